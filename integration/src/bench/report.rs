//! The benchmark's outputs: the markdown tables on stdout and `bench.json`.

use crate::cell::CellResult;
use serde::Serialize;
use std::fmt::Write as _;

/// Fills in each cell's throughput ratio to raw-2pc at the same (participants, concurrency).
pub fn add_ratios(cells: &mut [CellResult]) {
    let raw: Vec<(usize, usize, f64)> = cells
        .iter()
        .filter(|c| c.mode == "raw-2pc")
        .map(|c| (c.participants, c.concurrency, c.throughput))
        .collect();
    for cell in cells.iter_mut() {
        cell.ratio_to_raw_2pc = raw
            .iter()
            .find(|(n, c, _)| *n == cell.participants && *c == cell.concurrency)
            .filter(|(_, _, t)| *t > 0.0)
            .map(|(_, _, t)| cell.throughput / t);
    }
}

/// Table order: by databases, then concurrency, then mode in the order given on the command
/// line, so the modes being compared sit on adjacent rows.
pub fn sort(cells: &mut [CellResult], modes: &[String]) {
    let rank = |m: &str| modes.iter().position(|x| x == m).unwrap_or(usize::MAX);
    cells.sort_by_key(|c| (c.participants, c.concurrency, rank(&c.mode)));
}

fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

fn mb(kb: u64) -> String {
    format!("{:.0}", kb as f64 / 1024.0)
}

/// CPU seconds over the window as a percentage of one core.
fn pct(cpu_s: Option<f64>, secs: f64) -> String {
    match cpu_s {
        Some(c) if secs > 0.0 => format!("{:.0}%", 100.0 * c / secs),
        _ => "–".to_string(),
    }
}

pub fn markdown(cells: &[CellResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| N | c | mode | tx/s | vs raw-2pc | p50 ms | p99 ms | p99.9 ms | abort / unknown / error \
         | coord RSS MB max / Σ | coord CPU Σ (max) | agents RSS MB max / Σ | agents CPU Σ (max) \
         | PG CPU | client CPU | host busy |\n",
    );
    s.push_str("|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for c in cells {
        let ratio = c
            .ratio_to_raw_2pc
            .map(|r| format!("{r:.2}×"))
            .unwrap_or_else(|| "–".into());
        let usage = |u: &Option<crate::procstat::Usage>| match u {
            Some(u) => (
                format!("{} / {}", mb(u.peak_rss_kb_max), mb(u.peak_rss_kb_sum)),
                format!(
                    "{} ({})",
                    pct(Some(u.cpu_s_sum), c.resource_window_s),
                    pct(Some(u.cpu_s_max), c.resource_window_s)
                ),
            ),
            None => ("–".into(), "–".into()),
        };
        let (coord_rss, coord_cpu) = usage(&c.coordinator);
        let (agent_rss, agent_cpu) = usage(&c.agents);
        let busy = c
            .host_cpu_busy
            .map(|b| format!("{:.0}%", 100.0 * b))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            c.participants,
            c.concurrency,
            c.mode,
            c.throughput,
            ratio,
            ms(c.latency.p50_us),
            ms(c.latency.p99_us),
            ms(c.latency.p999_us),
            c.aborted,
            c.unknown,
            c.errors,
            coord_rss,
            coord_cpu,
            agent_rss,
            agent_cpu,
            pct(c.postgres_cpu_s, c.resource_window_s),
            pct(c.client_cpu_s, c.resource_window_s),
            busy,
        );
    }
    s
}

/// Where the time of a committed transfer goes: p50 / p99 of each phase, in ms.
pub fn phases_markdown(cells: &[CellResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| N | c | mode | phases, p50 / p99 ms | acceptor-log fsyncs per commit (Σ replicas) | log records per fsync |\n\
         |--:|--:|---|---|--:|--:|\n",
    );
    for c in cells {
        let phases: Vec<String> = c
            .phases
            .iter()
            .map(|p| {
                format!(
                    "{} {} / {}",
                    p.name,
                    ms(p.latency.p50_us),
                    ms(p.latency.p99_us)
                )
            })
            .collect();
        let (per_commit, per_fsync) = match (c.coordinator_fsyncs, c.coordinator_log_records) {
            (Some(f), Some(r)) if c.committed > 0 && f > 0 => (
                format!("{:.2}", f as f64 / c.committed as f64),
                format!("{:.1}", r as f64 / f as f64),
            ),
            _ => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            c.participants,
            c.concurrency,
            c.mode,
            phases.join(" · "),
            per_commit,
            per_fsync
        );
    }
    s
}

/// What one committed transfer costs the machine: CPU of our processes (replicas and agents)
/// and of PostgreSQL, and wake-ups (voluntary context switches) of our processes.
pub fn cost_markdown(cells: &[CellResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| N | c | mode | tx/s | our CPU ms per transfer (replicas + agents) | PG CPU ms per transfer \
         | wake-ups per transfer (replicas + agents) | preemptions per transfer |\n\
         |--:|--:|---|--:|--:|--:|--:|--:|\n",
    );
    for c in cells {
        let per = |x: f64| {
            if c.committed > 0 {
                x / c.committed as f64
            } else {
                f64::NAN
            }
        };
        let (ours, wakeups, preemptions) = match (&c.coordinator, &c.agents) {
            (Some(r), Some(a)) => (
                format!(
                    "{:.2} ({:.2} + {:.2})",
                    per(1000.0 * (r.cpu_s_sum + a.cpu_s_sum)),
                    per(1000.0 * r.cpu_s_sum),
                    per(1000.0 * a.cpu_s_sum)
                ),
                format!(
                    "{:.1} ({:.1} + {:.1})",
                    per((r.voluntary_switches + a.voluntary_switches) as f64),
                    per(r.voluntary_switches as f64),
                    per(a.voluntary_switches as f64)
                ),
                format!(
                    "{:.1}",
                    per((r.involuntary_switches + a.involuntary_switches) as f64)
                ),
            ),
            _ => ("–".into(), "–".into(), "–".into()),
        };
        let pg = c
            .postgres_cpu_s
            .map_or("–".into(), |p| format!("{:.2}", per(1000.0 * p)));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            c.participants, c.concurrency, c.mode, c.throughput, ours, pg, wakeups, preemptions
        );
    }
    s
}

/// The first failure message per cell that had any, so a reader sees what the counts mean.
pub fn failures(cells: &[CellResult]) -> String {
    let mut s = String::new();
    for c in cells {
        if let Some(f) = &c.first_failure {
            let _ = writeln!(
                s,
                "- {} N={} c={}: {}",
                c.mode, c.participants, c.concurrency, f
            );
        }
    }
    s
}

/// The whole run, as written to `bench.json`.
#[derive(Serialize)]
pub struct Report<'a> {
    pub generated_unix_s: u64,
    pub profile: &'static str,
    pub host: Host,
    pub config: &'a serde_json::Value,
    pub cells: &'a [CellResult],
}

#[derive(Serialize)]
pub struct Host {
    pub cpus: usize,
    pub postgres_version: Option<String>,
    pub git_revision: Option<String>,
}

pub fn git_revision() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(paxos_commit_integration::process::workspace_root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
