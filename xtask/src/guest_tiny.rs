//! `cargo xtask guest --tiny-kernel`: builds `target/guest/tiny-vmlinux`, a small Linux kernel
//! whose ring-0 code PVM's emulator can run (see shared/research/pvm.md), from Debian's
//! `linux-source-6.1` package.
//!
//! Recipe: `make tinyconfig`, then the options of `guest/tiny-kernel/config` through
//! `scripts/config` and `make olddefconfig` (every option is checked afterwards, so one that
//! Kconfig silently dropped is an error), two source edits that remove instructions PVM cannot
//! emulate ([`PATCHES`]), and `make vmlinux`. The result is an uncompressed ELF vmlinux whose
//! `e_entry` is `startup_64`'s physical address, which outboard-vmm enters in long mode.
//!
//! ```text
//! inputs (package version, config fragment, patches, this file) ──hash──► stamp
//!   stamp == target/guest/tiny-kernel.stamp and image present ─► nothing to do
//!   stamp == tree's .outboard-stamp (interrupted build) ─────────► make resumes in that tree
//!   otherwise ─► fresh tree: extract ─► patch ─► configure ─► make ─► copy ─► write stamp
//! ```

use crate::{setup, util};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The top directory the tarball unpacks to.
const SOURCE_DIR: &str = "linux-source-6.1";
/// Marks a tree that was extracted, patched and configured for the inputs it holds.
const TREE_STAMP: &str = ".outboard-stamp";
const BUILDER_SOURCE: &str = include_str!("guest_tiny.rs");
/// How often a running `make` reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// A text edit of one source file: `find` must occur exactly once.
struct Patch {
    file: &'static str,
    why: &'static str,
    find: &'static str,
    replace: &'static str,
}

/// Instructions PVM's emulator ends the VM on (KVM_EXIT_INTERNAL_ERROR), taken out at the source.
const PATCHES: &[Patch] = &[
    Patch {
        file: "arch/x86/kernel/alternative.c",
        why: "the int3 self-test (PVM cannot emulate int3)",
        find: "\tint3_selftest();\n",
        replace: "\t/* outboard: no int3_selftest(): PVM cannot emulate int3 */\n",
    },
    Patch {
        file: "arch/x86/kernel/fpu/core.c",
        why: "the fwait in fpu__drop (PVM cannot emulate fwait)",
        find: "\t\tasm volatile(\"1: fwait\\n\"\n\t\t\t     \"2:\\n\"\n\t\t\t     _ASM_EXTABLE(1b, 2b));\n",
        replace: "\t\t/* outboard: no fwait here: PVM cannot emulate it */\n",
    },
];

/// One line of the config fragment: `NAME=y` or `NAME=n`.
#[derive(Debug, PartialEq, Eq)]
struct ConfigOption {
    name: String,
    enable: bool,
}

pub fn build() -> Result<()> {
    let started = Instant::now();
    setup::tiny_kernel_deps()?;
    let root = util::workspace_root();
    let out = root.join("target/guest");
    let image = out.join("tiny-vmlinux");
    let stamp_path = out.join("tiny-kernel.stamp");
    let fragment_path = root.join("guest/tiny-kernel/config");
    let fragment = std::fs::read_to_string(&fragment_path)
        .with_context(|| format!("Cannot read {}", fragment_path.display()))?;
    let options = parse_fragment(&fragment)
        .with_context(|| format!("Bad config fragment {}", fragment_path.display()))?;
    let version = package_version()?;
    let stamp = stamp(&version, &fragment);
    let previous = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    if image.is_file() && previous == stamp {
        println!(
            "xtask guest: tiny kernel up to date ({}, {SOURCE_PACKAGE} {version})",
            image.display()
        );
        return Ok(());
    }

    let work = out.join("cache/tiny-kernel");
    let tree = work.join(SOURCE_DIR);
    let tree_stamp = tree.join(TREE_STAMP);
    if std::fs::read_to_string(&tree_stamp).unwrap_or_default() == stamp {
        println!(
            "xtask guest: tiny kernel: resuming the build in {}",
            tree.display()
        );
    } else {
        prepare_tree(&work, &tree, &options)?;
        std::fs::write(&tree_stamp, &stamp)
            .with_context(|| format!("Cannot write {}", tree_stamp.display()))?;
    }

    make_vmlinux(&tree, &work.join("build.log"))?;
    std::fs::create_dir_all(&out).with_context(|| format!("Cannot create {}", out.display()))?;
    std::fs::copy(tree.join("vmlinux"), &image)
        .with_context(|| format!("Cannot copy vmlinux to {}", image.display()))?;
    std::fs::write(&stamp_path, &stamp)
        .with_context(|| format!("Cannot write {}", stamp_path.display()))?;
    let size = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    println!(
        "xtask guest: tiny kernel built in {:.0?}: {} ({:.1} MiB, {SOURCE_PACKAGE} {version})",
        started.elapsed(),
        image.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Extracts a fresh tree, applies [`PATCHES`] and configures it.
fn prepare_tree(work: &Path, tree: &Path, options: &[ConfigOption]) -> Result<()> {
    if tree.exists() {
        std::fs::remove_dir_all(tree)
            .with_context(|| format!("Cannot remove the old tree {}", tree.display()))?;
    }
    std::fs::create_dir_all(work).with_context(|| format!("Cannot create {}", work.display()))?;
    println!("xtask guest: tiny kernel: extracting {SOURCE_TARBALL}");
    run(Command::new("tar")
        .arg("-xf")
        .arg(SOURCE_TARBALL)
        .arg("-C")
        .arg(work))?;
    if !tree.join("Makefile").is_file() {
        bail!(
            "{SOURCE_TARBALL} did not unpack to {}: did {SOURCE_PACKAGE}'s layout change?",
            tree.display()
        );
    }
    for patch in PATCHES {
        apply_patch(tree, patch)?;
    }
    println!("xtask guest: tiny kernel: configuring (tinyconfig + guest/tiny-kernel/config)");
    run(make(tree).arg("tinyconfig"))?;
    // Twice: an option whose dependency is enabled in the same round is only offered afterwards.
    for _ in 0..2 {
        let mut config = Command::new(tree.join("scripts/config"));
        config.current_dir(tree).arg("--file").arg(".config");
        for option in options {
            let verb = if option.enable {
                "--enable"
            } else {
                "--disable"
            };
            config.arg(verb).arg(&option.name);
        }
        run(&mut config)?;
        run(make(tree).arg("olddefconfig"))?;
    }
    let config_path = tree.join(".config");
    let config = std::fs::read_to_string(&config_path)
        .with_context(|| format!("Cannot read {}", config_path.display()))?;
    let dropped = check_config(&config, options);
    if !dropped.is_empty() {
        bail!(
            "Kconfig did not keep {} of guest/tiny-kernel/config (unmet dependency or renamed \
             option?); see {}",
            dropped.join(", "),
            config_path.display()
        );
    }
    Ok(())
}

fn apply_patch(tree: &Path, patch: &Patch) -> Result<()> {
    let path = tree.join(patch.file);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("Cannot read {}", path.display()))?;
    let patched = patch_text(&text, patch.find, patch.replace).with_context(|| {
        format!(
            "Cannot remove {} from {}: did {SOURCE_PACKAGE} change?",
            patch.why, patch.file
        )
    })?;
    std::fs::write(&path, patched).with_context(|| format!("Cannot write {}", path.display()))?;
    println!("xtask guest: tiny kernel: patched out {}", patch.why);
    Ok(())
}

/// Replaces the one occurrence of `find` in `text`.
fn patch_text(text: &str, find: &str, replace: &str) -> Result<String> {
    match text.matches(find).count() {
        1 => Ok(text.replacen(find, replace, 1)),
        0 => bail!("Pattern not found: {find:?}"),
        n => bail!("Pattern found {n} times, expected once: {find:?}"),
    }
}

/// Runs `make vmlinux` with its output in `log`, printing a progress line now and then.
fn make_vmlinux(tree: &Path, log: &Path) -> Result<()> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "xtask guest: tiny kernel: make -j{jobs} vmlinux (several minutes; log: {})",
        log.display()
    );
    let log_file =
        std::fs::File::create(log).with_context(|| format!("Cannot create {}", log.display()))?;
    let started = Instant::now();
    let mut child = make(tree)
        .arg(format!("-j{jobs}"))
        .arg("vmlinux")
        .stdout(
            log_file
                .try_clone()
                .context("Cannot duplicate the log file")?,
        )
        .stderr(log_file)
        .spawn()
        .context("Cannot run make")?;
    let mut next_report = started + PROGRESS_EVERY;
    let status = loop {
        if let Some(status) = child.try_wait().context("Cannot wait for make")? {
            break status;
        }
        if Instant::now() >= next_report {
            let compiled = std::fs::read_to_string(log)
                .map(|s| {
                    s.lines()
                        .filter(|l| l.trim_start().starts_with("CC"))
                        .count()
                })
                .unwrap_or(0);
            println!(
                "xtask guest: tiny kernel: still building ({:.0?}, {compiled} files compiled)",
                started.elapsed()
            );
            next_report += PROGRESS_EVERY;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        bail!(
            "make vmlinux failed with {status}; last lines of {}:\n{tail}",
            log.display()
        );
    }
    println!(
        "xtask guest: tiny kernel: make finished in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

fn make(tree: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(tree);
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("Cannot run {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The installed version of the source package.
fn package_version() -> Result<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", SOURCE_PACKAGE])
        .output()
        .context("Cannot run dpkg-query")?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || version.is_empty() || !Path::new(SOURCE_TARBALL).is_file() {
        bail!("{SOURCE_PACKAGE} is not installed: run `apt-get install -y {SOURCE_PACKAGE}`");
    }
    Ok(version)
}

/// Everything the image depends on, hashed.
fn stamp(version: &str, fragment: &str) -> String {
    let mut hash = Sha256::new();
    for part in [SOURCE_PACKAGE, version, fragment, BUILDER_SOURCE] {
        hash.update(part.len().to_le_bytes());
        hash.update(part.as_bytes());
    }
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{SOURCE_PACKAGE} {version}\nsha256 {digest}\n")
}

fn parse_fragment(text: &str) -> Result<Vec<ConfigOption>> {
    let mut options = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .with_context(|| format!("Line {}: expected NAME=y or NAME=n", n + 1))?;
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid_name {
            bail!("Line {}: bad option name {name:?}", n + 1);
        }
        let enable = match value {
            "y" => true,
            "n" => false,
            _ => bail!("Line {}: {name} must be y or n, not {value:?}", n + 1),
        };
        options.push(ConfigOption {
            name: name.to_string(),
            enable,
        });
    }
    Ok(options)
}

/// The options `.config` does not hold as asked: enabled ones must read `CONFIG_X=y`,
/// disabled ones must not be set.
fn check_config(config: &str, options: &[ConfigOption]) -> Vec<String> {
    options
        .iter()
        .filter(|option| {
            let set = config
                .lines()
                .any(|l| l == format!("CONFIG_{}=y", option.name));
            set != option.enable
        })
        .map(|option| {
            let value = if option.enable { "y" } else { "n" };
            format!("{}={value}", option.name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_replaces_exactly_one_occurrence() {
        assert_eq!(patch_text("a\nb\nc\n", "b\n", "x\n").unwrap(), "a\nx\nc\n");
        let missing = patch_text("a\n", "b\n", "x\n").unwrap_err();
        assert!(missing.to_string().contains("not found"), "{missing}");
        let twice = patch_text("b\nb\n", "b\n", "x\n").unwrap_err();
        assert!(twice.to_string().contains("2 times"), "{twice}");
    }

    #[test]
    fn the_committed_fragment_parses() {
        let text = include_str!("../../guest/tiny-kernel/config");
        let options = parse_fragment(text).unwrap();
        assert!(options.contains(&ConfigOption {
            name: "VIRTIO_PCI".into(),
            enable: true
        }));
        assert!(options.contains(&ConfigOption {
            name: "MODULES".into(),
            enable: false
        }));
    }

    #[test]
    fn bad_fragment_lines_are_errors() {
        assert!(parse_fragment("PCI").is_err());
        assert!(parse_fragment("PCI=m").is_err());
        assert!(parse_fragment("pci=y").is_err());
        assert!(parse_fragment("# comment\n\nPCI=y\n").is_ok());
    }

    #[test]
    fn config_check_finds_dropped_options() {
        let config = "CONFIG_PCI=y\n# CONFIG_MODULES is not set\nCONFIG_ACPI=y\n";
        let options = parse_fragment("PCI=y\nMODULES=n\nVIRTIO=y\nACPI=n\n").unwrap();
        assert_eq!(check_config(config, &options), ["VIRTIO=y", "ACPI=n"]);
    }
}
