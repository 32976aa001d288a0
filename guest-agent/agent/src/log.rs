//! Console logging: one plain line per event, prefixed `berth-agent:`.
//!
//! PID 1's stderr is `/dev/console` (the serial port the host captures), and the console log is
//! what a human or a test reads when a guest misbehaves. No levels and no subscriber: the agent
//! logs rarely, and everything it logs matters. Writing never panics; a console that fails to
//! take a line has nowhere to report that anyway.

use std::error::Error;
use std::fmt;
use std::io::{self, Write};

/// Writes one `berth-agent:`-prefixed line to stderr, like `eprintln!` but never panicking.
macro_rules! console {
    ($($arg:tt)*) => {
        $crate::log::write_line(::std::format_args!($($arg)*))
    };
}
pub(crate) use console;

/// Writes `args` as one prefixed line to stderr. Use [`console!`] instead of calling this.
pub fn write_line(args: fmt::Arguments<'_>) {
    let mut stderr = io::stderr().lock();
    // Ignored: there is no other place to report that the console is broken.
    let _ = writeln!(stderr, "berth-agent: {args}");
}

/// Displays an error with its whole `source()` chain, `outer: inner: innermost`: the one place
/// the chain is flattened, at the edge where it is logged or sent to the host.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the thing")]
    struct Outer(#[source] io::Error);

    #[test]
    fn chain_nested_error_joins_every_cause() {
        let err = Outer(io::Error::new(io::ErrorKind::NotFound, "no such file"));

        assert_eq!(
            Chain(&err).to_string(),
            "cannot open the thing: no such file"
        );
    }
}
