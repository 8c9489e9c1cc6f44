//! One cell of the benchmark: one mode, one number of databases, one concurrency. A fixed
//! number of client tasks run transfers back to back (closed loop) through a warm-up and
//! then a measured window; only transfers that finish inside the window count.

use crate::procstat::{self, Group, Usage};
use crate::workload::{histogram, micros, Driver, Ending, Plan, TaskConns};
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use paxos_commit_proto::client::Client;
use paxos_commit_proto::pb;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// What to run, and the processes to watch while it runs.
pub struct CellSpec {
    /// Unique within the run; part of raw-2pc's gids.
    pub id: usize,
    pub mode: String,
    pub replicas: Option<usize>,
    pub participants: usize,
    pub concurrency: usize,
    pub accounts: i32,
    pub warmup: Duration,
    pub duration: Duration,
    pub driver: Driver,
    /// Per task, its connection to every database (direct modes only).
    pub conns: Option<Arc<Vec<TaskConns>>>,
    pub coordinator_pids: Vec<u32>,
    pub agent_pids: Vec<u32>,
    pub pg_data_dirs: Vec<PathBuf>,
    /// For paxos modes: asked for the replicas' acceptor-log counters (ClusterInfo).
    pub coordinator: Option<Client>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub latency: Latency,
}

/// Everything measured in one cell; one element of `bench.json`'s `cells`.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    pub mode: String,
    pub participants: usize,
    /// Coordinator replicas (2F+1) for paxos modes.
    pub replicas: Option<usize>,
    pub concurrency: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub committed: u64,
    pub aborted: u64,
    pub unknown: u64,
    pub errors: u64,
    /// Committed transfers per second.
    pub throughput: f64,
    /// This mode's throughput over raw-2pc's at the same (participants, concurrency).
    pub ratio_to_raw_2pc: Option<f64>,
    /// End-to-end latency of committed transfers.
    pub latency: Latency,
    /// Where that time went, per phase of the mode (committed transfers).
    pub phases: Vec<Phase>,
    /// The interval over which CPU was actually sampled (the measured window, give or take
    /// scheduling delays); CPU percentages divide by it.
    pub resource_window_s: f64,
    pub coordinator: Option<Usage>,
    pub agents: Option<Usage>,
    /// CPU seconds of all PostgreSQL servers (postmasters and backends) in the window.
    pub postgres_cpu_s: Option<f64>,
    /// CPU seconds of this benchmark process (the clients) in the window.
    pub client_cpu_s: Option<f64>,
    /// Fraction of the machine's CPU time that was busy in the window (everything shares it).
    pub host_cpu_busy: Option<f64>,
    /// Acceptor-log fsyncs of all replicas in the window, and log records written: how well
    /// group commit batches (paxos modes).
    pub coordinator_fsyncs: Option<u64>,
    pub coordinator_log_records: Option<u64>,
    /// The first abort or error message, to tell what went wrong.
    pub first_failure: Option<String>,
}

struct TaskStats {
    latency: Histogram<u64>,
    phases: Vec<Histogram<u64>>,
    committed: u64,
    aborted: u64,
    unknown: u64,
    errors: u64,
    first_failure: Option<String>,
}

impl TaskStats {
    fn new(phases: usize) -> Result<TaskStats> {
        Ok(TaskStats {
            latency: histogram()?,
            phases: (0..phases).map(|_| histogram()).collect::<Result<_>>()?,
            committed: 0,
            aborted: 0,
            unknown: 0,
            errors: 0,
            first_failure: None,
        })
    }

    fn fail(&mut self, what: &str, msg: String) {
        if self.first_failure.is_none() {
            self.first_failure = Some(format!("{what}: {msg}"));
        }
    }

    fn merge(&mut self, other: TaskStats) -> Result<()> {
        self.latency.add(&other.latency)?;
        for (a, b) in self.phases.iter_mut().zip(&other.phases) {
            a.add(b)?;
        }
        self.committed += other.committed;
        self.aborted += other.aborted;
        self.unknown += other.unknown;
        self.errors += other.errors;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        Ok(())
    }
}

fn diff_u64(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?))
}

fn pg_cpu(dirs: &[PathBuf]) -> Option<f64> {
    dirs.iter()
        .map(|d| procstat::postgres_cpu_seconds(d))
        .sum::<Option<f64>>()
}

/// Snapshot of the machine-wide counters at one end of the window.
struct Snapshot {
    at: Instant,
    pg: Option<f64>,
    client: Option<f64>,
    host: Option<(u64, u64)>,
    /// (fsyncs, records) summed over the replicas.
    log: Option<(u64, u64)>,
}

/// What the sampler saw over the measured window.
struct Sampled {
    start: Snapshot,
    end: Snapshot,
    coordinator: Usage,
    agents: Usage,
}

/// Watches the window from a blocking-pool thread rather than from the cell's own future:
/// with dozens of busy client tasks on a loaded machine the async loop can wake late, and a
/// snapshot taken late makes CPU figures meaningless. The thread sleeps to the window's
/// edges and records when it actually read the counters, so rates use the real interval.
fn spawn_sampler(
    spec: &CellSpec,
    t_start: Instant,
    t_end: Instant,
) -> tokio::task::JoinHandle<Sampled> {
    let rt = tokio::runtime::Handle::current();
    let mut coordinator = Group::new(spec.coordinator_pids.clone());
    let mut agents = Group::new(spec.agent_pids.clone());
    let pg_dirs = spec.pg_data_dirs.clone();
    let client = spec.coordinator.clone();
    tokio::task::spawn_blocking(move || {
        let take = |groups: [&mut Group; 2], starting: bool| {
            // The local counters first, at the edge itself; the RPCs after.
            let at = Instant::now();
            for g in groups {
                if starting {
                    g.start();
                } else {
                    g.end();
                }
            }
            let pg = pg_cpu(&pg_dirs);
            let own = procstat::cpu_seconds(std::process::id());
            let host = procstat::host_jiffies();
            let log = client.as_ref().and_then(|c| rt.block_on(log_counters(c)));
            Snapshot {
                at,
                pg,
                client: own,
                host,
                log,
            }
        };
        std::thread::sleep(t_start.saturating_duration_since(Instant::now()));
        let start = take([&mut coordinator, &mut agents], true);
        while Instant::now() < t_end {
            std::thread::sleep(
                Duration::from_millis(100).min(t_end.saturating_duration_since(Instant::now())),
            );
            coordinator.sample_rss();
            agents.sample_rss();
        }
        let end = take([&mut coordinator, &mut agents], false);
        Sampled {
            start,
            end,
            coordinator: coordinator.usage(),
            agents: agents.usage(),
        }
    })
}

/// Acceptor-log counters summed over every replica; `None` if one does not answer.
async fn log_counters(client: &Client) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    for i in 0..client.replica_count() {
        let info = client
            .replica(i)?
            .cluster_info(pb::Empty {})
            .await
            .ok()?
            .into_inner();
        total.0 += info.fsyncs;
        total.1 += info.records;
    }
    Some(total)
}

/// Runs the cell. `bar` is advanced from `bar_base` by the elapsed milliseconds of the
/// cell (its length counts every cell's warm-up + duration).
pub async fn run(spec: CellSpec, bar: &ProgressBar, bar_base: u64) -> Result<CellResult> {
    let t0 = Instant::now();
    let t_start = t0 + spec.warmup;
    let t_end = t_start + spec.duration;
    let live = Arc::new(AtomicU64::new(0));
    let phase_names = spec.driver.phase_names();

    let mut tasks = JoinSet::new();
    for task in 0..spec.concurrency {
        let driver = spec.driver.clone();
        let conns = spec.conns.clone();
        let live = live.clone();
        let (n, accounts) = (spec.participants, spec.accounts);
        let gid_base = format!("bench-{}-{}-{task}", std::process::id(), spec.id);
        tasks.spawn(async move {
            let mut stats = TaskStats::new(phase_names.len())?;
            let mut seq = 0u64;
            while Instant::now() < t_end {
                let plan = Plan::random(n, accounts);
                seq += 1;
                let gid = format!("{gid_base}-{seq}");
                let began = Instant::now();
                let mine = conns.as_ref().and_then(|c| c.get(task));
                let timed = driver.run(mine, &plan, &gid).await;
                let done = Instant::now();
                let failed_hard = matches!(timed.ending, Ending::Error(_));
                if done >= t_start && done <= t_end {
                    match timed.ending {
                        Ending::Committed => {
                            stats.committed += 1;
                            live.fetch_add(1, Ordering::Relaxed);
                            stats.latency.saturating_record(micros(done - began));
                            for (h, d) in stats.phases.iter_mut().zip(&timed.phases) {
                                h.saturating_record(micros(*d));
                            }
                        }
                        Ending::Aborted(m) => {
                            stats.aborted += 1;
                            stats.fail("aborted", m);
                        }
                        Ending::Unknown(m) => {
                            stats.unknown += 1;
                            stats.fail("outcome unknown", m);
                        }
                        Ending::Error(m) => {
                            stats.errors += 1;
                            stats.fail("error", m);
                        }
                    }
                }
                if failed_hard {
                    // Do not spin on a server that refuses everything.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok::<TaskStats, anyhow::Error>(stats)
        });
    }

    let sampler = spawn_sampler(&spec, t_start, t_end);
    let mut total = TaskStats::new(phase_names.len())?;
    let mut last_tick = (Instant::now(), 0u64);
    let mut rate = 0.0;
    let cell_ms = (spec.warmup + spec.duration).as_millis() as u64;
    let label = match spec.replicas {
        Some(r) => format!(
            "{} (N={} c={} replicas={r})",
            spec.mode, spec.participants, spec.concurrency
        ),
        None => format!(
            "{} (N={} c={})",
            spec.mode, spec.participants, spec.concurrency
        ),
    };
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(r) => total.merge(r.context("client task panicked")??)?,
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if last_tick.0.elapsed() >= Duration::from_millis(500) {
            let n = live.load(Ordering::Relaxed);
            rate = (n - last_tick.1) as f64 / last_tick.0.elapsed().as_secs_f64();
            last_tick = (Instant::now(), n);
        }
        let phase = if Instant::now() < t_start {
            "warm-up"
        } else {
            "measuring"
        };
        bar.set_position(bar_base + (t0.elapsed().as_millis() as u64).min(cell_ms));
        bar.set_message(format!("{label} {phase}, {rate:.0} tx/s"));
    }
    let Sampled {
        start: at_start,
        end: at_end,
        coordinator,
        agents,
    } = sampler.await.context("the resource sampler panicked")?;

    let secs = spec.duration.as_secs_f64();
    let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let watched = !spec.coordinator_pids.is_empty();
    Ok(CellResult {
        mode: spec.mode.clone(),
        participants: spec.participants,
        replicas: spec.replicas,
        concurrency: spec.concurrency,
        warmup_s: spec.warmup.as_secs_f64(),
        duration_s: secs,
        committed: total.committed,
        aborted: total.aborted,
        unknown: total.unknown,
        errors: total.errors,
        throughput: total.committed as f64 / secs,
        ratio_to_raw_2pc: None,
        latency: Latency::of(&total.latency),
        phases: phase_names
            .iter()
            .zip(&total.phases)
            .map(|(name, h)| Phase {
                name: name.to_string(),
                latency: Latency::of(h),
            })
            .collect(),
        resource_window_s: (at_end.at - at_start.at).as_secs_f64(),
        coordinator: watched.then_some(coordinator),
        agents: watched.then_some(agents),
        postgres_cpu_s: diff(at_start.pg, at_end.pg),
        client_cpu_s: diff(at_start.client, at_end.client),
        host_cpu_busy: match (at_start.host, at_end.host) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        },
        coordinator_fsyncs: diff_u64(at_start.log.map(|l| l.0), at_end.log.map(|l| l.0)),
        coordinator_log_records: diff_u64(at_start.log.map(|l| l.1), at_end.log.map(|l| l.1)),
        first_failure: total.first_failure,
    })
}
