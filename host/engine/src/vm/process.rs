//! The host processes that make up a VM, whether this process started them or found them in a
//! state file written by another.
//!
//! A process we spawned is watched through its `Child` (so it is reaped and never lingers as a
//! zombie). A process found in a state file is watched by pid, and only while
//! `/proc/<pid>/cmdline` still mentions the VM's state directory: a recycled pid belonging to
//! something else is never signalled.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::debug;

/// How long a killed process may take to disappear before we stop waiting for it.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// One host process of a VM.
#[derive(Debug)]
pub struct VmProcess {
    role: String,
    pid: i32,
    /// Present when this process spawned it.
    child: Option<Child>,
    /// A string its command line contains, proving a pid from a state file is still ours.
    marker: String,
    /// Recorded once the process is known to be gone.
    exited: Option<String>,
}

impl VmProcess {
    /// Wraps a process this process spawned.
    pub fn spawned(role: impl Into<String>, child: Child, marker: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            pid: i32::try_from(child.id()).unwrap_or(i32::MAX),
            child: Some(child),
            marker: marker.into(),
            exited: None,
        }
    }

    /// Wraps a process recorded by another process.
    pub fn adopt(role: String, pid: i32, marker: String) -> Self {
        Self {
            role,
            pid,
            child: None,
            marker,
            exited: None,
        }
    }

    /// What the process is (`qemu`, `berth-vsock`).
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `None` while it runs; how it ended once it has.
    pub fn exit_status(&mut self) -> Option<String> {
        if self.exited.is_some() {
            return self.exited.clone();
        }
        let status = match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(describe_status(status)),
                Ok(None) => None,
                Err(e) => Some(format!("cannot be waited for ({e})")),
            },
            None => (!self.adopted_alive()).then(|| "exited".to_string()),
        };
        self.exited.clone_from(&status);
        status
    }

    /// Sends SIGKILL (if it still runs) and waits until it is gone and reaped.
    pub fn kill_and_reap(&mut self) {
        if self.exit_status().is_some() {
            return;
        }
        match &mut self.child {
            Some(child) => {
                if let Err(e) = child.kill() {
                    debug!(role = %self.role, error = %e, "kill");
                }
                match child.wait() {
                    Ok(status) => self.exited = Some(describe_status(status)),
                    Err(e) => self.exited = Some(format!("cannot be waited for ({e})")),
                }
            }
            None => {
                if let Err(e) = kill(Pid::from_raw(self.pid), Signal::SIGKILL) {
                    debug!(role = %self.role, error = %e, "kill");
                }
                let deadline = Instant::now() + KILL_WAIT;
                while self.adopted_alive() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(10));
                }
                self.exited = Some("killed".into());
            }
        }
    }

    /// Whether the adopted pid is still a live process of this VM.
    fn adopted_alive(&self) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{}/cmdline", self.pid)) else {
            return false;
        };
        if !String::from_utf8_lossy(&cmdline).contains(&self.marker) {
            return false;
        }
        // A zombie has exited; its parent (not us) has yet to reap it.
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        process_state(&stat).is_some_and(|state| state != 'Z' && state != 'X')
    }
}

/// The state letter of a `/proc/<pid>/stat` line (the field after the parenthesised name, which
/// may itself contain spaces and parentheses).
fn process_state(stat: &str) -> Option<char> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.trim_start().chars().next()
}

/// "exited with status 1", "killed by signal 9 (SIGKILL)".
pub fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(signal) => {
            let name = Signal::try_from(signal).map_or("unknown", Signal::as_str);
            format!("was killed by signal {signal} ({name})")
        }
        None => "ended in an unknown way".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn process_state_name_with_parens_reads_state_after_name() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1";

        assert_eq!(process_state(stat), Some('S'));
    }

    #[test]
    fn describe_status_sigkill_names_signal() {
        let status = ExitStatus::from_raw(9);

        assert_eq!(describe_status(status), "was killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn describe_status_exit_code_is_reported() {
        let status = ExitStatus::from_raw(3 << 8);

        assert_eq!(describe_status(status), "exited with status 3");
    }

    #[test]
    fn kill_and_reap_spawned_child_leaves_no_process() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let mut process = VmProcess::spawned("sleep", child, "30");

        process.kill_and_reap();

        assert!(process.exit_status().is_some());
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn exit_status_adopted_pid_of_other_program_is_exited() {
        // Our own pid is alive but its command line lacks the marker: not the VM's process.
        let mut process = VmProcess::adopt(
            "qemu".into(),
            std::process::id() as i32,
            "/no/such/state-dir".into(),
        );

        assert!(process.exit_status().is_some());
    }
}
