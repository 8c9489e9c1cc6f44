//! What the agent checks and sets up before it serves: it must be the only live agent of its
//! participant on the database (a session advisory lock, held for the life of the process),
//! 2PC must be enabled on the database, the versioned SQL in `migrations/` is applied, and the
//! database must not belong to another participant.
//!
//! Two agents serving one participant would each run, prepare and finish branches of the same
//! gids on their own say (one could roll back what the other voted Prepared), so the second
//! one is refused at start, and an agent that finds its lock taken by another after a
//! reconnection stops serving.

use crate::config::AgentConfig;
use crate::db_tls::DbConnect;
use crate::ServeError;
use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// How often the lock's connection is checked, and how long the check may take.
const PING_EVERY: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between attempts to take the lock again while PostgreSQL is unreachable.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub async fn prepare_database(cfg: &AgentConfig) -> Result<Pool, ServeError> {
    let mut pg_cfg = pg_config(cfg)?;
    if pg_cfg.get_application_name().is_none() {
        pg_cfg.application_name(format!("paxos-commit-agent {}", cfg.participant));
    }
    let (mut client, conn_task) = cfg
        .database_tls
        .connect(&pg_cfg)
        .await
        .map_err(|e| ServeError::Startup(format!("cannot connect to the database: {e}")))?;

    let row = client
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .map_err(|e| ServeError::Startup(format!("reading max_prepared_transactions: {e}")))?;
    let max_prepared: i64 = row.get::<_, String>(0).parse().unwrap_or(0);
    if max_prepared == 0 {
        return Err(ServeError::Startup(
            "max_prepared_transactions is 0 on this database, which disables PREPARE \
             TRANSACTION: set it (for example to 100) in postgresql.conf and restart PostgreSQL"
                .into(),
        ));
    }
    if (max_prepared as usize) < cfg.pool_size {
        tracing::warn!(
            max_prepared,
            pool = cfg.pool_size,
            "max_prepared_transactions is below the pool size; prepares may be refused under load"
        );
    }

    // The migrations' history lives in the agent's own schema: since PostgreSQL 15 a role
    // that is not the database's owner may not create in `public`, where refinery would put
    // it. A database migrated before keeps its history where it is.
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS paxos_commit")
        .await
        .map_err(|e| ServeError::Startup(format!("creating schema paxos_commit: {e}")))?;
    let history_in_public: bool = client
        .query_one(
            "SELECT to_regclass('public.refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| ServeError::Startup(format!("looking for the migration history: {e}")))?
        .get(0);
    let history = if history_in_public {
        "public.refinery_schema_history"
    } else {
        "paxos_commit.refinery_schema_history"
    };
    let report = embedded::migrations::runner()
        .set_migration_table_name(history)
        .run_async(&mut client)
        .await
        .map_err(|e| ServeError::Startup(format!("applying migrations: {e}")))?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied");
    }

    client
        .execute(
            "INSERT INTO paxos_commit.agent (participant, coordinator_group) VALUES ($1, $2) \
             ON CONFLICT (singleton) DO NOTHING",
            &[&cfg.participant, &cfg.group],
        )
        .await
        .map_err(|e| ServeError::Startup(format!("recording the agent identity: {e}")))?;
    let owner = client
        .query_one(
            "SELECT participant, coordinator_group FROM paxos_commit.agent",
            &[],
        )
        .await
        .map_err(|e| ServeError::Startup(format!("reading the agent identity: {e}")))?;
    let (participant, group): (String, String) = (owner.get(0), owner.get(1));
    if participant != cfg.participant || group != cfg.group {
        return Err(ServeError::Startup(format!(
            "this database belongs to participant {participant:?} of group {group:?}, not \
             {:?} of {:?}: an agent with another identity would not find that one's prepared \
             transactions",
            cfg.participant, cfg.group
        )));
    }
    drop(client);
    let _ = conn_task.await;

    // The branches' lock and statement timeouts as the pool connections' defaults: a
    // statement pays nothing for them, and RESET ALL after each branch restores them.
    let options = format!(
        "{} -c lock_timeout={} -c statement_timeout={}",
        pg_cfg.get_options().unwrap_or_default(),
        cfg.lock_timeout.as_millis(),
        cfg.statement_timeout.as_millis(),
    );
    pg_cfg.options(options.trim());
    let manager = cfg.database_tls.manager(
        pg_cfg,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // A request that finds every connection busy waits a bounded time, then is refused with
    // RESOURCE_EXHAUSTED rather than queueing without end.
    Pool::builder(manager)
        .max_size(cfg.pool_size)
        .wait_timeout(Some(cfg.pool_wait_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| ServeError::Startup(format!("connection pool: {e}")))
}

fn pg_config(cfg: &AgentConfig) -> Result<tokio_postgres::Config, ServeError> {
    cfg.database_url
        .parse()
        .map_err(|e| ServeError::Startup(format!("database URL: {e}")))
}

/// The advisory-lock key of one participant of one group: FNV-1a (64 bit) over
/// `paxos_commit`, the group and the participant, NUL-separated. Fixed by this function
/// alone, not by a hasher that may change between Rust versions: every build of the agent
/// must derive the same key, or two of them would not exclude each other.
pub fn agent_lock_key(group: &str, participant: &str) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in ["paxos_commit", group, participant] {
        for b in part.bytes().chain([0]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash as i64
}

/// The session that holds the agent lock.
struct Session {
    client: Client,
    connection: JoinHandle<()>,
    /// The backend's pid and start time: after a broken connection, a lock still held by
    /// exactly this backend is our own session, not another agent.
    backend: Backend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Backend {
    pid: i32,
    started: Option<String>,
}

/// Who holds the lock, as PostgreSQL shows it.
struct Holder {
    backend: Backend,
    application: Option<String>,
    client_addr: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgreSQL backend pid {}", self.backend.pid)?;
        if let Some(app) = self.application.as_deref().filter(|a| !a.is_empty()) {
            write!(f, ", application {app:?}")?;
        }
        if let Some(addr) = &self.client_addr {
            write!(f, ", from {addr}")?;
        }
        Ok(())
    }
}

enum Attempt {
    Taken(Session),
    /// Held by another session (which PostgreSQL may already have let go by the time it is
    /// looked up: `None`).
    Held(Option<Holder>),
}

/// The session-level advisory lock that makes this process the one live agent of its
/// participant on this database. Take it with [`take_agent_lock`] before anything else
/// touches the database, and keep [`AgentLock::hold`] running for as long as the agent
/// serves: it returns only when the agent must stop.
pub struct AgentLock {
    pg: tokio_postgres::Config,
    db: DbConnect,
    key: i64,
    group: String,
    participant: String,
    session: Session,
}

/// Takes the agent lock on a dedicated connection, or explains who holds it.
pub async fn take_agent_lock(cfg: &AgentConfig) -> Result<AgentLock, ServeError> {
    let mut pg = pg_config(cfg)?;
    if pg.get_application_name().is_none() {
        pg.application_name(format!("paxos-commit-agent {} (lock)", cfg.participant));
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    // A peer that vanished without closing the connection is noticed in seconds, not hours.
    pg.keepalives_idle(Duration::from_secs(10));
    let key = agent_lock_key(&cfg.group, &cfg.participant);
    let attempt = try_lock(&pg, &cfg.database_tls, key).await.map_err(|e| {
        ServeError::Startup(format!(
            "cannot connect to the database to take the agent lock: {e}"
        ))
    })?;
    match attempt {
        Attempt::Taken(session) => {
            tracing::info!(
                participant = %cfg.participant,
                group = %cfg.group,
                pid = session.backend.pid,
                "holding the agent lock of this database"
            );
            Ok(AgentLock {
                pg,
                db: cfg.database_tls.clone(),
                key,
                group: cfg.group.clone(),
                participant: cfg.participant.clone(),
                session,
            })
        }
        Attempt::Held(holder) => Err(ServeError::Refused(format!(
            "another agent for participant {} of group {} holds this database ({}); stop it \
             first",
            cfg.participant,
            cfg.group,
            describe(holder.as_ref())
        ))),
    }
}

fn describe(holder: Option<&Holder>) -> String {
    holder.map_or_else(
        || "it let go just now; try again".to_string(),
        |h| h.to_string(),
    )
}

impl AgentLock {
    /// Holds the lock: watches its connection and, when it breaks (PostgreSQL restarted, the
    /// network failed), takes the lock again on a new one, retrying for as long as
    /// PostgreSQL is unreachable. Returns only if another agent holds the lock by then: this
    /// agent must stop serving at once. Dropping the future (or the lock) releases the lock.
    pub async fn hold(mut self) -> ServeError {
        loop {
            self.watch().await;
            tracing::warn!(
                participant = %self.participant,
                "lost the connection that holds the agent lock; taking the lock again"
            );
            if let Some(e) = self.retake().await {
                return e;
            }
        }
    }

    /// Returns when the lock's connection is gone or does not answer.
    async fn watch(&mut self) {
        let mut tick = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                _ = &mut self.session.connection => return,
                _ = tick.tick() => {
                    let ping = self.session.client.simple_query("SELECT 1");
                    match tokio::time::timeout(PING_TIMEOUT, ping).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!("the agent lock's connection failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(
                                "the agent lock's connection did not answer within {:?}",
                                PING_TIMEOUT
                            );
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Takes the lock again; `Some` when another agent has it.
    async fn retake(&mut self) -> Option<ServeError> {
        self.session.connection.abort();
        let old = self.session.backend.clone();
        let mut wait = RETRY_FIRST;
        loop {
            match try_lock(&self.pg, &self.db, self.key).await {
                Ok(Attempt::Taken(session)) => {
                    tracing::info!(
                        participant = %self.participant,
                        pid = session.backend.pid,
                        "holding the agent lock again"
                    );
                    self.session = session;
                    return None;
                }
                // Our own session, still alive on the server (the connection hung rather
                // than broke): end it, and the lock with it.
                Ok(Attempt::Held(Some(h))) if h.backend == old => {
                    tracing::warn!(
                        pid = old.pid,
                        "the agent lock is still held by this agent's previous session; \
                         ending that session"
                    );
                    if let Err(e) = terminate(&self.pg, &self.db, old.pid).await {
                        tracing::warn!(pid = old.pid, "could not end the old session: {e}");
                    }
                }
                Ok(Attempt::Held(Some(h))) => {
                    return Some(ServeError::Refused(format!(
                        "another agent for participant {} of group {} took this database ({h}) \
                         while this agent's connection to it was down; this agent stops \
                         serving",
                        self.participant, self.group
                    )));
                }
                Ok(Attempt::Held(None)) => {}
                Err(e) => tracing::debug!("taking the agent lock again: {e}"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }
}

/// One attempt on a fresh connection: the connection is kept if the lock was taken.
async fn try_lock(
    pg: &tokio_postgres::Config,
    db: &DbConnect,
    key: i64,
) -> Result<Attempt, tokio_postgres::Error> {
    let (client, connection) = db.connect(pg).await?;
    let taken = async {
        let row = client
            .query_one(
                "SELECT pg_catalog.pg_try_advisory_lock($1), pg_catalog.pg_backend_pid(), \
                        (SELECT backend_start::text FROM pg_catalog.pg_stat_activity \
                          WHERE pid = pg_catalog.pg_backend_pid())",
                &[&key],
            )
            .await?;
        let taken: bool = row.try_get(0)?;
        let backend = Backend {
            pid: row.try_get(1)?,
            started: row.try_get(2)?,
        };
        if taken {
            return Ok(Ok(backend));
        }
        Ok::<_, tokio_postgres::Error>(Err(holder(&client, key).await?))
    };
    match taken.await {
        Ok(Ok(backend)) => Ok(Attempt::Taken(Session {
            client,
            connection,
            backend,
        })),
        Ok(Err(holder)) => {
            connection.abort();
            Ok(Attempt::Held(holder))
        }
        Err(e) => {
            connection.abort();
            Err(e)
        }
    }
}

/// The session holding `key` in this database, from `pg_locks`: a bigint key shows as its
/// high half in `classid`, its low half in `objid`, and `objsubid` 1.
async fn holder(client: &Client, key: i64) -> Result<Option<Holder>, tokio_postgres::Error> {
    let high = ((key as u64) >> 32) as u32;
    let low = key as u64 as u32;
    let row = client
        .query_opt(
            "SELECT l.pid, a.backend_start::text, a.application_name, a.client_addr::text \
               FROM pg_catalog.pg_locks l \
               LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                AND l.classid = $1 AND l.objid = $2 \
                AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                                   WHERE datname = pg_catalog.current_database()) \
              LIMIT 1",
            &[&high, &low],
        )
        .await?;
    row.map(|r| {
        Ok(Holder {
            backend: Backend {
                pid: r.try_get(0)?,
                started: r.try_get(1)?,
            },
            application: r.try_get(2)?,
            client_addr: r.try_get(3)?,
        })
    })
    .transpose()
}

async fn terminate(
    pg: &tokio_postgres::Config,
    db: &DbConnect,
    pid: i32,
) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = db.connect(pg).await?;
    let result = client
        .query_one("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid])
        .await
        .map(drop);
    drop(client);
    let _ = connection.await;
    result
}

#[cfg(test)]
mod tests {
    use super::agent_lock_key;

    #[test]
    fn the_lock_key_is_fixed_and_tells_participants_apart() {
        // Pinned: an agent built from another version must derive the same key.
        assert_eq!(
            agent_lock_key("main", "bank_a"),
            agent_lock_key("main", "bank_a")
        );
        assert_eq!(agent_lock_key("main", "bank_a"), PINNED);
        assert_ne!(
            agent_lock_key("main", "bank_a"),
            agent_lock_key("main", "bank_b")
        );
        assert_ne!(
            agent_lock_key("main", "bank_a"),
            agent_lock_key("other", "bank_a")
        );
        // The separator keeps the parts apart.
        assert_ne!(agent_lock_key("ab", "c"), agent_lock_key("a", "bc"));
    }

    const PINNED: i64 = -6_094_723_744_471_752_949;
}
