//! SIGHUP for the coordinator, the conventional "reload": the files its credentials come from
//! read again (API tokens, the fleet secret) and the TLS files looked at, without a restart
//! that would cost every worker its session.

use std::path::PathBuf;

use tether_coordinator::auth::{ApiTokens, Fleet};
use tether_coordinator::tls::TlsFiles;

/// What a coordinator reads again on SIGHUP.
pub(crate) struct Reload {
    pub tokens: Option<ApiTokens>,
    pub fleet: Option<Fleet>,
    /// Read at each registration already: nothing to reload, said so.
    pub secrets_dir: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
}

impl Reload {
    /// Reads the files again and logs one line: what was reloaded, and what was kept and why
    /// (at ERROR: a bad new token file keeps every token in use, a bad secret file the secret
    /// in use). Blocking: file reads.
    pub(crate) fn run(&self) {
        let mut done = Vec::new();
        let mut kept = Vec::new();
        if let Some(tokens) = self.tokens.as_ref().filter(|t| t.has_files()) {
            match tokens.reload() {
                Ok(r) => {
                    let (admin, read, metrics) = r.after;
                    let unchanged = if r.changed { "" } else { " (unchanged)" };
                    done.push(format!(
                        "API tokens: {admin} admin, {read} read, {metrics} metrics{unchanged}"
                    ));
                }
                Err(e) => kept.push(format!("{e}: every API token in use is kept")),
            }
        }
        if let Some(fleet) = &self.fleet
            && let Some(path) = fleet.file()
        {
            match fleet.reload() {
                Ok(true) => done.push(format!(
                    "fleet secret{}: changed, asked of the registrations from now on (sessions \
                     under way keep theirs)",
                    fleet.next_file().map_or("", |_| " and next secret")
                )),
                Ok(false) => done.push(format!(
                    "fleet secret{}: unchanged",
                    fleet.next_file().map_or("", |_| " and next secret")
                )),
                Err(e) => kept.push(format!(
                    "fleet secret file {} (or its next): {e}: the secrets in use are kept",
                    path.display()
                )),
            }
        }
        if let Some(dir) = &self.secrets_dir {
            done.push(format!(
                "worker secrets directory {}: read at each registration, nothing to reload",
                dir.display()
            ));
        }
        if let Some(tls) = &self.tls {
            tls.look_now();
            done.push(
                "TLS certificate and key: looked at (a change is logged as it is served or \
                 refused)"
                    .to_owned(),
            );
        }
        if done.is_empty() && kept.is_empty() {
            tracing::info!(
                "SIGHUP: nothing to reload (no API token file, fleet secret file or TLS files)"
            );
        } else if kept.is_empty() {
            tracing::info!(reloaded = %done.join("; "), "SIGHUP: files read again");
        } else {
            tracing::error!(reloaded = %done.join("; "), kept = %kept.join("; "), "SIGHUP: a file read again cannot serve; what was in use is kept");
        }
    }
}
