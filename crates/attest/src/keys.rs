//! Attestation keys and certificates: the operator's root CA, host keys, and the signer.
//!
//! Trust chain: operator root CA (self-signed, P-384) → optional intermediates → host
//! attestation certificate (P-384, `digitalSignature`). The host key signs attestation documents
//! ([`AttestationSigner`]); verifiers are given the root.
//!
//! Files (PEM; names fixed so the CLI and the VMM agree):
//!
//! | file | content | mode |
//! |---|---|---|
//! | `root-ca.key` | root private key, PKCS#8 (AES-256-CBC encrypted when a passphrase is given) | 0600 |
//! | `root-ca.pem` | root certificate | 0644 |
//! | `host.key` | host attestation private key, PKCS#8 (encrypted when a passphrase is given) | 0600 |
//! | `host.pem` | host certificate | 0644 |
//! | `cabundle.pem` | issuing chain, root first then each intermediate down to the issuer (Nitro order) | 0644 |
//!
//! Private keys are created with mode 0600 at `open` time (never widened then narrowed), never
//! overwrite an existing file, and never appear in `Debug` output or logs ([`SecretKey`]).

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::symm::Cipher;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier,
};
use openssl::x509::{X509Name, X509NameBuilder, X509VerifyResult, X509};

use crate::pcr::sha384;

pub const ROOT_KEY_FILE: &str = "root-ca.key";
pub const ROOT_CERT_FILE: &str = "root-ca.pem";
pub const HOST_KEY_FILE: &str = "host.key";
pub const HOST_CERT_FILE: &str = "host.pem";
pub const CABUNDLE_FILE: &str = "cabundle.pem";

/// PEM files above this size are refused (a certificate chain is a few KiB).
const MAX_PEM_FILE: u64 = 1 << 20;
/// Largest DER certificate the Nitro document format allows.
pub const MAX_CERT_DER: usize = 1024;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cryptographic operation failed: {what}")]
    Crypto {
        what: &'static str,
        #[source]
        source: ErrorStack,
    },
    #[error("Cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_PEM_FILE} bytes")]
    FileTooLarge { path: PathBuf },
    #[error("{path} holds no PEM {what}")]
    BadPem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Option<ErrorStack>,
    },
    #[error("Key is not an ECDSA P-384 key")]
    NotP384,
    #[error("Certificate does not match the private key")]
    KeyMismatch,
    #[error("CA bundle is empty")]
    EmptyBundle,
    #[error("Certificate is {0} bytes in DER; the document format allows at most {MAX_CERT_DER}")]
    CertTooLarge(usize),
    #[error("Certificate was not issued by the last certificate of the CA bundle")]
    NotIssuedByBundle,
}

fn crypto(what: &'static str) -> impl FnOnce(ErrorStack) -> Error {
    move |source| Error::Crypto { what, source }
}

/// A P-384 private key. Its `Debug` output never shows key material. Cloning shares the one
/// OpenSSL key object (a reference count), it never copies the key.
#[derive(Clone)]
pub struct SecretKey(PKey<Private>);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    /// A fresh P-384 key.
    pub fn generate() -> Result<SecretKey, Error> {
        let group = EcGroup::from_curve_name(Nid::SECP384R1).map_err(crypto("P-384 group"))?;
        let ec = EcKey::generate(&group).map_err(crypto("key generation"))?;
        Ok(SecretKey(
            PKey::from_ec_key(ec).map_err(crypto("key generation"))?,
        ))
    }

    fn from_pkey(k: PKey<Private>) -> Result<SecretKey, Error> {
        let is_p384 =
            k.ec_key().ok().and_then(|ec| ec.group().curve_name()) == Some(Nid::SECP384R1);
        if !is_p384 {
            return Err(Error::NotP384);
        }
        Ok(SecretKey(k))
    }

    /// Reads a PKCS#8 PEM key, decrypting it with `passphrase` when given.
    pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<SecretKey, Error> {
        let pem = read_bounded(path)?;
        let parsed = match passphrase {
            Some(p) => PKey::private_key_from_pem_passphrase(&pem, p),
            None => PKey::private_key_from_pem(&pem),
        };
        let key = parsed.map_err(|e| Error::BadPem {
            path: path.to_owned(),
            what: "private key (or wrong passphrase)",
            source: Some(e),
        })?;
        SecretKey::from_pkey(key)
    }

    /// Writes the key as PKCS#8 PEM to a new file created with mode 0600.
    pub fn save(&self, path: &Path, passphrase: Option<&[u8]>) -> Result<(), Error> {
        let pem = match passphrase {
            Some(p) => self
                .0
                .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), p),
            None => self.0.private_key_to_pem_pkcs8(),
        }
        .map_err(crypto("key encoding"))?;
        write_new(path, &pem, 0o600)
    }

    /// Signs SHA-384(`message`) with ECDSA; returns the raw `r ‖ s` form COSE uses.
    pub fn sign_es384(&self, message: &[u8]) -> Result<[u8; 96], Error> {
        let ec = self.0.ec_key().map_err(crypto("ECDSA signing"))?;
        let sig = EcdsaSig::sign(&sha384(message), &ec).map_err(crypto("ECDSA signing"))?;
        let r = sig.r().to_vec_padded(48).map_err(crypto("ECDSA signing"))?;
        let s = sig.s().to_vec_padded(48).map_err(crypto("ECDSA signing"))?;
        let mut out = [0u8; 96];
        out[..48].copy_from_slice(&r);
        out[48..].copy_from_slice(&s);
        Ok(out)
    }
}

/// A certificate validity period, in seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// From an hour ago (tolerating clock skew between hosts) to `days` from now.
    pub fn days_from_now(days: u32) -> Validity {
        let now = unix_now();
        Validity {
            not_before: now - 3600,
            not_after: now + i64::from(days) * 86_400,
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A certificate authority: the operator's root, or an intermediate below it.
#[derive(Debug)]
pub struct CertificateAuthority {
    pub key: SecretKey,
    pub certificate: X509,
    /// Chain above this CA, root first; empty for a root.
    pub chain: Vec<X509>,
}

fn name(common_name: &str) -> Result<X509Name, Error> {
    let mut b = X509NameBuilder::new().map_err(crypto("name"))?;
    b.append_entry_by_nid(Nid::ORGANIZATIONNAME, "Outboard")
        .map_err(crypto("name"))?;
    b.append_entry_by_nid(Nid::COMMONNAME, common_name)
        .map_err(crypto("name"))?;
    Ok(b.build())
}

/// Builds and signs a certificate for `subject_key`; `issuer` is `None` for a self-signed root.
fn make_cert(
    common_name: &str,
    subject_key: &SecretKey,
    issuer: Option<&CertificateAuthority>,
    is_ca: bool,
    validity: Validity,
) -> Result<X509, Error> {
    let c = crypto("certificate creation");
    let mut b = X509::builder().map_err(c)?;
    b.set_version(2).map_err(crypto("certificate creation"))?;
    let mut serial = BigNum::new().map_err(crypto("serial"))?;
    serial
        .rand(159, MsbOption::MAYBE_ZERO, false)
        .map_err(crypto("serial"))?;
    let serial = Asn1Integer::from_bn(&serial).map_err(crypto("serial"))?;
    b.set_serial_number(&serial).map_err(crypto("serial"))?;
    let subject = name(common_name)?;
    b.set_subject_name(&subject).map_err(crypto("name"))?;
    match issuer {
        Some(ca) => b.set_issuer_name(ca.certificate.subject_name()),
        None => b.set_issuer_name(&subject),
    }
    .map_err(crypto("name"))?;
    b.set_pubkey(&subject_key.0).map_err(crypto("public key"))?;
    let nb = Asn1Time::from_unix(validity.not_before).map_err(crypto("validity"))?;
    let na = Asn1Time::from_unix(validity.not_after).map_err(crypto("validity"))?;
    b.set_not_before(&nb).map_err(crypto("validity"))?;
    b.set_not_after(&na).map_err(crypto("validity"))?;
    let mut bc = BasicConstraints::new();
    bc.critical();
    if is_ca {
        bc.ca();
    }
    b.append_extension(bc.build().map_err(crypto("extensions"))?)
        .map_err(crypto("extensions"))?;
    let mut ku = KeyUsage::new();
    ku.critical();
    if is_ca {
        ku.key_cert_sign().crl_sign();
    } else {
        ku.digital_signature();
    }
    b.append_extension(ku.build().map_err(crypto("extensions"))?)
        .map_err(crypto("extensions"))?;
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(issuer.map(|ca| &*ca.certificate), None))
        .map_err(crypto("extensions"))?;
    b.append_extension(ski).map_err(crypto("extensions"))?;
    if let Some(ca) = issuer {
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&ca.certificate), None))
            .map_err(crypto("extensions"))?;
        b.append_extension(aki).map_err(crypto("extensions"))?;
    }
    let signing_key = issuer.map_or(subject_key, |ca| &ca.key);
    b.sign(&signing_key.0, MessageDigest::sha384())
        .map_err(crypto("certificate signing"))?;
    Ok(b.build())
}

impl CertificateAuthority {
    /// A new self-signed root CA with a fresh P-384 key.
    pub fn create_root(common_name: &str, validity: Validity) -> Result<Self, Error> {
        let key = SecretKey::generate()?;
        let certificate = make_cert(common_name, &key, None, true, validity)?;
        Ok(Self {
            key,
            certificate,
            chain: Vec::new(),
        })
    }

    /// A new intermediate CA issued by this one.
    pub fn create_intermediate(
        &self,
        common_name: &str,
        validity: Validity,
    ) -> Result<Self, Error> {
        let key = SecretKey::generate()?;
        let certificate = make_cert(common_name, &key, Some(self), true, validity)?;
        let mut chain = self.chain.clone();
        chain.push(self.certificate.clone());
        Ok(Self {
            key,
            certificate,
            chain,
        })
    }

    /// Issues a host attestation certificate for `host_key`.
    pub fn issue_host_certificate(
        &self,
        common_name: &str,
        host_key: &SecretKey,
        validity: Validity,
    ) -> Result<X509, Error> {
        make_cert(common_name, host_key, Some(self), false, validity)
    }

    /// The CA bundle a host certificate issued by this CA carries: root first, this CA last.
    pub fn bundle(&self) -> Vec<X509> {
        let mut b = self.chain.clone();
        b.push(self.certificate.clone());
        b
    }

    /// Writes `root-ca.key` (0600) and `root-ca.pem` into `dir` (created 0700 if missing).
    pub fn save_root(&self, dir: &Path, passphrase: Option<&[u8]>) -> Result<(), Error> {
        make_dir(dir)?;
        self.key.save(&dir.join(ROOT_KEY_FILE), passphrase)?;
        write_certs(
            &dir.join(ROOT_CERT_FILE),
            std::slice::from_ref(&self.certificate),
        )
    }

    /// Loads a root CA saved by [`save_root`](Self::save_root).
    pub fn load_root(dir: &Path, passphrase: Option<&[u8]>) -> Result<Self, Error> {
        let key = SecretKey::load(&dir.join(ROOT_KEY_FILE), passphrase)?;
        let certificate = load_certificate(&dir.join(ROOT_CERT_FILE))?;
        if !certificate
            .public_key()
            .map_err(crypto("public key"))?
            .public_eq(&key.0)
        {
            return Err(Error::KeyMismatch);
        }
        Ok(Self {
            key,
            certificate,
            chain: Vec::new(),
        })
    }
}

/// Writes a host's `host.key` (0600), `host.pem` and `cabundle.pem` into `dir`.
pub fn save_host_files(
    dir: &Path,
    key: &SecretKey,
    certificate: &X509,
    cabundle: &[X509],
    passphrase: Option<&[u8]>,
) -> Result<(), Error> {
    make_dir(dir)?;
    key.save(&dir.join(HOST_KEY_FILE), passphrase)?;
    write_certs(&dir.join(HOST_CERT_FILE), std::slice::from_ref(certificate))?;
    write_certs(&dir.join(CABUNDLE_FILE), cabundle)
}

fn make_dir(dir: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Create {
            path: dir.to_owned(),
            source,
        })
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let err = |source| Error::Create {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

fn write_certs(path: &Path, certs: &[X509]) -> Result<(), Error> {
    let mut pem = Vec::new();
    for c in certs {
        pem.extend(c.to_pem().map_err(crypto("certificate encoding"))?);
    }
    write_new(path, &pem, 0o644)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, Error> {
    let err = |source| Error::ReadFile {
        path: path.to_owned(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    let mut buf = Vec::new();
    f.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_PEM_FILE {
        return Err(Error::FileTooLarge {
            path: path.to_owned(),
        });
    }
    Ok(buf)
}

/// Loads every certificate of a PEM file, in file order (at least one).
pub fn load_certificates(path: &Path) -> Result<Vec<X509>, Error> {
    let pem = read_bounded(path)?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| Error::BadPem {
        path: path.to_owned(),
        what: "certificate",
        source: Some(e),
    })?;
    if certs.is_empty() {
        return Err(Error::BadPem {
            path: path.to_owned(),
            what: "certificate",
            source: None,
        });
    }
    Ok(certs)
}

/// Loads the first certificate of a PEM file.
pub fn load_certificate(path: &Path) -> Result<X509, Error> {
    Ok(load_certificates(path)?.swap_remove(0))
}

/// The host's document signer: its key, certificate and CA bundle. A host's attestation
/// service clones it per VM ([`AttestationSigner::with_module_id`]); clones share the key.
#[derive(Clone, Debug)]
pub struct AttestationSigner {
    key: SecretKey,
    certificate_der: Vec<u8>,
    cabundle_der: Vec<Vec<u8>>,
    module_id: String,
}

impl AttestationSigner {
    /// Checks that the key is P-384, matches `certificate`, and that the last bundle entry issued
    /// the certificate. `cabundle` is root first.
    pub fn new(key: SecretKey, certificate: &X509, cabundle: &[X509]) -> Result<Self, Error> {
        let cert_key = certificate.public_key().map_err(crypto("public key"))?;
        if !cert_key.public_eq(&key.0) {
            return Err(Error::KeyMismatch);
        }
        let issuer = cabundle.last().ok_or(Error::EmptyBundle)?;
        if issuer.issued(certificate) != X509VerifyResult::OK {
            return Err(Error::NotIssuedByBundle);
        }
        let der = |c: &X509| -> Result<Vec<u8>, Error> {
            let d = c.to_der().map_err(crypto("certificate encoding"))?;
            if d.len() > MAX_CERT_DER {
                return Err(Error::CertTooLarge(d.len()));
            }
            Ok(d)
        };
        let module_id = certificate
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok())
            .unwrap_or_else(|| "outboard".to_owned());
        Ok(Self {
            key,
            certificate_der: der(certificate)?,
            cabundle_der: cabundle.iter().map(der).collect::<Result<_, _>>()?,
            module_id,
        })
    }

    /// Loads the files `outboard attest host-key create` writes (`--attest-key`,
    /// `--attest-cert`, `--attest-cabundle` of outboard-vmm).
    pub fn from_files(
        key: &Path,
        certificate: &Path,
        cabundle: &Path,
        passphrase: Option<&[u8]>,
    ) -> Result<Self, Error> {
        let key = SecretKey::load(key, passphrase)?;
        let cert = load_certificate(certificate)?;
        let bundle = load_certificates(cabundle)?;
        Self::new(key, &cert, &bundle)
    }

    /// Sets the document's `module_id` (default: the certificate's common name). The VMM uses
    /// its VM id, like Nitro's enclave id.
    pub fn with_module_id(mut self, module_id: impl Into<String>) -> Self {
        self.module_id = module_id.into();
        self
    }

    pub fn module_id(&self) -> &str {
        &self.module_id
    }

    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate_der
    }

    /// Root first.
    pub fn cabundle_der(&self) -> &[Vec<u8>] {
        &self.cabundle_der
    }

    pub(crate) fn key(&self) -> &SecretKey {
        &self.key
    }

    /// ES384 over `message`, raw `r ‖ s`.
    pub fn sign(&self, message: &[u8]) -> Result<[u8; 96], Error> {
        self.key.sign_es384(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_roundtrip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertificateAuthority::create_root("test root", Validity::days_from_now(10)).unwrap();
        ca.save_root(dir.path(), Some(b"pw")).unwrap();
        let mode = std::fs::metadata(dir.path().join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(SecretKey::load(&dir.path().join(ROOT_KEY_FILE), None).is_err());
        let ca = CertificateAuthority::load_root(dir.path(), Some(b"pw")).unwrap();
        // Never overwrites.
        assert!(ca.save_root(dir.path(), None).is_err());

        let host_key = SecretKey::generate().unwrap();
        let cert = ca
            .issue_host_certificate("host-1", &host_key, Validity::days_from_now(1))
            .unwrap();
        let hd = dir.path().join("host");
        save_host_files(&hd, &host_key, &cert, &ca.bundle(), None).unwrap();
        let s = AttestationSigner::from_files(
            &hd.join(HOST_KEY_FILE),
            &hd.join(HOST_CERT_FILE),
            &hd.join(CABUNDLE_FILE),
            None,
        )
        .unwrap();
        assert_eq!(s.module_id(), "host-1");
        assert_eq!(format!("{:?}", s.key), "SecretKey(<redacted>)");
        assert!(!format!("{s:?}").contains("PRIVATE"));
    }

    #[test]
    fn signer_rejects_a_foreign_key() {
        let ca = CertificateAuthority::create_root("r", Validity::days_from_now(1)).unwrap();
        let k = SecretKey::generate().unwrap();
        let cert = ca
            .issue_host_certificate("h", &k, Validity::days_from_now(1))
            .unwrap();
        let other = SecretKey::generate().unwrap();
        assert!(matches!(
            AttestationSigner::new(other, &cert, &ca.bundle()),
            Err(Error::KeyMismatch)
        ));
        let other_ca = CertificateAuthority::create_root("r2", Validity::days_from_now(1)).unwrap();
        assert!(matches!(
            AttestationSigner::new(k, &cert, &other_ca.bundle()),
            Err(Error::NotIssuedByBundle)
        ));
    }
}
