//! How a VM ended, and the process exit code that says so.

use crate::vcpu::GuestStop;

/// The guest shut down or rebooted on its own, cleanly.
pub const EXIT_GUEST_STOPPED: i32 = 0;
/// The VMM could not set up or run the VM (bad config, missing kernel, no KVM).
pub const EXIT_VMM_ERROR: i32 = 1;
/// The guest kernel panicked (for Berth: usually the agent, PID 1, died).
pub const EXIT_GUEST_PANIC: i32 = 3;
/// KVM failed while running the guest (emulation failure, failed VM entry).
pub const EXIT_INTERNAL_ERROR: i32 = 4;
/// Added to the signal number when the VMM was signalled, as shells do.
pub const EXIT_SIGNAL_BASE: i32 = 128;

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest asked to stop.
    GuestStopped(GuestStop),
    /// The guest kernel panicked, then reset.
    GuestPanicked,
    /// The VMM got this signal.
    Signalled(i32),
    /// A vCPU failed.
    InternalError(String),
}

impl VmOutcome {
    /// The outcome of a guest stop, given whether the console showed a kernel panic.
    pub fn from_stop(stop: GuestStop, panicked: bool) -> Self {
        if panicked || stop == GuestStop::Crash {
            Self::GuestPanicked
        } else {
            Self::GuestStopped(stop)
        }
    }

    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::GuestStopped(_) => EXIT_GUEST_STOPPED,
            Self::GuestPanicked => EXIT_GUEST_PANIC,
            Self::Signalled(signal) => EXIT_SIGNAL_BASE + signal,
            Self::InternalError(_) => EXIT_INTERNAL_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_stop_reset_without_panic_is_clean() {
        let outcome = VmOutcome::from_stop(GuestStop::Reset, false);

        assert_eq!(outcome.exit_code(), EXIT_GUEST_STOPPED);
    }

    #[test]
    fn from_stop_reset_after_panic_is_panic() {
        let outcome = VmOutcome::from_stop(GuestStop::Reset, true);

        assert_eq!(outcome, VmOutcome::GuestPanicked);
        assert_eq!(outcome.exit_code(), EXIT_GUEST_PANIC);
    }

    #[test]
    fn from_stop_crash_event_is_panic() {
        assert_eq!(
            VmOutcome::from_stop(GuestStop::Crash, false),
            VmOutcome::GuestPanicked
        );
    }

    #[test]
    fn signalled_sigterm_exits_143() {
        assert_eq!(VmOutcome::Signalled(libc::SIGTERM).exit_code(), 143);
    }
}
