//! Platform configuration registers (PCRs) and the event log that explains them.
//!
//! A PCR is a 48-byte SHA-384 register that starts at zero and can only be *extended*:
//! `PCR ← SHA384(PCR ‖ SHA384(data))`. Each extension is recorded as an [`Event`] (register,
//! description, digest of the data), so a verifier who is given the [`EventLog`] can replay it
//! and check that it yields the PCRs the attestation document claims. A single extension of a
//! zero register equals the AWS Nitro Enclaves image-format convention
//! (`SHA384(0^48 ‖ SHA384(data))`).
//!
//! The register layout is the platform's own (see the crate documentation): [`PcrIndex`] names it.

use std::fmt;
use std::io::Read;

use openssl::sha::Sha384;
use serde::{Deserialize, Serialize};

/// Size of a SHA-384 digest and of each PCR.
pub const PCR_SIZE: usize = 48;
/// Number of PCRs held and reported in attestation documents (like the Nitro Secure Module's
/// locked PCR0..15).
pub const PCR_COUNT: usize = 16;

/// A SHA-384 digest (a PCR value or an event digest).
pub type Digest = [u8; PCR_SIZE];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("PCR index {0} is out of range (0..{PCR_COUNT})")]
    IndexOutOfRange(usize),
    #[error("Cannot read measured data")]
    Read(#[source] std::io::Error),
    #[error("Event digest {0:?} is not 96 hex digits")]
    BadDigest(String),
}

/// The meaning of each register on Outboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum PcrIndex {
    /// The outboard-vmm binary actually running (`/proc/self/exe`).
    VmmBinary = 0,
    /// Guest firmware (reserved: Outboard boots kernels directly).
    Firmware = 1,
    /// Guest kernel, as placed in guest memory.
    Kernel = 2,
    /// Initial RAM disk, as placed in guest memory.
    Initrd = 3,
    /// Kernel command line, as placed in guest memory (without the terminating NUL).
    Cmdline = 4,
    /// Canonical VM configuration ([`crate::config::CanonicalVmConfig`]).
    VmConfig = 5,
    /// The host agent that launched the VMM.
    HostAgent = 6,
    /// The card (offload process) serving the VM's devices.
    Card = 7,
    /// The DER certificate of the key that signs attestation documents.
    SigningCertificate = 8,
}

impl PcrIndex {
    /// All named registers, in index order.
    pub const ALL: [PcrIndex; 9] = [
        PcrIndex::VmmBinary,
        PcrIndex::Firmware,
        PcrIndex::Kernel,
        PcrIndex::Initrd,
        PcrIndex::Cmdline,
        PcrIndex::VmConfig,
        PcrIndex::HostAgent,
        PcrIndex::Card,
        PcrIndex::SigningCertificate,
    ];

    /// The register number.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Short lower-case name used in event descriptions and CLI output.
    pub fn name(self) -> &'static str {
        match self {
            PcrIndex::VmmBinary => "vmm",
            PcrIndex::Firmware => "firmware",
            PcrIndex::Kernel => "kernel",
            PcrIndex::Initrd => "initrd",
            PcrIndex::Cmdline => "cmdline",
            PcrIndex::VmConfig => "config",
            PcrIndex::HostAgent => "host-agent",
            PcrIndex::Card => "card",
            PcrIndex::SigningCertificate => "signing-certificate",
        }
    }

    /// The named register with this number, if any.
    pub fn from_index(index: usize) -> Option<PcrIndex> {
        PcrIndex::ALL.get(index).copied()
    }
}

/// SHA-384 of `data`.
pub fn sha384(data: &[u8]) -> Digest {
    openssl::sha::sha384(data)
}

/// The SHA-384 of an event's data, fed in pieces (e.g. guest memory read back in chunks).
pub struct EventHasher {
    hasher: Sha384,
}

impl fmt::Debug for EventHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventHasher")
    }
}

impl Default for EventHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHasher {
    pub fn new() -> Self {
        Self {
            hasher: Sha384::new(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    /// Hashes everything `reader` yields, in 1 MiB pieces.
    pub fn update_from_reader(&mut self, mut reader: impl Read) -> Result<(), Error> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Read(e)),
            }
        }
    }

    pub fn finish(self) -> Digest {
        self.hasher.finish()
    }
}

/// The register file: [`PCR_COUNT`] SHA-384 registers, all zero at creation.
#[derive(Clone, PartialEq, Eq)]
pub struct PcrBank {
    registers: [Digest; PCR_COUNT],
}

impl Default for PcrBank {
    fn default() -> Self {
        Self {
            registers: [[0; PCR_SIZE]; PCR_COUNT],
        }
    }
}

impl fmt::Debug for PcrBank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (i, r) in self.registers.iter().enumerate() {
            m.entry(&i, &hex::encode(r));
        }
        m.finish()
    }
}

impl PcrBank {
    pub fn new() -> Self {
        Self::default()
    }

    /// `PCR[index] ← SHA384(PCR[index] ‖ digest)`.
    pub fn extend(&mut self, index: usize, digest: &Digest) -> Result<(), Error> {
        let reg = self
            .registers
            .get_mut(index)
            .ok_or(Error::IndexOutOfRange(index))?;
        let mut h = Sha384::new();
        h.update(reg);
        h.update(digest);
        *reg = h.finish();
        Ok(())
    }

    pub fn get(&self, index: usize) -> Option<&Digest> {
        self.registers.get(index)
    }

    /// All registers, index order.
    pub fn registers(&self) -> &[Digest; PCR_COUNT] {
        &self.registers
    }
}

/// One extension of one register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Register extended.
    pub pcr: usize,
    /// What was measured, e.g. `kernel` or `vmm /usr/bin/outboard-vmm`.
    pub description: String,
    /// SHA-384 of the measured data (hex in JSON).
    #[serde(with = "hex_digest")]
    pub digest: Digest,
}

/// The ordered list of extensions; replaying it reproduces the PCRs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLog {
    pub events: Vec<Event>,
}

impl EventLog {
    /// Extends a zeroed bank with every event, in order.
    pub fn replay(&self) -> Result<PcrBank, Error> {
        let mut bank = PcrBank::new();
        for e in &self.events {
            bank.extend(e.pcr, &e.digest)?;
        }
        Ok(bank)
    }
}

impl EventLog {
    /// Indices where replaying this log disagrees with `pcrs` (index → value): a PCR the log
    /// extends but `pcrs` lacks, or whose value differs. Empty when the log explains `pcrs`.
    pub fn mismatches(
        &self,
        pcrs: &std::collections::BTreeMap<u8, Vec<u8>>,
    ) -> Result<Vec<u8>, Error> {
        let replayed = self.replay()?;
        let zero = [0u8; PCR_SIZE];
        let logged: std::collections::BTreeSet<usize> = self.events.iter().map(|e| e.pcr).collect();
        let mut bad = Vec::new();
        for (i, r) in replayed.registers().iter().enumerate() {
            let claimed = pcrs.get(&(i as u8));
            let ok = match claimed {
                Some(v) => v[..] == r[..],
                // Unreported registers are fine if the log never touched them.
                None => !logged.contains(&i) && r == &zero,
            };
            if !ok {
                bad.push(i as u8);
            }
        }
        Ok(bad)
    }
}

mod hex_digest {
    use super::{Digest, PCR_SIZE};
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; PCR_SIZE];
        hex::decode_to_slice(&s, &mut out)
            .map_err(|_| D::Error::custom(super::Error::BadDigest(s.clone())))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_extension_matches_nitro_convention() {
        let mut bank = PcrBank::new();
        bank.extend(2, &sha384(b"kernel")).unwrap();
        let mut concat = vec![0u8; PCR_SIZE];
        concat.extend_from_slice(&sha384(b"kernel"));
        assert_eq!(bank.get(2).unwrap(), &sha384(&concat));
        assert_eq!(bank.get(3).unwrap(), &[0u8; PCR_SIZE]);
    }

    #[test]
    fn out_of_range_index_is_an_error() {
        assert!(matches!(
            PcrBank::new().extend(PCR_COUNT, &[0; PCR_SIZE]),
            Err(Error::IndexOutOfRange(16))
        ));
    }

    #[test]
    fn streamed_hash_equals_one_shot() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let mut h = EventHasher::new();
        h.update_from_reader(&data[..]).unwrap();
        assert_eq!(h.finish(), sha384(&data));
    }
}
