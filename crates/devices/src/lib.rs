//! outboard-devices (stub)
