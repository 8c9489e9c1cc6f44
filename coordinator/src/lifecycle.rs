//! Where a replica is in its life, for every part that must act on it: joining (a new log
//! not yet admitted by every peer), serving, degraded (its acceptor log stopped writing), or
//! draining (asked to stop).
//!
//! A replica whose fsync hangs cannot make a promise durable, so everything it leads stalls;
//! if it kept answering Begin quickly, clients would pile onto exactly the replica that
//! cannot commit. A stopping replica must stop being an acceptor for others at once, finish
//! (within a bound) the commits it leads, and then close every stream so that the process
//! can exit. Both states turn the gRPC health service NOT_SERVING and refuse Begin with
//! UNAVAILABLE, which the client library takes as "try the next replica".

use paxos_commit_proto::pb::coordinator_server::CoordinatorServer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tonic::Status;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

pub struct Lifecycle {
    /// Waiting for every peer to admit this replica (see `paxos_commit_core::admission`).
    joining: AtomicBool,
    draining: AtomicBool,
    degraded: Mutex<Option<String>>,
    /// Set once every stream must end (the last step of a stop).
    closed: watch::Sender<bool>,
    health: HealthReporter,
}

impl Lifecycle {
    pub fn new(health: HealthReporter) -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            joining: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            degraded: Mutex::new(None),
            closed: watch::channel(false).0,
            health,
        })
    }

    fn degraded_reason(&self) -> Option<String> {
        self.degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Begin's gate: a replica that is stopping or cannot write its log takes no new work.
    pub fn admit_begin(&self) -> Result<(), Status> {
        if self.is_draining() {
            return Err(Status::unavailable(
                "this replica is shutting down; begin on another replica",
            ));
        }
        if let Some(reason) = self.degraded_reason() {
            return Err(Status::unavailable(format!(
                "this replica is degraded ({reason}); begin on another replica"
            )));
        }
        if self.joining.load(Ordering::Acquire) {
            return Err(Status::unavailable(
                "this replica is joining the group (waiting for every peer to admit it); \
                 begin on another replica",
            ));
        }
        Ok(())
    }

    /// ("serving" | "degraded" | "draining" | "joining", why).
    pub fn state(&self) -> (&'static str, String) {
        if self.is_draining() {
            ("draining", "asked to stop".into())
        } else if let Some(reason) = self.degraded_reason() {
            ("degraded", reason)
        } else if self.joining.load(Ordering::Acquire) {
            (
                "joining",
                "its acceptor log is new: waiting for every peer to admit it".into(),
            )
        } else {
            ("serving", String::new())
        }
    }

    /// Marks the replica joining (NOT_SERVING, Begin refused) or admitted.
    pub fn set_joining(&self, joining: bool) {
        self.joining.store(joining, Ordering::Release);
        self.publish();
    }

    /// The first step of a stop.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.publish();
    }

    /// Marks the replica degraded (`Some(reason)`) or healthy again (`None`).
    pub fn set_degraded(&self, reason: Option<String>) {
        *self.degraded.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.publish();
    }

    /// Ends every stream (see [`Lifecycle::closed`]).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once the replica closes its streams.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }

    fn publish(&self) {
        let status = if self.state().0 == "serving" {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        let health = self.health.clone();
        // The reporter is async but only updates a watch: it never waits on I/O.
        tokio::spawn(async move {
            health
                .set_service_status(
                    <CoordinatorServer<crate::server::Handle> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            health.set_service_status("", status).await;
        });
    }
}
