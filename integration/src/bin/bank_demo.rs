//! The bank demo: the first thing to run. It starts its own PostgreSQL clusters, three
//! coordinator replicas and one agent per database on loopback, moves money between accounts
//! in different databases, kills the leading replica with kill -9 halfway through, and ends
//! by checking that no money was created or destroyed and nothing is left prepared.

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::pb;
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    about = "paxos-commit bank demo: transfers across PostgreSQL databases, with a replica killed midway"
)]
struct Args {
    /// Transfers to run.
    #[arg(long, default_value_t = 3000)]
    transfers: u64,
    /// Transfers in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u64,
    /// Databases (participants), 2 or more.
    #[arg(long, default_value_t = 3)]
    databases: usize,
    /// Coordinator replicas (2F+1).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Accounts per database.
    #[arg(long, default_value_t = 100)]
    accounts: i32,
    /// Do not kill the leading replica halfway.
    #[arg(long)]
    no_kill: bool,
}

#[derive(Default)]
struct Counts {
    committed: AtomicU64,
    aborted: AtomicU64,
    unknown: AtomicU64,
    started: AtomicU64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // Ctrl-C drops everything (clusters, processes, directories) before exiting.
    let outcome = tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: stopping the demo's processes and databases");
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    if let Err(e) = outcome {
        eprintln!("bank demo: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    if args.databases < 2 {
        bail!("--databases must be at least 2");
    }
    let names: Vec<String> = (0..args.databases)
        .map(|i| format!("bank_{}", (b'a' + i as u8) as char))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    println!(
        "starting {} PostgreSQL clusters, {} coordinator replicas and {} agents on loopback ...",
        args.databases, args.replicas, args.databases
    );
    let mut spec = Spec::new("demo", args.replicas, &refs);
    spec.env = vec![("RUST_LOG".into(), "warn".into())];
    let cluster = Cluster::start(spec).await?;
    let initial = 1_000i64;
    bank::create_accounts(&cluster, args.accounts, initial).await?;
    let expected = initial * i64::from(args.accounts) * args.databases as i64;
    println!(
        "{} accounts of {initial} in each of {}: {expected} in all",
        args.accounts,
        names.join(", ")
    );
    println!("logs: {}", cluster.dir.path().display());

    let counts = Arc::new(Counts::default());
    let bar = ProgressBar::new(args.transfers);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .context("progress bar template")?,
    );
    let unknown_txids = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let client = cluster.client.clone();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, counts, names, bar, unknown_txids) = (
            client.clone(),
            counts.clone(),
            names.clone(),
            bar.clone(),
            unknown_txids.clone(),
        );
        let (total, accounts) = (args.transfers, args.accounts);
        workers.spawn(async move {
            while counts.started.fetch_add(1, Ordering::Relaxed) < total {
                let (from, to, a, b, amount) = {
                    let mut rng = rand::rng();
                    let from = rng.random_range(0..names.len());
                    let to = (from + rng.random_range(1..names.len())) % names.len();
                    (
                        from,
                        to,
                        rng.random_range(1..=accounts),
                        rng.random_range(1..=accounts),
                        rng.random_range(1..=100),
                    )
                };
                match bank::transfer(&client, (&names[from], a), (&names[to], b), amount).await {
                    Ok((_, TransferOutcome::Committed)) => {
                        counts.committed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((_, TransferOutcome::Aborted(_))) => {
                        counts.aborted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((txid, TransferOutcome::Unknown(_))) => {
                        counts.unknown.fetch_add(1, Ordering::Relaxed);
                        unknown_txids.lock().await.push(txid);
                    }
                    Err(_) => {
                        // Refused before anything was prepared (e.g. Begin found no replica).
                        counts.aborted.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                bar.inc(1);
            }
        });
    }

    let start = Instant::now();
    let mut killed = args.no_kill;
    let mut last = (Instant::now(), 0u64);
    while !workers.is_empty() {
        tokio::select! {
            r = workers.join_next() => { if let Some(r) = r { r.context("worker")?; } }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let done =
            counts.committed.load(Ordering::Relaxed) + counts.aborted.load(Ordering::Relaxed);
        let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        if last.0.elapsed() > Duration::from_secs(1) {
            last = (Instant::now(), done);
        }
        bar.set_message(format!(
            "{rate:>6.0} transfers/s   committed {}   aborted {}   in doubt {}",
            counts.committed.load(Ordering::Relaxed),
            counts.aborted.load(Ordering::Relaxed),
            counts.unknown.load(Ordering::Relaxed),
        ));
        if !killed && bar.position() >= args.transfers / 2 {
            killed = true;
            bar.println(format!(
                ">>> kill -9 of replica 0, the leader of most transactions (pid {:?}); the others take over",
                cluster.replicas[0].pid()
            ));
            cluster.replicas[0].kill9()?;
        }
    }
    bar.finish();
    let elapsed = start.elapsed();

    println!("settling transactions whose outcome the client could not learn ...");
    // First every prepared branch is finished (the agents ask the group, which takes over
    // what the dead leader left). After that no branch of any transaction can still commit:
    // the clients are done, and an unprepared branch only ever rolls back.
    cluster.wait_no_prepared(Duration::from_secs(60)).await?;
    let mut unknown_resolved = 0;
    for txid in unknown_txids.lock().await.iter() {
        let state = cluster.wait_decided(txid, Duration::from_secs(2)).await;
        let rows = bank::rows_of(&cluster, txid).await?;
        let state = match state {
            Ok(s) => s,
            // Never seen by an acceptor, or still to be aborted by a takeover: nothing of it
            // is prepared any more, so nothing of it can be applied.
            Err(_) => pb::TxnState::Unknown,
        };
        let applied = rows.values().filter(|n| **n > 0).count();
        let consistent = match state {
            pb::TxnState::Committed => applied == 2,
            _ => applied == 0,
        };
        if !consistent {
            bail!("{txid}: group says {state:?} but rows are {rows:?}");
        }
        unknown_resolved += 1;
    }

    let totals = bank::totals(&cluster).await?;
    println!();
    println!(
        "{} transfers in {:.1} s ({:.0}/s): {} committed, {} aborted, {} in doubt at the client and settled since",
        args.transfers,
        elapsed.as_secs_f64(),
        args.transfers as f64 / elapsed.as_secs_f64(),
        counts.committed.load(Ordering::Relaxed),
        counts.aborted.load(Ordering::Relaxed),
        unknown_resolved,
    );
    for (db, total) in &totals {
        println!("  {db}: {total}");
    }
    let sum: i64 = totals.values().sum();
    println!("  all databases: {sum} (expected {expected})");
    if sum != expected {
        bail!("money was created or destroyed: {sum} != {expected}");
    }
    println!("invariant holds: the total is conserved and nothing is left in pg_prepared_xacts");
    Ok(())
}
