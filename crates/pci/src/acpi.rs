//! The ACPI pieces of the root complex, for crates/boot to place: the MCFG table (where ECAM
//! is) and the DSDT's `\_SB_.PCI0` (a PNP0A08 host bridge whose `_CRS` lists bus 0, ports
//! 0xCF8–0xCFF and the two MMIO windows), plus a PNP0C02 device reserving the ECAM range.

use acpi_tables::{aml, mcfg::MCFG, Aml, AmlSink};

use crate::root::{PciWindows, CONFIG_ADDRESS_PORT, ECAM_BUS_SIZE};

/// Where the root complex lives, for its ACPI description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostBridgeAml {
    pub ecam_base: u64,
    /// Buses decoded through ECAM: `0..=last_bus`.
    pub last_bus: u8,
    pub windows: PciWindows,
}

/// MCFG table bytes (header and checksum included) for one ECAM segment.
pub fn mcfg(ecam_base: u64, last_bus: u8, oem_id: [u8; 6], oem_table_id: [u8; 8]) -> Vec<u8> {
    let mut table = MCFG::new(oem_id, oem_table_id, 1);
    table.add_ecam(ecam_base, 0, 0, last_bus);
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

impl Aml for HostBridgeAml {
    /// `Device (\_SB_.PCI0)` and `Device (\_SB_.MRES)`, to append to the DSDT body.
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let w = self.windows;
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
        let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
        let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
        let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
        let buses = aml::AddressSpace::new_bus_number(0u16, u16::from(self.last_bus));
        let cf8 = aml::IO::new(CONFIG_ADDRESS_PORT, CONFIG_ADDRESS_PORT, 1, 8);
        let mmio32 = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            w.mmio32_start as u32,
            (w.mmio32_start + w.mmio32_size - 1) as u32,
            None,
        );
        let mmio64 = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            w.mmio64_start,
            w.mmio64_start + w.mmio64_size - 1,
            None,
        );
        let mut resources: Vec<&dyn Aml> = vec![&buses, &cf8, &mmio32];
        if w.mmio64_size > 0 {
            resources.push(&mmio64);
        }
        let template = aml::ResourceTemplate::new(resources);
        let crs = aml::Name::new("_CRS".into(), &template);
        let pci0 = aml::Device::new(
            "PCI0".into(),
            vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
        );

        let ecam_len = ECAM_BUS_SIZE * (u64::from(self.last_bus) + 1);
        let mres_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
        let mres_uid = aml::Name::new("_UID".into(), &aml::ONE);
        let ecam = aml::Memory32Fixed::new(false, self.ecam_base as u32, ecam_len as u32);
        let mres_tmpl = aml::ResourceTemplate::new(vec![&ecam]);
        let mres_crs = aml::Name::new("_CRS".into(), &mres_tmpl);
        let mres = aml::Device::new("MRES".into(), vec![&mres_hid, &mres_uid, &mres_crs]);
        aml::Scope::new("\\_SB_".into(), vec![&pci0, &mres]).to_aml_bytes(sink);
    }
}

impl HostBridgeAml {
    /// The AML bytes of [`HostBridgeAml`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.to_aml_bytes(&mut bytes);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcfg_has_one_entry_and_checksums() {
        let t = mcfg(0xe000_0000, 0, *b"OUTBRD", *b"OBVMMCFG");
        assert_eq!(&t[0..4], b"MCFG");
        assert_eq!(t.len(), 36 + 8 + 16);
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(
            u64::from_le_bytes(t[44..52].try_into().unwrap()),
            0xe000_0000
        );
        assert_eq!((t[54], t[55]), (0, 0), "bus range 0..=0");
    }

    #[test]
    fn host_bridge_aml_names_windows() {
        let aml = HostBridgeAml {
            ecam_base: 0xe000_0000,
            last_bus: 0,
            windows: PciWindows {
                mmio32_start: 0xc000_0000,
                mmio32_size: 0x2000_0000,
                mmio64_start: 1 << 40,
                mmio64_size: 1 << 36,
            },
        }
        .to_bytes();
        let find = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"PCI0") && find(b"_CRS") && find(b"MRES"));
        // PNP0A08 compressed EISA ID.
        assert!(find(&[0x41, 0xd0, 0x0a, 0x08]));
        assert!(find(&0xc000_0000u32.to_le_bytes()));
        assert!(find(&0xdfff_ffffu32.to_le_bytes()));
        assert!(find(&(1u64 << 40).to_le_bytes()));
        assert!(find(&0xcf8u16.to_le_bytes()));
    }

    /// Disassembles a DSDT holding the host bridge and an MCFG with ACPICA's `iasl`: both
    /// must parse, and the disassembly must show what Linux looks for.
    #[test]
    fn iasl_accepts_the_tables() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("SKIP: iasl (acpica-tools) not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("outboard-pci-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = HostBridgeAml {
            ecam_base: 0xe000_0000,
            last_bus: 0,
            windows: PciWindows {
                mmio32_start: 0xc000_0000,
                mmio32_size: 0x2000_0000,
                mmio64_start: 1 << 36,
                mmio64_size: 1 << 36,
            },
        }
        .to_bytes();
        let mut dsdt = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 2, *b"OUTBRD", *b"OBVMDSDT", 1);
        dsdt.append_slice(&aml);
        std::fs::write(dir.join("dsdt.aml"), dsdt.as_slice()).unwrap();
        std::fs::write(
            dir.join("mcfg.aml"),
            mcfg(0xe000_0000, 0, *b"OUTBRD", *b"OBVMMCFG"),
        )
        .unwrap();
        for table in ["dsdt", "mcfg"] {
            let out = std::process::Command::new("iasl")
                .current_dir(&dir)
                .args(["-d", &format!("{table}.aml")])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for want in [
            "PNP0A08",
            "PNP0A03",
            "WordBusNumber",
            "0x0CF8",
            "0xC0000000",
            "0xDFFFFFFF",
            "QWordMemory",
            "0x0000001000000000",
            "PNP0C02",
            "0xE0000000",
        ] {
            assert!(dsl.contains(want), "{want} missing from:\n{dsl}");
        }
        let mcfg_dsl = std::fs::read_to_string(dir.join("mcfg.dsl")).unwrap();
        assert!(mcfg_dsl.contains("00000000E0000000"), "{mcfg_dsl}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
