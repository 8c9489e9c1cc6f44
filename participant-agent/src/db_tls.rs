//! TLS between the agent and its PostgreSQL server, when the database is not on the same
//! host (or the operator wants it anyway): the server's certificate is verified against a CA
//! file and the host name in `database_url` (libpq's `sslmode=verify-full`).
//!
//! tokio-postgres leaves TLS to a connector; this one is rustls with ring, the same stack as
//! the gRPC links, so the agent links no second TLS library.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// A tokio-postgres connector that verifies the server against `ca`.
#[derive(Clone)]
pub struct DbTls {
    config: Arc<ClientConfig>,
}

impl DbTls {
    pub fn from_ca_file(ca: &Path) -> Result<DbTls, String> {
        let pem = std::fs::read(ca)
            .map_err(|e| format!("cannot read database_tls_ca {}: {e}", ca.display()))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("database_tls_ca {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("database_tls_ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "database_tls_ca {} holds no certificate",
                ca.display()
            ));
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to the database: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(DbTls {
            config: Arc::new(config),
        })
    }
}

pub struct Connect {
    config: Arc<ClientConfig>,
    server: ServerName<'static>,
}

impl<S> MakeTlsConnect<S> for DbTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Connect, io::Error> {
        let server = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Connect {
            config: self.config.clone(),
            server,
        })
    }
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { connector.connect(self.server, stream).await.map(Stream) })
    }
}

pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM channel binding is optional; without it the password exchange still runs
        // inside the verified TLS session.
        ChannelBinding::none()
    }
}

/// How the agent connects to its database: plaintext (the database on the same host, over a
/// local socket or loopback), or TLS verified against `database_tls_ca`.
#[derive(Clone)]
pub enum DbConnect {
    Plain,
    Tls(DbTls),
}

impl std::fmt::Debug for DbConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DbConnect::Plain => "plaintext",
            DbConnect::Tls(_) => "TLS",
        })
    }
}

impl DbConnect {
    pub fn from_ca(ca: Option<&Path>) -> Result<DbConnect, String> {
        Ok(match ca {
            Some(ca) => DbConnect::Tls(DbTls::from_ca_file(ca)?),
            None => DbConnect::Plain,
        })
    }

    /// A connection; its driving task runs in the background until the client is dropped.
    pub async fn connect(
        &self,
        cfg: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        async fn drive<F>(connection: F) -> tokio::task::JoinHandle<()>
        where
            F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("a database connection ended: {e}");
                }
            })
        }
        Ok(match self {
            DbConnect::Plain => {
                let (client, connection) = cfg.connect(tokio_postgres::NoTls).await?;
                (client, drive(connection).await)
            }
            DbConnect::Tls(tls) => {
                let (client, connection) = required(cfg.clone()).connect(tls.clone()).await?;
                (client, drive(connection).await)
            }
        })
    }

    /// Asks the server to cancel whatever the connection of `token` is running (a request
    /// on a connection of its own, as `pg_cancel_backend` would).
    pub async fn cancel(
        &self,
        token: &tokio_postgres::CancelToken,
    ) -> Result<(), tokio_postgres::Error> {
        match self {
            DbConnect::Plain => token.cancel_query(tokio_postgres::NoTls).await,
            DbConnect::Tls(tls) => token.cancel_query(tls.clone()).await,
        }
    }

    /// The connection pool's manager.
    pub fn manager(
        &self,
        cfg: tokio_postgres::Config,
        manager: deadpool_postgres::ManagerConfig,
    ) -> deadpool_postgres::Manager {
        match self {
            DbConnect::Plain => {
                deadpool_postgres::Manager::from_config(cfg, tokio_postgres::NoTls, manager)
            }
            DbConnect::Tls(tls) => {
                deadpool_postgres::Manager::from_config(required(cfg), tls.clone(), manager)
            }
        }
    }
}

/// With a CA configured, a server that does not speak TLS is refused rather than used in
/// plaintext (tokio-postgres would otherwise fall back).
fn required(mut cfg: tokio_postgres::Config) -> tokio_postgres::Config {
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    cfg
}
