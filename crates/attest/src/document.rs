//! The attestation document, byte-compatible with AWS Nitro Enclaves.
//!
//! Wire form: an untagged `COSE_Sign1` (RFC 9052) array
//! `[protected: bstr(a1 01 38 22 = {1: -35 /ES384/}), unprotected: {}, payload: bstr, signature: bstr(96)]`.
//! The signature is ECDSA P-384 / SHA-384 over the `Sig_structure`
//! `["Signature1", protected, h'', payload]`, as raw `r ‖ s` (not DER).
//!
//! Payload: a CBOR map, keys in this order (as the Nitro Secure Module emits them), absent
//! optional values encoded as `null`:
//!
//! | key | type | limits (checked on parse) |
//! |---|---|---|
//! | `module_id` | text | non-empty, ≤ 256 bytes |
//! | `digest` | text | `"SHA384"` |
//! | `timestamp` | uint | ms since the Unix epoch, > 0 |
//! | `pcrs` | map uint → bstr | 1..=32 entries, index < 32, 48-byte values |
//! | `certificate` | bstr | DER, 1..=1024 bytes |
//! | `cabundle` | array of bstr | 1..=16 DER certificates, root first, each 1..=1024 bytes |
//! | `public_key` | bstr / null | 1..=1024 bytes |
//! | `user_data` | bstr / null | ≤ 512 bytes |
//! | `nonce` | bstr / null | ≤ 512 bytes |
//!
//! Parsing is for hostile input: the whole document is bounded ([`MAX_DOCUMENT_SIZE`]), every
//! field is type- and size-checked, unknown or duplicate keys are refused, and nothing panics.
//! Parsing does not verify: see [`crate::verify`].

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use ciborium::Value;
use coset::{
    iana, CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable,
};

use crate::keys::{self, AttestationSigner, SecretKey, MAX_CERT_DER};
use crate::pcr::{PcrBank, PCR_SIZE};

/// Largest document accepted by the parser (the NSM's response buffer is 12 KiB).
pub const MAX_DOCUMENT_SIZE: usize = 64 * 1024;
pub const MAX_USER_DATA: usize = 512;
pub const MAX_NONCE: usize = 512;
pub const MAX_PUBLIC_KEY: usize = 1024;
pub const MAX_MODULE_ID: usize = 256;
pub const MAX_CABUNDLE: usize = 16;
/// Highest PCR count a document may carry.
pub const MAX_PCRS: usize = 32;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Document is {0} bytes; at most {MAX_DOCUMENT_SIZE} are accepted")]
    TooLarge(usize),
    #[error("Document is not a COSE_Sign1 structure")]
    Cose(#[source] coset::CoseError),
    #[error("Protected header must be exactly {{1: -35}} (ES384)")]
    Algorithm,
    #[error("Document has no payload")]
    NoPayload,
    #[error("Signature is {0} bytes; ES384 needs 96")]
    SignatureLength(usize),
    #[error("Payload is not valid CBOR")]
    Cbor(#[source] ciborium::de::Error<std::io::Error>),
    #[error("Payload CBOR has trailing bytes")]
    TrailingBytes,
    #[error("Payload field {field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("Payload has unknown or duplicate key {0:?}")]
    UnexpectedKey(String),
    #[error("Cannot sign the document")]
    Sign(#[source] keys::Error),
    #[error("Cannot encode the document")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
    #[error("Request parameter {0:?} is unknown or repeated")]
    BadParameter(String),
    #[error("Request parameter {name} is not hex or longer than {max} bytes")]
    BadParameterValue { name: &'static str, max: usize },
}

fn field(field: &'static str, problem: impl Into<String>) -> Error {
    Error::Field {
        field,
        problem: problem.into(),
    }
}

/// What the requester binds into a document (`GET /attestation?nonce=…&user_data=…&public_key=…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttestationRequest {
    pub nonce: Option<Vec<u8>>,
    pub user_data: Option<Vec<u8>>,
    pub public_key: Option<Vec<u8>>,
}

impl AttestationRequest {
    /// Parses a URL query string of hex parameters `nonce`, `user_data`, `public_key` (each
    /// optional, at most once). An empty value means an empty byte string.
    pub fn from_query(query: &str) -> Result<Self, Error> {
        let mut r = AttestationRequest::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (slot, name, max) = match name {
                "nonce" => (&mut r.nonce, "nonce", MAX_NONCE),
                "user_data" => (&mut r.user_data, "user_data", MAX_USER_DATA),
                "public_key" => (&mut r.public_key, "public_key", MAX_PUBLIC_KEY),
                other => return Err(Error::BadParameter(other.chars().take(64).collect())),
            };
            if slot.is_some() {
                return Err(Error::BadParameter(name.to_owned()));
            }
            let bytes = hex::decode(value)
                .ok()
                .filter(|b| b.len() <= max && !(name == "public_key" && b.is_empty()))
                .ok_or(Error::BadParameterValue { name, max })?;
            *slot = Some(bytes);
        }
        Ok(r)
    }
}

/// The payload of an attestation document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationDocument {
    pub module_id: String,
    /// Always `"SHA384"`.
    pub digest: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    /// DER of the signing certificate.
    pub certificate: Vec<u8>,
    /// DER certificates, root first.
    pub cabundle: Vec<Vec<u8>>,
    pub public_key: Option<Vec<u8>>,
    pub user_data: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
}

fn opt_bytes(v: &Option<Vec<u8>>) -> Value {
    v.as_ref().map_or(Value::Null, |b| Value::Bytes(b.clone()))
}

impl AttestationDocument {
    /// Signs a document over `pcrs` (all registers of the bank) for `request`, with the current
    /// time; returns the COSE_Sign1 bytes to serve as `application/cbor`.
    pub fn build_and_sign(
        signer: &AttestationSigner,
        pcrs: &PcrBank,
        request: &AttestationRequest,
    ) -> Result<Vec<u8>, Error> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let doc = AttestationDocument {
            module_id: signer.module_id().to_owned(),
            digest: "SHA384".to_owned(),
            timestamp,
            pcrs: pcrs
                .registers()
                .iter()
                .enumerate()
                .map(|(i, r)| (i as u8, r.to_vec()))
                .collect(),
            certificate: signer.certificate_der().to_vec(),
            cabundle: signer.cabundle_der().to_vec(),
            public_key: request.public_key.clone(),
            user_data: request.user_data.clone(),
            nonce: request.nonce.clone(),
        };
        doc.sign(signer)
    }

    /// Wraps this payload in a COSE_Sign1 signed by `signer`.
    pub fn sign(&self, signer: &AttestationSigner) -> Result<Vec<u8>, Error> {
        self.sign_with_key(signer.key())
    }

    /// Wraps this payload in a COSE_Sign1 signed by `key`, whatever the payload's certificate
    /// says (tests and tools that need documents [`AttestationSigner`] refuses to make).
    pub fn sign_with_key(&self, key: &SecretKey) -> Result<Vec<u8>, Error> {
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES384)
            .build();
        let sign1 = CoseSign1Builder::new()
            .protected(protected)
            .payload(self.to_payload()?)
            .try_create_signature(b"", |tbs| key.sign_es384(tbs).map(|s| s.to_vec()))
            .map_err(Error::Sign)?
            .build();
        sign1.to_vec().map_err(Error::Cose)
    }

    /// The CBOR payload, in Nitro key order.
    pub fn to_payload(&self) -> Result<Vec<u8>, Error> {
        let text = |s: &str| Value::Text(s.to_owned());
        let map = Value::Map(vec![
            (text("module_id"), text(&self.module_id)),
            (text("digest"), text(&self.digest)),
            (text("timestamp"), Value::Integer(self.timestamp.into())),
            (
                text("pcrs"),
                Value::Map(
                    self.pcrs
                        .iter()
                        .map(|(i, v)| (Value::Integer((*i).into()), Value::Bytes(v.clone())))
                        .collect(),
                ),
            ),
            (text("certificate"), Value::Bytes(self.certificate.clone())),
            (
                text("cabundle"),
                Value::Array(self.cabundle.iter().cloned().map(Value::Bytes).collect()),
            ),
            (text("public_key"), opt_bytes(&self.public_key)),
            (text("user_data"), opt_bytes(&self.user_data)),
            (text("nonce"), opt_bytes(&self.nonce)),
        ]);
        let mut out = Vec::new();
        ciborium::into_writer(&map, &mut out).map_err(Error::Encode)?;
        Ok(out)
    }

    /// Parses and validates a payload (see the module documentation for the rules).
    pub fn from_payload(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_DOCUMENT_SIZE {
            return Err(Error::TooLarge(bytes.len()));
        }
        let mut rest = bytes;
        let value: Value =
            ciborium::de::from_reader_with_recursion_limit(&mut rest, 16).map_err(Error::Cbor)?;
        if !rest.is_empty() {
            return Err(Error::TrailingBytes);
        }
        let Value::Map(entries) = value else {
            return Err(field("(payload)", "not a map"));
        };
        let mut fields: BTreeMap<&'static str, Value> = BTreeMap::new();
        const KEYS: [&str; 9] = [
            "module_id",
            "digest",
            "timestamp",
            "pcrs",
            "certificate",
            "cabundle",
            "public_key",
            "user_data",
            "nonce",
        ];
        for (k, v) in entries {
            let name = match &k {
                Value::Text(t) => KEYS.iter().find(|n| **n == t.as_str()).copied(),
                _ => None,
            };
            let Some(name) = name.filter(|n| !fields.contains_key(n)) else {
                return Err(Error::UnexpectedKey(
                    format!("{k:?}").chars().take(64).collect(),
                ));
            };
            fields.insert(name, v);
        }
        let mut take = |name: &'static str| fields.remove(name);

        let module_id = match take("module_id") {
            Some(Value::Text(t)) if !t.is_empty() && t.len() <= MAX_MODULE_ID => t,
            _ => {
                return Err(field(
                    "module_id",
                    "must be non-empty text of at most 256 bytes",
                ))
            }
        };
        let digest = match take("digest") {
            Some(Value::Text(t)) if t == "SHA384" => t,
            _ => return Err(field("digest", "must be \"SHA384\"")),
        };
        let timestamp = match take("timestamp") {
            Some(Value::Integer(i)) => u64::try_from(i)
                .ok()
                .filter(|t| *t > 0)
                .ok_or_else(|| field("timestamp", "must be a positive u64"))?,
            _ => return Err(field("timestamp", "must be an unsigned integer")),
        };
        let pcrs = parse_pcrs(take("pcrs"))?;
        let certificate = cert_bytes("certificate", take("certificate"))?;
        let cabundle = match take("cabundle") {
            Some(Value::Array(a)) if !a.is_empty() && a.len() <= MAX_CABUNDLE => a
                .into_iter()
                .map(|c| cert_bytes("cabundle", Some(c)))
                .collect::<Result<Vec<_>, _>>()?,
            _ => {
                return Err(field(
                    "cabundle",
                    "must be an array of 1 to 16 certificates",
                ))
            }
        };
        let public_key = optional_bytes("public_key", take("public_key"), 1, MAX_PUBLIC_KEY)?;
        let user_data = optional_bytes("user_data", take("user_data"), 0, MAX_USER_DATA)?;
        let nonce = optional_bytes("nonce", take("nonce"), 0, MAX_NONCE)?;
        Ok(AttestationDocument {
            module_id,
            digest,
            timestamp,
            pcrs,
            certificate,
            cabundle,
            public_key,
            user_data,
            nonce,
        })
    }
}

fn parse_pcrs(v: Option<Value>) -> Result<BTreeMap<u8, Vec<u8>>, Error> {
    let Some(Value::Map(entries)) = v else {
        return Err(field("pcrs", "must be a map"));
    };
    if entries.is_empty() || entries.len() > MAX_PCRS {
        return Err(field("pcrs", "must hold 1 to 32 registers"));
    }
    let mut pcrs = BTreeMap::new();
    for (k, v) in entries {
        let index = match k {
            Value::Integer(i) => u8::try_from(i).ok().filter(|i| usize::from(*i) < MAX_PCRS),
            _ => None,
        }
        .ok_or_else(|| field("pcrs", "index must be an integer below 32"))?;
        let Value::Bytes(b) = v else {
            return Err(field("pcrs", "value must be a byte string"));
        };
        if b.len() != PCR_SIZE {
            return Err(field(
                "pcrs",
                format!("PCR{index} is {} bytes, not 48", b.len()),
            ));
        }
        if pcrs.insert(index, b).is_some() {
            return Err(field("pcrs", format!("PCR{index} appears twice")));
        }
    }
    Ok(pcrs)
}

fn cert_bytes(name: &'static str, v: Option<Value>) -> Result<Vec<u8>, Error> {
    match v {
        Some(Value::Bytes(b)) if !b.is_empty() && b.len() <= MAX_CERT_DER => Ok(b),
        _ => Err(field(name, "must be a DER certificate of 1 to 1024 bytes")),
    }
}

fn optional_bytes(
    name: &'static str,
    v: Option<Value>,
    min: usize,
    max: usize,
) -> Result<Option<Vec<u8>>, Error> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bytes(b)) if (min..=max).contains(&b.len()) => Ok(Some(b)),
        _ => Err(field(name, format!("must be null or {min} to {max} bytes"))),
    }
}

/// A parsed, *unverified* COSE_Sign1 document.
#[derive(Clone, Debug)]
pub struct SignedDocument {
    pub document: AttestationDocument,
    pub(crate) cose: CoseSign1,
}

impl SignedDocument {
    /// The Sig_structure bytes the signature covers (from the protected header bytes as
    /// received).
    pub fn signed_bytes(&self) -> Vec<u8> {
        self.cose.tbs_data(b"")
    }

    /// The raw 96-byte `r ‖ s` signature.
    pub fn signature(&self) -> &[u8] {
        &self.cose.signature
    }
}

/// The exact protected header bytes Nitro documents carry: `{1: -35}`.
const PROTECTED_ES384: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];

/// Parses a document (tagged or untagged COSE_Sign1) without verifying it.
pub fn parse(bytes: &[u8]) -> Result<SignedDocument, Error> {
    if bytes.len() > MAX_DOCUMENT_SIZE {
        return Err(Error::TooLarge(bytes.len()));
    }
    // 0xd2 = tag 18 (COSE_Sign1); Nitro emits untagged, other tools may tag.
    let cose = if bytes.first() == Some(&0xd2) {
        CoseSign1::from_tagged_slice(bytes)
    } else {
        CoseSign1::from_slice(bytes)
    }
    .map_err(Error::Cose)?;
    if cose.protected.original_data.as_deref() != Some(&PROTECTED_ES384[..]) {
        return Err(Error::Algorithm);
    }
    let payload = cose.payload.as_deref().ok_or(Error::NoPayload)?;
    if cose.signature.len() != 96 {
        return Err(Error::SignatureLength(cose.signature.len()));
    }
    let document = AttestationDocument::from_payload(payload)?;
    Ok(SignedDocument { document, cose })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let r = AttestationRequest::from_query("nonce=00ff&user_data=&public_key=01").unwrap();
        assert_eq!(r.nonce, Some(vec![0, 0xff]));
        assert_eq!(r.user_data, Some(vec![]));
        assert_eq!(r.public_key, Some(vec![1]));
        assert!(AttestationRequest::from_query("nonce=00&nonce=01").is_err());
        assert!(AttestationRequest::from_query("nonce=zz").is_err());
        assert!(AttestationRequest::from_query("evil=1").is_err());
        assert!(AttestationRequest::from_query(&format!("nonce={}", "00".repeat(513))).is_err());
        assert_eq!(
            AttestationRequest::from_query("").unwrap(),
            AttestationRequest::default()
        );
    }

    #[test]
    fn payload_rejects_bad_fields() {
        let doc = AttestationDocument {
            module_id: "m".into(),
            digest: "SHA384".into(),
            timestamp: 1,
            pcrs: [(0u8, vec![0u8; 48])].into_iter().collect(),
            certificate: vec![1],
            cabundle: vec![vec![2]],
            public_key: None,
            user_data: Some(vec![]),
            nonce: None,
        };
        let ok = doc.to_payload().unwrap();
        assert_eq!(AttestationDocument::from_payload(&ok).unwrap(), doc);
        let mut bad = doc.clone();
        bad.digest = "SHA256".into();
        assert!(AttestationDocument::from_payload(&bad.to_payload().unwrap()).is_err());
        let mut bad = doc.clone();
        bad.pcrs.insert(1, vec![0; 47]);
        assert!(AttestationDocument::from_payload(&bad.to_payload().unwrap()).is_err());
        let mut bad = doc.clone();
        bad.cabundle.clear();
        assert!(AttestationDocument::from_payload(&bad.to_payload().unwrap()).is_err());
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(matches!(
            AttestationDocument::from_payload(&trailing),
            Err(Error::TrailingBytes)
        ));
        for cut in 0..ok.len() {
            assert!(AttestationDocument::from_payload(&ok[..cut]).is_err());
        }
    }
}
