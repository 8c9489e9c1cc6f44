//! Prometheus metrics of the server binaries: a `/metrics` listener on the configured
//! address (`metrics_listen`), fed through the `metrics` crate's macros where things happen.
//!
//! Names follow Prometheus conventions: a `paxos_commit_` prefix, base units (seconds,
//! bytes), `_total` for counters. DESIGN-level gauges (transactions in doubt, the oldest
//! prepared branch) are set by each server's own sampler.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;

/// Latency buckets, in seconds: from a loopback round trip to a commit timeout.
const SECONDS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
/// Records per group-commit batch.
const RECORDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Starts the `/metrics` listener on `listen` (host:port) and installs the recorder. Must be
/// called from within the server's tokio runtime.
pub fn install(listen: &str) -> Result<(), String> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| format!("metrics_listen {listen:?}: {e}"))?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_records".into()), RECORDS))
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install()
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    Ok(())
}
