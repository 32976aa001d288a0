//! berth-agent: PID 1 of the Berth guest.
fn main() {}
