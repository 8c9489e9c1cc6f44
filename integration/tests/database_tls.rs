//! The optional TLS between an agent and its PostgreSQL server: with `database_tls_ca` set,
//! every connection the agent opens (its pool, its lock) is TLS, verified against that CA.

use anyhow::{ensure, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_reach_their_databases_over_tls() -> Result<()> {
    let mut spec = Spec::new("database-tls", 1, &["bank_a", "bank_b"]);
    spec.database_tls = true;
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 2, 100).await?;
    let (txid, outcome) = bank::transfer(&c.client, ("bank_a", 1), ("bank_b", 1), 10).await?;
    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    ensure!(bank::rows_of(&c, &txid).await?.values().all(|n| *n == 1));
    for p in ["bank_a", "bank_b"] {
        let row = c
            .db(p)
            .await?
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
                   FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                  WHERE a.application_name LIKE 'paxos-commit-agent%'",
                &[],
            )
            .await?;
        let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
        eprintln!("{p}: the agent holds {tls} TLS and {plain} plaintext connection(s)");
        ensure!(tls >= 2, "{p}: the agent's pool and lock should be on TLS");
        ensure!(plain == 0, "{p}: the agent opened a plaintext connection");
    }
    Ok(())
}
