//! Command-line arguments of native mode.
//!
//! Parsed by hand: there are three flags, and the agent is a static binary that should stay
//! small. PID 1 never parses its arguments (the kernel passes init the unknown words of its own
//! command line), so this only serves host-side runs.

use std::ffi::OsString;
use std::fmt;
use std::num::ParseIntError;
use std::path::PathBuf;

use agent_protocol::CONTROL_PORT;
use thiserror::Error;

/// Usage text for `--help` and argument errors.
pub const USAGE: &str = "\
usage: berth-agent [--listen-unix <path> | --listen-vsock <port>]

PID 1 of the Berth guest. As PID 1 it ignores its arguments and serves vsock port 1024.
Run as any other process it serves the same control protocol without touching the system:
  --listen-unix <path>   serve on a unix socket at <path> (host tests)
  --listen-vsock <port>  serve on a vsock port (default: 1024)
  -h, --help             print this help
  -V, --version          print the version";

/// Where the control server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// AF_VSOCK, any CID, this port.
    Vsock {
        /// The vsock port.
        port: u32,
    },
    /// A unix socket at this path.
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { port } => write!(f, "vsock port {port}"),
            Self::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Serve the control protocol.
    Serve(Listen),
    /// Print usage.
    Help,
    /// Print the version.
    Version,
}

/// Why the command line was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("bad vsock port {value:?}")]
    BadPort {
        value: String,
        #[source]
        source: ParseIntError,
    },
    #[error("give at most one --listen-* option")]
    TwoListeners,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, ArgsError> {
    let mut listen = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(OsString::from(value))),
            _ => (text.as_ref(), None),
        };
        let parsed = match flag {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "--listen-unix" => {
                let value = inline
                    .or_else(|| args.next())
                    .ok_or(ArgsError::MissingValue("--listen-unix"))?;
                Listen::Unix(PathBuf::from(value))
            }
            "--listen-vsock" => {
                let value = inline
                    .or_else(|| args.next())
                    .ok_or(ArgsError::MissingValue("--listen-vsock"))?;
                let value = value.to_string_lossy().into_owned();
                let port = value
                    .parse()
                    .map_err(|source| ArgsError::BadPort { value, source })?;
                Listen::Vsock { port }
            }
            _ => return Err(ArgsError::Unknown(text.into_owned())),
        };
        if listen.replace(parsed).is_some() {
            return Err(ArgsError::TwoListeners);
        }
    }
    Ok(Invocation::Serve(
        listen.unwrap_or(Listen::Vsock { port: CONTROL_PORT }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Invocation, ArgsError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn parse_no_arguments_serves_control_port_on_vsock() {
        assert_eq!(
            parse_strs(&[]),
            Ok(Invocation::Serve(Listen::Vsock { port: CONTROL_PORT }))
        );
    }

    #[test]
    fn parse_listen_unix_serves_that_path() {
        assert_eq!(
            parse_strs(&["--listen-unix", "/tmp/a.sock"]),
            Ok(Invocation::Serve(Listen::Unix("/tmp/a.sock".into())))
        );
    }

    #[test]
    fn parse_inline_value_is_accepted() {
        assert_eq!(
            parse_strs(&["--listen-vsock=2000"]),
            Ok(Invocation::Serve(Listen::Vsock { port: 2000 }))
        );
    }

    #[test]
    fn parse_missing_value_is_refused() {
        assert_eq!(
            parse_strs(&["--listen-unix"]),
            Err(ArgsError::MissingValue("--listen-unix"))
        );
    }

    #[test]
    fn parse_bad_port_is_refused() {
        assert!(matches!(
            parse_strs(&["--listen-vsock", "http"]),
            Err(ArgsError::BadPort { .. })
        ));
    }

    #[test]
    fn parse_unknown_argument_is_refused() {
        assert_eq!(
            parse_strs(&["--bogus"]),
            Err(ArgsError::Unknown("--bogus".into()))
        );
    }

    #[test]
    fn parse_two_listeners_is_refused() {
        assert_eq!(
            parse_strs(&["--listen-vsock", "1", "--listen-unix", "/x"]),
            Err(ArgsError::TwoListeners)
        );
    }
}
