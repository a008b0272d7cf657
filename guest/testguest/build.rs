//! Links the guest with `link.ld` (load address, segments, the PVH note).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
    println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=src/arch/entry.s");
    println!("cargo:rerun-if-changed=src/arch/idt.s");
    println!("cargo:rerun-if-changed=src/arch/trampoline.s");
}
