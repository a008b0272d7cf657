//! outboard-guest-harness (stub)
