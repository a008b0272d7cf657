//! outboard-boot (stub)
