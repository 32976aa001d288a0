//! The Docker Engine API of Berth.
