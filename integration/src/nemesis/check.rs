//! The nemesis test's checker: once the faults are healed and the recovery window has passed,
//! it holds what every client was told against what the databases hold and what the
//! coordinator group says (GetStatus), and measures availability in the window where at most
//! F replicas were faulty.
//!
//! Properties checked:
//!
//! * nothing of ours is left in `pg_prepared_xacts` after the recovery window;
//! * the total balance is conserved, no balance is negative, and every account's balance is
//!   its initial balance plus the deltas of the transfer rows tagged on it (a branch applied
//!   without its tag row, or twice, shows here);
//! * for every transaction id, its tagged rows are in all of its databases (exactly the rows
//!   the transfer wrote) or in none, and no row carries a txid no client began;
//! * acknowledged committed ⇒ rows present and GetStatus committed; reported aborted ⇒ rows
//!   absent and GetStatus not committed; reported unknown ⇒ GetStatus settles it (committed,
//!   aborted, or never seen by any acceptor) and the rows match: committed ⇒ present,
//!   otherwise absent;
//! * in the availability window, at least the required share of transfers committed;
//! * after everything healed, transfers commit again.
//!
//! The availability window ("while at most F replicas were faulty") is defined on what the
//! nemesis really did (its timeline), per transfer attempt. An attempt counts if
//!
//! 1. it began and ended within an available phase;
//! 2. no fault that leaves the window overlapped it, nor ended less than a grace period
//!    (2 s) before it began: kill or pause of an agent, crash-stop of a database, loss on the
//!    links of the client or the agents, and the majority-lost faults. An agent or database
//!    fault necessarily fails the transfers that touch it, and loss on the client's links
//!    breaks its RPCs — none of that is about replicas;
//! 3. at most F distinct replicas were faulty while it ran — killed, paused, isolated, or cut
//!    from the agents (a replica the agents cannot reach is faulty for them). Delay on any
//!    link and loss between replicas stay in the window: the protocol must absorb them;
//! 4. it is not a deliberate overdraft (those must abort).
//!
//! It committed if the client was told so, or if its unknown outcome resolved to committed.
//! Everything else counts against availability: aborts of any reason (lock timeouts
//! included), Begin failures, unknown outcomes that resolved to aborted or never seen. So
//! an attempt whose leader was killed under it is a failure: the requirement is that such
//! losses stay under 5% of the traffic, not that they never happen.

use super::executor::Timeline;
use super::schedule::PhaseKind;
use super::workload::{Attempt, Reported, Step};
use crate::cluster::Cluster;
use anyhow::{Context, Result};
use futures::StreamExt;
use paxos_commit_proto::client::Client;
use paxos_commit_proto::pb;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

/// What the checker needs to know of the run.
#[derive(Clone, Debug)]
pub struct Expect {
    pub participants: Vec<String>,
    pub accounts: i32,
    pub balance: i64,
    pub f: usize,
    /// Required committed share in the availability window.
    pub min_availability: f64,
    /// Fewer counted transfers than this means the window measured nothing.
    pub min_window_transfers: usize,
    /// After a fault of an agent or a database heals, how long its after-effects (broken
    /// pooled connections, reconnects) may still fail transfers without counting.
    pub grace: Duration,
    /// How long prepared transactions may take to drain once everything is healed.
    pub recovery_timeout: Duration,
    /// How long GetStatus may take to settle an unknown outcome (an abandoned open
    /// transaction is only aborted after the replicas' open timeout).
    pub resolve_timeout: Duration,
}

/// The final state of a transaction, as GetStatus says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resolved {
    Committed,
    Aborted,
    /// No acceptor ever saw it (or it is forgotten).
    NeverSeen,
    /// Still in progress at the deadline.
    InProgress,
    /// GetStatus itself failed.
    Error,
}

/// The run in figures.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub attempts: usize,
    pub not_begun: usize,
    pub acked_committed: usize,
    pub reported_aborted: usize,
    pub reported_unknown: usize,
    pub overdrafts: usize,
    /// Unknown outcomes by what GetStatus resolved them to.
    pub unknown_resolved: BTreeMap<String, usize>,
    /// Transactions committed in the end (acknowledged or resolved).
    pub committed: usize,
    pub window_transfers: usize,
    pub window_committed: usize,
    pub window_acked: usize,
    pub window_seconds: f64,
    pub committed_after_heal: usize,
    pub prepared_drained_after: Option<Duration>,
}

impl Figures {
    pub fn availability(&self) -> f64 {
        if self.window_transfers == 0 {
            0.0
        } else {
            self.window_committed as f64 / self.window_transfers as f64
        }
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "transfers: {} attempted, {} acknowledged committed, {} reported aborted \
             ({} deliberate overdrafts), {} outcome unknown, {} never begun",
            self.attempts,
            self.acked_committed,
            self.reported_aborted,
            self.overdrafts,
            self.reported_unknown,
            self.not_begun
        )?;
        writeln!(
            f,
            "unknown outcomes resolved by GetStatus: {:?}; committed in the end: {}",
            self.unknown_resolved, self.committed
        )?;
        writeln!(
            f,
            "availability window (≤ F replicas faulty, no agent/database/client-loss fault): \
             {:.1} s, {} transfers, {} committed ({:.1}%), {} acknowledged at once",
            self.window_seconds,
            self.window_transfers,
            self.window_committed,
            100.0 * self.availability(),
            self.window_acked
        )?;
        write!(
            f,
            "after healing: {} transfers committed; prepared transactions drained in {}",
            self.committed_after_heal,
            self.prepared_drained_after
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "— (not drained)".into())
        )
    }
}

/// The checker's findings.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    pub failures: Vec<String>,
    pub figures: Figures,
}

/// Rows a transfer wrote: (participant, account, delta).
type Row = (String, i32, i64);

fn expected_rows(steps: &[Step]) -> Vec<Row> {
    let mut rows: Vec<Row> = steps
        .iter()
        .map(|s| (s.participant.clone(), s.account, s.delta))
        .collect();
    rows.sort();
    rows
}

/// Lists at most a few examples of one kind of failure, with the count.
struct Failures {
    by_kind: BTreeMap<&'static str, Vec<String>>,
}

const EXAMPLES: usize = 12;

impl Failures {
    fn new() -> Failures {
        Failures {
            by_kind: BTreeMap::new(),
        }
    }

    fn add(&mut self, kind: &'static str, detail: String) {
        self.by_kind.entry(kind).or_default().push(detail);
    }

    fn into_lines(self) -> Vec<String> {
        self.by_kind
            .into_iter()
            .map(|(kind, details)| {
                let n = details.len();
                let mut s = format!("{kind}: {n} case(s)");
                for d in details.iter().take(EXAMPLES) {
                    s.push_str("\n    ");
                    s.push_str(d);
                }
                if n > EXAMPLES {
                    s.push_str(&format!("\n    … and {} more", n - EXAMPLES));
                }
                s
            })
            .collect()
    }
}

pub async fn check(
    cluster: &Cluster,
    expect: &Expect,
    attempts: &[Attempt],
    timeline: &Timeline,
) -> Result<Verdict> {
    let mut failures = Failures::new();
    let mut figures = Figures::default();

    // 1. The recovery window: every prepared transaction of ours finished.
    let started = Instant::now();
    let mut left = Vec::new();
    loop {
        left.clear();
        for p in &expect.participants {
            for gid in cluster.prepared(p).await? {
                left.push(gid);
            }
        }
        if left.is_empty() {
            figures.prepared_drained_after = Some(started.elapsed());
            break;
        }
        if started.elapsed() > expect.recovery_timeout {
            for gid in &left {
                failures.add(
                    "prepared transaction left after the recovery window",
                    gid.clone(),
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // 2. Money: conserved, never negative, and explained by the tagged rows.
    let mut rows_by_txid: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    let mut deltas: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut total = 0i64;
    for p in &expect.participants {
        let db = cluster.db(p).await?;
        for r in db
            .query("SELECT txid, account, delta FROM transfers", &[])
            .await
            .with_context(|| format!("reading transfers on {p}"))?
        {
            let (txid, account, delta): (String, i32, i64) = (r.get(0), r.get(1), r.get(2));
            *deltas.entry((p.clone(), account)).or_default() += delta;
            rows_by_txid
                .entry(txid)
                .or_default()
                .push((p.clone(), account, delta));
        }
        for r in db
            .query("SELECT id, balance FROM accounts ORDER BY id", &[])
            .await
            .with_context(|| format!("reading accounts on {p}"))?
        {
            let (id, balance): (i32, i64) = (r.get(0), r.get(1));
            total += balance;
            if balance < 0 {
                failures.add("negative balance", format!("{p} account {id}: {balance}"));
            }
            let explained = expect.balance + deltas.get(&(p.clone(), id)).copied().unwrap_or(0);
            if balance != explained {
                failures.add(
                    "balance not explained by its transfer rows",
                    format!(
                        "{p} account {id}: balance {balance}, initial + tagged deltas {explained}"
                    ),
                );
            }
        }
    }
    for rows in rows_by_txid.values_mut() {
        rows.sort();
    }
    let initial = expect.balance * i64::from(expect.accounts) * expect.participants.len() as i64;
    if total != initial {
        failures.add(
            "total balance not conserved",
            format!("{total} now, {initial} at the start"),
        );
    }

    // 3. What GetStatus says, through the real addresses (the proxies are out of the way).
    let client = cluster.direct_client()?;
    let with_txid: Vec<&Attempt> = attempts.iter().filter(|a| a.txid.is_some()).collect();
    let status = resolve_all(&client, &with_txid, expect.resolve_timeout).await;

    // 4. Every attempt against the rows and the status.
    let known: BTreeSet<&str> = with_txid.iter().filter_map(|a| a.txid.as_deref()).collect();
    for txid in rows_by_txid.keys() {
        if !known.contains(txid.as_str()) {
            failures.add(
                "rows tagged with a txid no client began",
                format!("{txid}: {:?}", rows_by_txid[txid]),
            );
        }
    }
    figures.attempts = attempts.len();
    for a in attempts {
        if a.overdraft {
            figures.overdrafts += 1;
        }
        let Some(txid) = a.txid.as_deref() else {
            figures.not_begun += 1;
            continue;
        };
        let state = status.get(txid).copied().unwrap_or(Resolved::Error);
        let rows = rows_by_txid.get(txid).cloned().unwrap_or_default();
        let expected = expected_rows(&a.steps);
        let present = if rows.is_empty() {
            Some(false)
        } else if rows == expected {
            Some(true)
        } else {
            None
        };
        let evidence = || {
            format!(
                "{txid} (client {}, {:.2}–{:.2} s): told {:?}; GetStatus {state:?}; rows {rows:?}; \
                 expected {expected:?}",
                a.client,
                a.start.as_secs_f64(),
                a.end.as_secs_f64(),
                a.reported
            )
        };
        if present.is_none() {
            failures.add(
                "atomicity: rows in some of the transfer's databases only",
                evidence(),
            );
        }
        if a.overdraft && present == Some(true) {
            failures.add("an overdraft committed", evidence());
        }
        match &a.reported {
            Reported::Committed => {
                figures.acked_committed += 1;
                figures.committed += 1;
                if present == Some(false) {
                    failures.add("acknowledged committed but absent", evidence());
                }
                if state != Resolved::Committed {
                    failures.add("acknowledged committed but GetStatus disagrees", evidence());
                }
            }
            Reported::Aborted(_) => {
                figures.reported_aborted += 1;
                if present == Some(true) {
                    failures.add("reported aborted but present", evidence());
                }
                if state == Resolved::Committed {
                    failures.add("reported aborted but GetStatus says committed", evidence());
                }
            }
            Reported::Unknown(_) => {
                figures.reported_unknown += 1;
                *figures
                    .unknown_resolved
                    .entry(format!("{state:?}"))
                    .or_default() += 1;
                match state {
                    Resolved::Committed => {
                        figures.committed += 1;
                        if present == Some(false) {
                            failures.add("unknown, resolved committed, but absent", evidence());
                        }
                    }
                    Resolved::Aborted | Resolved::NeverSeen => {
                        if present == Some(true) {
                            failures.add(
                                "unknown, resolved aborted or never seen, but present",
                                evidence(),
                            );
                        }
                    }
                    Resolved::InProgress | Resolved::Error => {
                        failures.add("unknown outcome not resolved by GetStatus", evidence());
                    }
                }
            }
            Reported::NotBegun(_) => {}
        }
    }

    // 5. Availability in the window, and liveness after healing.
    availability(expect, attempts, &status, timeline, &mut figures);
    if figures.window_transfers < expect.min_window_transfers {
        failures.add(
            "availability window too thin to measure",
            format!(
                "{} transfers counted (at least {} wanted)",
                figures.window_transfers, expect.min_window_transfers
            ),
        );
    } else if figures.availability() < expect.min_availability {
        failures.add(
            "availability below the requirement while at most F replicas were faulty",
            format!(
                "{}/{} = {:.1}% committed, {:.0}% required; failures in the window: {}",
                figures.window_committed,
                figures.window_transfers,
                100.0 * figures.availability(),
                100.0 * expect.min_availability,
                window_failure_summary(expect, attempts, &status, timeline)
            ),
        );
    }
    if let Some(healed) = timeline.healed_at() {
        figures.committed_after_heal = attempts
            .iter()
            .filter(|a| a.start >= healed && final_committed(a, &status))
            .count();
        if figures.committed_after_heal == 0 {
            failures.add(
                "no transfer committed after every fault healed",
                format!("healed at {:.1} s", healed.as_secs_f64()),
            );
        }
    }

    Ok(Verdict {
        failures: failures.into_lines(),
        figures,
    })
}

fn final_committed(a: &Attempt, status: &BTreeMap<String, Resolved>) -> bool {
    match &a.reported {
        Reported::Committed => true,
        Reported::Unknown(_) => a
            .txid
            .as_ref()
            .is_some_and(|t| status.get(t) == Some(&Resolved::Committed)),
        _ => false,
    }
}

/// Asks GetStatus about every transaction; unknown outcomes are polled until decided (or the
/// deadline), the others asked once.
async fn resolve_all(
    client: &Client,
    attempts: &[&Attempt],
    timeout: Duration,
) -> BTreeMap<String, Resolved> {
    let deadline = Instant::now() + timeout;
    let mut out = BTreeMap::new();
    let mut pending: Vec<(String, bool)> = attempts
        .iter()
        .filter_map(|a| {
            let poll = matches!(a.reported, Reported::Unknown(_));
            a.txid.clone().map(|t| (t, poll))
        })
        .collect();
    while !pending.is_empty() {
        let answers: Vec<(String, bool, Resolved)> = futures::stream::iter(pending.drain(..))
            .map(|(txid, poll)| async move {
                let r = status_of(client, &txid).await;
                (txid, poll, r)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let late = Instant::now() >= deadline;
        for (txid, poll, r) in answers {
            let settled = matches!(
                r,
                Resolved::Committed | Resolved::Aborted | Resolved::NeverSeen
            );
            if settled || !poll || late {
                out.insert(txid, r);
            } else {
                pending.push((txid, poll));
            }
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    out
}

async fn status_of(client: &Client, txid: &str) -> Resolved {
    match client.status(txid).await {
        Ok(s) => match pb::TxnState::try_from(s.state).unwrap_or(pb::TxnState::Unknown) {
            pb::TxnState::Committed => Resolved::Committed,
            pb::TxnState::Aborted => Resolved::Aborted,
            pb::TxnState::InProgress => Resolved::InProgress,
            _ => Resolved::NeverSeen,
        },
        Err(_) => Resolved::Error,
    }
}

/// Whether an attempt counts in the availability window: inside an available phase, clear
/// of every fault that leaves the window (plus its grace), and with at most F distinct
/// replicas faulty over its lifetime. Deliberate overdrafts do not count: they must abort.
fn in_window(expect: &Expect, a: &Attempt, timeline: &Timeline) -> bool {
    in_window_at(expect, a.start, a.end, timeline) && !a.overdraft
}

fn in_window_at(expect: &Expect, start: Duration, end: Duration, timeline: &Timeline) -> bool {
    let phases = timeline.phases();
    let inside = phases
        .iter()
        .any(|p| p.kind == PhaseKind::Available && p.start <= start && end <= p.end);
    if !inside {
        return false;
    }
    let mut faulty = BTreeSet::new();
    for e in timeline.entries() {
        let until = e.end.unwrap_or(Duration::MAX);
        if e.fault.leaves_window() {
            if e.start <= end && start <= until.saturating_add(expect.grace) {
                return false;
            }
        } else if e.start <= end && start <= until {
            faulty.extend(e.fault.faulty_replicas());
        }
    }
    faulty.len() <= expect.f
}

fn availability(
    expect: &Expect,
    attempts: &[Attempt],
    status: &BTreeMap<String, Resolved>,
    timeline: &Timeline,
    figures: &mut Figures,
) {
    for a in attempts.iter().filter(|a| in_window(expect, a, timeline)) {
        figures.window_transfers += 1;
        if final_committed(a, status) {
            figures.window_committed += 1;
        }
        if a.reported == Reported::Committed {
            figures.window_acked += 1;
        }
    }
    // Window length, sampled every 100 ms.
    let step = Duration::from_millis(100);
    let mut t = Duration::ZERO;
    let end = timeline
        .phases()
        .iter()
        .map(|p| p.end)
        .max()
        .unwrap_or_default();
    let mut n = 0u64;
    while t < end {
        if in_window_at(expect, t, t, timeline) {
            n += 1;
        }
        t += step;
    }
    figures.window_seconds = n as f64 * step.as_secs_f64();
}

/// What the failed transfers in the window were told, grouped, for the failure message.
fn window_failure_summary(
    expect: &Expect,
    attempts: &[Attempt],
    status: &BTreeMap<String, Resolved>,
    timeline: &Timeline,
) -> String {
    let mut by_reason: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for a in attempts
        .iter()
        .filter(|a| in_window(expect, a, timeline) && !final_committed(a, status))
    {
        let (kind, detail) = match &a.reported {
            Reported::Aborted(r) => ("aborted", r.clone()),
            Reported::Unknown(r) => ("unknown", r.clone()),
            Reported::NotBegun(r) => ("not begun", r.clone()),
            Reported::Committed => ("committed", String::new()),
        };
        // Group by the message's beginning; keep one full example with its time.
        let key = format!("{kind}: {}", detail.chars().take(60).collect::<String>());
        let e = by_reason.entry(key).or_insert((0, String::new()));
        e.0 += 1;
        if e.1.is_empty() {
            e.1 = format!(
                "{:.1} s {}: {detail}",
                a.start.as_secs_f64(),
                a.txid.as_deref().unwrap_or("-")
            );
        }
    }
    let mut lines: Vec<(usize, String)> = by_reason
        .into_iter()
        .map(|(k, (n, ex))| (n, format!("\n      {n} × {k}…  e.g. {ex}")))
        .collect();
    lines.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    lines.into_iter().map(|(_, l)| l).collect()
}
