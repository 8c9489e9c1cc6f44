//! txctl: the operator's CLI for in-doubt transactions. It reads the same configuration
//! (file, `PAXOS_COMMIT_*` variables, flags) as the replicas, plus the agents' addresses.

use clap::{Parser, Subcommand, ValueEnum};
use paxos_commit_coordinator::audit::AuditOptions;
use paxos_commit_coordinator::config::ConfigArgs;
use paxos_commit_coordinator::ops::{parse_duration, Deployment, OpsError};
use paxos_commit_core::Outcome;
use serde::Serialize;
use std::process::ExitCode;
use std::time::Duration;

const EXIT_OK: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_IN_DOUBT: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;
const EXIT_REFUSED: u8 = 5;
const EXIT_DIVERGED: u8 = 6;

/// Inspect and resolve paxos-commit transactions.
///
/// Exit codes: 0 fine; 1 error; 2 bad usage or configuration; 3 something is in doubt
/// (in-doubt found prepared transactions, or resolve left some unresolved); 4 a replica or
/// agent that was needed is unreachable; 5 refused (heuristic contradicted, or --force missing);
/// 6 the audit found a database that contradicts the group.
///
/// Configuration: --config FILE (the replicas' TOML, with an [agents] table), or
/// PAXOS_COMMIT_REPLICAS=host:port,... and PAXOS_COMMIT_AGENTS=id=host:port,...
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Per-request timeout, e.g. 5s.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The decision (or none yet), each participant's vote as each acceptor recorded it, and
    /// whether each participant applied the decision.
    ///
    /// Example: txctl --config replica.toml status 00a1b2c3d4e5f607
    Status { txid: String },
    /// Every prepared transaction of ours across all agents, its age, its participants, and
    /// what the coordinator group knows of it. Exits 3 if any is found.
    ///
    /// Example: txctl --config replica.toml in-doubt --older-than 30s
    InDoubt {
        /// Only those prepared longer ago than this (e.g. 500ms, 30s, 5m).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
    },
    /// Drives a transaction (or every in-doubt one) to its decision through the coordinator
    /// group (a replica takes it over with a higher ballot if needed) and pushes the decision
    /// to the agents. Safe at any time; idempotent.
    ///
    /// Example: txctl --config replica.toml resolve --all
    Resolve {
        txid: Option<String>,
        /// Every in-doubt transaction on every agent.
        #[arg(long, conflicts_with = "txid")]
        all: bool,
    },
    /// Replicas up or down, transactions each one leads, acceptor log size, oldest undecided
    /// transaction; agents up or down with their oldest prepared transaction.
    ///
    /// Example: txctl --config replica.toml cluster
    Cluster,
    /// Last resort when the coordinator group is lost for good: commit or abort one prepared
    /// branch by gid. Refuses whenever a reachable replica knows a decision or a vote that
    /// contradicts it, prints what it checked, and needs --force.
    ///
    /// Example: txctl --config replica.toml heuristic abort pxc:bank:00a1b2c3d4e5f607:bank_a --force
    Heuristic {
        decision: HeuristicDecision,
        gid: String,
        /// Really apply it (after the checks passed).
        #[arg(long)]
        force: bool,
    },
    /// Compares every database's commit proofs (paxos_commit.committed, written in each
    /// branch's own transaction) with the group's outcomes and lists every divergence: a
    /// branch committed where the group aborted or never decided, or rolled back where the
    /// group committed. Exits 6 if any is found, 4 if a database or replica could not be read.
    ///
    /// Example: txctl --config replica.toml audit --window 24h
    Audit {
        /// Only transactions younger than this (proofs are pruned after the agents'
        /// commit-proof retention, full group state after the replicas' retention).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        window: Duration,
    },
    /// A development certificate authority: `init` makes the CA, `issue` one certificate per
    /// process (replica, agent, client or operator). The group comes from --group.
    ///
    /// Example: txctl --group bank certs init --dir certs &&
    ///          txctl --group bank certs issue --dir certs --role replica --name 0 --host 10.0.0.1
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Makes ca.pem and ca-key.pem (keep the key offline; every process needs ca.pem).
    Init {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u64,
    },
    /// Issues <role>-<name>.pem and <role>-<name>-key.pem, signed by the CA in --dir.
    Issue {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, value_enum)]
        role: CertRole,
        /// Replica index, participant id, or client/operator name.
        #[arg(long)]
        name: String,
        /// Host names or IP addresses others dial this process at (servers only), repeatable.
        #[arg(long)]
        host: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CertRole {
    Replica,
    Agent,
    Client,
    Operator,
}

#[derive(Clone, Copy, ValueEnum)]
enum HeuristicDecision {
    Commit,
    Abort,
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("txctl: cannot encode JSON: {e}"),
    }
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn age(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 120_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, ms / 1000 % 60)
    }
}

fn fail(e: &OpsError) -> ExitCode {
    eprintln!("txctl: {e}");
    ExitCode::from(match e {
        OpsError::Invalid(_) => EXIT_USAGE,
        OpsError::Unreachable(_) => EXIT_UNREACHABLE,
        OpsError::Refused(_) => EXIT_REFUSED,
        OpsError::Rpc(_) => EXIT_ERROR,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Certs(c) = &cli.command {
        return certs(cli.config.group.as_deref(), c);
    }
    // A replica's file may take its id from the host name; txctl is no replica and runs
    // anywhere, so that setting is not its own.
    let mut config = cli.config.clone();
    config.id_from_hostname = Some(false);
    let cfg = match config.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("txctl: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let deployment = match Deployment::new(cfg, cli.timeout) {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    match cli.command {
        Command::Status { txid } => status(&deployment, &txid, cli.json).await,
        Command::InDoubt { older_than } => {
            in_doubt(&deployment, older_than.unwrap_or_default(), cli.json).await
        }
        Command::Resolve { txid, all } => resolve(&deployment, txid, all, cli.json).await,
        Command::Cluster => cluster(&deployment, cli.json).await,
        Command::Audit { window } => audit(&deployment, window, cli.json).await,
        Command::Heuristic {
            decision,
            gid,
            force,
        } => {
            let outcome = match decision {
                HeuristicDecision::Commit => Outcome::Committed,
                HeuristicDecision::Abort => Outcome::Aborted,
            };
            heuristic(&deployment, &gid, outcome, force, cli.json).await
        }
        Command::Certs(_) => ExitCode::from(EXIT_USAGE),
    }
}

fn certs(group: Option<&str>, command: &CertsCommand) -> ExitCode {
    use paxos_commit_proto::pki::{Ca, Validity};
    use paxos_commit_proto::tls::{valid_name, Role};
    let Some(group) = group.filter(|g| valid_name(g)) else {
        eprintln!("txctl certs: give the group (--group NAME, 1-64 of [A-Za-z0-9_-])");
        return ExitCode::from(EXIT_USAGE);
    };
    let result = match command {
        CertsCommand::Init { dir, days } => Ca::new(group, Validity::days(*days))
            .and_then(|ca| ca.save(dir))
            .map(|()| format!("wrote {0}/ca.pem and {0}/ca-key.pem", dir.display())),
        CertsCommand::Issue {
            dir,
            role,
            name,
            host,
            days,
        } => {
            let role = match role {
                CertRole::Replica => match name.parse() {
                    Ok(i) => Role::Replica(i),
                    Err(_) => {
                        eprintln!("txctl certs: a replica is named by its index (0, 1, ...)");
                        return ExitCode::from(EXIT_USAGE);
                    }
                },
                CertRole::Agent => Role::Agent(name.clone()),
                CertRole::Client => Role::Client(name.clone()),
                CertRole::Operator => Role::Operator(name.clone()),
            };
            if !valid_name(name) {
                eprintln!("txctl certs: --name must be 1-64 characters of [A-Za-z0-9_-]");
                return ExitCode::from(EXIT_USAGE);
            }
            let file = role.to_string().replace('/', "-");
            Ca::load(dir)
                .and_then(|ca| ca.issue(group, &role, host, Validity::days(*days)))
                .and_then(|issued| issued.save(dir, &file))
                .map(|(cert, key)| {
                    format!(
                        "wrote {} and {} for {}",
                        cert.display(),
                        key.display(),
                        role.uri(group)
                    )
                })
        }
    };
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::from(EXIT_OK)
        }
        Err(e) => {
            eprintln!("txctl certs: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn status(d: &Deployment, txid: &str, json: bool) -> ExitCode {
    let v = match d.status(txid).await {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    if json {
        print_json(&v);
    } else {
        let expired = if v.expired {
            " (forgotten after retention)"
        } else {
            ""
        };
        println!("transaction {}: {}{expired}", v.txid, v.state);
        println!(
            "leader: replica {}   highest promised ballot: {}",
            v.leader, v.promised_ballot
        );
        let rows: Vec<Vec<String>> = v
            .participants
            .iter()
            .map(|p| {
                let votes = if p.votes.is_empty() {
                    "-".to_string()
                } else {
                    p.votes
                        .iter()
                        .map(|x| format!("r{}:{}@b{}", x.acceptor, x.vote, x.ballot))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                vec![
                    p.id.clone(),
                    p.address.clone(),
                    votes,
                    if p.applied { "yes" } else { "no" }.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "PARTICIPANT",
                "ADDRESS",
                "VOTES (acceptor:vote@ballot)",
                "APPLIED",
            ],
            &rows,
        );
    }
    ExitCode::from(EXIT_OK)
}

async fn in_doubt(d: &Deployment, older_than: Duration, json: bool) -> ExitCode {
    let (list, unreachable) = match d.in_doubt(older_than).await {
        Ok(x) => x,
        Err(e) => return fail(&e),
    };
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            in_doubt: &'a [paxos_commit_coordinator::ops::InDoubt],
            unreachable_agents: &'a [String],
        }
        print_json(&Out {
            in_doubt: &list,
            unreachable_agents: &unreachable,
        });
    } else {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|x| {
                vec![
                    x.txid.clone(),
                    x.participant.clone(),
                    age(x.age_ms),
                    x.participants.join(","),
                    x.group_state.clone(),
                ]
            })
            .collect();
        table(
            &["TXID", "PREPARED ON", "AGE", "PARTICIPANTS", "GROUP SAYS"],
            &rows,
        );
        println!("{} prepared transaction(s) in doubt", list.len());
        for u in &unreachable {
            eprintln!("agent unreachable: {u}");
        }
    }
    if !list.is_empty() {
        ExitCode::from(EXIT_IN_DOUBT)
    } else if !unreachable.is_empty() {
        ExitCode::from(EXIT_UNREACHABLE)
    } else {
        ExitCode::from(EXIT_OK)
    }
}

async fn audit(d: &Deployment, window: Duration, json: bool) -> ExitCode {
    let report = match d.audit(AuditOptions { window }).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if json {
        print_json(&report);
    } else {
        let rows: Vec<Vec<String>> = report
            .divergences
            .iter()
            .map(|x| {
                vec![
                    x.txid.clone(),
                    x.participant.clone(),
                    x.kind.describe().to_string(),
                    x.committed_at.join(","),
                    x.participants.join(","),
                    age(x.age_ms),
                ]
            })
            .collect();
        if !rows.is_empty() {
            table(
                &[
                    "TXID",
                    "DATABASE",
                    "DIVERGENCE",
                    "COMMITTED AT",
                    "PARTICIPANTS",
                    "AGE",
                ],
                &rows,
            );
        }
        println!(
            "{} divergence(s) in {} transaction(s) ({} proofs, {} in flight, {} not judged) in {} ms",
            report.divergences.len(),
            report.transactions,
            report.proofs,
            report.in_flight,
            report.not_judged,
            report.duration_ms
        );
        for u in &report.unreachable_agents {
            eprintln!("agent unreachable: {u}");
        }
        for u in &report.unreachable_replicas {
            eprintln!("replica unreachable: {u}");
        }
        for p in &report.unaudited_participants {
            eprintln!("participant {p} has no configured agent: its database was not audited");
        }
    }
    if !report.divergences.is_empty() {
        ExitCode::from(EXIT_DIVERGED)
    } else if !report.complete() {
        ExitCode::from(EXIT_UNREACHABLE)
    } else {
        ExitCode::from(EXIT_OK)
    }
}

async fn resolve(d: &Deployment, txid: Option<String>, all: bool, json: bool) -> ExitCode {
    let txids: Vec<String> = match (txid, all) {
        (Some(t), false) => vec![t],
        (None, true) => match d.in_doubt(Duration::ZERO).await {
            Ok((list, _)) => {
                let mut t: Vec<String> = list.into_iter().map(|x| x.txid).collect();
                t.dedup();
                t
            }
            Err(e) => return fail(&e),
        },
        _ => {
            eprintln!("txctl: resolve needs a TXID or --all");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for t in txids {
        match d.resolve(&t).await {
            Ok(r) => results.push(r),
            Err(e) => failures.push((t, e)),
        }
    }
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            resolved: &'a [paxos_commit_coordinator::ops::Resolution],
            failed: Vec<(String, String)>,
        }
        print_json(&Out {
            resolved: &results,
            failed: failures
                .iter()
                .map(|(t, e)| (t.clone(), e.to_string()))
                .collect(),
        });
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|r| {
                vec![
                    r.txid.clone(),
                    r.outcome.clone(),
                    r.applied_on.join(","),
                    r.errors.join("; "),
                ]
            })
            .collect();
        table(&["TXID", "OUTCOME", "APPLIED ON", "ERRORS"], &rows);
        for (t, e) in &failures {
            eprintln!("{t}: {e}");
        }
        println!("{} resolved, {} not", results.len(), failures.len());
    }
    if let Some((_, e)) = failures.first() {
        if failures
            .iter()
            .all(|(_, e)| matches!(e, OpsError::Unreachable(_)))
        {
            return ExitCode::from(EXIT_UNREACHABLE);
        }
        let _ = e;
        return ExitCode::from(EXIT_IN_DOUBT);
    }
    if results.iter().any(|r| !r.errors.is_empty()) {
        return ExitCode::from(EXIT_IN_DOUBT);
    }
    ExitCode::from(EXIT_OK)
}

async fn cluster(d: &Deployment, json: bool) -> ExitCode {
    let replicas = d.replicas_health().await;
    let agents = d.agents_health().await;
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            replicas: &'a [paxos_commit_coordinator::ops::ReplicaHealth],
            agents: &'a [paxos_commit_coordinator::ops::AgentHealth],
        }
        print_json(&Out {
            replicas: &replicas,
            agents: &agents,
        });
    } else {
        let rows: Vec<Vec<String>> = replicas
            .iter()
            .map(|r| {
                vec![
                    r.replica.to_string(),
                    r.address.clone(),
                    if r.up {
                        let mut state = match r.state.as_str() {
                            "" | "serving" => "up".to_string(),
                            other => format!("{} ({})", other.to_uppercase(), r.state_reason),
                        };
                        if r.rejoined {
                            state.push_str(" [rejoined]");
                        }
                        state
                    } else {
                        format!("DOWN ({})", r.error.clone().unwrap_or_default())
                    },
                    r.leading.to_string(),
                    r.undecided.to_string(),
                    r.log_bytes.to_string(),
                    r.oldest_undecided
                        .as_ref()
                        .map_or("-".into(), |(t, a)| format!("{t} ({})", age(*a))),
                ]
            })
            .collect();
        table(
            &[
                "REPLICA",
                "ADDRESS",
                "STATE",
                "LEADING",
                "UNDECIDED",
                "LOG BYTES",
                "OLDEST UNDECIDED",
            ],
            &rows,
        );
        println!();
        let rows: Vec<Vec<String>> = agents
            .iter()
            .map(|a| {
                vec![
                    a.participant.clone(),
                    a.address.clone(),
                    if a.up {
                        "up".into()
                    } else {
                        format!("DOWN ({})", a.error.clone().unwrap_or_default())
                    },
                    a.open_branches.to_string(),
                    a.prepared.to_string(),
                    a.oldest_prepared
                        .as_ref()
                        .map_or("-".into(), |(t, ms)| format!("{t} ({})", age(*ms))),
                ]
            })
            .collect();
        table(
            &[
                "AGENT",
                "ADDRESS",
                "STATE",
                "OPEN",
                "PREPARED",
                "OLDEST PREPARED",
            ],
            &rows,
        );
    }
    let majority = replicas.len() / 2 + 1;
    // A degraded or draining replica answers, but cannot take part in a decision.
    let serving = replicas
        .iter()
        .filter(|r| r.up && matches!(r.state.as_str(), "" | "serving"))
        .count();
    if serving < majority || agents.iter().any(|a| !a.up) {
        ExitCode::from(EXIT_UNREACHABLE)
    } else {
        ExitCode::from(EXIT_OK)
    }
}

async fn heuristic(
    d: &Deployment,
    gid: &str,
    outcome: Outcome,
    force: bool,
    json: bool,
) -> ExitCode {
    let (check, err) = match d.heuristic(gid, outcome, force).await {
        Ok(c) => (c, None),
        Err((c, e)) => (c, Some(e)),
    };
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            check: &'a paxos_commit_coordinator::ops::HeuristicCheck,
            applied: bool,
            error: Option<String>,
        }
        print_json(&Out {
            check: &check,
            applied: err.is_none(),
            error: err.as_ref().map(|e| e.to_string()),
        });
    } else {
        println!(
            "heuristic {} of {} ({} on {}):",
            check.asked, check.gid, check.txid, check.participant
        );
        for c in &check.checks {
            println!("  checked: {c}");
        }
        if !check.replicas_unreachable.is_empty() {
            println!(
                "  warning: replicas {:?} were unreachable and could not be checked",
                check.replicas_unreachable
            );
        }
        if err.is_none() {
            println!("applied.");
        }
    }
    match err {
        None => ExitCode::from(EXIT_OK),
        Some(e) => fail(&e),
    }
}
