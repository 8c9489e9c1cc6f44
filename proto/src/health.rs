//! A plaintext listener that serves the gRPC health service and nothing else
//! (`health_listen`), for probes that cannot speak TLS: Kubernetes' built-in gRPC probe, a
//! load balancer's health check. The main port stays mutual TLS only; what this one tells is
//! what any health check may know (SERVING or NOT_SERVING), and it accepts nothing else.

use std::net::SocketAddr;
use std::time::Duration;
use tonic_health::pb::health_server::{Health, HealthServer};

/// Streams (a Watch is one) per connection: a probe needs one.
const STREAMS_PER_CONNECTION: u32 = 4;

/// Binds `listen` (host:port) now, so that a bad address fails the start, and serves
/// `health` on it in the background until the process ends.
pub async fn serve<S: Health>(listen: &str, health: HealthServer<S>) -> Result<(), String> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| format!("health_listen {listen:?}: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("health listener on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("health listener on {addr}: {e}"))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tracing::info!(%bound, "health service (alone, plaintext) serving");
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .max_concurrent_streams(STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            tracing::error!("health listener on {bound} stopped: {e}");
        }
    });
    Ok(())
}
