//! outboard-vmm core (stub)
