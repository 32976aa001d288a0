//! berthd.

fn main() {}
