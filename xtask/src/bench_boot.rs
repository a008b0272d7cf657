//! stub
use anyhow::Result;
pub fn run(_args: &[&str]) -> Result<()> { Ok(()) }
