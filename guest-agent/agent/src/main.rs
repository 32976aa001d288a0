//! `berth-agent`: PID 1 of the Berth guest, or a native control server for tier-1 tests.
//!
//! All the work lives in the library so it can be unit-tested; `main` only hands over.

use std::process::ExitCode;

fn main() -> ExitCode {
    berth_agent::run()
}
