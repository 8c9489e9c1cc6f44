//! Test harness for end-to-end tests of paxos-commit.
//!
//! The properties that matter (atomic commit across databases, surviving crashes of the
//! coordinator, the agents and the databases themselves) can only be checked against real
//! processes and real PostgreSQL servers, so the harness provides both:
//!
//! - [`pg`]: throwaway PostgreSQL clusters with two-phase commit enabled, one port and one
//!   temporary directory each, that can be crash-stopped and restarted.
//! - [`process`]: the workspace binaries run as child processes, with logs, SIGKILL, SIGSTOP
//!   and restart for fault injection.
//!
//! Everything is cleaned up on drop, also when a test panics (logs are then kept and their
//! path printed).
//!
//! On top of them:
//!
//! - [`cluster`]: a whole deployment (databases, agents, 2F+1 replicas) on loopback;
//! - [`bank`]: the transfer workload and its invariants;
//! - [`proxy`]: loopback fault proxies between the components (cut, delay, loss);
//! - [`nemesis`]: the randomized fault schedule, workload and checker of the nemesis test.

pub mod bank;
pub mod browser;
pub mod certs;
pub mod cluster;
pub mod container;
pub mod deploy;
pub mod nemesis;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod python;
pub mod scrape;
pub mod txctl;
