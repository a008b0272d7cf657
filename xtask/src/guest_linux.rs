//! `cargo xtask guest` (Linux part): builds `target/guest/vmlinuz` and
//! `target/guest/initramfs.img` from Debian packages only.
//!
//! - kernel: the `-unsigned` form of the package `linux-image-cloud-amd64` depends on, with only
//!   the virtio modules (and what they depend on per `modules.dep`) in the image;
//! - `busybox-static` for the init (`guest/linux/init`) and every tool the scripts use;
//! - `fio`, and util-linux's `fallocate` (busybox's has no mode flags: `-z` and `-p` on a disk
//!   are the kernel's WRITE_ZEROES without and with unmap), with exactly the shared libraries
//!   their ELF files need, found by reading `DT_NEEDED` and fetching the `Depends` of the
//!   package that lacks one until nothing is missing; only those files of util-linux ship;
//! - guest scripts: each `guest/linux/scripts/<name>.sh` ships as `/outboard/scripts/<name>.sh`
//!   and runs with `outboard.run=<name>` on the kernel command line.
//!
//! Cache: `target/guest/cache` keeps the `.deb` files and their unpacked trees, and
//! `target/guest/linux.stamp` lists every input (package versions, hashes of the init, the
//! scripts and this builder's source). A run whose inputs match the stamp does nothing.

mod apt;
mod cpio;
mod elf;

use crate::util;
use anyhow::{bail, Context, Result};
use apt::Package;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The meta package whose dependency names the current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";
const FIO: &str = "fio";
const UTIL_LINUX: &str = "util-linux";
/// The dynamically linked tools shipped (each found in the package trees with its libraries);
/// they shadow busybox applets of the same name.
const TOOLS: &[&str] = &["/usr/bin/fio", "/usr/bin/fallocate"];
/// The modules the init loads (with their dependencies): virtio over PCI for disks, NICs and
/// vsock, plus two cheap extras (entropy, a second console) later guests may use.
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
    "virtio_console",
];
/// The loader's default directories (Debian's glibc), searched after RUNPATH.
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
];
/// This builder's own source: a change to it rebuilds the image.
const BUILDER_SOURCE: &[&str] = &[
    include_str!("guest_linux.rs"),
    include_str!("guest_linux/apt.rs"),
    include_str!("guest_linux/cpio.rs"),
    include_str!("guest_linux/elf.rs"),
];

pub fn build() -> Result<()> {
    let started = Instant::now();
    let root = util::workspace_root();
    let out = root.join("target/guest");
    let cache = out.join("cache");
    let source = root.join("guest/linux");
    for (tool, package) in [
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
        ("depmod", "kmod"),
    ] {
        apt::tool(tool, package)?;
    }

    println!("xtask guest: resolving {KERNEL_META}, {BUSYBOX}, {FIO} and {UTIL_LINUX}");
    let kernel_name = kernel_package()?;
    let roots = apt::resolve(&[
        kernel_name.clone(),
        BUSYBOX.to_string(),
        FIO.to_string(),
        UTIL_LINUX.to_string(),
    ])?;
    let package = |name: &str| {
        roots
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .context("Unresolved package")
    };
    let (kernel, busybox) = (package(&kernel_name)?, package(BUSYBOX)?);
    let (fio, util_linux) = (package(FIO)?, package(UTIL_LINUX)?);

    let stamp_path = out.join("linux.stamp");
    let outputs = [out.join("vmlinuz"), out.join("initramfs.img")];
    let previous = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    let previous_libs = apt::candidates(&stamp_lib_packages(&previous))?
        .into_iter()
        .map(|(name, version)| Package { name, version })
        .collect::<Vec<_>>();
    if outputs.iter().all(|p| p.exists()) && stamp(&roots, &previous_libs, &source)? == previous {
        println!(
            "xtask guest: Linux image up to date ({}, {} {})",
            out.display(),
            kernel.name,
            kernel.version
        );
        return Ok(());
    }

    std::fs::create_dir_all(&out).with_context(|| format!("Cannot create {}", out.display()))?;
    let debs = cache.join("debs");
    let unpacked = cache.join("unpacked");
    let trees = fetch(&debs, &unpacked, &roots)?;
    let tree = |p: &Package| trees[p].clone();

    let mut archive = cpio::Archive::default();
    let release = add_kernel_modules(&mut archive, &tree(&kernel))?;
    add_base(&mut archive, &tree(&busybox), &source, &release, &roots)?;
    let tools = vec![
        (fio.clone(), tree(&fio)),
        (util_linux.clone(), tree(&util_linux)),
    ];
    let (lib_packages, fetched) = add_tools(&mut archive, &debs, &unpacked, tools)?;

    println!("xtask guest: writing initramfs.img");
    let initramfs = write_initramfs(&archive, &out)?;
    copy_atomically(
        &tree(&kernel).join(format!("boot/vmlinuz-{release}")),
        &out.join("vmlinuz"),
    )?;
    std::fs::write(&stamp_path, stamp(&roots, &lib_packages, &source)?)
        .with_context(|| format!("Cannot write {}", stamp_path.display()))?;
    prune(&debs, &unpacked, roots.iter().chain(&fetched));
    println!(
        "xtask guest: Linux image ready in {:.1} s: kernel {release} (vmlinuz {:.1} MiB), initramfs.img {:.1} MiB",
        started.elapsed().as_secs_f64(),
        mib(&out.join("vmlinuz")),
        initramfs as f64 / 1048576.0,
    );
    Ok(())
}

/// The `-unsigned` form of the kernel package the meta package depends on.
fn kernel_package() -> Result<String> {
    apt::resolve(&[KERNEL_META.to_string()])?;
    let signed = apt::depends(&[KERNEL_META.to_string()])?
        .remove(KERNEL_META)
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("{KERNEL_META} depends on no linux-image package"))?;
    Ok(format!("{signed}-unsigned"))
}

/// Downloads and unpacks packages; returns each package's unpacked tree.
fn fetch(debs: &Path, unpacked: &Path, packages: &[Package]) -> Result<BTreeMap<Package, PathBuf>> {
    let files = apt::download(debs, packages)?;
    let mut trees = BTreeMap::new();
    for (package, deb) in packages.iter().zip(files) {
        let dir = unpacked.join(format!(
            "{}_{}",
            package.name,
            package.version.replace(':', "%3a")
        ));
        if !dir.join(".outboard-extracted").exists() {
            println!("xtask guest: unpacking {}", package.name);
        }
        apt::extract(&deb, &dir)?;
        trees.insert(package.clone(), dir);
    }
    Ok(trees)
}

/// Adds the wanted modules in dependency order and `/etc/outboard/modules` (the load list).
/// Returns the kernel release.
fn add_kernel_modules(archive: &mut cpio::Archive, tree: &Path) -> Result<String> {
    let release = std::fs::read_dir(tree.join("boot"))
        .context("The kernel package has no /boot")?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .context("The kernel package has no /boot/vmlinuz-*")?;
    let modules_dir = tree.join("lib/modules").join(&release);
    if !modules_dir.join("modules.dep").exists() {
        println!("xtask guest: depmod {release}");
        apt::depmod(tree, &release)?;
    }
    let dep_text = std::fs::read_to_string(modules_dir.join("modules.dep"))
        .context("Cannot read modules.dep")?;
    let deps = parse_modules_dep(&dep_text);
    let order = load_order(&deps, MODULES)?;
    let mut list = String::new();
    for module in &order {
        let (guest_rel, bytes) = read_module(&modules_dir.join(module), module)?;
        let guest_path = format!("/lib/modules/{release}/{guest_rel}");
        archive.file(&guest_path, 0o644, cpio::Data::Bytes(bytes))?;
        list.push_str(&guest_path);
        list.push('\n');
    }
    archive.file(
        "/etc/outboard/modules",
        0o644,
        cpio::Data::Bytes(list.into_bytes()),
    )?;
    println!("xtask guest: kernel {release}: {} modules", order.len());
    Ok(release)
}

/// modules.dep: `kernel/a.ko: kernel/b.ko kernel/c.ko` (every line lists all dependencies).
fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| {
            (
                module.to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect()
}

/// A module's name as `insmod`/`lsmod` know it: file stem, `-` read as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The module files to load, dependencies first, for the wanted module names.
fn load_order(deps: &BTreeMap<String, Vec<String>>, wanted: &[&str]) -> Result<Vec<String>> {
    fn visit(
        module: &str,
        deps: &BTreeMap<String, Vec<String>>,
        order: &mut Vec<String>,
        active: &mut BTreeSet<String>,
    ) -> Result<()> {
        if order.iter().any(|m| m == module) {
            return Ok(());
        }
        if !active.insert(module.to_string()) {
            bail!("Module dependency cycle through {module}");
        }
        for dep in deps.get(module).into_iter().flatten() {
            visit(dep, deps, order, active)?;
        }
        active.remove(module);
        order.push(module.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    for name in wanted {
        let path = deps
            .keys()
            .find(|path| module_name(path) == *name)
            .with_context(|| format!("The kernel has no module {name} (built in or renamed?)"))?;
        visit(path, deps, &mut order, &mut BTreeSet::new())?;
    }
    Ok(order)
}

/// A module's bytes, decompressed where the package compresses modules (busybox insmod takes
/// plain ELF only), and its path in the guest (always `.ko`).
fn read_module(path: &Path, rel: &str) -> Result<(String, Vec<u8>)> {
    let read_err = || format!("Cannot read module {}", path.display());
    if let Some(stem) = rel.strip_suffix(".ko") {
        return Ok((
            format!("{stem}.ko"),
            std::fs::read(path).with_context(read_err)?,
        ));
    }
    let (stem, tool) = if let Some(stem) = rel.strip_suffix(".ko.xz") {
        (stem, "xz")
    } else if let Some(stem) = rel.strip_suffix(".ko.zst") {
        (stem, "zstd")
    } else if let Some(stem) = rel.strip_suffix(".ko.gz") {
        (stem, "gzip")
    } else {
        bail!("Unknown module file type {rel}");
    };
    let output = std::process::Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("Cannot run {tool} to decompress module {rel}"))?;
    if !output.status.success() {
        bail!("{tool} cannot decompress module {rel}");
    }
    Ok((format!("{stem}.ko"), output.stdout))
}

/// The init, busybox, the guest scripts and the directories the init expects.
fn add_base(
    archive: &mut cpio::Archive,
    busybox: &Path,
    source: &Path,
    release: &str,
    roots: &[Package],
) -> Result<()> {
    let init = source.join("init");
    let init_bytes =
        std::fs::read(&init).with_context(|| format!("Cannot read {}", init.display()))?;
    archive.file("/init", 0o755, cpio::Data::Bytes(init_bytes))?;
    archive.file(
        "/bin/busybox",
        0o755,
        cpio::Data::Host(busybox.join("bin/busybox")),
    )?;
    // The kernel opens /dev/console for init before devtmpfs is mounted over /dev.
    archive.char_dev("/dev/console", 0o600, 5, 1)?;
    for dir in [
        "/proc",
        "/sys",
        "/tmp",
        "/run",
        "/root",
        "/mnt",
        "/sbin",
        "/usr/sbin",
    ] {
        archive.dir(dir)?;
    }
    for (name, path) in guest_scripts(source)? {
        let bytes =
            std::fs::read(&path).with_context(|| format!("Cannot read {}", path.display()))?;
        archive.file(
            &format!("/outboard/{name}"),
            0o755,
            cpio::Data::Bytes(bytes),
        )?;
    }
    let mut info = format!("kernel_release={release}\n");
    for p in roots {
        info.push_str(&format!("package={} {}\n", p.name, p.version));
    }
    archive.last_file(
        "/etc/outboard/image",
        0o644,
        cpio::Data::Bytes(info.into_bytes()),
    )
}

/// `lib.sh` and `scripts/*.sh` under `guest/linux`, keyed by their path under `/outboard`.
fn guest_scripts(source: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut scripts = BTreeMap::new();
    let lib = source.join("lib.sh");
    if lib.exists() {
        scripts.insert("lib.sh".to_string(), lib);
    }
    let dir = source.join("scripts");
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("Cannot list {}", dir.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".sh") {
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!("Guest script name {name:?} must be [A-Za-z0-9._-]");
            }
            scripts.insert(format!("scripts/{name}"), path);
        }
    }
    Ok(scripts)
}

/// The files of the packages fetched so far, seen as one file system (like the guest's).
struct Trees(Vec<(Package, PathBuf)>);

impl Trees {
    /// Finds a guest path, following symlinks through all trees; returns the host file and
    /// the package holding it.
    fn find(&self, guest_path: &str) -> Option<(PathBuf, Package)> {
        let mut path = guest_path.to_string();
        for _ in 0..32 {
            let (host, package) = self.0.iter().find_map(|(package, dir)| {
                let host = dir.join(path.trim_start_matches('/'));
                host.symlink_metadata().is_ok().then_some((host, package))
            })?;
            match std::fs::read_link(&host) {
                Ok(target) => {
                    let target = target.to_str()?;
                    path = if target.starts_with('/') {
                        target.to_string()
                    } else {
                        format!("{}/{target}", parent(&path))
                    };
                    path = lexical_normalise(&path);
                }
                Err(_) => return host.is_file().then(|| (host, package.clone())),
            }
        }
        None
    }
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

fn lexical_normalise(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The files the [`TOOLS`] need at run time, or the libraries still missing and who needs them.
struct Closure {
    /// guest path → host file
    files: BTreeMap<String, PathBuf>,
    packages: BTreeSet<Package>,
    missing: Vec<(String, Package)>,
}

fn tools_closure(trees: &Trees) -> Result<Closure> {
    let mut closure = Closure {
        files: BTreeMap::new(),
        packages: BTreeSet::new(),
        missing: Vec::new(),
    };
    let mut queue: Vec<String> = TOOLS.iter().map(|t| t.to_string()).collect();
    while let Some(guest_path) = queue.pop() {
        if closure.files.contains_key(&guest_path) {
            continue;
        }
        let (host, package) = trees
            .find(&guest_path)
            .with_context(|| format!("{guest_path} is in no package"))?;
        let bytes =
            std::fs::read(&host).with_context(|| format!("Cannot read {}", host.display()))?;
        let info = elf::dynamic_info(&bytes)
            .with_context(|| format!("Cannot read ELF {}", host.display()))?;
        closure.files.insert(guest_path.clone(), host);
        closure.packages.insert(package.clone());
        if let Some(interp) = info.interp {
            match trees.find(&interp) {
                Some(_) => queue.push(interp),
                None => closure.missing.push((interp, package.clone())),
            }
        }
        for soname in &info.needed {
            let origin = parent(&guest_path);
            let dirs = info.runpath.iter().map(|d| d.replace("$ORIGIN", origin));
            let found = dirs
                .chain(LIB_DIRS.iter().map(|d| d.to_string()))
                .map(|dir| format!("{dir}/{soname}"))
                .find(|candidate| trees.find(candidate).is_some());
            match found {
                Some(path) => queue.push(lexical_normalise(&path)),
                None => closure.missing.push((soname.clone(), package.clone())),
            }
        }
    }
    Ok(closure)
}

/// Adds the [`TOOLS`] (from the packages `tools`) and their libraries, fetching the `Depends`
/// of whichever package lacks a library until none is missing. Returns the library packages
/// used (for the stamp) and every package fetched on the way.
fn add_tools(
    archive: &mut cpio::Archive,
    debs: &Path,
    unpacked: &Path,
    tools: Vec<(Package, PathBuf)>,
) -> Result<(Vec<Package>, Vec<Package>)> {
    let roots: Vec<String> = tools.iter().map(|(p, _)| p.name.clone()).collect();
    let mut trees = Trees(tools);
    let mut expanded = BTreeSet::new();
    let closure = loop {
        let closure = tools_closure(&trees)?;
        if closure.missing.is_empty() {
            break closure;
        }
        let lacking: BTreeSet<String> = closure
            .missing
            .iter()
            .map(|(_, p)| p.name.clone())
            .collect();
        // One tool package at a time: the libraries fetched for one usually serve the next
        // (util-linux depends on a dozen packages its fallocate does not need).
        let mut root_taken = false;
        let mut to_expand = Vec::new();
        for name in lacking {
            if expanded.contains(&name) {
                continue;
            }
            let deferred = roots.contains(&name) && std::mem::replace(&mut root_taken, true);
            if !deferred {
                expanded.insert(name.clone());
                to_expand.push(name);
            }
        }
        let mut wanted = Vec::new();
        for dep in apt::depends(&to_expand)?.into_values().flatten() {
            if !trees.0.iter().any(|(p, _)| p.name == dep) && !wanted.contains(&dep) {
                wanted.push(dep);
            }
        }
        let available: Vec<Package> = apt::candidates(&wanted)?
            .into_iter()
            .map(|(name, version)| Package { name, version })
            .collect();
        if available.is_empty() {
            let (soname, package) = &closure.missing[0];
            bail!(
                "Cannot find {soname}, needed by package {}, in any package it depends on",
                package.name
            );
        }
        trees.0.extend(fetch(debs, unpacked, &available)?);
    };
    // A host file reached twice (the loader under /lib64 and its own directory) ships once.
    let mut shipped: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (guest_path, host) in &closure.files {
        let real = host.canonicalize().unwrap_or(host.clone());
        match shipped.get(&real) {
            Some(first) => archive.symlink(guest_path, first)?,
            None => {
                archive.file(guest_path, 0o755, cpio::Data::Host(host.clone()))?;
                shipped.insert(real, guest_path.clone());
            }
        }
    }
    let libs: Vec<Package> = closure
        .packages
        .into_iter()
        .filter(|p| !roots.contains(&p.name))
        .collect();
    println!(
        "xtask guest: {} with {} shared libraries from {} packages",
        TOOLS.join(", "),
        closure.files.len() - TOOLS.len(),
        libs.len()
    );
    Ok((libs, trees.0.into_iter().map(|(p, _)| p).collect()))
}

/// Removes the `.deb` files and trees of package versions this build did not use (older
/// kernels, superseded libraries), so the cache does not grow with every Debian update.
fn prune<'a>(debs: &Path, unpacked: &Path, used: impl Iterator<Item = &'a Package>) {
    let keep: Vec<String> = used
        .map(|p| format!("{}_{}", p.name, p.version.replace(':', "%3a")))
        .collect();
    for dir in [debs, unpacked] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let used = keep
                .iter()
                .any(|k| name == *k || name.starts_with(&format!("{k}_")));
            if !used {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }
}

fn write_initramfs(archive: &cpio::Archive, out: &Path) -> Result<u64> {
    let path = out.join("initramfs.img");
    let tmp = out.join("initramfs.img.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("Cannot create {}", tmp.display()))?;
    let mut gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(file),
        flate2::Compression::default(),
    );
    archive.write_to(&mut gz)?;
    gz.finish()
        .context("Cannot compress the initramfs")?
        .flush()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(std::fs::metadata(&path)?.len())
}

fn copy_atomically(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).with_context(|| format!("Cannot copy {}", from.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("Cannot write {}", to.display()))
}

fn mib(path: &Path) -> f64 {
    std::fs::metadata(path)
        .map(|m| m.len() as f64 / 1048576.0)
        .unwrap_or(0.0)
}

/// Every input of the image, one per line; equal stamps mean an equal image.
fn stamp(roots: &[Package], libs: &[Package], source: &Path) -> Result<String> {
    let sha = |bytes: &[u8]| format!("{:x}", Sha256::digest(bytes));
    let mut text = format!("builder {}\n", sha(BUILDER_SOURCE.concat().as_bytes()));
    for p in roots {
        text.push_str(&format!("package {} {}\n", p.name, p.version));
    }
    for p in libs {
        text.push_str(&format!("lib-package {} {}\n", p.name, p.version));
    }
    let mut files = guest_scripts(source)?;
    files.insert("init".to_string(), source.join("init"));
    for (name, path) in files {
        let bytes =
            std::fs::read(&path).with_context(|| format!("Cannot read {}", path.display()))?;
        text.push_str(&format!("file {name} {}\n", sha(&bytes)));
    }
    Ok(text)
}

fn stamp_lib_packages(stamp: &str) -> Vec<String> {
    stamp
        .lines()
        .filter_map(|l| l.strip_prefix("lib-package "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_modules_dependencies_first() {
        let deps = parse_modules_dep(
            "kernel/virtio_net.ko: kernel/net_failover.ko kernel/failover.ko kernel/virtio.ko kernel/virtio_ring.ko\n\
             kernel/net_failover.ko: kernel/failover.ko\n\
             kernel/failover.ko:\n\
             kernel/virtio.ko: kernel/virtio_ring.ko\n\
             kernel/virtio_ring.ko:\n\
             kernel/virtio-rng.ko.xz: kernel/virtio.ko kernel/virtio_ring.ko\n",
        );
        let order = load_order(&deps, &["virtio_net", "virtio_rng"]).unwrap();
        let pos = |m: &str| order.iter().position(|o| o == m).unwrap();
        assert_eq!(order.len(), 6);
        assert!(pos("kernel/failover.ko") < pos("kernel/net_failover.ko"));
        assert!(pos("kernel/virtio_ring.ko") < pos("kernel/virtio.ko"));
        assert!(pos("kernel/virtio.ko") < pos("kernel/virtio_net.ko"));
        assert_eq!(order.last().unwrap(), "kernel/virtio-rng.ko.xz");
        assert!(load_order(&deps, &["nonexistent"]).is_err());
    }

    #[test]
    fn module_dependency_cycle_is_an_error() {
        let deps = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n");
        assert!(load_order(&deps, &["a"]).is_err());
    }

    #[test]
    fn normalises_paths_and_reads_stamp_packages() {
        assert_eq!(lexical_normalise("/lib64/../lib/./x.so"), "/lib/x.so");
        let stamp =
            "builder 00\npackage fio 3.33-3\nlib-package libc6 2.36\nlib-package zlib1g 1:1.2\n";
        assert_eq!(stamp_lib_packages(stamp), ["libc6", "zlib1g"]);
    }
}
