//! The guest's wall clock, set from the host's at every handshake.
//!
//! A micro-VM has no battery-backed clock worth trusting: it boots at the epoch or at whatever
//! the emulated RTC says, and drifts after a host suspend. The host sends its time in
//! [`agent_protocol::Hello`]; PID 1 adopts it so TLS, file times and logs make sense.

use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};
use thiserror::Error;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Why the clock was not set.
#[derive(Debug, Error)]
pub enum ClockError {
    #[error("host time of {0} ns since the epoch is out of range")]
    OutOfRange(u128),
    #[error("clock_settime(CLOCK_REALTIME) failed")]
    Set(#[source] nix::Error),
}

/// Converts nanoseconds since the Unix epoch to a `timespec`.
pub fn timespec_from_unix_nanos(nanos: u128) -> Result<TimeSpec, ClockError> {
    let secs = i64::try_from(nanos / NANOS_PER_SEC).map_err(|_| ClockError::OutOfRange(nanos))?;
    let subsec = i64::try_from(nanos % NANOS_PER_SEC).map_err(|_| ClockError::OutOfRange(nanos))?;
    Ok(TimeSpec::new(secs, subsec))
}

/// Sets `CLOCK_REALTIME` to `nanos` since the Unix epoch. Only PID 1 may call this: on a host it
/// would change the host's clock.
pub fn set_realtime(nanos: u128) -> Result<(), ClockError> {
    let time = timespec_from_unix_nanos(nanos)?;
    clock_settime(ClockId::CLOCK_REALTIME, time).map_err(ClockError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespec_from_unix_nanos_splits_seconds_and_nanoseconds() {
        let time = timespec_from_unix_nanos(1_700_000_000_123_456_789).unwrap();

        assert_eq!(
            (time.tv_sec(), time.tv_nsec()),
            (1_700_000_000, 123_456_789)
        );
    }

    #[test]
    fn timespec_from_unix_nanos_beyond_i64_seconds_is_out_of_range() {
        let err = timespec_from_unix_nanos(u128::MAX).unwrap_err();

        assert!(matches!(err, ClockError::OutOfRange(_)));
    }
}
