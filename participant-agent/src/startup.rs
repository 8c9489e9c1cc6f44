//! What the agent checks and sets up before it serves: 2PC must be enabled on the database,
//! the versioned SQL in `migrations/` is applied, and the database must not belong to another
//! participant.

use crate::config::AgentConfig;
use crate::ServeError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

pub async fn prepare_database(cfg: &AgentConfig) -> Result<Pool, ServeError> {
    let pg_cfg: tokio_postgres::Config = cfg
        .database_url
        .parse()
        .map_err(|e| ServeError::Startup(format!("database URL: {e}")))?;
    let (mut client, connection) = pg_cfg
        .connect(NoTls)
        .await
        .map_err(|e| ServeError::Startup(format!("cannot connect to the database: {e}")))?;
    let conn_task = tokio::spawn(connection);

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

    let report = embedded::migrations::runner()
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

    let manager = Manager::from_config(
        pg_cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(cfg.pool_size)
        .build()
        .map_err(|e| ServeError::Startup(format!("connection pool: {e}")))
}
