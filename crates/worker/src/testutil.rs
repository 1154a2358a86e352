//! What the crate's unit tests that run real processes share.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a test waits for a process to do what it should.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until `cond` holds, failing the test after [`PATIENCE`].
pub(crate) async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs a process the test started outside any `Child` (one that left its task's group, an
/// orphan) when dropped: a failed assertion does not leave it running.
pub(crate) struct KillOnDrop(pub(crate) u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Gone, or a zombie waiting for a reaper that is not us: either way it runs no more.
pub(crate) fn is_dead(pid: u32) -> bool {
    crate::executor::procs::Stat::read(pid).is_none_or(|s| s.is_dead())
}

/// Runs the ignored test `test` of this test binary alone, in a process of its own with `env`
/// added (a property of the whole process: its environment, being a subreaper), and asserts
/// it ran and passed.
pub(crate) fn pass_alone(test: &str, env: &[(&str, &std::ffi::OsStr)]) {
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().copied())
        .output()
        .expect("run the test binary");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the test did not run: {text}");
}
