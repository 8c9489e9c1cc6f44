//! The nemesis's fault schedule: a deterministic list of (time offset, fault, duration)
//! drawn from a seed, so that a failing run can be replayed with the same faults.
//!
//! Time is real time, so a replay repeats the schedule, not the exact interleaving of
//! messages; in practice that is what brings a bug back (most bugs need one kind of fault at
//! one step of the protocol, and the same schedule hits that step again).
//!
//! The run is a warm-up, then one or more cycles of:
//!
//! * an **available** phase: replica faults throughout (never more than F replicas at once:
//!   one track per F, each owning its own replicas and running its faults one after the
//!   other). In its first part, only faults that a deployment with at most F faulty replicas
//!   must absorb are added (delay anywhere, loss between replicas, which Paxos resends): that
//!   is where the commit ratio is measured. Its second part adds process faults (agents,
//!   PostgreSQL) and loss on the clients' and agents' links;
//! * a **majority lost** phase: the agents cut from a majority of replicas, then every
//!   replica killed at once;
//! * a **recovery** phase without faults.

use crate::proxy::CutMode;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use std::fmt;
use std::time::Duration;

/// Which links a network fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Between replicas (both directions).
    Replicas,
    /// Between agents and replicas (both directions).
    Agents,
    /// From the client to replicas and agents.
    Clients,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Replicas => write!(f, "replica↔replica"),
            Scope::Agents => write!(f, "agent↔replica"),
            Scope::Clients => write!(f, "client→*"),
        }
    }
}

/// One fault; it is applied at the start of its event and undone at the end.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// kill -9, then restart with the same data directory.
    KillReplica(usize),
    /// SIGSTOP, then SIGCONT.
    PauseReplica(usize),
    /// Every link to and from the replica cut.
    IsolateReplica(usize, CutMode),
    /// The links between the replica that leads the current transactions and every agent
    /// cut; the replica is chosen when the fault starts (the one the clients last began on).
    LeaderFromAgents(Option<usize>, CutMode),
    KillAgent(String),
    PauseAgent(String),
    /// `pg_ctl stop -m immediate`, then start again.
    StopPg(String),
    Delay {
        scope: Scope,
        delay: Duration,
        jitter: Duration,
    },
    /// Connection-killing "loss" (see [`crate::proxy`]) with this probability per chunk.
    Loss(Scope, f64),
    /// The links between every agent and these replicas (a majority) cut.
    AgentsFromMajority(Vec<usize>, CutMode),
    /// kill -9 of these replicas at once, then restart them all.
    KillReplicas(Vec<usize>),
}

impl Fault {
    /// A short name, to count faults by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillReplica(_) => "kill -9 replica",
            Fault::PauseReplica(_) => "pause replica",
            Fault::IsolateReplica(..) => "isolate replica",
            Fault::LeaderFromAgents(..) => "leader cut from agents",
            Fault::KillAgent(_) => "kill -9 agent",
            Fault::PauseAgent(_) => "pause agent",
            Fault::StopPg(_) => "crash-stop postgres",
            Fault::Delay { .. } => "delay",
            Fault::Loss(..) => "loss",
            Fault::AgentsFromMajority(..) => "agents cut from majority",
            Fault::KillReplicas(_) => "kill -9 all replicas",
        }
    }

    /// The replicas this fault makes faulty (unreachable or stopped for some of their peers).
    pub fn faulty_replicas(&self) -> Vec<usize> {
        match self {
            Fault::KillReplica(i) | Fault::PauseReplica(i) | Fault::IsolateReplica(i, _) => {
                vec![*i]
            }
            Fault::LeaderFromAgents(i, _) => i.iter().copied().collect(),
            Fault::AgentsFromMajority(rs, _) | Fault::KillReplicas(rs) => rs.clone(),
            _ => Vec::new(),
        }
    }

    /// Whether the fault takes the test out of the "at most F replicas faulty" window where
    /// availability is measured: a fault of an agent or a database necessarily fails the
    /// transfers that touch it, and so does loss on the links the client and agents use
    /// (it breaks their RPCs). Delay anywhere, and loss between replicas (Paxos resends), do
    /// not excuse a failed transfer.
    pub fn leaves_window(&self) -> bool {
        match self {
            Fault::KillAgent(_)
            | Fault::PauseAgent(_)
            | Fault::StopPg(_)
            | Fault::AgentsFromMajority(..)
            | Fault::KillReplicas(_) => true,
            Fault::Loss(scope, _) => *scope != Scope::Replicas,
            _ => false,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillReplica(i) => write!(f, "kill -9 replica {i}"),
            Fault::PauseReplica(i) => write!(f, "SIGSTOP replica {i}"),
            Fault::IsolateReplica(i, m) => write!(f, "isolate replica {i} ({m})"),
            Fault::LeaderFromAgents(Some(i), m) => {
                write!(f, "cut leader (replica {i}) from the agents ({m})")
            }
            Fault::LeaderFromAgents(None, m) => write!(f, "cut the leader from the agents ({m})"),
            Fault::KillAgent(p) => write!(f, "kill -9 agent {p}"),
            Fault::PauseAgent(p) => write!(f, "SIGSTOP agent {p}"),
            Fault::StopPg(p) => write!(f, "crash-stop postgres {p}"),
            Fault::Delay {
                scope,
                delay,
                jitter,
            } => write!(f, "delay {scope} {delay:?} + up to {jitter:?}"),
            Fault::Loss(scope, p) => write!(f, "loss {scope} p={p:.3}"),
            Fault::AgentsFromMajority(rs, m) => {
                write!(f, "cut the agents from replicas {rs:?} ({m})")
            }
            Fault::KillReplicas(rs) => write!(f, "kill -9 replicas {rs:?}"),
        }
    }
}

/// A fault at `at` (from the start of the run) held for `hold`.
#[derive(Clone, Debug)]
pub struct Event {
    pub at: Duration,
    pub hold: Duration,
    pub fault: Fault,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseKind {
    Warmup,
    Available,
    MajorityLost,
    Recovery,
}

impl fmt::Display for PhaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhaseKind::Warmup => write!(f, "warm-up"),
            PhaseKind::Available => write!(f, "available (≤ F replicas faulty)"),
            PhaseKind::MajorityLost => write!(f, "majority lost"),
            PhaseKind::Recovery => write!(f, "recovery"),
        }
    }
}

/// A phase: tracks run concurrently, each one's events one after the other.
#[derive(Clone, Debug)]
pub struct Phase {
    pub kind: PhaseKind,
    pub start: Duration,
    pub end: Duration,
    pub tracks: Vec<Vec<Event>>,
}

/// What the schedule is drawn for.
#[derive(Clone, Debug)]
pub struct Shape {
    pub replicas: usize,
    pub participants: Vec<String>,
    /// Length of the faulted part (all cycles).
    pub duration: Duration,
    /// A pause must outlast this (the replicas' takeover timeout).
    pub takeover_after: Duration,
}

#[derive(Clone, Debug)]
pub struct Schedule {
    pub seed: u64,
    pub phases: Vec<Phase>,
}

const WARMUP: f64 = 3.0;
const MAJORITY: f64 = 10.0;
const RECOVERY: f64 = 6.0;
/// Cycle length the long mode aims for.
const CYCLE: f64 = 100.0;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl Schedule {
    pub fn generate(seed: u64, shape: &Shape) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let total = shape.duration.as_secs_f64();
        let cycles = ((total / CYCLE).round() as usize).max(1);
        let cycle = total / cycles as f64;
        let available = (cycle - MAJORITY - RECOVERY).max(10.0);
        let mut phases = vec![Phase {
            kind: PhaseKind::Warmup,
            start: Duration::ZERO,
            end: secs(WARMUP),
            tracks: Vec::new(),
        }];
        let mut t = WARMUP;
        for _ in 0..cycles {
            phases.push(available_phase(&mut rng, shape, t, t + available));
            t += available;
            phases.push(majority_phase(&mut rng, shape, t));
            t += MAJORITY;
            phases.push(Phase {
                kind: PhaseKind::Recovery,
                start: secs(t),
                end: secs(t + RECOVERY),
                tracks: Vec::new(),
            });
            t += RECOVERY;
        }
        Schedule { seed, phases }
    }

    pub fn end(&self) -> Duration {
        self.phases.last().map(|p| p.end).unwrap_or_default()
    }

    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.phases.iter().flat_map(|p| p.tracks.iter().flatten())
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "nemesis schedule, seed {} ({} faults, {:.0} s):",
            self.seed,
            self.events().count(),
            self.end().as_secs_f64()
        )?;
        for p in &self.phases {
            writeln!(
                f,
                "  [{:7.1} s – {:7.1} s] {}",
                p.start.as_secs_f64(),
                p.end.as_secs_f64(),
                p.kind
            )?;
            let mut events: Vec<(usize, &Event)> = p
                .tracks
                .iter()
                .enumerate()
                .flat_map(|(k, t)| t.iter().map(move |e| (k, e)))
                .collect();
            events.sort_by_key(|(_, e)| e.at);
            for (k, e) in events {
                writeln!(
                    f,
                    "    {:7.1} s  track {k}  {} for {:.1} s",
                    e.at.as_secs_f64(),
                    e.fault,
                    e.hold.as_secs_f64()
                )?;
            }
        }
        Ok(())
    }
}

/// Events of one track in `[start, end)`: `draw` gives a fault and its hold, one after the
/// other with gaps in `gap` seconds.
fn track(
    rng: &mut StdRng,
    start: f64,
    end: f64,
    first: (f64, f64),
    gap: (f64, f64),
    mut draw: impl FnMut(&mut StdRng) -> (Fault, f64, f64),
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut t = start + rng.random_range(first.0..first.1);
    loop {
        let (fault, min_hold, max_hold) = draw(rng);
        let hold = rng.random_range(min_hold..max_hold).min(end - 0.5 - t);
        if hold < min_hold {
            break;
        }
        events.push(Event {
            at: secs(t),
            hold: secs(hold),
            fault,
        });
        t += hold + rng.random_range(gap.0..gap.1);
    }
    events
}

fn cut_mode(rng: &mut StdRng) -> CutMode {
    if rng.random_bool(0.5) {
        CutMode::Reset
    } else {
        CutMode::Blackhole
    }
}

/// Share of an available phase given to the measured part (see the module doc).
const MEASURED: f64 = 0.55;

fn available_phase(rng: &mut StdRng, shape: &Shape, start: f64, end: f64) -> Phase {
    let split = start + (end - start) * MEASURED;
    let f = (shape.replicas.saturating_sub(1) / 2).max(1);
    // A pause shorter than the takeover timeout would test nothing the kill does not.
    let pause_min = (shape.takeover_after.as_secs_f64() * 1.5).max(1.5);
    let mut tracks = Vec::new();
    // Replica tracks: track k owns the replicas r with r % F == k, so at most F replicas are
    // faulty at once even when a restart overruns its planned time (tracks are sequential).
    // A fault on the replica the clients begin on costs the transfers in flight there (up to
    // one per client) whatever the throughput: the gaps keep that cost a few percent of the
    // traffic even when the machine is slow, so that the 95% figure measures the protocol.
    for k in 0..f {
        let owned: Vec<usize> = (0..shape.replicas).filter(|r| r % f == k).collect();
        if owned.is_empty() {
            continue;
        }
        tracks.push(track(rng, start, end, (0.5, 2.0), (4.0, 9.0), |rng| {
            let r = *owned.choose(rng).unwrap_or(&k);
            match rng.random_range(0..100) {
                0..30 => (Fault::KillReplica(r), 1.0, 4.0),
                30..55 => (Fault::PauseReplica(r), pause_min, pause_min + 2.5),
                55..80 => (Fault::IsolateReplica(r, cut_mode(rng)), 1.5, 4.0),
                _ => (Fault::LeaderFromAgents(None, cut_mode(rng)), 1.5, 4.0),
            }
        }));
    }
    // The measured part: delay on any link, loss only between replicas (Paxos resends).
    tracks.push(track(rng, start, split, (0.5, 3.0), (2.0, 6.0), |rng| {
        if rng.random_bool(0.7) {
            let scope = any_scope(rng);
            (delay(rng, scope), 2.0, 5.0)
        } else {
            let p = rng.random_range(0.01..0.05);
            (Fault::Loss(Scope::Replicas, p), 2.0, 5.0)
        }
    }));
    // The rest: processes, and loss on every kind of link.
    let participants = shape.participants.clone();
    tracks.push(track(rng, split, end, (0.5, 2.0), (3.0, 8.0), |rng| {
        let p = participants.choose(rng).cloned().unwrap_or_default();
        match rng.random_range(0..100) {
            0..35 => (Fault::KillAgent(p), 1.0, 3.0),
            35..60 => (Fault::PauseAgent(p), pause_min, pause_min + 2.5),
            _ => (Fault::StopPg(p), 1.0, 3.0),
        }
    }));
    tracks.push(track(rng, split, end, (0.5, 2.0), (2.0, 6.0), |rng| {
        let scope = any_scope(rng);
        if rng.random_bool(0.4) {
            (delay(rng, scope), 2.0, 5.0)
        } else {
            let p = match scope {
                Scope::Replicas => rng.random_range(0.01..0.05),
                _ => rng.random_range(0.005..0.03),
            };
            (Fault::Loss(scope, p), 2.0, 5.0)
        }
    }));
    Phase {
        kind: PhaseKind::Available,
        start: secs(start),
        end: secs(end),
        tracks,
    }
}

fn any_scope(rng: &mut StdRng) -> Scope {
    *[Scope::Replicas, Scope::Agents, Scope::Clients]
        .choose(rng)
        .unwrap_or(&Scope::Replicas)
}

fn delay(rng: &mut StdRng, scope: Scope) -> Fault {
    Fault::Delay {
        scope,
        delay: Duration::from_millis(rng.random_range(20..150)),
        jitter: Duration::from_millis(rng.random_range(0..30)),
    }
}

fn majority_phase(rng: &mut StdRng, shape: &Shape, start: f64) -> Phase {
    let n = shape.replicas;
    let mut all: Vec<usize> = (0..n).collect();
    let majority: Vec<usize> = {
        let mut m: Vec<usize> = all.choose_multiple(rng, n / 2 + 1).copied().collect();
        m.sort_unstable();
        m
    };
    all.sort_unstable();
    let events = vec![
        Event {
            at: secs(start),
            hold: secs(4.0),
            fault: Fault::AgentsFromMajority(majority, cut_mode(rng)),
        },
        Event {
            at: secs(start + 5.0),
            hold: secs(4.0),
            fault: Fault::KillReplicas(all),
        },
    ];
    Phase {
        kind: PhaseKind::MajorityLost,
        start: secs(start),
        end: secs(start + MAJORITY),
        tracks: vec![events],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(duration: u64) -> Shape {
        Shape {
            replicas: 3,
            participants: vec!["a".into(), "b".into(), "c".into()],
            duration: Duration::from_secs(duration),
            takeover_after: Duration::from_millis(800),
        }
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = Schedule::generate(42, &shape(60)).to_string();
        let b = Schedule::generate(42, &shape(60)).to_string();
        let c = Schedule::generate(43, &shape(60)).to_string();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn at_most_f_replicas_faulty_in_available_phases() {
        for seed in 0..200 {
            let s = Schedule::generate(seed, &shape(600));
            // A warm-up, then six cycles of three phases.
            assert_eq!(s.phases.len(), 1 + 3 * 6, "{s}");
            for p in s.phases.iter().filter(|p| p.kind == PhaseKind::Available) {
                for t in &p.tracks {
                    for w in t.windows(2) {
                        assert!(w[0].at + w[0].hold < w[1].at, "overlap in a track: {s}");
                    }
                    for e in t {
                        assert!(e.at >= p.start && e.at + e.hold <= p.end, "{s}");
                    }
                }
                // One replica track for F = 1: its events never overlap, so at most one
                // replica is faulty at a time.
                let replica_tracks = p
                    .tracks
                    .iter()
                    .filter(|t| t.iter().any(|e| !e.fault.faulty_replicas().is_empty()))
                    .count();
                assert!(replica_tracks <= 1, "{s}");
            }
        }
    }
}
