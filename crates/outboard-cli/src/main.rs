//! `outboard`: the operator's and user's command line.
//!
//! | command | does |
//! |---|---|
//! | `attest ca create` | creates the operator root CA (`root-ca.key` 0600, `root-ca.pem`) |
//! | `attest host-key create` | creates a host attestation key and certificate signed by the root CA |
//! | `attest verify` | verifies a document: signature, chain to a root, nonce, policy; non-zero exit on failure |
//! | `attest measure` | predicts a launch's PCRs from its files, for writing a policy before launching |
//! | `attest policy` | writes a policy approving the PCRs of one or more documents |
//! | `attest bench` | times phase 1 (measure + sign); prints a `RESULT attest` line |

mod attest;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "outboard", about = "Outboard command line", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attestation: keys, verification, expected measurements, policies.
    Attest {
        #[command(subcommand)]
        command: attest::Command,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Attest { command } => attest::run(command),
    }
}
