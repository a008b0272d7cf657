//! `cargo xtask fuzz [--seconds N] [TARGET…]`: runs every cargo-fuzz target of the workspace
//! (each crate's `fuzz/fuzz_targets/*.rs`, and the test guest's parser) for N seconds each
//! (default 60), one after the other, and stops at the first crash, whose input libFuzzer
//! leaves in that crate's `fuzz/artifacts/`. Needs a nightly toolchain and cargo-fuzz; says so
//! and fails when either is missing. Last line: `FUZZ targets=<n> seconds=<n> runs=<total>
//! crashes=<n>`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util;

/// A fuzz target: the directory holding `fuzz/` and the target's name.
struct Target {
    dir: PathBuf,
    name: String,
}

fn targets(root: &Path) -> Result<Vec<Target>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.push(root.join("guest/testguest/parse"));
    dirs.sort();
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir.join("fuzz/fuzz_targets")) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".rs").map(str::to_owned)
            })
            .collect();
        names.sort();
        found.extend(names.into_iter().map(|name| Target {
            dir: dir.clone(),
            name,
        }));
    }
    Ok(found)
}

pub fn run(args: &[&str]) -> Result<()> {
    let mut seconds = 60u64;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--seconds" => {
                seconds = it
                    .next()
                    .context("--seconds needs a value")?
                    .parse()
                    .context("--seconds needs a number")?
            }
            other if other.starts_with('-') => bail!("Unknown option {other}; known: --seconds N"),
            name => only.push(name.to_owned()),
        }
    }
    let ok = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!("cargo fuzz needs a nightly toolchain and cargo-fuzz (rustup toolchain install nightly; cargo install cargo-fuzz)");
    }
    let root = util::workspace_root();
    let mut all = targets(&root)?;
    if !only.is_empty() {
        all.retain(|t| only.contains(&t.name));
        if all.is_empty() {
            bail!("No fuzz target named {only:?}");
        }
    }
    let target_dir = util::cargo_target_dir().join("fuzz");
    let (mut total_runs, mut crashes) = (0u64, 0usize);
    for t in &all {
        let crate_name = t.dir.file_name().unwrap_or_default().to_string_lossy();
        println!("xtask fuzz: {crate_name}/{} for {seconds} s", t.name);
        let out = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", &t.name, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=4096")
            .current_dir(&t.dir)
            .env("CARGO_TARGET_DIR", &target_dir)
            .output()
            .with_context(|| format!("Cannot run cargo fuzz for {}", t.name))?;
        let log = String::from_utf8_lossy(&out.stderr);
        // libFuzzer's last line: "Done N runs in S second(s)".
        let runs = log.lines().rev().find_map(|l| {
            l.strip_prefix("Done ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        });
        match (out.status.success(), runs) {
            (true, Some(runs)) => {
                println!("xtask fuzz: {crate_name}/{}: {runs} runs, no crash", t.name);
                total_runs += runs;
            }
            _ => {
                crashes += 1;
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!(
                    "xtask fuzz: {crate_name}/{} FAILED:\n{}",
                    t.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
                break;
            }
        }
    }
    println!(
        "FUZZ targets={} seconds={seconds} runs={total_runs} crashes={crashes}",
        all.len()
    );
    if crashes > 0 {
        bail!("A fuzz target failed");
    }
    Ok(())
}
