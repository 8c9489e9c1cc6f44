//! Soak: a long stream of transfers through three replicas (F = 1), sampling the replicas'
//! resident memory and acceptor-log size as it goes. Both must stay flat: finished
//! transactions are forgotten after the retention window and the log is compacted.
//!
//! `cargo run --release -p paxos-commit-integration --bin soak -- --transfers 1000000 --out soak`
//! writes `soak.csv` and `soak.svg` (the curves in BENCHMARKS.md).

use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::pb;
use rand::Rng;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    transfers: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: u64,
    #[arg(long, default_value_t = 10_000)]
    accounts: i32,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    every: u64,
    /// How long finished transactions stay answerable (ms); shorter shows flatness sooner.
    #[arg(long, default_value_t = 60_000)]
    retention_ms: u64,
    #[arg(long, default_value = "soak")]
    out: PathBuf,
}

struct Sample {
    secs: f64,
    done: u64,
    rss_kb: Vec<u64>,
    log_bytes: Vec<u64>,
    retained: Vec<u64>,
}

fn rss_kb(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let mut spec = Spec::new("soak", 3, &["bank_a", "bank_b"]);
    spec.env = vec![("RUST_LOG".into(), "warn".into())];
    spec.env.push((
        "PAXOS_COMMIT_RETENTION_MS".into(),
        args.retention_ms.to_string(),
    ));
    let cluster = Cluster::start(spec).await?;
    bank::create_accounts(&cluster, args.accounts, 1_000_000).await?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, done, failed, next) = (
            cluster.client.clone(),
            done.clone(),
            failed.clone(),
            next.clone(),
        );
        let (total, accounts) = (args.transfers, args.accounts);
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let (a, b, flip) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(1..=accounts),
                        rng.random_range(1..=accounts),
                        rng.random_bool(0.5),
                    )
                };
                let (from, to) = if flip {
                    ("bank_a", "bank_b")
                } else {
                    ("bank_b", "bank_a")
                };
                match bank::transfer(&client, (from, a), (to, b), 1).await {
                    Ok((_, TransferOutcome::Committed)) => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let bar = ProgressBar::new(args.transfers);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} {msg} ({eta})",
    )?);
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(args.every));
    while !workers.is_empty() {
        tokio::select! {
            r = workers.join_next() => { if let Some(r) = r { r.context("worker")?; } continue; }
            _ = tick.tick() => {}
        }
        let mut s = Sample {
            secs: start.elapsed().as_secs_f64(),
            done: done.load(Ordering::Relaxed),
            rss_kb: Vec::new(),
            log_bytes: Vec::new(),
            retained: Vec::new(),
        };
        for (i, r) in cluster.replicas.iter().enumerate() {
            s.rss_kb.push(rss_kb(r.pid()));
            let info = match cluster.operator.replica(i) {
                Some(mut c) => c
                    .cluster_info(pb::Empty {})
                    .await
                    .ok()
                    .map(|r| r.into_inner()),
                None => None,
            };
            s.log_bytes.push(info.as_ref().map_or(0, |i| i.log_bytes));
            s.retained.push(info.map_or(0, |i| i.decided_retained));
        }
        bar.set_position(s.done);
        bar.set_message(format!(
            "{:.0}/s, replica RSS {:?} kB, log {:?} B, failed {}",
            s.done as f64 / s.secs.max(1e-3),
            s.rss_kb,
            s.log_bytes,
            failed.load(Ordering::Relaxed)
        ));
        samples.push(s);
    }
    bar.finish();
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{} transfers in {elapsed:.0} s ({:.0}/s), {} not committed",
        args.transfers,
        args.transfers as f64 / elapsed,
        failed.load(Ordering::Relaxed)
    );

    let mut csv = String::from("secs,transfers,rss_kb_0,rss_kb_1,rss_kb_2,log_bytes_0,log_bytes_1,log_bytes_2,retained_0\n");
    for s in &samples {
        let _ = writeln!(
            csv,
            "{:.0},{},{},{},{},{},{},{},{}",
            s.secs,
            s.done,
            s.rss_kb.first().unwrap_or(&0),
            s.rss_kb.get(1).unwrap_or(&0),
            s.rss_kb.get(2).unwrap_or(&0),
            s.log_bytes.first().unwrap_or(&0),
            s.log_bytes.get(1).unwrap_or(&0),
            s.log_bytes.get(2).unwrap_or(&0),
            s.retained.first().unwrap_or(&0),
        );
    }
    std::fs::write(args.out.join("soak.csv"), csv)?;
    std::fs::write(args.out.join("soak.svg"), chart(&samples))?;
    println!("wrote {}/soak.csv and soak.svg", args.out.display());
    Ok(())
}

/// Two stacked line charts against transfers done: replica RSS (MiB) and acceptor-log size
/// (MiB), one line per replica.
fn chart(samples: &[Sample]) -> String {
    let (w, h, pad) = (900.0, 260.0, 50.0);
    let max_x = samples.last().map_or(1, |s| s.done.max(1)) as f64;
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="12">"#,
        2.0 * h + 40.0
    );
    type Series = fn(&Sample, usize) -> f64;
    let panels: [(&str, Series); 2] = [
        ("replica RSS (MiB)", |s, i| {
            *s.rss_kb.get(i).unwrap_or(&0) as f64 / 1024.0
        }),
        ("acceptor log (MiB)", |s, i| {
            *s.log_bytes.get(i).unwrap_or(&0) as f64 / 1_048_576.0
        }),
    ];
    for (k, (title, value)) in panels.iter().enumerate() {
        let top = k as f64 * (h + 20.0) + 10.0;
        let max_y = samples
            .iter()
            .flat_map(|s| (0..3).map(|i| value(s, i)))
            .fold(1e-9, f64::max)
            * 1.1;
        let _ = write!(
            svg,
            r#"<text x="{pad}" y="{}">{title} vs transfers (max {:.1})</text><line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{pad}" y1="{}" x2="{pad}" y2="{}" stroke="black"/>"#,
            top + 12.0,
            max_y / 1.1,
            top + h - 20.0,
            w - 10.0,
            top + h - 20.0,
            top + 20.0,
            top + h - 20.0
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{:.0}</text>"#,
            w - 10.0,
            top + h - 5.0,
            max_x
        );
        for (i, color) in colors.iter().enumerate() {
            let points: Vec<String> = samples
                .iter()
                .map(|s| {
                    let x = pad + (w - pad - 10.0) * s.done as f64 / max_x;
                    let y = top + h - 20.0 - (h - 40.0) * value(s, i) / max_y;
                    format!("{x:.1},{y:.1}")
                })
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><text x="{}" y="{}" fill="{color}">replica {i}</text>"#,
                points.join(" "),
                w - 90.0,
                top + 30.0 + 14.0 * i as f64
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
