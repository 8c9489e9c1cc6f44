//! Reads a Prometheus `/metrics` page the way a scraper does, over plain HTTP/1.0, so that
//! tests assert on exactly what Prometheus would see.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scrape of `/metrics` at `address`: each sample line's name with labels, and value.
pub async fn scrape(address: &str) -> Result<BTreeMap<String, f64>> {
    let mut conn = tokio::net::TcpStream::connect(address).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{head}"
    );
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// A sample's value, 0 when absent (a counter or gauge not touched yet is not exported).
pub fn value(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}
