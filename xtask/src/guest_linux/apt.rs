//! The Debian tools the image builder drives: `apt-cache` to resolve packages and their
//! candidate versions, `apt-get download` to fetch `.deb` files without installing them,
//! `dpkg-deb -x` to unpack them and `depmod` for the kernel's module index.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A package pinned to the version apt would download now.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// Finds a tool in PATH or in the sbin directories a non-login root shell may lack.
pub fn tool(name: &str, debian_package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is missing (Debian package {debian_package}): the Linux guest image is built with Debian's tools on a Debian host")
}

fn run(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .output()
        .with_context(|| format!("Cannot run {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// The candidate version of each package that has one; packages apt doesn't know are absent.
pub fn candidates(names: &[String]) -> Result<BTreeMap<String, String>> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    let output = run(Command::new(tool("apt-cache", "apt")?)
        .arg("policy")
        .args(names))?;
    Ok(parse_policy(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_policy(text: &str) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            current = Some(line.trim_end_matches(':').to_string());
        } else if let (Some(name), Some(version)) =
            (&current, line.trim().strip_prefix("Candidate: "))
        {
            if version != "(none)" {
                versions.insert(name.clone(), version.to_string());
            }
        }
    }
    versions
}

/// Resolves names to pinned packages, running `apt-get update` once (as root) where apt knows
/// none of them yet, as on a fresh machine.
pub fn resolve(names: &[String]) -> Result<Vec<Package>> {
    let mut found = candidates(names)?;
    if found.len() < names.len() && is_root() {
        println!(
            "xtask guest: package lists lack {:?}: running apt-get update",
            missing(names, &found)
        );
        run(Command::new(tool("apt-get", "apt")?).args(["update", "-q"]))?;
        found = candidates(names)?;
    }
    let lacking = missing(names, &found);
    if !lacking.is_empty() {
        bail!("Debian packages {lacking:?} have no installable version (is the host Debian 12 with its main repository, and has `apt-get update` run?)");
    }
    Ok(found
        .into_iter()
        .map(|(name, version)| Package { name, version })
        .collect())
}

fn missing(names: &[String], found: &BTreeMap<String, String>) -> Vec<String> {
    names
        .iter()
        .filter(|n| !found.contains_key(*n))
        .cloned()
        .collect()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// For each package, the names in `Depends`/`Pre-Depends` of its candidate version (all
/// alternatives, no virtual packages, architecture qualifiers dropped). One `apt-cache` run for
/// all, since each run spends most of its time loading the package cache.
pub fn depends(names: &[String]) -> Result<BTreeMap<String, Vec<String>>> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    let output = run(Command::new(tool("apt-cache", "apt")?)
        .args([
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(names))?;
    Ok(parse_depends(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_depends(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut packages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            current = Some(line.trim().to_string());
            packages.entry(line.trim().to_string()).or_default();
            continue;
        }
        let line = line.trim().trim_start_matches('|');
        let dep = line
            .strip_prefix("Depends: ")
            .or_else(|| line.strip_prefix("PreDepends: "));
        if let (Some(dep), Some(package)) = (dep, &current) {
            if !dep.starts_with('<') {
                let name = dep.split(':').next().unwrap_or(dep).to_string();
                let names = packages.entry(package.clone()).or_default();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    packages
}

/// The file `apt-get download` names a package's `.deb`.
fn deb_file(dir: &Path, package: &Package) -> Option<PathBuf> {
    let prefix = format!("{}_{}_", package.name, package.version.replace(':', "%3a"));
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// Downloads the packages not yet in `dir`; returns each package's `.deb`.
pub fn download(dir: &Path, packages: &[Package]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let absent: Vec<String> = packages
        .iter()
        .filter(|p| deb_file(dir, p).is_none())
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    if !absent.is_empty() {
        println!("xtask guest: downloading {}", absent.join(" "));
        run(Command::new(tool("apt-get", "apt")?)
            .arg("download")
            .args(&absent)
            .current_dir(dir))
        .context("Cannot download the guest's Debian packages")?;
    }
    packages
        .iter()
        .map(|p| {
            deb_file(dir, p)
                .with_context(|| format!("apt-get download left no .deb for {}", p.name))
        })
        .collect()
}

/// Unpacks a `.deb` into `dir` (once: a marker records a complete extraction).
pub fn extract(deb: &Path, dir: &Path) -> Result<()> {
    let done = dir.join(".outboard-extracted");
    if done.exists() {
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("Cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    run(Command::new(tool("dpkg-deb", "dpkg")?)
        .arg("-x")
        .arg(deb)
        .arg(dir))?;
    std::fs::write(&done, b"").with_context(|| format!("Cannot write {}", done.display()))
}

/// Writes `modules.dep` for the kernel unpacked under `root` (the package ships none).
pub fn depmod(root: &Path, kernel_release: &str) -> Result<()> {
    run(Command::new(tool("depmod", "kmod")?)
        .arg("-b")
        .arg(root)
        .arg(kernel_release))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policy_candidates() {
        let text =
            "fio:\n  Installed: 3.33-3\n  Candidate: 3.33-3\n  Version table:\n *** 3.33-3 500\n\
                    ghost:\n  Installed: (none)\n  Candidate: (none)\n\
                    busybox-static:\n  Installed: (none)\n  Candidate: 1:1.35.0-4\n";
        let versions = parse_policy(text);
        assert_eq!(versions.len(), 2);
        assert_eq!(versions["fio"], "3.33-3");
        assert_eq!(versions["busybox-static"], "1:1.35.0-4");
    }

    #[test]
    fn parses_depends_with_alternatives_and_virtuals() {
        let text = "fio\n  Depends: libaio1\n |Depends: libc6\n  Depends: libc6.1\n  \
                    PreDepends: zlib1g\n  Depends: python3:any\n  Depends: <libfoo-abi>\n    libfoo1\n\
                    libc6\n  Depends: libgcc-s1\nbusybox-static\n";
        let deps = parse_depends(text);
        assert_eq!(
            deps["fio"],
            ["libaio1", "libc6", "libc6.1", "zlib1g", "python3"]
        );
        assert_eq!(deps["libc6"], ["libgcc-s1"]);
        assert!(deps["busybox-static"].is_empty());
    }
}
