//! Carries out a [`Schedule`] against a running [`Cluster`]: applies each fault, holds it,
//! undoes it, and records on a [`Timeline`] when each fault really started and ended (a
//! restart can take longer than planned), which is what the checker's availability window is
//! computed from.

use super::schedule::{Event, Fault, Phase, PhaseKind, Schedule, Scope};
use crate::cluster::Cluster;
use crate::proxy::{CutMode, Net, Node};
use anyhow::{anyhow, bail, Context, Result};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A fault as it happened.
#[derive(Clone, Debug)]
pub struct Entry {
    /// With runtime choices filled in (which replica led).
    pub fault: Fault,
    pub start: Duration,
    /// When the fault was undone (the process serving again); `None` while it lasts.
    pub end: Option<Duration>,
}

/// A phase as it happened.
#[derive(Clone, Copy, Debug)]
pub struct PhaseSpan {
    pub kind: PhaseKind,
    pub start: Duration,
    pub end: Duration,
}

/// What the nemesis did, in times since `t0` (shared with the workload's records).
#[derive(Debug)]
pub struct Timeline {
    pub t0: Instant,
    entries: Mutex<Vec<Entry>>,
    phases: Mutex<Vec<PhaseSpan>>,
    /// When every fault was healed at the end.
    healed: Mutex<Option<Duration>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Timeline {
    pub fn new(t0: Instant) -> Timeline {
        Timeline {
            t0,
            entries: Mutex::new(Vec::new()),
            phases: Mutex::new(Vec::new()),
            healed: Mutex::new(None),
        }
    }

    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn begin(&self, fault: Fault) -> usize {
        let mut entries = lock(&self.entries);
        entries.push(Entry {
            fault,
            start: self.now(),
            end: None,
        });
        entries.len() - 1
    }

    fn end(&self, id: usize) {
        let now = self.now();
        if let Some(e) = lock(&self.entries).get_mut(id) {
            e.end = Some(now);
        }
    }

    pub fn entries(&self) -> Vec<Entry> {
        lock(&self.entries).clone()
    }

    pub fn phases(&self) -> Vec<PhaseSpan> {
        lock(&self.phases).clone()
    }

    pub fn healed_at(&self) -> Option<Duration> {
        *lock(&self.healed)
    }

    /// Faults injected, by kind.
    pub fn counts(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for e in lock(&self.entries).iter() {
            *counts.entry(e.fault.kind()).or_default() += 1;
        }
        counts
    }
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "what the nemesis did:")?;
        let phases = self.phases();
        let entries = self.entries();
        let mut lines: Vec<(Duration, String)> = phases
            .iter()
            .map(|p| {
                (
                    p.start,
                    format!(
                        "  {:7.1} s  — {} phase until {:.1} s",
                        p.start.as_secs_f64(),
                        p.kind,
                        p.end.as_secs_f64()
                    ),
                )
            })
            .collect();
        lines.extend(entries.iter().map(|e| {
            let end = e
                .end
                .map(|t| format!("{:.1} s", t.as_secs_f64()))
                .unwrap_or_else(|| "never healed".into());
            (
                e.start,
                format!("  {:7.1} s  {} until {end}", e.start.as_secs_f64(), e.fault),
            )
        }));
        lines.sort_by_key(|(t, _)| *t);
        for (_, l) in lines {
            writeln!(f, "{l}")?;
        }
        if let Some(h) = self.healed_at() {
            writeln!(f, "  {:7.1} s  everything healed", h.as_secs_f64())?;
        }
        Ok(())
    }
}

/// Applies faults to one cluster.
pub struct Executor {
    pub cluster: Arc<Cluster>,
    pub net: Arc<Net>,
    pub timeline: Arc<Timeline>,
    /// The replica the clients last began a transaction on (set by the workload).
    pub leader: Arc<AtomicUsize>,
}

/// How long a process gets to come back before the run is declared broken.
const RESTART_DEADLINE: Duration = Duration::from_secs(60);

impl Executor {
    /// Runs every phase in turn; each phase's tracks run concurrently, and a phase ends at its
    /// planned end or when its last fault is undone, whichever is later.
    pub async fn run(&self, schedule: &Schedule) -> Result<()> {
        for phase in &schedule.phases {
            self.run_phase(phase).await?;
        }
        Ok(())
    }

    async fn run_phase(&self, phase: &Phase) -> Result<()> {
        self.sleep_until(phase.start).await;
        let start = self.timeline.now();
        let tracks = phase.tracks.iter().map(|t| self.run_track(t));
        let results = futures::future::join_all(tracks).await;
        self.sleep_until(phase.end).await;
        lock(&self.timeline.phases).push(PhaseSpan {
            kind: phase.kind,
            start,
            end: self.timeline.now(),
        });
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    async fn run_track(&self, events: &[Event]) -> Result<()> {
        for e in events {
            self.sleep_until(e.at).await;
            self.inject(e)
                .await
                .with_context(|| format!("nemesis fault {} at {:?}", e.fault, e.at))?;
        }
        Ok(())
    }

    async fn sleep_until(&self, at: Duration) {
        let deadline = self.timeline.t0 + at;
        tokio::time::sleep_until(deadline.into()).await;
    }

    async fn inject(&self, e: &Event) -> Result<()> {
        let fault = match &e.fault {
            Fault::LeaderFromAgents(None, mode) => {
                let n = self.cluster.replicas.len().max(1);
                Fault::LeaderFromAgents(Some(self.leader.load(Ordering::Relaxed) % n), *mode)
            }
            other => other.clone(),
        };
        let id = self.timeline.begin(fault.clone());
        eprintln!(
            "[nemesis {:7.1} s] {fault} for {:.1} s",
            self.timeline.now().as_secs_f64(),
            e.hold.as_secs_f64()
        );
        self.apply(&fault, true).await?;
        tokio::time::sleep(e.hold).await;
        self.apply(&fault, false).await?;
        self.timeline.end(id);
        Ok(())
    }

    /// Applies (`on`) or undoes a fault.
    async fn apply(&self, fault: &Fault, on: bool) -> Result<()> {
        let c = &self.cluster;
        match fault {
            Fault::KillReplica(i) => {
                if on {
                    c.replicas[*i].kill9()?;
                } else {
                    self.restart_replica(*i).await?;
                }
            }
            Fault::KillReplicas(rs) => {
                for i in rs {
                    if on {
                        c.replicas[*i].kill9()?;
                    } else {
                        self.restart_replica(*i).await?;
                    }
                }
            }
            Fault::PauseReplica(i) => {
                let i = *i;
                let name = c.replicas[i].name().to_string();
                blocking(c, move |c| {
                    let p = &c.replicas[i];
                    if on {
                        p.pause()
                    } else {
                        p.resume()
                    }
                })
                .await
                .with_context(|| name)?;
            }
            Fault::IsolateReplica(i, mode) => {
                let r = Node::Replica(*i);
                self.cut(|from, to| *from == r || *to == r, *mode, on)?;
            }
            Fault::LeaderFromAgents(i, mode) => {
                let i = i.ok_or_else(|| anyhow!("leader not resolved"))?;
                let r = Node::Replica(i);
                self.cut(
                    |from, to| {
                        (*from == r && matches!(to, Node::Agent(_)))
                            || (matches!(from, Node::Agent(_)) && *to == r)
                    },
                    *mode,
                    on,
                )?;
            }
            Fault::AgentsFromMajority(rs, mode) => {
                let in_set = |n: &Node| matches!(n, Node::Replica(i) if rs.contains(i));
                self.cut(
                    |from, to| {
                        (in_set(from) && matches!(to, Node::Agent(_)))
                            || (matches!(from, Node::Agent(_)) && in_set(to))
                    },
                    *mode,
                    on,
                )?;
            }
            Fault::KillAgent(p) => {
                if on {
                    c.agent(p)?.kill9()?;
                } else {
                    self.restart_agent(p).await?;
                }
            }
            Fault::PauseAgent(p) => {
                let p = p.clone();
                blocking(c, move |c| {
                    let a = c.agent(&p)?;
                    if on {
                        a.pause()
                    } else {
                        a.resume()
                    }
                })
                .await?;
            }
            Fault::StopPg(p) => {
                let p = p.clone();
                blocking(c, move |c| {
                    let pg = c.pg(&p)?;
                    if on {
                        pg.stop_immediate()
                    } else {
                        pg.start_again()
                    }
                })
                .await?;
            }
            Fault::Delay {
                scope,
                delay,
                jitter,
            } => {
                let (delay, jitter) = if on {
                    (*delay, *jitter)
                } else {
                    (Duration::ZERO, Duration::ZERO)
                };
                self.net.modify_where(in_scope(*scope), |f| {
                    f.delay = delay;
                    f.jitter = jitter;
                });
            }
            Fault::Loss(scope, p) => {
                let p = if on { *p } else { 0.0 };
                self.net.modify_where(in_scope(*scope), |f| f.loss = p);
            }
        }
        Ok(())
    }

    fn cut(&self, select: impl Fn(&Node, &Node) -> bool, mode: CutMode, on: bool) -> Result<()> {
        let n = self
            .net
            .modify_where(|f, t| select(f, t), |f| f.set_cut(mode, on));
        if n == 0 {
            bail!("the cut matched no link");
        }
        Ok(())
    }

    async fn restart_replica(&self, i: usize) -> Result<()> {
        let start = Instant::now();
        loop {
            let c = &self.cluster;
            let p = &c.replicas[i];
            let attempt = async {
                if !p.is_running() {
                    p.restart()?;
                }
                c.wait_replica(i).await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() < RESTART_DEADLINE => {
                    eprintln!("[nemesis] restarting replica {i} failed, retrying: {e:#}");
                    p.kill9()?;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An agent refuses to start while its database is down (it checks and migrates it
    /// first), so a restart is retried until the database is back.
    async fn restart_agent(&self, participant: &str) -> Result<()> {
        let start = Instant::now();
        loop {
            let c = &self.cluster;
            let p = c.agent(participant)?;
            let attempt = async {
                if !p.is_running() {
                    p.restart()?;
                }
                c.wait_agent(participant).await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() < RESTART_DEADLINE => {
                    tracing::debug!("restarting agent {participant} failed, retrying: {e:#}");
                    p.kill9()?;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Undoes anything left over: every link clean, every process resumed and running,
    /// every database up. The tracks undo their own faults; this is the safety net that makes
    /// the checks meaningful even after an error.
    pub async fn heal_all(&self) -> Result<()> {
        self.net.heal_all();
        let c = &self.cluster;
        for (i, p) in c.replicas.iter().enumerate() {
            if p.is_running() {
                let _ = p.resume();
            } else {
                self.restart_replica(i).await?;
            }
        }
        for name in c.pgs.keys() {
            let name = name.clone();
            blocking(c, move |c| {
                let pg = c.pg(&name)?;
                if pg.is_running() {
                    Ok(())
                } else {
                    pg.start_again()
                }
            })
            .await?;
        }
        for (name, p) in &c.agents {
            if p.is_running() {
                let _ = p.resume();
            } else {
                self.restart_agent(name).await?;
            }
        }
        *lock(&self.timeline.healed) = Some(self.timeline.now());
        Ok(())
    }
}

/// Runs blocking harness calls (pg_ctl, waiting for SIGSTOP to take) off the async workers.
async fn blocking<T: Send + 'static>(
    cluster: &Arc<Cluster>,
    f: impl FnOnce(&Cluster) -> Result<T> + Send + 'static,
) -> Result<T> {
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .map_err(|e| anyhow!("harness task failed: {e}"))?
}

fn in_scope(scope: Scope) -> impl Fn(&Node, &Node) -> bool {
    move |from, to| match scope {
        Scope::Replicas => matches!((from, to), (Node::Replica(_), Node::Replica(_))),
        Scope::Agents => matches!(
            (from, to),
            (Node::Agent(_), Node::Replica(_)) | (Node::Replica(_), Node::Agent(_))
        ),
        Scope::Clients => *from == Node::Client,
    }
}
