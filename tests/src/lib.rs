//! Fixtures shared by Berth's end-to-end scenarios.
