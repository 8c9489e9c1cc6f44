//! The benchmark: what does Paxos Commit cost over PostgreSQL's own two-phase commit?
//!
//! It exists so that claims about performance rest on numbers measured the same way every
//! time. It starts fresh PostgreSQL clusters (fsync on) with the real coordinator and agent
//! binaries of its own build profile (so `cargo run --release --bin bench` measures release
//! servers), and drives one transfer workload (see `bench/workload.rs`) as:
//!
//! - `local`: all updates in one database, no 2PC: the reference;
//! - `raw-2pc`: the client runs BEGIN / UPDATE / PREPARE TRANSACTION / COMMIT PREPARED on
//!   every database itself, no coordinator: the limit of 2PC on these databases;
//! - `paxos-f0`, `paxos-f1`, `paxos-f2`: paxos-commit with 1, 3 and 5 replicas;
//!
//! over several concurrencies and numbers of databases. It reports throughput, latency
//! percentiles, the coordinator's and agents' peak memory and CPU, and each mode's ratio to
//! raw-2pc, as markdown on stdout and as `bench.json` and `bench.svg` in `--out`.
//!
//! `--quick` is the CI smoke configuration (N = 2, c = 1 and 8, F = 0 and 1, 1 s per cell),
//! and exits non-zero if a cell committed nothing or saw errors; without it everything runs
//! (about ten minutes).

#[path = "../bench/cell.rs"]
mod cell;
#[path = "../bench/procstat.rs"]
mod procstat;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/svg.rs"]
mod svg;
#[path = "../bench/workload.rs"]
mod workload;

use anyhow::{bail, Context, Result};
use cell::{CellResult, CellSpec};
use clap::Parser;
use futures::future::join_all;
use indicatif::{ProgressBar, ProgressStyle};
use paxos_commit_integration::bank;
use paxos_commit_integration::cluster::{Cluster, Spec};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use workload::{DbConn, Driver, TaskConns};

#[derive(Parser, Debug)]
#[command(
    about = "paxos-commit benchmark: transfers across PostgreSQL databases, local vs raw 2PC vs Paxos Commit"
)]
struct Args {
    /// CI smoke run: N=2, concurrency 1 and 8, modes local, raw-2pc, paxos-f0, paxos-f1 (and
    /// paxos-f1-plaintext), 1 s
    /// per cell, 1000 accounts; exits non-zero if a cell committed nothing or saw errors.
    /// Other flags still override its settings.
    #[arg(long)]
    quick: bool,
    /// Modes, comma-separated: local, raw-2pc, paxos-f0, paxos-f1, paxos-f1-plaintext,
    /// paxos-f2 (paxos-fF runs 2F+1 coordinator replicas with mutual TLS on every link, as
    /// deployed; -plaintext the same without TLS). Default: all of them.
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<String>>,
    /// Numbers of databases (participants) per transfer, comma-separated. Default: 2,5.
    #[arg(long, value_delimiter = ',')]
    participants: Option<Vec<usize>>,
    /// Client tasks running transfers back to back, comma-separated. Default: 1,8,32,64.
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Measured seconds per cell. Default: 10 (quick: 1).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds per cell, not measured. Default: 1 (quick: 0.5).
    #[arg(long)]
    warmup: Option<f64>,
    /// Accounts per database; transfers pick them uniformly, so more accounts means less
    /// lock contention. Default: 10000 (quick: 1000).
    #[arg(long)]
    accounts: Option<i32>,
    /// Where bench.json and bench.svg go. Default: <workspace>/target/bench.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Paxos modes answer once the decision is chosen (commit_fast) instead of once every
    /// database applied it. raw-2pc still waits for COMMIT PREPARED.
    #[arg(long)]
    commit_fast: bool,
    /// Every replica audits the databases against the group's outcomes this often (ms), as
    /// deployed with `audit_interval_ms`; 0 (the default here) runs no audit.
    #[arg(long, default_value_t = 0)]
    audit_every_ms: u64,
}

/// The resolved configuration; also recorded in bench.json.
#[derive(Debug, Clone, Serialize)]
struct Config {
    quick: bool,
    modes: Vec<String>,
    participants: Vec<usize>,
    concurrency: Vec<usize>,
    duration_s: f64,
    warmup_s: f64,
    accounts: i32,
    out: PathBuf,
    commit_fast: bool,
    audit_every_ms: u64,
    initial_balance: i64,
}

/// Every account starts this rich, so no transfer ever fails the balance CHECK.
const INITIAL_BALANCE: i64 = 1_000_000_000_000;

/// The clusters allow 100 prepared transactions and 200 connections per database; raw-2pc
/// holds one prepared transaction and one connection per client task, next to the agent's
/// pool (64).
const MAX_CONCURRENCY: usize = 96;

/// `paxos-f1-plaintext` is paxos-f1 without TLS, to show what TLS costs.
const ALL_MODES: [&str; 6] = [
    "local",
    "raw-2pc",
    "paxos-f0",
    "paxos-f1",
    "paxos-f1-plaintext",
    "paxos-f2",
];

impl Config {
    fn from(args: Args) -> Result<Config> {
        let q = args.quick;
        let modes = args.modes.unwrap_or_else(|| {
            let all: &[&str] = if q { &ALL_MODES[..5] } else { &ALL_MODES };
            all.iter().map(|s| s.to_string()).collect()
        });
        let mut modes = modes;
        let mut seen = std::collections::BTreeSet::new();
        modes.retain(|m| seen.insert(m.clone()));
        let cfg = Config {
            quick: q,
            modes,
            participants: sorted(args.participants.unwrap_or_else(|| {
                if q {
                    vec![2]
                } else {
                    vec![2, 5]
                }
            })),
            concurrency: sorted(args.concurrency.unwrap_or_else(|| {
                if q {
                    vec![1, 8]
                } else {
                    vec![1, 8, 32, 64]
                }
            })),
            duration_s: args.duration.unwrap_or(if q { 1.0 } else { 10.0 }),
            warmup_s: args.warmup.unwrap_or(if q { 0.5 } else { 1.0 }),
            accounts: args.accounts.unwrap_or(if q { 1_000 } else { 10_000 }),
            out: args.out.unwrap_or_else(|| {
                paxos_commit_integration::process::workspace_root()
                    .join("target")
                    .join("bench")
            }),
            commit_fast: args.commit_fast,
            audit_every_ms: args.audit_every_ms,
            initial_balance: INITIAL_BALANCE,
        };
        for m in &cfg.modes {
            if mode_f(m).is_none() && m != "local" && m != "raw-2pc" {
                bail!("unknown mode {m:?}; known: {}", ALL_MODES.join(", "));
            }
        }
        if cfg.modes.is_empty() || cfg.participants.is_empty() || cfg.concurrency.is_empty() {
            bail!("--modes, --participants and --concurrency need at least one value each");
        }
        if let Some(n) = cfg.participants.iter().find(|n| !(1..=26).contains(*n)) {
            bail!("--participants {n}: use 1 to 26 databases");
        }
        if let Some(c) = cfg
            .concurrency
            .iter()
            .find(|c| !(1..=MAX_CONCURRENCY).contains(*c))
        {
            bail!("--concurrency {c}: use 1 to {MAX_CONCURRENCY} (the test clusters allow 100 prepared transactions)");
        }
        if !(cfg.duration_s > 0.0 && cfg.warmup_s >= 0.0) {
            bail!("--duration must be positive and --warmup not negative");
        }
        if cfg.accounts < 1 {
            bail!("--accounts must be at least 1");
        }
        Ok(cfg)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s)
    }

    fn direct_modes(&self) -> Vec<String> {
        self.modes
            .iter()
            .filter(|m| mode_f(m).is_none())
            .cloned()
            .collect()
    }

    /// The deployments the paxos modes need, as (F, plaintext), without duplicates.
    fn paxos_fs(&self) -> Vec<(usize, bool)> {
        let mut fs: Vec<(usize, bool)> = self
            .modes
            .iter()
            .filter_map(|m| Some((mode_f(m)?, m.ends_with(PLAINTEXT))))
            .collect();
        fs.sort_unstable();
        fs.dedup();
        fs
    }
}

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

const PLAINTEXT: &str = "-plaintext";

/// `paxos-fF` (mutual TLS, as deployed) or `paxos-fF-plaintext` → F.
fn mode_f(mode: &str) -> Option<usize> {
    let rest = mode.strip_prefix("paxos-f")?;
    rest.strip_suffix(PLAINTEXT)
        .unwrap_or(rest)
        .parse()
        .ok()
        .filter(|f| *f <= 3)
}

#[tokio::main]
async fn main() {
    let cfg = match Config::from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::exit(2);
        }
    };
    let mut cells = Vec::new();
    let mut pg_version = None;
    // Ctrl-C drops the clusters (processes, databases, directories) and still writes the
    // cells measured so far.
    let outcome = tokio::select! {
        r = run(&cfg, &mut cells, &mut pg_version) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // A smoke run must fail loudly when a mode does not work at all, not only print it.
    let smoke = if cfg.quick && outcome.is_ok() {
        smoke_check(&cells)
    } else {
        Ok(())
    };
    let written = if cells.is_empty() {
        Ok(())
    } else {
        finish(&cfg, cells, pg_version)
    };
    let errors: Vec<anyhow::Error> = [outcome.err(), written.err(), smoke.err()]
        .into_iter()
        .flatten()
        .collect();
    for e in &errors {
        eprintln!("bench: {e:#}");
    }
    if !errors.is_empty() {
        std::process::exit(1);
    }
}

async fn run(
    cfg: &Config,
    cells: &mut Vec<CellResult>,
    pg_version: &mut Option<String>,
) -> Result<()> {
    let cell_ms = (cfg.warmup() + cfg.duration()).as_millis() as u64;
    let total_cells = cfg.participants.len() * cfg.concurrency.len() * cfg.modes.len();
    let bar = ProgressBar::new(total_cells as u64 * cell_ms);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {percent:>3}% eta {eta:>4} {msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let say = |line: String| bar.suspend(|| eprintln!("{line}"));
    say(format!(
        "bench: {} cells of {:.1} s warm-up + {:.1} s; modes {}; N = {:?}; c = {:?}; {} accounts per database",
        total_cells,
        cfg.warmup_s,
        cfg.duration_s,
        cfg.modes.join(", "),
        cfg.participants,
        cfg.concurrency,
        cfg.accounts
    ));

    let max_c = cfg.concurrency.iter().copied().max().unwrap_or(1);
    let direct = cfg.direct_modes();
    let fs = cfg.paxos_fs();
    for &n in &cfg.participants {
        let names: Vec<String> = (0..n)
            .map(|i| format!("bench_{}", (b'a' + i as u8) as char))
            .collect();
        // One deployment per F; the direct modes use the databases of the first one (all
        // are configured alike and equally fresh).
        let cluster_fs = if fs.is_empty() {
            vec![(0, false)]
        } else {
            fs.clone()
        };
        for (k, &(f, plaintext)) in cluster_fs.iter().enumerate() {
            bar.set_message(format!(
                "starting {n} PostgreSQL clusters, {} replicas, {n} agents",
                2 * f + 1
            ));
            let cluster = start_cluster(&names, f, plaintext, cfg).await?;
            if pg_version.is_none() {
                // "15.4 (Debian 15.4-1)" → "15.4".
                *pg_version = server_version(&cluster, &names[0])
                    .await
                    .ok()
                    .and_then(|v| v.split_whitespace().next().map(str::to_string));
            }
            let pg_data_dirs: Vec<PathBuf> = cluster.pgs.values().map(|p| p.data_dir()).collect();

            if k == 0 && !direct.is_empty() {
                bar.set_message(format!("opening {max_c} x {n} connections"));
                let conns = Arc::new(connect_all(&cluster, &names, max_c).await?);
                for mode in &direct {
                    let driver = if mode == "local" {
                        Driver::Local
                    } else {
                        Driver::Raw2pc
                    };
                    for &c in &cfg.concurrency {
                        let spec = CellSpec {
                            id: cells.len(),
                            mode: mode.clone(),
                            replicas: None,
                            participants: n,
                            concurrency: c,
                            accounts: cfg.accounts,
                            warmup: cfg.warmup(),
                            duration: cfg.duration(),
                            driver: driver.clone(),
                            conns: Some(conns.clone()),
                            coordinator_pids: Vec::new(),
                            agent_pids: Vec::new(),
                            pg_data_dirs: pg_data_dirs.clone(),
                            coordinator: None,
                        };
                        let result =
                            run_cell(&cluster, &names, spec, &bar, cells.len() as u64 * cell_ms)
                                .await?;
                        say(summary(&result));
                        cells.push(result);
                    }
                }
                drop(conns);
                roll_back_leftovers(&cluster, &names, &say).await?;
            }

            if fs.contains(&(f, plaintext)) {
                let mode = format!("paxos-f{f}{}", if plaintext { PLAINTEXT } else { "" });
                let driver = Driver::Paxos {
                    client: cluster.client.clone(),
                    participants: Arc::new(names.clone()),
                    commit_fast: cfg.commit_fast,
                };
                for &c in &cfg.concurrency {
                    let spec = CellSpec {
                        id: cells.len(),
                        mode: mode.clone(),
                        replicas: Some(2 * f + 1),
                        participants: n,
                        concurrency: c,
                        accounts: cfg.accounts,
                        warmup: cfg.warmup(),
                        duration: cfg.duration(),
                        driver: driver.clone(),
                        conns: None,
                        coordinator_pids: cluster.replicas.iter().filter_map(|p| p.pid()).collect(),
                        agent_pids: cluster.agents.values().filter_map(|p| p.pid()).collect(),
                        pg_data_dirs: pg_data_dirs.clone(),
                        coordinator: Some(cluster.operator.clone()),
                    };
                    let result =
                        run_cell(&cluster, &names, spec, &bar, cells.len() as u64 * cell_ms)
                            .await?;
                    say(summary(&result));
                    cells.push(result);
                }
                // Every paxos transfer waited for its outcome, so nothing may be left.
                cluster
                    .wait_no_prepared(Duration::from_secs(30))
                    .await
                    .context("prepared transactions left after the paxos cells")?;
            }
            bar.set_message("stopping the deployment");
            // Stops the servers and removes their directories before the next one starts.
            drop(cluster);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

async fn start_cluster(
    names: &[String],
    f: usize,
    plaintext: bool,
    cfg: &Config,
) -> Result<Cluster> {
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut spec = Spec::new(&format!("bench-n{}-f{f}", names.len()), 2 * f + 1, &refs);
    spec.insecure = plaintext;
    // Per-transaction info logs would be part of what is measured; production runs at warn.
    spec.env = vec![("RUST_LOG".into(), "warn".into())];
    spec.group = "bench".into();
    spec.audit_interval_ms = (cfg.audit_every_ms > 0).then_some(cfg.audit_every_ms);
    let cluster = Cluster::start(spec)
        .await
        .with_context(|| format!("starting the deployment for N={} F={f}", names.len()))?;
    bank::create_accounts(&cluster, cfg.accounts, cfg.initial_balance).await?;
    cluster.setup_sql("VACUUM ANALYZE accounts").await?;
    Ok(cluster)
}

async fn server_version(cluster: &Cluster, db: &str) -> Result<String> {
    let row = cluster
        .db(db)
        .await?
        .query_one("SHOW server_version", &[])
        .await?;
    Ok(row.get(0))
}

/// One connection to every database per client task, for the direct modes.
async fn connect_all(cluster: &Cluster, names: &[String], tasks: usize) -> Result<Vec<TaskConns>> {
    let urls: Vec<String> = names
        .iter()
        .map(|p| cluster.pg(p).map(|pg| pg.url()))
        .collect::<Result<_>>()?;
    join_all((0..tasks).map(|_| async {
        let mut conns = Vec::with_capacity(urls.len());
        for url in &urls {
            conns.push(DbConn::connect(url).await?);
        }
        Ok::<TaskConns, anyhow::Error>(conns)
    }))
    .await
    .into_iter()
    .collect()
}

/// A CHECKPOINT before each cell, so that one cell does not pay for the dirty pages of the
/// previous one; then the cell.
async fn run_cell(
    cluster: &Cluster,
    names: &[String],
    spec: CellSpec,
    bar: &ProgressBar,
    bar_base: u64,
) -> Result<CellResult> {
    for p in names {
        cluster
            .db(p)
            .await?
            .batch_execute("CHECKPOINT")
            .await
            .with_context(|| format!("CHECKPOINT on {p}"))?;
    }
    cell::run(spec, bar, bar_base).await
}

/// raw-2pc rolls back what it prepared when a transfer fails; a gid left behind (a failed
/// ROLLBACK PREPARED) would hold a prepared-transaction slot, so it is removed and reported.
async fn roll_back_leftovers(
    cluster: &Cluster,
    names: &[String],
    say: &impl Fn(String),
) -> Result<()> {
    for p in names {
        let db = cluster.db(p).await?;
        let rows = db
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'bench-%'",
                &[],
            )
            .await?;
        for row in rows {
            let gid: String = row.get(0);
            say(format!(
                "warning: raw-2pc left {gid} prepared on {p}; rolling it back"
            ));
            db.batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                .await?;
        }
    }
    Ok(())
}

fn summary(c: &CellResult) -> String {
    format!(
        "  {:<9} N={} c={:<3} {:>7.0} tx/s  p50 {:>6.2} ms  p99 {:>6.2} ms  aborted {} unknown {} errors {}",
        c.mode,
        c.participants,
        c.concurrency,
        c.throughput,
        c.latency.p50_us as f64 / 1000.0,
        c.latency.p99_us as f64 / 1000.0,
        c.aborted,
        c.unknown,
        c.errors
    )
}

/// `--quick` is CI's smoke test: every cell must have committed something, and no transfer
/// may have ended in an error or an unknown outcome (aborts are tolerated: lock timeouts can
/// happen by chance).
fn smoke_check(cells: &[CellResult]) -> Result<()> {
    let bad: Vec<String> = cells
        .iter()
        .filter(|c| c.committed == 0 || c.errors > 0 || c.unknown > 0)
        .map(|c| {
            format!(
                "{} N={} c={}: {} committed, {} unknown, {} errors ({})",
                c.mode,
                c.participants,
                c.concurrency,
                c.committed,
                c.unknown,
                c.errors,
                c.first_failure.as_deref().unwrap_or("no message")
            )
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        bail!("smoke check failed:\n  {}", bad.join("\n  "))
    }
}

/// Prints the tables and writes bench.json and bench.svg.
fn finish(cfg: &Config, mut cells: Vec<CellResult>, pg_version: Option<String>) -> Result<()> {
    report::add_ratios(&mut cells);
    report::sort(&mut cells, &cfg.modes);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let commit = if cfg.commit_fast {
        "paxos commit answers on decision"
    } else {
        "commit waits until applied"
    };
    println!(
        "\n## paxos-commit benchmark ({profile} build, {cpus} CPUs, PostgreSQL {}, fsync on, {:.1} s per cell, {} accounts per database, {commit})\n",
        pg_version.as_deref().unwrap_or("?"),
        cfg.duration_s,
        cfg.accounts
    );
    println!("{}", report::markdown(&cells));
    println!("CPU is a percentage of one core over the measured window (Σ: all processes of the role; max: the busiest one). RSS is the peak sampled during the window.\n");
    println!(
        "### Where the time goes\n\n{}",
        report::phases_markdown(&cells)
    );
    println!(
        "### What a committed transfer costs\n\n{}\nWake-ups are voluntary context switches (a thread blocked, then woken), summed over every thread of the replicas and agents; preemptions are involuntary ones.\n",
        report::cost_markdown(&cells)
    );
    let failures = report::failures(&cells);
    if !failures.is_empty() {
        println!("### First failure per cell\n\n{failures}");
    }

    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let config = serde_json::to_value(cfg)?;
    let report = report::Report {
        generated_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        profile,
        host: report::Host {
            cpus,
            postgres_version: pg_version.clone(),
            git_revision: report::git_revision(),
        },
        config: &config,
        cells: &cells,
    };
    let json_path = cfg.out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let subtitle = format!(
        "{profile} build · {cpus} CPUs · PostgreSQL {} · fsync on · {:.1} s per cell · {} accounts per database · {commit}",
        pg_version.as_deref().unwrap_or("?"),
        cfg.duration_s,
        cfg.accounts
    );
    let svg_path = cfg.out.join("bench.svg");
    std::fs::write(
        &svg_path,
        svg::chart(
            &cells,
            &cfg.modes,
            &cfg.participants,
            &cfg.concurrency,
            &subtitle,
        ),
    )
    .with_context(|| format!("writing {}", svg_path.display()))?;
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}
