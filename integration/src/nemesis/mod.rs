//! The nemesis bank test: a whole deployment (3 databases, 2F+1 replicas, one agent per
//! database) with every link between components behind a fault proxy, concurrent clients
//! transferring money, and a seeded random schedule of crashes, pauses, partitions, delay
//! and loss. Afterwards a checker holds every answer the clients got against the databases
//! and GetStatus.
//!
//! Why it exists: the targeted tests kill one process at one protocol step; real failures
//! overlap, hit any step, and include the network. This test explores that space at random,
//! while staying replayable: the seed fixes the schedule and the workload's choices, and is
//! printed with the schedule at the start and in every failure.
//!
//! * [`schedule`] — the faults and their seeded schedule;
//! * [`executor`] — applies the schedule to a running cluster and records what happened;
//! * [`workload`] — the clients and their record of every attempt;
//! * [`check`] — the invariants, the availability figure, the report.

pub mod check;
pub mod executor;
pub mod schedule;
pub mod workload;

use crate::bank;
use crate::cluster::{Cluster, Spec};
use crate::proxy::StatsSummary;
use anyhow::{anyhow, bail, Context, Result};
use check::{Expect, Verdict};
use executor::{Executor, Timeline};
use paxos_commit_proto::client::Client;
use schedule::{Schedule, Shape};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{Mix, Workload};

/// Replays a run: the seed it printed.
pub const SEED_ENV: &str = "PAXOS_NEMESIS_SEED";
/// Length of the faulted part, e.g. `10m`, `90s` (default: the short run).
pub const DURATION_ENV: &str = "PAXOS_NEMESIS_DURATION";
/// The short run's faulted part: with start-up, healing and checks it stays well under the
/// 3 minutes CI allows it.
pub const SHORT: Duration = Duration::from_secs(60);

/// Everything a run depends on.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// The faulted part: warm-up excluded, healing and checks excluded.
    pub duration: Duration,
    pub clients: usize,
    /// 2F+1.
    pub replicas: usize,
    pub participants: Vec<String>,
    pub accounts: i32,
    pub balance: i64,
    pub takeover_after_ms: u64,
    pub in_doubt_after_ms: u64,
    pub commit_timeout_ms: u64,
    pub branch_timeout_ms: u64,
    /// A begun transaction that never reaches Commit is aborted after this.
    pub open_timeout_ms: u64,
    /// The clients' RPC deadline: above the commit timeout, so that Commit normally answers
    /// by itself, and short enough that a blackholed replica costs seconds, not minutes.
    pub client_rpc_timeout: Duration,
    /// Transfers keep running this long after everything healed (liveness).
    pub post_heal: Duration,
    pub min_availability: f64,
}

impl Config {
    pub fn new(seed: u64, duration: Duration) -> Config {
        Config {
            seed,
            duration,
            clients: 8,
            replicas: 3,
            participants: vec!["bank_a".into(), "bank_b".into(), "bank_c".into()],
            accounts: 100,
            balance: 10_000,
            takeover_after_ms: 800,
            in_doubt_after_ms: 1_000,
            commit_timeout_ms: 3_000,
            branch_timeout_ms: 5_000,
            open_timeout_ms: 15_000,
            client_rpc_timeout: Duration::from_secs(5),
            post_heal: Duration::from_secs(5),
            min_availability: 0.95,
        }
    }

    /// The seed from [`SEED_ENV`] (else a fresh one) and the duration from [`DURATION_ENV`]
    /// (else [`SHORT`]).
    pub fn from_env() -> Result<Config> {
        let seed = match std::env::var(SEED_ENV) {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("{SEED_ENV}={s:?} is not an unsigned integer"))?,
            Err(_) => rand::random::<u64>() % 1_000_000_000,
        };
        let duration = match std::env::var(DURATION_ENV) {
            Ok(s) => parse_duration(&s)?,
            Err(_) => SHORT,
        };
        Ok(Config::new(seed, duration))
    }

    pub fn f(&self) -> usize {
        self.replicas.saturating_sub(1) / 2
    }

    pub fn shape(&self) -> Shape {
        Shape {
            replicas: self.replicas,
            participants: self.participants.clone(),
            duration: self.duration,
            takeover_after: Duration::from_millis(self.takeover_after_ms),
        }
    }

    /// How to run this again.
    pub fn replay_hint(&self) -> String {
        let duration = if self.duration == SHORT {
            String::new()
        } else {
            format!("{DURATION_ENV}={}s ", self.duration.as_secs())
        };
        format!(
            "{SEED_ENV}={} {duration}cargo test -p paxos-commit-integration --test nemesis nemesis_bank \
             -- --nocapture",
            self.seed
        )
    }
}

/// `600`, `600s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .with_context(|| format!("duration {s:?}: expected a number and s, m or h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        other => bail!("duration {s:?}: unknown unit {other:?} (use s, m or h)"),
    };
    Ok(Duration::from_secs(secs))
}

/// A started deployment with its schedule, ready to run.
pub struct Nemesis {
    pub cfg: Config,
    pub schedule: Schedule,
    pub cluster: Arc<Cluster>,
}

/// The outcome of a run.
pub struct Report {
    pub seed: u64,
    pub verdict: Verdict,
    pub timeline: Arc<Timeline>,
    pub faults: BTreeMap<&'static str, usize>,
    pub proxies: StatsSummary,
    /// From the first transfer to the end of the checks.
    pub wall: Duration,
    /// Per 5 s of the run (by start time): transfers acknowledged committed, and the others
    /// (deliberate overdrafts left out), to show when the faults hurt.
    pub throughput: Vec<(usize, usize)>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.verdict.failures.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "nemesis run, seed {}: {} in {:.0} s",
            self.seed,
            if self.passed() { "PASSED" } else { "FAILED" },
            self.wall.as_secs_f64()
        )?;
        let total: usize = self.faults.values().sum();
        writeln!(f, "faults injected: {total} {:?}", self.faults)?;
        writeln!(f, "proxies: {}", self.proxies)?;
        writeln!(f, "{}", self.verdict.figures)?;
        let buckets: Vec<String> = self
            .throughput
            .iter()
            .enumerate()
            .map(|(i, (ok, failed))| format!("{}s:{ok}/{failed}", i * BUCKET_SECS))
            .collect();
        writeln!(
            f,
            "committed/failed per {BUCKET_SECS} s: {}",
            buckets.join(" ")
        )?;
        for failure in &self.verdict.failures {
            writeln!(f, "FAILED CHECK {failure}")?;
        }
        Ok(())
    }
}

impl Nemesis {
    /// Starts the deployment (all links proxied) and creates the accounts.
    pub async fn start(cfg: Config) -> Result<Nemesis> {
        let schedule = Schedule::generate(cfg.seed, &cfg.shape());
        let names: Vec<&str> = cfg.participants.iter().map(String::as_str).collect();
        let mut spec = Spec::new("nemesis", cfg.replicas, &names).with_proxies(true);
        spec.takeover_after_ms = cfg.takeover_after_ms;
        spec.in_doubt_after_ms = cfg.in_doubt_after_ms;
        spec.commit_timeout_ms = cfg.commit_timeout_ms;
        spec.branch_timeout_ms = cfg.branch_timeout_ms;
        // GetStatus must still remember every transaction when the checker asks, at the end
        // of a long run.
        spec.env
            .push(("PAXOS_COMMIT_RETENTION_MS".into(), "86400000".into()));
        spec.env.push((
            "PAXOS_COMMIT_OPEN_TIMEOUT_MS".into(),
            cfg.open_timeout_ms.to_string(),
        ));
        let cluster = Cluster::start(spec).await?;
        bank::create_accounts(&cluster, cfg.accounts, cfg.balance).await?;
        Ok(Nemesis {
            cfg,
            schedule,
            cluster: Arc::new(cluster),
        })
    }

    /// Runs the workload under the schedule, heals, and checks.
    pub async fn run(&self) -> Result<Report> {
        let cfg = &self.cfg;
        let net = self
            .cluster
            .net
            .clone()
            .ok_or_else(|| anyhow!("the nemesis needs a cluster with proxies"))?;
        let t0 = Instant::now();
        let timeline = Arc::new(Timeline::new(t0));
        let leader = Arc::new(AtomicUsize::new(0));
        let client = Client::new(&self.cluster.client_config(cfg.client_rpc_timeout))?;
        let mix = Mix {
            participants: cfg.participants.clone(),
            accounts: cfg.accounts,
            max_amount: 50,
            single_db: 0.1,
            overdraft: 0.02,
            think: Duration::from_millis(20),
        };
        let workload = Workload::start(cfg.clients, cfg.seed, mix, client, t0, leader.clone());
        let exec = Executor {
            cluster: self.cluster.clone(),
            net: net.clone(),
            timeline: timeline.clone(),
            leader,
        };
        let ran = exec.run(&self.schedule).await;
        if let Err(e) = &ran {
            eprintln!("[nemesis] the schedule stopped early: {e:#}");
        }
        let healed = exec.heal_all().await;
        eprintln!(
            "[nemesis {:7.1} s] everything healed; {} transfers so far; clients run {:?} more",
            timeline.now().as_secs_f64(),
            workload.count(),
            cfg.post_heal
        );
        tokio::time::sleep(cfg.post_heal).await;
        let attempts = workload.stop().await;
        ran?;
        healed?;
        let left = net.faulty_links();
        if !left.is_empty() {
            bail!("links still faulty after healing: {left:?}");
        }
        eprintln!(
            "[nemesis {:7.1} s] clients stopped after {} transfers; checking",
            timeline.now().as_secs_f64(),
            attempts.len()
        );
        let expect = Expect {
            participants: cfg.participants.clone(),
            accounts: cfg.accounts,
            balance: cfg.balance,
            f: cfg.f(),
            min_availability: cfg.min_availability,
            min_window_transfers: 100,
            grace: Duration::from_secs(2),
            recovery_timeout: Duration::from_secs(60),
            resolve_timeout: Duration::from_millis(cfg.open_timeout_ms) + Duration::from_secs(20),
        };
        let verdict = check::check(&self.cluster, &expect, &attempts, &timeline).await?;
        // Kept with the processes' logs when the test fails.
        let csv = self.cluster.dir.join("attempts.csv");
        if let Err(e) = std::fs::write(&csv, attempts_csv(&attempts)) {
            eprintln!("[nemesis] could not write {}: {e}", csv.display());
        }
        let timeline_txt = self.cluster.dir.join("timeline.txt");
        let _ = std::fs::write(&timeline_txt, format!("{}\n{timeline}", self.schedule));
        Ok(Report {
            throughput: throughput(&attempts),
            seed: cfg.seed,
            verdict,
            faults: timeline.counts(),
            timeline,
            proxies: net.stats(),
            wall: t0.elapsed(),
        })
    }
}

const BUCKET_SECS: usize = 5;

fn throughput(attempts: &[workload::Attempt]) -> Vec<(usize, usize)> {
    let mut buckets: Vec<(usize, usize)> = Vec::new();
    for a in attempts.iter().filter(|a| !a.overdraft) {
        let i = a.start.as_secs() as usize / BUCKET_SECS;
        if buckets.len() <= i {
            buckets.resize(i + 1, (0, 0));
        }
        if a.reported == workload::Reported::Committed {
            buckets[i].0 += 1;
        } else {
            buckets[i].1 += 1;
        }
    }
    buckets
}

/// One line per attempt, for reading a failed run after the fact.
fn attempts_csv(attempts: &[workload::Attempt]) -> String {
    let mut out = String::from("client,txid,start_s,end_s,steps,overdraft,reported,detail\n");
    for a in attempts {
        let steps: Vec<String> = a
            .steps
            .iter()
            .map(|s| format!("{}:{}:{:+}", s.participant, s.account, s.delta))
            .collect();
        let (reported, detail) = match &a.reported {
            workload::Reported::Committed => ("committed", String::new()),
            workload::Reported::Aborted(r) => ("aborted", r.clone()),
            workload::Reported::Unknown(r) => ("unknown", r.clone()),
            workload::Reported::NotBegun(r) => ("not-begun", r.clone()),
        };
        out.push_str(&format!(
            "{},{},{:.3},{:.3},{},{},{reported},\"{}\"\n",
            a.client,
            a.txid.as_deref().unwrap_or(""),
            a.start.as_secs_f64(),
            a.end.as_secs_f64(),
            steps.join(" "),
            a.overdraft,
            detail.replace('"', "'").replace('\n', " ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
