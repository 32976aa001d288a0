//! berth: the Berth command-line tool.
fn main() {}
