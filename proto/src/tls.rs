//! Mutual TLS on every link, and who is at the other end of one.
//!
//! A server of this project decides what a caller may do from the caller's certificate and
//! never from a field of the message: a message body can claim any replica index or
//! participant id, a certificate signed by the deployment's CA cannot. The identity is the
//! certificate's URI subject alternative name, SPIFFE-style:
//!
//! ```text
//! spiffe://<group>/replica/<index>     a coordinator replica
//! spiffe://<group>/agent/<participant> the agent of one database
//! spiffe://<group>/client/<name>       an application
//! spiffe://<group>/operator/<name>     a person with txctl
//! ```
//!
//! Plaintext is possible only when a process is explicitly started `insecure`; it then warns
//! at start, and its servers cannot tell callers apart, so they let everyone do everything.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// What a caller is, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    Replica(u32),
    Agent(String),
    Client(String),
    Operator(String),
}

/// The kinds of [`Role`], for permission lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Replica,
    Agent,
    Client,
    Operator,
}

impl Role {
    pub fn kind(&self) -> Kind {
        match self {
            Role::Replica(_) => Kind::Replica,
            Role::Agent(_) => Kind::Agent,
            Role::Client(_) => Kind::Client,
            Role::Operator(_) => Kind::Operator,
        }
    }

    /// The certificate's URI for this role in `group`.
    pub fn uri(&self, group: &str) -> String {
        format!("spiffe://{group}/{self}")
    }

    /// Parses `spiffe://<group>/<kind>/<name>` into (group, role).
    pub fn parse_uri(uri: &str) -> Result<(String, Role), String> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{uri:?} is not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let (Some(group), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("{uri:?} is not spiffe://<group>/<role>/<name>"));
        };
        if !valid_name(group) || !valid_name(name) {
            return Err(format!(
                "{uri:?}: group and name must be 1-64 characters of [A-Za-z0-9_-]"
            ));
        }
        let role = match kind {
            "replica" => Role::Replica(
                name.parse()
                    .map_err(|_| format!("{uri:?}: a replica is named by its index"))?,
            ),
            "agent" => Role::Agent(name.to_string()),
            "client" => Role::Client(name.to_string()),
            "operator" => Role::Operator(name.to_string()),
            other => return Err(format!("{uri:?}: unknown role {other:?}")),
        };
        Ok((group.to_string(), role))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Replica(i) => write!(f, "replica/{i}"),
            Role::Agent(p) => write!(f, "agent/{p}"),
            Role::Client(n) => write!(f, "client/{n}"),
            Role::Operator(n) => write!(f, "operator/{n}"),
        }
    }
}

/// Group names, participant ids and certificate names share one charset: they end up in
/// gids, URIs and log lines.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A configured group name, or the default `main`; in the charset of [`valid_name`].
pub fn group_or_default(group: Option<String>) -> Result<String, String> {
    let group = group.unwrap_or_else(|| "main".to_string());
    if valid_name(&group) {
        Ok(group)
    } else {
        Err(format!(
            "group {group:?} must be 1-64 characters of [A-Za-z0-9_-]"
        ))
    }
}

/// The identity in a DER certificate: its one `spiffe://` URI SAN.
pub fn certificate_identity(der: &[u8]) -> Result<(String, Role), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?
        .ok_or("the certificate has no subject alternative names")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let uri = uris
        .next()
        .ok_or("the certificate has no spiffe:// URI subject alternative name")?;
    if uris.next().is_some() {
        return Err("the certificate names more than one spiffe:// identity".into());
    }
    Role::parse_uri(uri)
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A process's own certificate and key, and the CA that signs every peer's.
pub struct Tls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// Who this process is, read from its own certificate.
    pub group: String,
    pub role: Role,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tls({})", self.role.uri(&self.group))
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl Tls {
    /// Loads PEM files: the CA bundle (several CAs while one is being rotated out), this
    /// process's certificate and its private key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        Tls::from_pem(
            read("CA certificate", ca)?,
            read("certificate", cert)?,
            read("private key", key)?,
        )
    }

    pub fn from_pem(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Tls, TlsError> {
        let der = first_pem_block(&cert_pem)
            .ok_or_else(|| TlsError::Invalid("the certificate file holds no PEM block".into()))?;
        let (group, role) = certificate_identity(&der)
            .map_err(|e| TlsError::Invalid(format!("own certificate: {e}")))?;
        if first_pem_block(&ca_pem).is_none() {
            return Err(TlsError::Invalid(
                "the CA file holds no PEM certificate".into(),
            ));
        }
        Ok(Tls {
            ca_pem,
            cert_pem,
            key_pem,
            group,
            role,
        })
    }

    /// The PEM text of the CA bundle, this process's certificate and its key, for a server
    /// built outside tonic (the operator page's HTTPS).
    pub fn pem(&self) -> (&[u8], &[u8], &[u8]) {
        (&self.ca_pem, &self.cert_pem, &self.key_pem)
    }

    /// Server side: present our certificate; ask every caller for one signed by the CA. A
    /// caller without one still gets through the handshake, so that it can be told
    /// UNAUTHENTICATED in gRPC terms rather than see a connection reset; a certificate that
    /// is expired or signed by another CA fails the handshake.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
    }

    /// Client side: verify the server against the CA and the host we dialled; present ours.
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'))
    }
}

/// The DER bytes of the first PEM block of a file.
fn first_pem_block(pem: &[u8]) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem)
        .ok()
        .map(|(_, block)| block.contents)
}

/// How a process talks: mutual TLS, or plaintext when explicitly configured so.
#[derive(Debug, Clone)]
pub enum Security {
    Tls(Arc<Tls>),
    Insecure,
}

impl Security {
    /// TLS from three PEM files, or plaintext when (and only when) `insecure` is set: the
    /// settings of every process of the project.
    /// The certificate must belong to `group`.
    pub fn from_settings(
        group: &str,
        insecure: bool,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Security, String> {
        match (insecure, ca, cert, key) {
            (true, None, None, None) => Ok(Security::Insecure),
            (true, ..) => Err("insecure = true and TLS files are both set: choose one".into()),
            (false, Some(ca), Some(cert), Some(key)) => {
                let tls = Tls::load(&ca, &cert, &key).map_err(|e| format!("TLS: {e}"))?;
                if tls.group != group {
                    return Err(format!(
                        "the certificate {} belongs to group {:?}, this configuration is group \
                         {group:?}",
                        tls.role.uri(&tls.group),
                        tls.group
                    ));
                }
                Ok(Security::Tls(Arc::new(tls)))
            }
            (false, ..) => Err(
                "TLS needs tls_ca, tls_cert and tls_key (--tls-ca, --tls-cert, \
                 --tls-key); `txctl certs` makes a development CA and certificates. Plaintext \
                 only with insecure = true, on a development machine"
                    .into(),
            ),
        }
    }

    pub fn tls(&self) -> Option<&Arc<Tls>> {
        match self {
            Security::Tls(t) => Some(t),
            Security::Insecure => None,
        }
    }

    /// The warning every insecure process logs at start.
    pub fn warn_if_insecure(&self, what: &str) {
        if matches!(self, Security::Insecure) {
            tracing::warn!(
                "{what} runs WITHOUT TLS (insecure = true): every port is plaintext and any \
                 caller can do anything, including commit one database and abort another; \
                 use this only on a development machine"
            );
        }
    }
}

/// Who called, as far as the server can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An insecure server cannot tell: it trusts what the message says.
    Anyone,
    Peer(Role),
}

impl Caller {
    /// The replica index to attribute a message to: the certificate's, or (insecure) the
    /// message's own claim.
    pub fn replica_or(&self, claimed: u32) -> Option<u32> {
        match self {
            Caller::Anyone => Some(claimed),
            Caller::Peer(Role::Replica(i)) => Some(*i),
            Caller::Peer(_) => None,
        }
    }

    /// Whether this caller may speak for participant `id`.
    pub fn is_agent(&self, id: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Peer(Role::Agent(p)) => p == id,
            Caller::Peer(_) => false,
        }
    }

    /// A name for audit records and logs.
    pub fn name(&self) -> String {
        match self {
            Caller::Anyone => "anonymous (insecure)".into(),
            Caller::Peer(r) => r.to_string(),
        }
    }
}

/// The server side of identities: from a request's peer certificate to a [`Caller`], and
/// the permission check of each call.
#[derive(Debug, Clone)]
pub struct Gate {
    /// The group every caller's certificate must name; `None` when insecure.
    group: Option<String>,
    /// Unary calls in progress: bounded, so that a flood is refused instead of queued.
    calls: Arc<tokio::sync::Semaphore>,
    max_calls: usize,
    /// Certificate (DER) → the identity it names (see [`Gate::identity`]).
    identities: Arc<std::sync::Mutex<std::collections::HashMap<Vec<u8>, IdentityResult>>>,
    /// Calls refused for overload since start.
    overloaded: Arc<std::sync::atomic::AtomicU64>,
}

type IdentityResult = Result<(String, Role), String>;

impl Gate {
    /// `max_calls`: unary calls served at once (see [`Gate::admit`]).
    pub fn new(security: &Security, max_calls: usize) -> Gate {
        Gate {
            group: security.tls().map(|t| t.group.clone()),
            calls: Arc::new(tokio::sync::Semaphore::new(max_calls)),
            max_calls,
            identities: Default::default(),
            overloaded: Default::default(),
        }
    }

    /// Admits a unary call of a permitted caller while fewer than `max_calls` are being
    /// served (the permit ends with the call), or says why not.
    pub fn admit<T>(
        &self,
        req: &Request<T>,
        call: &str,
        kinds: &[Kind],
    ) -> Result<(Caller, tokio::sync::OwnedSemaphorePermit), Status> {
        let caller = self.allow(req, call, kinds)?;
        let permit = self.calls.clone().try_acquire_owned().map_err(|_| {
            // Refusals come in floods when they come: the 1st, 2nd, 4th, 8th... are logged.
            let n = self
                .overloaded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    call,
                    refused = n,
                    "refused a call: serving {} already (max_concurrent_calls)",
                    self.max_calls
                );
            }
            crate::reason::status(
                tonic::Code::ResourceExhausted,
                format!("serving {} calls already; retry later", self.max_calls),
                crate::pb::ErrorReason::Overloaded,
                &[],
            )
        })?;
        Ok((caller, permit))
    }

    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let Some(group) = &self.group else {
            return Ok(Caller::Anyone);
        };
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: every caller must present one signed by the \
                 deployment's CA",
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
        let (their_group, role) = self
            .identity(leaf)
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        if &their_group != group {
            return Err(Status::permission_denied(format!(
                "the caller's certificate belongs to group {their_group:?}, not {group:?}"
            )));
        }
        Ok(Caller::Peer(role))
    }

    /// The identity in a peer's certificate. A handful of certificates call a server over
    /// and over (every Execute of a client): parsing X.509 once per certificate, not once
    /// per call, keeps it off the hot path. Only certificates that passed the handshake get
    /// here, so the cache holds the deployment's own; it starts over past a bound.
    fn identity(&self, der: &[u8]) -> Result<(String, Role), String> {
        const MAX_CACHED: usize = 1024;
        let mut cache = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = cache.get(der) {
            return known.clone();
        }
        let parsed = certificate_identity(der);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(der.to_vec(), parsed.clone());
        parsed
    }

    /// The caller, if its kind may make `call`.
    pub fn allow<T>(&self, req: &Request<T>, call: &str, kinds: &[Kind]) -> Result<Caller, Status> {
        let caller = self.caller(req).inspect_err(|s| {
            let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(call, %peer, "refused a caller: {}", s.message());
        })?;
        match &caller {
            Caller::Anyone => Ok(caller),
            Caller::Peer(role) if kinds.contains(&role.kind()) => Ok(caller),
            Caller::Peer(role) => {
                tracing::warn!(caller = %role, call, "permission denied");
                Err(Status::permission_denied(format!(
                    "{role} may not call {call}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_uris() {
        for role in [
            Role::Replica(2),
            Role::Agent("bank_a".into()),
            Role::Client("app-1".into()),
            Role::Operator("alice".into()),
        ] {
            let uri = role.uri("bank");
            assert_eq!(Role::parse_uri(&uri), Ok(("bank".to_string(), role)));
        }
        for bad in [
            "http://bank/replica/0",
            "spiffe://bank/replica/x",
            "spiffe://bank/king/x",
            "spiffe://bank/agent",
            "spiffe://bank/agent/a/b",
            "spiffe://ba nk/agent/a",
            "spiffe:///agent/a",
        ] {
            assert!(Role::parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn callers_speak_only_for_themselves() {
        let agent = Caller::Peer(Role::Agent("bank_a".into()));
        assert!(agent.is_agent("bank_a"));
        assert!(!agent.is_agent("bank_b"));
        assert_eq!(agent.replica_or(0), None);
        assert_eq!(Caller::Peer(Role::Replica(1)).replica_or(0), Some(1));
        assert_eq!(Caller::Anyone.replica_or(2), Some(2));
        assert!(!Caller::Peer(Role::Client("c".into())).is_agent("bank_a"));
    }
}
