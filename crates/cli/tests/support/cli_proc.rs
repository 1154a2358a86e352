//! What the tests of `tether` run as real processes, in a tokio test, share: the command
//! without the settings of the test's own environment, a run bounded in time, its output as
//! text, a file's mode, a private file written. A test file takes what it needs of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

/// Generous: the processes run on a small, busy machine.
pub const LONG: Duration = Duration::from_secs(60);

/// `tether`, without the token, secret, CA, coordinator and config of the test's environment,
/// its stdin closed, killed when dropped.
pub fn tether() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
    for var in [
        "TETHER_TOKEN",
        "TETHER_TOKEN_FILE",
        "TETHER_SECRET",
        "TETHER_SECRET_FILE",
        "TETHER_SECRETS_DIR",
        "TETHER_CA_FILE",
        "TETHER_COORDINATOR",
        "TETHER_CONFIG",
    ] {
        c.env_remove(var);
    }
    c.stdin(Stdio::null()).kill_on_drop(true);
    c
}

/// Runs `cmd` to its end, within [`LONG`].
pub async fn run(cmd: &mut Command) -> Output {
    tokio::time::timeout(LONG, cmd.output())
        .await
        .expect("the command finishes")
        .expect("run tether")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The permission bits of `p`.
pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Writes `text` to `path`, readable by its user alone (as a token or secret file must be).
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}
