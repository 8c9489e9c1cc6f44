//! The Python client (`proto/python`, issue 13) against real clusters: its unit tests, then
//! its scripts under `proto/python/tests/` (and the README's example) with the cluster's
//! addresses and a client certificate in `PAXOS_COMMIT_*` variables, and what they did
//! checked here, in the databases.
//!
//! The Python environment is made once per target directory (see `integration::python`); a
//! machine that cannot make it fails these tests.

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::bank;
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_integration::python;
use paxos_commit_proto::pb::ErrorReason;
use paxos_commit_proto::reason;
use std::collections::BTreeSet;
use std::time::Duration;

const A: &str = "bank_a";
const B: &str = "bank_b";
const BALANCE: i64 = 100;

/// Three replicas (so that leaders other than replica 0 occur) and two databases of eight
/// accounts each.
async fn deployment(name: &str) -> Result<Cluster> {
    let c = Cluster::start(Spec::new(name, 3, &[A, B])).await?;
    bank::create_accounts(&c, 8, BALANCE).await?;
    Ok(c)
}

/// Runs `python <args>` against `c` as the client `client/python`; a failure shows the
/// servers' logs too.
fn python(c: &Cluster, args: &[&str]) -> Result<String> {
    let env = python::client_env(c, "python")?;
    tokio::task::block_in_place(|| python::run(args, &env))
        .with_context(|| format!("the servers' logs:\n{}", c.logs_tail(40)))
}

async fn balances(c: &Cluster, p: &str, accounts: &[i32]) -> Result<Vec<i64>> {
    let mut out = Vec::new();
    for &a in accounts {
        out.push(bank::balance(c, p, a).await?);
    }
    Ok(out)
}

#[test]
fn python_unit_tests() -> Result<()> {
    python::run(
        &[
            "-m",
            "unittest",
            "discover",
            "-s",
            "tests",
            "-p",
            "test_*.py",
            "-v",
        ],
        &[],
    )
    .map(drop)
}

/// The Python client retries exactly the reasons the Rust side calls transient.
#[test]
fn python_retries_the_same_reasons_as_rust() -> Result<()> {
    let rust: BTreeSet<String> = (0..128)
        .filter_map(|i| ErrorReason::try_from(i).ok())
        .filter(|r| reason::is_transient(*r))
        .map(|r| r.as_str_name().to_string())
        .collect();
    let out = python::run(
        &[
            "-c",
            "from paxos_commit.errors import TRANSIENT_REASONS; \
             print('\\n'.join(sorted(TRANSIENT_REASONS)))",
        ],
        &[],
    )?;
    let python: BTreeSet<String> = out.lines().map(str::to_string).collect();
    ensure!(rust == python, "Rust: {rust:?}\nPython: {python:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_transfer_commits_and_an_abort_leaves_nothing() -> Result<()> {
    let c = deployment("py-transfer").await?;
    let out = python(&c, &["examples/transfer.py"])?;
    ensure!(out.contains("committed"), "{out}");
    ensure!(bank::balance(&c, A, 1).await? == BALANCE - 30);
    ensure!(bank::balance(&c, B, 7).await? == BALANCE + 30);

    python(&c, &["tests/cluster_abort.py"])?;
    ensure!(balances(&c, A, &[2, 3]).await? == [BALANCE, BALANCE]);
    ensure!(balances(&c, B, &[2, 3]).await? == [BALANCE, BALANCE]);
    let totals = bank::totals(&c).await?;
    ensure!(
        totals[A] == 8 * BALANCE - 30 && totals[B] == 8 * BALANCE + 30,
        "{totals:?}"
    );
    c.wait_no_prepared(Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_violation_is_a_typed_constraint_violation() -> Result<()> {
    let c = deployment("py-check").await?;
    python(&c, &["tests/cluster_constraint.py"])?;
    // Nothing of either attempt was applied, on either side.
    ensure!(bank::balance(&c, A, 1).await? == BALANCE);
    ensure!(bank::balance(&c, B, 1).await? == BALANCE);
    let totals = bank::totals(&c).await?;
    ensure!(totals.values().all(|&t| t == 8 * BALANCE), "{totals:?}");
    c.wait_no_prepared(Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_values_round_trip_through_postgresql() -> Result<()> {
    let c = deployment("py-values").await?;
    c.setup_sql(
        "CREATE TABLE typed (
            id int PRIMARY KEY, n numeric, ts timestamptz, t timestamp, d date, u uuid,
            j jsonb, js json, b bytea, f float8, tx text, flag bool, big int8
        )",
    )
    .await?;
    python(&c, &["tests/cluster_values.py"])?;

    // What PostgreSQL itself holds, as text: the Python side cannot agree with itself here.
    let db = c.db(A).await?;
    let row = db
        .query_one(
            "SELECT n::text, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'),
                    t::text, d::text, u::text, j::text, js::text, encode(b, 'hex'), f, tx,
                    flag, big
             FROM typed WHERE id = 1",
            &[],
        )
        .await?;
    let text = |i: usize| -> String { row.get(i) };
    ensure!(text(0) == "0.3", "numeric: {}", text(0));
    ensure!(
        text(1) == "2024-02-29 12:34:56.123456",
        "timestamptz: {}",
        text(1)
    );
    ensure!(
        text(2) == "1999-12-31 23:59:59.999999",
        "timestamp: {}",
        text(2)
    );
    ensure!(text(3) == "2024-02-29", "date: {}", text(3));
    ensure!(
        text(4) == "6f1c2a4e-8b2d-4c1e-9a3f-0123456789ab",
        "uuid: {}",
        text(4)
    );
    ensure!(
        text(5) == r#"{"a": [1, "two", null], "b": {"c": true}}"#,
        "jsonb: {}",
        text(5)
    );
    ensure!(text(6) == r#""just a string""#, "json: {}", text(6));
    ensure!(text(7) == "0001feff", "bytea: {}", text(7));
    ensure!(row.get::<_, f64>(8) == 2.5);
    ensure!(text(9) == "héllo");
    ensure!(row.get::<_, bool>(10));
    ensure!(row.get::<_, i64>(11) == 1 << 62);

    let nulls = db
        .query_one(
            "SELECT num_nulls(n, ts, t, d, u, j, js, b, f, tx, flag, big) FROM typed WHERE id = 2",
            &[],
        )
        .await?;
    ensure!(nulls.get::<_, i32>(0) == 12, "row 2 is not all NULL");
    let infinite = db
        .query_one(
            "SELECT n::text, ts::text, t::text, d::text FROM typed WHERE id = 3",
            &[],
        )
        .await?;
    let got: Vec<String> = (0..4).map(|i| infinite.get(i)).collect();
    ensure!(
        got == ["NaN", "infinity", "-infinity", "infinity"],
        "row 3: {got:?}"
    );
    // The other database's copy came in the same transaction.
    let b = c.db(B).await?;
    let n: String = b
        .query_one("SELECT n::text FROM typed WHERE id = 1", &[])
        .await?
        .get(0);
    ensure!(n == "0.1", "bank_b numeric: {n}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_transfers_are_retried_to_success() -> Result<()> {
    let c = deployment("py-contention").await?;
    python(&c, &["tests/cluster_contention.py"])?;
    // In bank_a: 1 → 2 (10) and 2 → 1 (20). Across: a3 → b3 (5) and b3 → a3 (7).
    ensure!(balances(&c, A, &[1, 2, 3]).await? == [BALANCE + 10, BALANCE - 10, BALANCE + 2]);
    ensure!(bank::balance(&c, B, 3).await? == BALANCE - 2);
    let totals = bank::totals(&c).await?;
    ensure!(
        totals[A] == 8 * BALANCE + 2 && totals[B] == 8 * BALANCE - 2,
        "{totals:?}"
    );
    c.wait_no_prepared(Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_keys_status_prepare_and_typed_refusals() -> Result<()> {
    let c = deployment("py-api").await?;
    python(&c, &["tests/cluster_api.py"])?;
    // Credits of 1: commit_fast on account 4, prepare then commit on account 5 of each
    // database, the keyed transaction on account 6.
    ensure!(balances(&c, A, &[4, 5, 6]).await? == [BALANCE + 1, BALANCE + 1, BALANCE + 1]);
    ensure!(bank::balance(&c, B, 5).await? == BALANCE + 1);
    c.wait_no_prepared(Duration::from_secs(5)).await
}
