//! outboard-api-types (stub)
