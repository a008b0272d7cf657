//! Verifying an attestation document against a trusted root, a nonce and a policy.
//!
//! Order of checks (each failure is a distinct [`Error`] variant):
//! 1. parse (bounded, hostile input: [`crate::document::parse`]);
//! 2. the certificate chain: leaf ← cabundle intermediates ← the *caller's* root (the root the
//!    document carries is not trusted), with OpenSSL's path validation: signatures, validity
//!    periods at the verification time, CA basic constraints and path length; the leaf key must
//!    be P-384 and, when it has a key usage extension, allowed `digitalSignature`;
//! 3. the COSE_Sign1 ES384 signature with the leaf key over the Sig_structure as received;
//! 4. the nonce, when one is expected (missing or different → error);
//! 5. the event log, when given: replaying it must yield the document's PCRs;
//! 6. the policy, when given (any mismatch → error carrying the per-PCR report).

use openssl::bn::BigNum;
use openssl::ecdsa::EcdsaSig;
use openssl::error::ErrorStack;
use openssl::nid::Nid;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyParam;
use openssl::x509::{X509KeyUsage, X509StoreContext, X509};

use crate::document::{self, AttestationDocument};
use crate::pcr::{sha384, EventLog};
use crate::policy::{self, Policy, PolicyReport};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Malformed attestation document")]
    Parse(#[source] document::Error),
    #[error("Certificate in the document is not valid DER")]
    CertificateDer(#[source] ErrorStack),
    #[error("Signing certificate key is not ECDSA P-384")]
    LeafKey,
    #[error("Signing certificate's key usage does not allow digital signatures")]
    LeafKeyUsage,
    #[error("Certificate chain does not verify to the given root: {0}")]
    Chain(String),
    #[error("Certificate verification failed")]
    ChainSetup(#[source] ErrorStack),
    #[error("Document signature is not valid for its certificate")]
    BadSignature,
    #[error("Document carries no nonce but one was expected")]
    NonceMissing,
    #[error("Document nonce does not match the expected nonce (stale or replayed document)")]
    NonceMismatch,
    #[error("Event log does not replay to the document's PCR {}", .0.iter().map(u8::to_string).collect::<Vec<_>>().join(", "))]
    EventLogMismatch(Vec<u8>),
    #[error("Event log is invalid")]
    EventLog(#[source] crate::pcr::Error),
    #[error("Measurements rejected by the policy")]
    Policy(#[source] policy::Error),
}

/// What to check besides signature and chain.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyOptions<'a> {
    /// The challenge the verifier sent; `None` skips the freshness check.
    pub expected_nonce: Option<&'a [u8]>,
    pub policy: Option<&'a Policy>,
    /// The event log the host served with the document; `None` skips the replay check.
    pub event_log: Option<&'a EventLog>,
    /// Verification time for certificate validity, seconds since the Unix epoch (default: now).
    pub time: Option<i64>,
}

/// A document that passed every requested check.
#[derive(Clone, Debug)]
pub struct Verified {
    pub document: AttestationDocument,
    /// The policy outcome, when a policy was given (then it approved).
    pub policy_report: Option<PolicyReport>,
}

/// Verifies `bytes` (a COSE_Sign1 document) against `root`; see the module documentation.
pub fn verify_document(
    bytes: &[u8],
    root: &X509,
    opts: &VerifyOptions<'_>,
) -> Result<Verified, Error> {
    let signed = document::parse(bytes).map_err(Error::Parse)?;
    let doc = &signed.document;

    let leaf = X509::from_der(&doc.certificate).map_err(Error::CertificateDer)?;
    verify_chain(&leaf, &doc.cabundle, root, opts.time)?;

    // Nitro's rule: the leaf must be allowed to sign (a CA certificate with only keyCertSign
    // must not sign documents); an absent extension means unrestricted.
    if leaf
        .key_usage()
        .is_some_and(|ku| !ku.contains(X509KeyUsage::DIGITAL_SIGNATURE))
    {
        return Err(Error::LeafKeyUsage);
    }
    let key = leaf.public_key().map_err(|_| Error::LeafKey)?;
    let ec = key.ec_key().map_err(|_| Error::LeafKey)?;
    if ec.group().curve_name() != Some(Nid::SECP384R1) {
        return Err(Error::LeafKey);
    }
    let sig = signed.signature();
    let r = BigNum::from_slice(&sig[..48]).map_err(|_| Error::BadSignature)?;
    let s = BigNum::from_slice(&sig[48..]).map_err(|_| Error::BadSignature)?;
    let sig = EcdsaSig::from_private_components(r, s).map_err(|_| Error::BadSignature)?;
    let digest = sha384(&signed.signed_bytes());
    if !sig.verify(&digest, &ec).unwrap_or(false) {
        return Err(Error::BadSignature);
    }

    if let Some(expected) = opts.expected_nonce {
        match &doc.nonce {
            None => return Err(Error::NonceMissing),
            Some(n) if n[..] != expected[..] => return Err(Error::NonceMismatch),
            Some(_) => {}
        }
    }

    if let Some(log) = opts.event_log {
        let bad = log.mismatches(&doc.pcrs).map_err(Error::EventLog)?;
        if !bad.is_empty() {
            return Err(Error::EventLogMismatch(bad));
        }
    }

    let policy_report = opts
        .policy
        .map(|p| p.check_document(doc))
        .transpose()
        .map_err(Error::Policy)?;
    Ok(Verified {
        document: signed.document,
        policy_report,
    })
}

fn verify_chain(
    leaf: &X509,
    cabundle: &[Vec<u8>],
    root: &X509,
    time: Option<i64>,
) -> Result<(), Error> {
    let mut store = X509StoreBuilder::new().map_err(Error::ChainSetup)?;
    store.add_cert(root.clone()).map_err(Error::ChainSetup)?;
    if let Some(t) = time {
        let mut param = X509VerifyParam::new().map_err(Error::ChainSetup)?;
        param.set_time(t as _);
        store.set_param(&param).map_err(Error::ChainSetup)?;
    }
    let store = store.build();
    let mut untrusted = Stack::new().map_err(Error::ChainSetup)?;
    for der in cabundle {
        let c = X509::from_der(der).map_err(Error::CertificateDer)?;
        untrusted.push(c).map_err(Error::ChainSetup)?;
    }
    let mut ctx = X509StoreContext::new().map_err(Error::ChainSetup)?;
    let outcome = ctx
        .init(&store, leaf, &untrusted, |c| {
            let ok = c.verify_cert()?;
            Ok((ok, c.error()))
        })
        .map_err(Error::ChainSetup)?;
    match outcome {
        (true, _) => Ok(()),
        (false, e) => Err(Error::Chain(e.error_string().to_owned())),
    }
}
