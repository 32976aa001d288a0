//! `berth-agent`: PID 1 of the Berth guest, or a native control server for tier-1 tests.
//!
//! All the work lives in the library so it can be unit-tested; `main` only hands over.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Before anything else: when the container library re-executes this binary to set a
    // container up, this runs that setup in the fresh single-threaded process and exits.
    berth_container::run_init_if_requested();
    berth_agent::run()
}
