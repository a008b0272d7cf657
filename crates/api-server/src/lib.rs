//! outboard-api-server (stub)
