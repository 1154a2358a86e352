//! The client commands against a coordinator that needs API tokens: a refusal of the token
//! (none sent, one it does not know, a read-only one on a command) tells a CLI user how to give
//! one, a token file in the coordinator's own format (comments, one token a line) serves the
//! client when it holds one token, and what is a token is one rule on both sides.

use std::path::Path;

use tether_coordinator::auth::{ApiTokens, Scope};
use tether_testkit::*;

#[path = "support/cli_proc.rs"]
mod cli_proc;
use cli_proc::{run, write_private};

/// `tether args...` against the coordinator at `http`, without any token or coordinator from
/// the environment; its output, once it exited (within [`cli_proc::LONG`]).
async fn tether(http: &str, args: &[&str], token_file: Option<&Path>) -> std::process::Output {
    let mut c = cli_proc::tether();
    c.args(args).args(["--coordinator", http]);
    if let Some(f) = token_file {
        c.arg("--token-file").arg(f);
    }
    run(&mut c).await
}

fn stderr(out: &std::process::Output) -> String {
    cli_proc::text(&out.stderr)
}

#[tokio::test]
async fn a_refused_token_is_told_how_to_give_one_and_a_commented_token_file_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("files");
    let admin = files.path().join("admin.tokens");
    let read = files.path().join("read.tokens");
    // The coordinator's rotation format: a comment, then two tokens.
    write_private(
        &admin,
        "# admin tokens: the new one first, the old until Friday\nadmin-token-new-of-the-test\nadmin-token-old-of-the-test\n",
    );
    write_private(&read, "read-token-of-the-client-test\n");
    let mut tokens = ApiTokens::default();
    tokens.add_file(&admin, Scope::Admin).expect("admin tokens");
    tokens.add_file(&read, Scope::Read).expect("read tokens");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.api_tokens = Some(tokens);
    let c = spawn_coordinator_with(cfg, None).await;
    let http = format!("http://{}", c.addr);

    // No token: the coordinator's words, and how to give a token.
    for args in [&["tasks"][..], &["watch", "no-such-task"]] {
        let out = tether(&http, args, None).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("bearer token")
                && err.contains("(HTTP 401)")
                && err.contains("--token-file FILE (or TETHER_TOKEN_FILE=FILE)")
                && err.contains("TETHER_TOKEN"),
            "{args:?}: {err}"
        );
    }

    // A token the coordinator does not know.
    let wrong = files.path().join("wrong.token");
    write_private(&wrong, "not-a-token-of-this-coordinator\n");
    let out = tether(&http, &["tasks"], Some(&wrong)).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("unknown token") && err.contains("is not one this coordinator accepts"),
        "{err}"
    );

    // A read-only token on a command: said to be one, not told to give a token.
    let out = tether(&http, &["cancel", "no-such-task"], Some(&read)).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("admin scope") && err.contains("may only read") && err.contains("(HTTP 403)"),
        "{err}"
    );

    // The coordinator's file of two tokens: refused, saying so.
    let out = tether(&http, &["tasks"], Some(&admin)).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("holds 2 tokens (lines 2, 3); a client sends one"),
        "{err}"
    );
    // One token under a comment: sent, and the listing read.
    let one = files.path().join("one.token");
    write_private(&one, "# the admin token\n\nadmin-token-new-of-the-test\n");
    let out = tether(&http, &["tasks", "--json"], Some(&one)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(listed.is_array() || listed["tasks"].is_array(), "{listed}");
    c.stop().await;
}

/// A token the coordinator takes from its token file (here with spaces inside, one of a
/// rotation) is one the client sends, from a file or from `TETHER_TOKEN`, and it is served; a
/// line the coordinator would refuse (too short) the client refuses too, in the same words,
/// before any request: no refusal of a token reaches the coordinator. The client used to
/// refuse a token with a space that the coordinator took.
#[tokio::test]
async fn a_token_with_spaces_the_coordinator_takes_the_client_sends_and_a_short_one_neither_takes()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("files");
    let spaced = "an admin token with spaces inside";
    let admin = files.path().join("admin.tokens");
    write_private(
        &admin,
        &format!("# rotation: the new one first\n{spaced}\nadmin-token-old-of-the-test\n"),
    );
    let mut tokens = ApiTokens::default();
    assert_eq!(tokens.add_file(&admin, Scope::Admin).expect("taken"), 2);
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.api_tokens = Some(tokens);
    let c = spawn_coordinator_with(cfg, None).await;
    let http = format!("http://{}", c.addr);

    let one = files.path().join("one.token");
    write_private(&one, &format!("# the admin token\n{spaced}\n"));
    let out = tether(&http, &["tasks", "--json"], Some(&one)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(listed.is_array() || listed["tasks"].is_array(), "{listed}");
    // The same token in TETHER_TOKEN.
    let out = run(cli_proc::tether()
        .args(["tasks", "--json", "--coordinator", &http])
        .env("TETHER_TOKEN", spaced))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Both a token file and TETHER_TOKEN: the file's token is sent, and the client says the
    // variable was passed over (a token that is not the one meant is no silent guess).
    let out = run(cli_proc::tether()
        .args(["tasks", "--json", "--coordinator", &http, "--token-file"])
        .arg(&one)
        .env("TETHER_TOKEN", "a token the coordinator does not know"))
    .await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("TETHER_TOKEN is passed over"), "{err}");

    // A line the coordinator refuses at start, refused by the client in the same words.
    let short = files.path().join("short.token");
    write_private(&short, "short-token\n");
    let said = ApiTokens::default()
        .add_file(&short, Scope::Admin)
        .expect_err("refused by the coordinator")
        .to_string();
    assert_eq!(
        said,
        "the token on line 1 is not usable: 11 bytes, at least 16 are required"
    );
    let out = tether(&http, &["tasks"], Some(&short)).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "the API token on line 1 of the token file {} is not usable: 11 bytes, at least 16 \
             are required",
            short.display()
        )),
        "{err}"
    );
    let refused = c
        .handles
        .counters
        .api_auth_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused, 0, "a token was refused by the coordinator");
    c.stop().await;
}
