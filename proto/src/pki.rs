//! A small certificate authority for development, tests and the demo: a CA and one
//! certificate per process, each naming its role in a `spiffe://` URI (see [`crate::tls`]).
//!
//! A production deployment would rather use its own PKI (SPIRE, Vault, cert-manager); what
//! matters to paxos-commit is only that every certificate carries the right URI and that
//! every process trusts the same CA bundle.

use crate::tls::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days`.
    pub fn days(days: u64) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(days * 86_400),
        }
    }

    /// Expired an hour ago (for tests that must see such a certificate refused).
    pub fn expired() -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::from_secs(2 * 86_400),
            not_after: now - Duration::from_secs(3600),
        }
    }
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    key_pem: String,
}

impl Ca {
    /// A new self-signed CA for `group`.
    pub fn new(group: &str, validity: Validity) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("paxos-commit CA ({group})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA saved by [`Ca::save`].
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
                what: "cannot read",
                path,
                source,
            })
        };
        let (cert_pem, key_pem) = (read("ca.pem")?, read("ca-key.pem")?);
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca {
            issuer,
            cert_pem,
            key_pem,
        })
    }

    /// Writes `ca.pem` and `ca-key.pem` (private: mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        write(dir, "ca.pem", &self.cert_pem, false)?;
        write(dir, "ca-key.pem", &self.key_pem, true).map(|_| ())
    }

    /// A certificate for `role` in `group`, valid for the server names `hosts` (DNS names or
    /// IP addresses that clients dial) and usable on both ends of a TLS connection.
    pub fn issue(
        &self,
        group: &str,
        role: &Role,
        hosts: &[String],
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let uri = role.uri(group);
        let san = SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|_| PkiError::Invalid(format!("{uri:?} is not an IA5 string")))?,
        );
        let usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(hosts, Some(san), &uri, usages, validity)
    }

    /// A server certificate with no paxos-commit identity (a PostgreSQL server's, say):
    /// valid for `hosts` only, so it can never pass for a process of the deployment.
    pub fn issue_host(&self, hosts: &[String], validity: Validity) -> Result<Issued, PkiError> {
        let name = hosts.first().cloned().unwrap_or_default();
        let usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(hosts, None, &name, usages, validity)
    }

    fn sign(
        &self,
        hosts: &[String],
        identity: Option<SanType>,
        common_name: &str,
        usages: Vec<ExtendedKeyUsagePurpose>,
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.subject_alt_names.extend(identity);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Writes `<name>.pem` and `<name>-key.pem` (mode 0600) into `dir`; returns their paths.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert = write(dir, &format!("{name}.pem"), &self.cert_pem, false)?;
        let key = write(dir, &format!("{name}-key.pem"), &self.key_pem, true)?;
        Ok((cert, key))
    }
}

fn write(dir: &Path, name: &str, text: &str, private: bool) -> Result<PathBuf, PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let io = |source| PkiError::Io {
        what: "cannot write",
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{certificate_identity, Tls};

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = Ca::new("bank", Validity::days(1)).expect("ca");
        let role = Role::Agent("bank_a".into());
        let issued = ca
            .issue("bank", &role, &["127.0.0.1".into()], Validity::days(1))
            .expect("issue");
        let tls = Tls::from_pem(
            ca.cert_pem.clone().into_bytes(),
            issued.cert_pem.clone().into_bytes(),
            issued.key_pem.clone().into_bytes(),
        )
        .expect("load");
        assert_eq!((tls.group.as_str(), &tls.role), ("bank", &role));
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).expect("pem");
        assert_eq!(
            certificate_identity(&pem.contents),
            Ok(("bank".into(), role))
        );
    }

    #[test]
    fn a_saved_ca_issues_again() {
        let dir = std::env::temp_dir().join(format!("pxc-pki-{}", std::process::id()));
        let ca = Ca::new("g", Validity::days(1)).expect("ca");
        ca.save(&dir).expect("save");
        let again = Ca::load(&dir).expect("load");
        assert_eq!(again.cert_pem, ca.cert_pem);
        again
            .issue("g", &Role::Operator("op".into()), &[], Validity::days(1))
            .expect("issue");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
