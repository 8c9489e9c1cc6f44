//! The operator page: a read-only web page each replica serves on `operator_listen`, so that
//! an operator with only a browser sees what txctl sees — health, what is in doubt and why,
//! one transaction's votes, the last minutes' commits, the audit. HTTPS with the deployment's
//! CA; the page is shown only to a caller whose certificate is an operator's of this group,
//! decided from the certificate alone (anyone else gets 401/403 and nothing of the data).
//! HTTP/1.1, GET only, one small server-rendered document, no scripts.

use crate::audit::LastAudit;
use crate::config::ReplicaConfig;
use crate::error::CoordinatorError;
use crate::operator_html::{self, Gathered};
use crate::ops::Deployment;
use crate::server::Handle;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use paxos_commit_proto::tls::{certificate_identity, Role, Tls};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// A client that has not finished its TLS handshake or request head by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Everything the page asks of replicas and agents, each question bounded by this.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// A txid is 16 hex digits; anything much longer in the query is not one.
const MAX_QUERY_BYTES: usize = 256;

/// What the page is built from.
pub struct PageState {
    pub cfg: Arc<ReplicaConfig>,
    pub handle: Handle,
    pub deployment: Deployment,
    pub last_audit: LastAudit,
}

/// Who is asking, decided once per connection from its certificate.
#[derive(Clone)]
enum Viewer {
    Operator(String),
    /// Insecure deployment: no identities exist.
    Anyone,
    Refused(StatusCode, String),
}

/// Binds `operator_listen` (if set; a bad address or a port in use fails the start) and
/// serves the page, with its own connections to the replicas and agents (as this replica),
/// until the process ends.
pub async fn start(
    cfg: Arc<ReplicaConfig>,
    handle: Handle,
    last_audit: LastAudit,
) -> Result<(), CoordinatorError> {
    let Some(listen) = cfg.operator_listen.clone() else {
        return Ok(());
    };
    let addr: SocketAddr = listen.parse().map_err(|e| {
        CoordinatorError::InvalidArgument(format!("operator_listen address {listen:?}: {e}"))
    })?;
    let acceptor = match cfg.security.tls() {
        Some(tls) => Some(TlsAcceptor::from(Arc::new(server_config(tls)?))),
        None => None,
    };
    let deployment = Deployment::new((*cfg).clone(), ASK_TIMEOUT)
        .map_err(|e| CoordinatorError::InvalidArgument(format!("operator page: {e}")))?;
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        CoordinatorError::InvalidArgument(format!("operator page: binding {addr}: {e}"))
    })?;
    tracing::info!(%addr, tls = acceptor.is_some(), "operator page serving");
    let state = PageState {
        cfg,
        handle,
        deployment,
        last_audit,
    };
    tokio::spawn(accept_loop(listener, acceptor, Arc::new(state)));
    Ok(())
}

async fn accept_loop(listener: TcpListener, acceptor: Option<TlsAcceptor>, state: Arc<PageState>) {
    let group = state.cfg.group.clone();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("operator page: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (state, acceptor, group) = (state.clone(), acceptor.clone(), group.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => serve_connection(tcp, Viewer::Anyone, state).await,
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, "operator page: TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => return,
                        };
                    let viewer = viewer_of(tls.get_ref().1.peer_certificates(), &group);
                    if let Viewer::Refused(_, why) = &viewer {
                        tracing::warn!(%peer, "operator page refused: {why}");
                    }
                    serve_connection(tls, viewer, state).await;
                }
            }
        });
    }
}

/// The server's certificate, and a request for the caller's: optional at the handshake so
/// that a browser without one is told why in a page instead of a bare TLS alert.
fn server_config(tls: &Tls) -> Result<rustls::ServerConfig, CoordinatorError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        CoordinatorError::InvalidArgument(format!("operator page TLS: {what}: {e}"))
    };
    let (ca_pem, cert_pem, key_pem) = tls.pem();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        let ca = ca.map_err(|e| invalid("CA bundle", &e))?;
        roots.add(ca).map_err(|e| invalid("CA bundle", &e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| invalid("client verifier", &e))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("certificate", &e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid("key", &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("protocol versions", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid("certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn viewer_of(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>, group: &str) -> Viewer {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Viewer::Refused(
            StatusCode::UNAUTHORIZED,
            "no client certificate: the page is for operators; present an operator \
             certificate of this deployment"
                .into(),
        );
    };
    match certificate_identity(leaf.as_ref()) {
        Ok((g, Role::Operator(name))) if g == group => Viewer::Operator(name),
        Ok((g, role)) => Viewer::Refused(
            StatusCode::FORBIDDEN,
            format!(
                "the certificate names {role} of group {g:?}; this page is for operators of \
                 group {group:?}"
            ),
        ),
        Err(e) => Viewer::Refused(StatusCode::FORBIDDEN, format!("client certificate: {e}")),
    }
}

async fn serve_connection<S>(io: S, viewer: Viewer, state: Arc<PageState>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (viewer, state) = (viewer.clone(), state.clone());
        async move { Ok::<_, std::convert::Infallible>(respond(req, &viewer, &state).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!("operator page connection: {e}");
    }
}

fn page(status: StatusCode, html: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(html)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    let set = |h: &mut hyper::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, hyper::header::HeaderValue::from_static(v));
    };
    set(headers, "content-type", "text/html; charset=utf-8");
    set(headers, "cache-control", "no-store");
    // No scripts, no frames, nothing loaded from elsewhere.
    set(
        headers,
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
    );
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "referrer-policy", "no-referrer");
    resp
}

async fn respond(
    req: Request<Incoming>,
    viewer: &Viewer,
    state: &PageState,
) -> Response<Full<Bytes>> {
    let operator = match viewer {
        Viewer::Operator(name) => Some(name.as_str()),
        Viewer::Anyone => None,
        Viewer::Refused(status, why) => return page(*status, operator_html::refused(why)),
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return page(
            StatusCode::METHOD_NOT_ALLOWED,
            operator_html::refused("the operator page is read-only: GET only"),
        );
    }
    if req.uri().path() != "/" {
        return page(
            StatusCode::NOT_FOUND,
            operator_html::refused("no such page; the operator page is /"),
        );
    }
    let query = req.uri().query().unwrap_or("");
    if query.len() > MAX_QUERY_BYTES {
        return page(
            StatusCode::BAD_REQUEST,
            operator_html::refused("the query is too long"),
        );
    }
    let lookup = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("txid="))
        .map(|t| form_decode(t).trim().to_string())
        .filter(|t| !t.is_empty());
    let gathered = gather(state, lookup).await;
    page(
        StatusCode::OK,
        operator_html::render(&state.cfg, operator, &gathered),
    )
}

/// A form value as a browser sends it (`application/x-www-form-urlencoded`): `+` is a space,
/// `%XX` a byte; a malformed escape stays as it is. Invalid UTF-8 becomes U+FFFD.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let escaped = bytes
                    .get(i + 1)
                    .and_then(|&h| hex(h))
                    .zip(bytes.get(i + 2).and_then(|&l| hex(l)));
                if let Some((h, l)) = escaped {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Everything the page shows, asked in parallel; what does not answer is shown as such.
async fn gather(state: &PageState, lookup: Option<String>) -> Gathered {
    let d = &state.deployment;
    let with_agents = !state.cfg.agents.is_empty();
    let (info, replicas, agents, in_doubt, looked_up) = tokio::join!(
        state.handle.info(),
        d.replicas_health(),
        async {
            if with_agents {
                d.agents_health().await
            } else {
                Vec::new()
            }
        },
        async {
            if with_agents {
                Some(d.in_doubt(Duration::ZERO).await)
            } else {
                None
            }
        },
        async {
            match &lookup {
                Some(txid) => Some((txid.clone(), d.status(txid).await)),
                None => None,
            }
        },
    );
    // The votes of the in-doubt transactions (the first few: the page stays small).
    let mut votes = Vec::new();
    if let Some(Ok((list, _))) = &in_doubt {
        // One transaction may be prepared on several agents: ask once.
        let txids: std::collections::BTreeSet<&str> =
            list.iter().map(|x| x.txid.as_str()).collect();
        let asks = txids
            .into_iter()
            .take(operator_html::MAX_ROWS)
            .map(|t| async move { d.status(t).await.ok() });
        votes = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
    }
    Gathered {
        info: info.ok(),
        state: state.handle.state(),
        replicas,
        agents,
        in_doubt,
        votes,
        lookup: looked_up,
        recent: state.handle.recent().rows(),
        audit: state
            .last_audit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::form_decode;

    #[test]
    fn form_values_are_decoded_and_bad_escapes_kept() {
        assert_eq!(form_decode("00a1b2c3d4e5f607"), "00a1b2c3d4e5f607");
        assert_eq!(form_decode("%3Cb%3E+x"), "<b> x");
        assert_eq!(form_decode("%zz%4"), "%zz%4");
        assert_eq!(form_decode("%ff"), "\u{fffd}");
    }
}
