//! outboard-hypervisor (stub)
