//! Everything that turns an empty VM into one ready to enter a kernel: the guest-physical memory
//! map ([`layout`]), guest memory backed by a memfd ([`memory`]), kernel/initramfs/command-line
//! loading ([`loader`]), the zero page and e820 map ([`bootparams`]), the 64-bit entry's page
//! tables and GDT ([`paging`]) and the ACPI tables ([`acpi`]).

pub mod acpi;
pub mod bootparams;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod paging;

pub use memory::GuestRam;
