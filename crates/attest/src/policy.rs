//! Launch policies: the approved values of each PCR.
//!
//! A policy approves a launch when every PCR it names holds one of the values it lists for that
//! PCR; PCRs it does not name are not checked. File format (JSON, unknown fields refused):
//!
//! ```json
//! {
//!   "version": 1,
//!   "pcrs": {
//!     "2": ["<96 hex digits>", "<another approved kernel>"],
//!     "5": ["<96 hex digits>"]
//!   }
//! }
//! ```
//!
//! Keys are PCR indices (0..=31) as decimal strings. A policy that names no PCR is refused (it
//! would approve anything). `outboard attest policy --from-doc F` writes one from a document;
//! `outboard attest measure` prints the values to put in one.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::document::{AttestationDocument, MAX_PCRS};
use crate::measure::Measurements;
use crate::pcr::{PcrIndex, PCR_SIZE};

/// Policy files above this size are refused.
const MAX_POLICY_FILE: u64 = 1 << 20;
pub const POLICY_VERSION: u32 = 1;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read policy {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Policy file is larger than {MAX_POLICY_FILE} bytes")]
    TooLarge,
    #[error("Policy is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("Policy version {0} is not supported (expected {POLICY_VERSION})")]
    Version(u32),
    #[error("Policy key {0:?} is not a PCR index below 32")]
    BadIndex(String),
    #[error("Policy value for PCR{index} is not 96 hex digits")]
    BadValue { index: u8 },
    #[error("Policy approves no PCR value")]
    Empty,
    #[error("Measurements do not match the policy: PCR {}", .mismatched.iter().map(u8::to_string).collect::<Vec<_>>().join(", "))]
    Mismatch {
        mismatched: Vec<u8>,
        report: PolicyReport,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u32,
    pcrs: BTreeMap<String, Vec<String>>,
}

/// Approved values per PCR.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    approved: BTreeMap<u8, Vec<[u8; PCR_SIZE]>>,
}

/// How one PCR fared against the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PcrVerdict {
    /// The value is the policy's `n`-th approved value for this PCR.
    Match(usize),
    Mismatch,
    /// The policy names this PCR but the measurements do not carry it.
    Missing,
    /// The policy does not name this PCR.
    Unchecked,
}

/// One line of a [`PolicyReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrCheck {
    pub index: u8,
    pub value: Option<Vec<u8>>,
    pub verdict: PcrVerdict,
}

/// The outcome for every PCR measured or named by the policy, in index order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyReport {
    pub checks: Vec<PcrCheck>,
}

impl PolicyReport {
    /// True when no named PCR mismatched or was missing.
    pub fn approved(&self) -> bool {
        self.mismatched().is_empty()
    }

    pub fn mismatched(&self) -> Vec<u8> {
        self.checks
            .iter()
            .filter(|c| matches!(c.verdict, PcrVerdict::Mismatch | PcrVerdict::Missing))
            .map(|c| c.index)
            .collect()
    }
}

impl fmt::Display for PolicyReport {
    /// One line per PCR: `PCR2 (kernel) match <hex>` / `MISMATCH` / `missing` / `unchecked`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            let name = PcrIndex::from_index(c.index.into()).map_or("", PcrIndex::name);
            let value = c.value.as_deref().map(hex::encode).unwrap_or_default();
            let verdict = match c.verdict {
                PcrVerdict::Match(_) => "match",
                PcrVerdict::Mismatch => "MISMATCH",
                PcrVerdict::Missing => "MISSING",
                PcrVerdict::Unchecked => "unchecked",
            };
            writeln!(f, "PCR{:<2} {:<19} {:<9} {}", c.index, name, verdict, value)?;
        }
        Ok(())
    }
}

impl Policy {
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let file: PolicyFile = serde_json::from_str(text).map_err(Error::Json)?;
        if file.version != POLICY_VERSION {
            return Err(Error::Version(file.version));
        }
        let mut approved = BTreeMap::new();
        for (key, values) in file.pcrs {
            let index = key
                .parse::<u8>()
                .ok()
                .filter(|i| usize::from(*i) < MAX_PCRS && !key.starts_with('+'))
                .ok_or_else(|| Error::BadIndex(key.chars().take(32).collect()))?;
            let mut list: Vec<[u8; PCR_SIZE]> = Vec::with_capacity(values.len().min(64));
            for v in values {
                let mut d = [0u8; PCR_SIZE];
                hex::decode_to_slice(v.trim(), &mut d).map_err(|_| Error::BadValue { index })?;
                list.push(d);
            }
            if !list.is_empty() {
                approved.insert(index, list);
            }
        }
        if approved.is_empty() {
            return Err(Error::Empty);
        }
        Ok(Self { approved })
    }

    /// Reads a policy file (bounded in size).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let err = |source| Error::Read {
            path: path.to_owned(),
            source,
        };
        let f = std::fs::File::open(path).map_err(err)?;
        let mut text = String::new();
        f.take(MAX_POLICY_FILE + 1)
            .read_to_string(&mut text)
            .map_err(err)?;
        if text.len() as u64 > MAX_POLICY_FILE {
            return Err(Error::TooLarge);
        }
        Self::from_json(&text)
    }

    pub fn to_json(&self) -> String {
        let file = PolicyFile {
            version: POLICY_VERSION,
            pcrs: self
                .approved
                .iter()
                .map(|(i, vs)| (i.to_string(), vs.iter().map(hex::encode).collect()))
                .collect(),
        };
        // Serialising a map of strings cannot fail.
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }

    /// Approves `value` for PCR `index` (in addition to values already approved).
    pub fn approve(&mut self, index: u8, value: [u8; PCR_SIZE]) {
        let list = self.approved.entry(index).or_default();
        if !list.contains(&value) {
            list.push(value);
        }
    }

    /// Approves the values a document carries for `indices`.
    pub fn approve_from_document(&mut self, doc: &AttestationDocument, indices: &[u8]) {
        for i in indices {
            if let Some(v) = doc
                .pcrs
                .get(i)
                .and_then(|v| <[u8; PCR_SIZE]>::try_from(&v[..]).ok())
            {
                self.approve(*i, v);
            }
        }
    }

    pub fn approved(&self) -> &BTreeMap<u8, Vec<[u8; PCR_SIZE]>> {
        &self.approved
    }

    /// Compares `pcrs` (index → value) with the policy; never fails.
    pub fn evaluate(&self, pcrs: &BTreeMap<u8, Vec<u8>>) -> PolicyReport {
        let indices: std::collections::BTreeSet<u8> =
            pcrs.keys().chain(self.approved.keys()).copied().collect();
        let checks = indices
            .into_iter()
            .map(|index| {
                let value = pcrs.get(&index).cloned();
                let verdict = match (self.approved.get(&index), &value) {
                    (None, _) => PcrVerdict::Unchecked,
                    (Some(_), None) => PcrVerdict::Missing,
                    (Some(list), Some(v)) => list
                        .iter()
                        .position(|a| a[..] == v[..])
                        .map_or(PcrVerdict::Mismatch, PcrVerdict::Match),
                };
                PcrCheck {
                    index,
                    value,
                    verdict,
                }
            })
            .collect();
        PolicyReport { checks }
    }

    fn verdict(report: PolicyReport) -> Result<PolicyReport, Error> {
        let mismatched = report.mismatched();
        if mismatched.is_empty() {
            Ok(report)
        } else {
            Err(Error::Mismatch { mismatched, report })
        }
    }

    /// Checks a launch's measurements: `Err(Mismatch)` unless every named PCR is approved.
    /// outboard-vmm calls this before `InstanceStart`.
    pub fn check(&self, m: &Measurements) -> Result<PolicyReport, Error> {
        let pcrs = m
            .pcrs()
            .registers()
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u8, r.to_vec()))
            .collect();
        Self::verdict(self.evaluate(&pcrs))
    }

    /// Checks the PCRs of a (verified) document.
    pub fn check_document(&self, doc: &AttestationDocument) -> Result<PolicyReport, Error> {
        Self::verdict(self.evaluate(&doc.pcrs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_roundtrip_and_rejections() {
        let mut p = Policy::default();
        p.approve(2, [1; 48]);
        p.approve(2, [2; 48]);
        p.approve(2, [2; 48]);
        let back = Policy::from_json(&p.to_json()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.approved()[&2].len(), 2);
        assert!(matches!(
            Policy::from_json(r#"{"version":1,"pcrs":{}}"#),
            Err(Error::Empty)
        ));
        assert!(matches!(
            Policy::from_json(r#"{"version":1,"pcrs":{"32":["00"]}}"#),
            Err(Error::BadIndex(_))
        ));
        assert!(matches!(
            Policy::from_json(r#"{"version":1,"pcrs":{"1":["00"]}}"#),
            Err(Error::BadValue { index: 1 })
        ));
        assert!(Policy::from_json(r#"{"version":1,"pcrs":{"1":[]},"x":1}"#).is_err());
        assert!(matches!(
            Policy::from_json(r#"{"version":2,"pcrs":{}}"#),
            Err(Error::Version(2))
        ));
    }

    #[test]
    fn several_values_per_pcr_and_missing() {
        let mut p = Policy::default();
        p.approve(2, [1; 48]);
        p.approve(2, [2; 48]);
        p.approve(9, [0; 48]);
        let pcrs: BTreeMap<u8, Vec<u8>> =
            [(2u8, vec![2; 48]), (3, vec![7; 48])].into_iter().collect();
        let r = p.evaluate(&pcrs);
        assert_eq!(r.checks[0].verdict, PcrVerdict::Match(1));
        assert_eq!(r.checks[1].verdict, PcrVerdict::Unchecked);
        assert_eq!(r.checks[2].verdict, PcrVerdict::Missing);
        assert_eq!(r.mismatched(), vec![9]);
        assert!(r.to_string().contains("PCR2  kernel"));
    }
}
