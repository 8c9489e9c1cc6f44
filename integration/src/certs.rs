//! Certificates for a test deployment: one CA per cluster and one certificate per process,
//! made with the same code as `txctl certs`, so that every test runs with mutual TLS on as a
//! real deployment does.

use anyhow::{Context, Result};
use paxos_commit_proto::pki::{Ca, Validity};
use paxos_commit_proto::tls::{Role, Tls};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The PEM files of one process.
#[derive(Debug, Clone)]
pub struct Files {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Files {
    /// `--tls-ca`, `--tls-cert`, `--tls-key` for a coordinator, agent or txctl command line.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--tls-ca".into(),
            self.ca.display().to_string(),
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }

    pub fn load(&self) -> Result<Arc<Tls>> {
        Ok(Arc::new(
            Tls::load(&self.ca, &self.cert, &self.key).context("loading test certificates")?,
        ))
    }
}

pub struct TestPki {
    pub dir: PathBuf,
    pub group: String,
    pub ca: Ca,
}

impl TestPki {
    pub fn new(dir: &Path, group: &str) -> Result<TestPki> {
        let ca = Ca::new(group, Validity::days(2)).context("test CA")?;
        ca.save(dir).context("saving the test CA")?;
        Ok(TestPki {
            dir: dir.to_path_buf(),
            group: group.to_string(),
            ca,
        })
    }

    /// The certificate of `role`, issued on first use; valid for loopback.
    pub fn files(&self, role: &Role) -> Result<Files> {
        let name = role.to_string().replace('/', "-");
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}-key.pem"));
        if !cert.exists() {
            self.issue(role, Validity::days(2))?
                .save(&self.dir, &name)?;
        }
        Ok(Files {
            ca: self.dir.join("ca.pem"),
            cert,
            key,
        })
    }

    /// A certificate issued now with any validity (an expired one, for instance).
    pub fn issue(
        &self,
        role: &Role,
        validity: Validity,
    ) -> Result<paxos_commit_proto::pki::Issued> {
        Ok(self.ca.issue(
            &self.group,
            role,
            &["127.0.0.1".into(), "localhost".into()],
            validity,
        )?)
    }

    pub fn tls(&self, role: &Role) -> Result<Arc<Tls>> {
        self.files(role)?.load()
    }
}
