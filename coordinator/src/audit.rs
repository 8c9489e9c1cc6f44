//! The audit: does every database agree with the group's decisions? Each branch leaves a
//! commit proof in its own database, in the same PostgreSQL transaction as its writes
//! (`paxos_commit.committed`, naming all participants), so a proof exists if and only if that
//! branch committed. Comparing the proofs with the decided outcomes finds what no protocol
//! message can show: a heuristic or hand-made `COMMIT PREPARED` / `ROLLBACK PREPARED` that
//! contradicts the group, i.e. a split transfer.
//!
//! Every suspect gets a second, narrower look before it is reported, because a transaction
//! in flight (decided, not yet applied everywhere) looks like a divergence for a moment: a
//! participant that has neither a proof nor a prepared branch at the second look, or a proof
//! whose group outcome is still Aborted or undecided, is a divergence.

use crate::ops::{Deployment, OpsError};
use paxos_commit_proto::limits::MAX_AUDIT_PAGE;
use paxos_commit_proto::pb;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What kind of disagreement between a database and the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The branch committed here; the group aborted the transaction.
    CommittedHereAbortedByGroup,
    /// The branch committed here; the group never decided (a heuristic commit).
    CommittedHereUndecided,
    /// The group committed (or another participant holds a proof); this database holds no
    /// proof and no prepared branch: its branch was rolled back.
    MissingHere,
    /// Two replicas report different outcomes: a safety violation of the group itself.
    ReplicasDisagree,
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::CommittedHereAbortedByGroup => "committed here, aborted by the group",
            Kind::CommittedHereUndecided => "committed here, never decided by the group",
            Kind::MissingHere => "committed by the group, rolled back here",
            Kind::ReplicasDisagree => "replicas report different outcomes",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    pub txid: String,
    /// The database (participant) where it shows; empty for `ReplicasDisagree`.
    pub participant: String,
    pub kind: Kind,
    /// The group's outcome: committed, aborted, in-progress or unknown.
    pub group: String,
    /// Participants holding a proof of the transaction.
    pub committed_at: Vec<String>,
    /// All participants, as the proofs and the group name them.
    pub participants: Vec<String>,
    /// Age of the oldest proof or of the group's record, in milliseconds.
    pub age_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    /// Proofs read across all databases, within the window.
    pub proofs: u64,
    /// Distinct transactions checked.
    pub transactions: u64,
    /// Suspects the second look found in flight (decided, not yet applied everywhere).
    pub in_flight: u64,
    /// Transactions that could not be judged: older than a proof or outcome retention, or
    /// without a participant list (proofs written before participants were recorded).
    pub not_judged: u64,
    pub divergences: Vec<Divergence>,
    pub unreachable_agents: Vec<String>,
    pub unreachable_replicas: Vec<u32>,
    /// Participants named by a proof or the group that no configured agent serves.
    pub unaudited_participants: Vec<String>,
    pub duration_ms: u64,
}

impl AuditReport {
    /// Every database and replica answered.
    pub fn complete(&self) -> bool {
        self.unreachable_agents.is_empty()
            && self.unreachable_replicas.is_empty()
            && self.unaudited_participants.is_empty()
    }
}

/// How far back the audit looks; proofs and decisions older than this are not read.
#[derive(Debug, Clone, Copy)]
pub struct AuditOptions {
    pub window: Duration,
}

/// What the audit knows of one transaction.
#[derive(Default)]
struct Seen {
    /// Participants holding a proof.
    proofs: BTreeSet<String>,
    /// Participants named by any proof or by the group.
    participants: BTreeSet<String>,
    age_ms: u64,
    /// Outcomes reported by the replicas, by replica.
    outcomes: BTreeMap<u32, pb::TxnState>,
}

struct AgentProofs {
    retention_ms: u64,
}

fn state_name(s: pb::TxnState) -> String {
    match s {
        pb::TxnState::Committed => "committed",
        pb::TxnState::Aborted => "aborted",
        pb::TxnState::InProgress => "in-progress",
        _ => "unknown",
    }
    .to_string()
}

impl Deployment {
    /// Compares every configured database's commit proofs with the group's outcomes.
    pub async fn audit(&self, opts: AuditOptions) -> Result<AuditReport, OpsError> {
        let started = Instant::now();
        if self.agents.is_empty() {
            return Err(OpsError::Invalid(
                "no agents configured: the audit reads every database's proofs through its \
                 agent (--agents id=host:port,... or an [agents] table)"
                    .into(),
            ));
        }
        let window_ms = opts.window.as_millis() as u64;
        let mut report = AuditReport::default();
        let mut seen: BTreeMap<String, Seen> = BTreeMap::new();

        // 1. Every database's proofs.
        let mut agents: BTreeMap<String, AgentProofs> = BTreeMap::new();
        let reads = self.agents.values().map(|client| {
            let mut client = client.clone();
            async move {
                let mut proofs = Vec::new();
                let mut after = String::new();
                loop {
                    let page = client
                        .list_proofs(pb::ListProofsRequest {
                            after_txid: after.clone(),
                            limit: MAX_AUDIT_PAGE as u32,
                            txids: Vec::new(),
                            younger_than_ms: window_ms,
                        })
                        .await?
                        .into_inner();
                    if let Some(last) = page.proofs.last() {
                        after = last.txid.clone();
                    }
                    let more = page.more && !page.proofs.is_empty();
                    let retention_ms = page.retention_ms;
                    proofs.extend(page.proofs);
                    if !more {
                        return Ok::<_, tonic::Status>((proofs, retention_ms));
                    }
                }
            }
        });
        let answers = futures::future::join_all(reads).await;
        for ((id, _), answer) in self.agents.iter().zip(answers) {
            match answer {
                Ok((proofs, retention_ms)) => {
                    report.proofs += proofs.len() as u64;
                    for p in proofs {
                        let s = seen.entry(p.txid).or_default();
                        s.proofs.insert(id.clone());
                        s.participants.extend(p.participants);
                        s.age_ms = s.age_ms.max(p.age_ms);
                    }
                    agents.insert(id.clone(), AgentProofs { retention_ms });
                }
                Err(status) => {
                    tracing::warn!(participant = %id, "audit: agent unreachable: {status}");
                    report.unreachable_agents.push(id.clone());
                }
            }
        }

        // 2. What each replica still holds of committed transactions, with participants.
        let mut outcome_retention_ms = u64::MAX;
        let mut answered = 0usize;
        for (i, client) in self.replicas.iter().enumerate() {
            let mut client = client.clone();
            let mut after = String::new();
            let listed: Result<(), tonic::Status> = async {
                loop {
                    let page = client
                        .list_committed(pb::ListCommittedRequest {
                            after_txid: after.clone(),
                            limit: MAX_AUDIT_PAGE as u32,
                        })
                        .await?
                        .into_inner();
                    if let Some(last) = page.txns.last() {
                        after = last.txid.clone();
                    }
                    let more = page.more && !page.txns.is_empty();
                    for t in page.txns {
                        if t.age_ms > window_ms {
                            continue;
                        }
                        let s = seen.entry(t.txid).or_default();
                        s.participants.extend(t.participants);
                        s.age_ms = s.age_ms.max(t.age_ms);
                        s.outcomes.insert(i as u32, pb::TxnState::Committed);
                    }
                    if !more {
                        return Ok(());
                    }
                }
            }
            .await;
            if let Err(status) = listed {
                tracing::warn!(replica = i, "audit: replica unreachable: {status}");
                report.unreachable_replicas.push(i as u32);
                continue;
            }
            // 3. Its outcome of every transaction seen.
            let txids: Vec<String> = seen.keys().cloned().collect();
            let mut asked = Ok(());
            for chunk in txids.chunks(MAX_AUDIT_PAGE) {
                match client
                    .outcomes(pb::OutcomesRequest {
                        txids: chunk.to_vec(),
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        outcome_retention_ms = outcome_retention_ms.min(r.outcome_retention_ms);
                        for (txid, state) in chunk.iter().zip(r.states) {
                            let state =
                                pb::TxnState::try_from(state).unwrap_or(pb::TxnState::Unknown);
                            if let Some(s) = seen.get_mut(txid) {
                                s.outcomes.insert(i as u32, state);
                            }
                        }
                    }
                    Err(status) => {
                        asked = Err(status);
                        break;
                    }
                }
            }
            match asked {
                Ok(()) => answered += 1,
                Err(status) => {
                    tracing::warn!(replica = i, "audit: replica unreachable: {status}");
                    report.unreachable_replicas.push(i as u32);
                }
            }
        }
        if answered == 0 {
            return Err(OpsError::Unreachable(
                "no replica answered the audit's questions".into(),
            ));
        }
        report.transactions = seen.len() as u64;

        // 4. Suspects.
        let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut contradicted: Vec<String> = Vec::new();
        let mut unaudited = BTreeSet::new();
        for (txid, s) in &seen {
            let decided: BTreeSet<pb::TxnState> = s
                .outcomes
                .values()
                .copied()
                .filter(|o| matches!(o, pb::TxnState::Committed | pb::TxnState::Aborted))
                .collect();
            if decided.len() > 1 {
                report.divergences.push(Divergence {
                    txid: txid.clone(),
                    participant: String::new(),
                    kind: Kind::ReplicasDisagree,
                    group: "conflicting".into(),
                    committed_at: s.proofs.iter().cloned().collect(),
                    participants: s.participants.iter().cloned().collect(),
                    age_ms: s.age_ms,
                });
                continue;
            }
            let outcome = decided.first().copied();
            if outcome == Some(pb::TxnState::Aborted) && !s.proofs.is_empty() {
                contradicted.push(txid.clone());
                continue;
            }
            if outcome.is_none() && !s.proofs.is_empty() {
                if s.age_ms >= outcome_retention_ms {
                    report.not_judged += 1;
                } else {
                    contradicted.push(txid.clone());
                }
                continue;
            }
            // Committed, by the group or by a proof: every participant must hold a proof.
            if s.participants.is_empty() {
                report.not_judged += 1;
                continue;
            }
            for p in &s.participants {
                if s.proofs.contains(p) {
                    continue;
                }
                match agents.get(p) {
                    Some(a) if s.age_ms < a.retention_ms => {
                        missing.entry(p.clone()).or_default().push(txid.clone());
                    }
                    Some(_) => report.not_judged += 1,
                    None if self.agents.contains_key(p) => {} // unreachable: reported
                    None => {
                        unaudited.insert(p.clone());
                    }
                }
            }
        }
        report.unaudited_participants = unaudited.into_iter().collect();

        // 5. Second look: a missing proof may be a branch that is still prepared, or that
        // committed since the first read.
        for (participant, txids) in missing {
            let Some(client) = self.agents.get(&participant) else {
                continue;
            };
            for chunk in txids.chunks(MAX_AUDIT_PAGE) {
                let r = client
                    .clone()
                    .list_proofs(pb::ListProofsRequest {
                        txids: chunk.to_vec(),
                        ..Default::default()
                    })
                    .await;
                let r = match r {
                    Ok(r) => r.into_inner(),
                    Err(status) => {
                        tracing::warn!(%participant, "audit: agent unreachable: {status}");
                        if !report.unreachable_agents.contains(&participant) {
                            report.unreachable_agents.push(participant.clone());
                        }
                        break;
                    }
                };
                let settled: BTreeSet<&str> = r
                    .proofs
                    .iter()
                    .map(|p| p.txid.as_str())
                    .chain(r.prepared.iter().map(String::as_str))
                    .collect();
                for txid in chunk {
                    if settled.contains(txid.as_str()) {
                        report.in_flight += 1;
                        continue;
                    }
                    let Some(s) = seen.get(txid) else { continue };
                    report.divergences.push(Divergence {
                        txid: txid.clone(),
                        participant: participant.clone(),
                        kind: Kind::MissingHere,
                        group: "committed".into(),
                        committed_at: s.proofs.iter().cloned().collect(),
                        participants: s.participants.iter().cloned().collect(),
                        age_ms: s.age_ms,
                    });
                }
            }
        }
        // A proof whose group outcome is not Committed: ask the group as a whole, which
        // combines every replica's votes (a replica may not have learned a decision yet).
        for txid in contradicted {
            let Some(s) = seen.get(&txid) else { continue };
            let state = match self.group_state(&txid).await {
                Some(state) => state,
                None => {
                    report.not_judged += 1;
                    continue;
                }
            };
            let kind = match state {
                pb::TxnState::Committed => {
                    report.in_flight += 1;
                    continue;
                }
                pb::TxnState::Aborted => Kind::CommittedHereAbortedByGroup,
                _ => Kind::CommittedHereUndecided,
            };
            for participant in &s.proofs {
                report.divergences.push(Divergence {
                    txid: txid.clone(),
                    participant: participant.clone(),
                    kind,
                    group: state_name(state),
                    committed_at: s.proofs.iter().cloned().collect(),
                    participants: s.participants.iter().cloned().collect(),
                    age_ms: s.age_ms,
                });
            }
        }
        report.unreachable_agents.sort();
        report.duration_ms = started.elapsed().as_millis() as u64;
        for d in &report.divergences {
            tracing::error!(
                txid = %d.txid,
                participant = %d.participant,
                group = %d.group,
                "audit: {}",
                d.kind.describe()
            );
        }
        Ok(report)
    }

    /// The group's combined answer for one transaction, from the first replica that answers.
    async fn group_state(&self, txid: &str) -> Option<pb::TxnState> {
        for r in &self.replicas {
            if let Ok(resp) = r
                .clone()
                .get_status(pb::StatusRequest {
                    txid: txid.to_string(),
                    local_only: false,
                })
                .await
            {
                return Some(
                    pb::TxnState::try_from(resp.into_inner().state)
                        .unwrap_or(pb::TxnState::Unknown),
                );
            }
        }
        None
    }
}

/// The last round of this replica's periodic audit, for its metrics and its operator page.
#[derive(Debug, Clone)]
pub struct AuditRun {
    /// Unix time, seconds.
    pub finished_at: u64,
    pub result: AuditRound,
}

#[derive(Debug, Clone)]
pub enum AuditRound {
    /// This replica audited.
    Ran(Result<AuditReport, String>),
    /// A lower-numbered replica is serving and audits instead.
    LeftTo(u32),
}

pub type LastAudit = std::sync::Arc<std::sync::Mutex<Option<AuditRun>>>;

/// Audits every `cfg.audit_interval` for as long as the replica runs, with its own identity
/// (agents and replicas admit replicas to the audit's read-only calls). The first run comes a
/// tenth of an interval after start, so a fresh deployment is checked soon.
///
/// One replica audits, the lowest-numbered one that is serving: every round, each replica
/// asks whether one below it serves, and leaves the round to it if so. The databases are
/// then read once per interval rather than once per replica, and an audit still runs while
/// any replica does.
pub async fn run_periodically(cfg: std::sync::Arc<crate::config::ReplicaConfig>, last: LastAudit) {
    let interval = cfg.audit_interval;
    let opts = AuditOptions {
        window: cfg.audit_window,
    };
    let deployment = match Deployment::new((*cfg).clone(), cfg.commit_timeout) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("periodic audit off: {e}");
            return;
        }
    };
    tokio::time::sleep(interval / 10).await;
    loop {
        let now_s = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let auditor = deployment
            .replicas_health()
            .await
            .into_iter()
            .find(|r| r.up && r.state == "serving")
            .map(|r| r.replica);
        if let Some(other) = auditor.filter(|a| *a < cfg.id) {
            // This replica's own last finding no longer stands; the auditor's gauge does
            // (alerts take the maximum over replicas).
            metrics::gauge!("paxos_commit_audit_divergences").set(0.0);
            *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(AuditRun {
                finished_at: now_s(),
                result: AuditRound::LeftTo(other),
            });
            tokio::time::sleep(interval).await;
            continue;
        }
        let result = deployment.audit(opts).await.map_err(|e| e.to_string());
        let (label, divergences) = match &result {
            Ok(r) if !r.divergences.is_empty() => ("diverged", r.divergences.len()),
            Ok(r) if !r.complete() => ("incomplete", 0),
            Ok(_) => ("clean", 0),
            Err(_) => ("failed", 0),
        };
        match &result {
            Ok(r) => {
                metrics::gauge!("paxos_commit_audit_divergences").set(divergences as f64);
                metrics::gauge!("paxos_commit_audit_transactions").set(r.transactions as f64);
                metrics::gauge!("paxos_commit_audit_duration_seconds")
                    .set(r.duration_ms as f64 / 1000.0);
                tracing::info!(
                    transactions = r.transactions,
                    proofs = r.proofs,
                    divergences,
                    in_flight = r.in_flight,
                    complete = r.complete(),
                    ms = r.duration_ms,
                    "audit finished"
                );
            }
            Err(e) => tracing::warn!("audit failed: {e}"),
        }
        metrics::counter!("paxos_commit_audit_runs_total", "result" => label).increment(1);
        let finished_at = now_s();
        metrics::gauge!("paxos_commit_audit_last_run_timestamp_seconds").set(finished_at as f64);
        if matches!(&result, Ok(r) if r.complete()) {
            metrics::gauge!("paxos_commit_audit_last_complete_timestamp_seconds")
                .set(finished_at as f64);
        }
        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(AuditRun {
            finished_at,
            result: AuditRound::Ran(result),
        });
        tokio::time::sleep(interval).await;
    }
}
