//! Step 8, the rest of the client's part (issue 13), each against real PostgreSQL: `run`
//! commits a transfer and runs it again when PostgreSQL runs out of prepared-transaction
//! slots or picks it as a deadlock victim; values are exact (numeric 0.1 + 0.2 is 0.3) and
//! typed (timestamps, dates, uuid, jsonb, bytea, NULLs); an unsupported type is refused
//! before it can have any effect; errors carry typed reasons; and Begin's idempotency key.

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::bank;
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::client::{Client, ClientConfig, ClientError, Decimal, Transaction};
use paxos_commit_proto::pb::{self, ErrorReason, Value};
use paxos_commit_proto::run::RetryPolicy;
use paxos_commit_proto::tls::Role;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const A: &str = "bank_a";
const B: &str = "bank_b";

async fn deployment(name: &str) -> Result<Cluster> {
    let c = Cluster::start(Spec::new(name, 1, &[A, B])).await?;
    bank::create_accounts(&c, 8, 1_000).await?;
    Ok(c)
}

/// The README's transfer with `run` (a whole amount, for the bigint balances).
async fn transfer(client: &Client, amount: Decimal) -> Result<(), ClientError> {
    client
        .run(|txn| async move {
            let sql = "UPDATE accounts SET balance = balance + $1 WHERE id = $2";
            txn.execute("bank_a", sql, &[(-amount).into(), 1i64.into()])
                .await?;
            txn.execute("bank_b", sql, &[amount.into(), 7i64.into()])
                .await?;
            Ok(())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_retries_a_transfer_until_prepared_transactions_free_up() -> Result<()> {
    let c = deployment("run-exhausted").await?;
    transfer(&c.client, "5.00".parse()?).await?;

    // bank_b allows 4 prepared transactions, and an operator's tool holds all of them.
    c.pg(B)?.set_and_restart("max_prepared_transactions", "4")?;
    let db = c.db(B).await?;
    for i in 0..4 {
        db.batch_execute(&format!("BEGIN; PREPARE TRANSACTION 'held-{i}'"))
            .await?;
    }

    // One attempt: the abort says why, typed, with PostgreSQL's SQLSTATE.
    let once = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    let err = c
        .client
        .run_with(&once, |txn| async move {
            let sql = "UPDATE accounts SET balance = balance + $1 WHERE id = $2";
            txn.execute(A, sql, &[(-7i64).into(), 2i64.into()]).await?;
            txn.execute(B, sql, &[7i64.into(), 2i64.into()]).await?;
            Ok(())
        })
        .await
        .expect_err("no prepared transaction slot is free on bank_b");
    eprintln!("one attempt: {err}");
    assert_eq!(
        err.reason(),
        Some(ErrorReason::PreparedTransactionsExhausted),
        "{err}"
    );
    let ClientError::Aborted { decision, .. } = &err else {
        panic!("expected an abort, got {err}");
    };
    let cause = decision.cause.as_ref().context("no cause")?;
    assert_eq!(cause.participant, B);
    assert!(cause.sqlstate.starts_with("53"), "{cause:?}");
    assert!(err.is_transient());
    assert_eq!(bank::balance(&c, A, 2).await?, 1_000);

    // With retries, the transfer goes through once the slots free up.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        for i in 0..4 {
            db.batch_execute(&format!("ROLLBACK PREPARED 'held-{i}'"))
                .await?;
        }
        anyhow::Ok(())
    });
    // More attempts than the default's 10: its jittered pauses may add up to less than the
    // 1.5 s the slots stay held (about once in a hundred runs), and then the last attempt
    // fails for the test's timing rather than for anything `run` does.
    let patient = RetryPolicy {
        max_attempts: 40,
        ..RetryPolicy::default()
    };
    let ran = c
        .client
        .run_with(&patient, |txn| async move {
            let sql = "UPDATE accounts SET balance = balance + $1 WHERE id = $2";
            txn.execute(A, sql, &[(-7i64).into(), 2i64.into()]).await?;
            txn.execute(B, sql, &[7i64.into(), 2i64.into()]).await?;
            Ok(())
        })
        .await?;
    release.await??;
    eprintln!("committed {} after {} attempts", ran.txid, ran.attempts);
    assert!(ran.attempts > 1, "it should have failed at first");
    assert_eq!(bank::balance(&c, A, 2).await?, 993);
    assert_eq!(bank::balance(&c, B, 2).await?, 1_007);
    assert_eq!(bank::balance(&c, A, 1).await?, 995);
    assert_eq!(bank::balance(&c, B, 7).await?, 1_005);
    c.wait_no_prepared(Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_runs_a_deadlock_victim_again() -> Result<()> {
    let c = deployment("run-deadlock").await?;
    // Two transfers lock accounts 1 and 2 of bank_a in opposite orders; PostgreSQL aborts
    // one of them (40P01) and `run` runs it again.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let attempts = Arc::new(AtomicU32::new(0));
    let one = |first: i64, second: i64| {
        let (barrier, attempts, client) = (barrier.clone(), attempts.clone(), c.client.clone());
        async move {
            client
                .run(|txn: Transaction| {
                    let (barrier, attempts) = (barrier.clone(), attempts.clone());
                    async move {
                        let n = attempts.fetch_add(1, Ordering::SeqCst);
                        let sql = "UPDATE accounts SET balance = balance - 1 WHERE id = $1";
                        txn.execute(A, sql, &[first.into()]).await?;
                        if n < 2 {
                            barrier.wait().await;
                        }
                        txn.execute(A, sql, &[second.into()]).await?;
                        txn.execute(B, sql, &[first.into()]).await?;
                        Ok(())
                    }
                })
                .await
        }
    };
    let (x, y) = tokio::join!(one(1, 2), one(2, 1));
    x?;
    y?;
    let attempts = attempts.load(Ordering::SeqCst);
    ensure!(
        attempts >= 3,
        "no transfer was run again ({attempts} attempts)"
    );
    assert_eq!(bank::balance(&c, A, 1).await?, 998);
    assert_eq!(bank::balance(&c, A, 2).await?, 998);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_exact_and_typed() -> Result<()> {
    let c = deployment("run-values").await?;
    c.db(A)
        .await?
        .batch_execute(
            "CREATE TABLE ledger (id int PRIMARY KEY, amount numeric, at timestamptz, \
             local timestamp, day date, ref uuid, meta jsonb, doc json, raw bytea); \
             INSERT INTO ledger (id, amount) VALUES (1, 0);",
        )
        .await?;

    // 0.1 + 0.2, in two transactions, as money: exactly 0.3.
    for step in ["0.1", "0.2"] {
        let step: Decimal = step.parse()?;
        c.client
            .run(|txn| async move {
                txn.execute(
                    A,
                    "UPDATE ledger SET amount = amount + $1 WHERE id = 1",
                    &[step.into()],
                )
                .await?;
                Ok(())
            })
            .await?;
    }
    let db = c.db(A).await?;
    let text: String = db
        .query_one("SELECT amount::text FROM ledger WHERE id = 1", &[])
        .await?
        .get(0);
    assert_eq!(text, "0.3");
    let amount = c
        .client
        .run(|txn| async move {
            let r = txn
                .execute(A, "SELECT amount FROM ledger WHERE id = 1", &[])
                .await?;
            Ok(r.rows[0].values[0].clone())
        })
        .await?;
    assert_eq!(
        amount.as_decimal().context("not a decimal")??,
        "0.3".parse()?
    );

    // Every type out as it went in, and NULL of each.
    let at = 1_704_164_645_123_456i64; // 2024-01-02T03:04:05.123456Z
    let sent = vec![
        Value::decimal("-98765432109876543210.000000000123456789"),
        Value::timestamptz_micros(at),
        Value::timestamp_micros(at),
        Value::date_days(19_724), // 2024-01-02
        Value::uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        Value::json(r#"{"a": [1, 2.5, "x"]}"#),
        Value::json(r#"{"b":null}"#),
        Value::from(vec![0u8, 255, 7]),
    ];
    let insert = "INSERT INTO ledger (id, amount, at, local, day, ref, meta, doc, raw) \
                  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                  RETURNING amount, at, local, day, ref, meta, doc, raw";
    let (full, nulls) = {
        let sent = sent.clone();
        c.client
            .run(move |txn| {
                let sent = sent.clone();
                async move {
                    let mut params = vec![Value::from(2i64)];
                    params.extend(sent.iter().cloned());
                    let full = txn.execute(A, insert, &params).await?;
                    let mut nulls = vec![Value::from(3i64)];
                    nulls.extend(sent.iter().map(|_| Value::null()));
                    let nulls = txn.execute(A, insert, &nulls).await?;
                    Ok((full, nulls))
                }
            })
            .await?
    };
    assert_eq!(full.rows[0].values, sent);
    assert!(nulls.rows[0].values.iter().all(Value::is_null), "{nulls:?}");
    // And PostgreSQL read them as meant: the epochs, the calendar, the JSON.
    let row = db
        .query_one(
            "SELECT at = '2024-01-02 03:04:05.123456+00', local = '2024-01-02 03:04:05.123456', \
             day = '2024-01-02', ref = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', \
             meta = '{\"a\": [1, 2.5, \"x\"]}'::jsonb, raw = '\\x00ff07'::bytea, \
             amount = -98765432109876543210.000000000123456789 FROM ledger WHERE id = 2",
            &[],
        )
        .await?;
    for i in 0..row.len() {
        assert!(row.get::<_, bool>(i), "column {i} of the check differs");
    }

    // A float for a numeric is refused before anything runs: it is not exact.
    let txn = c.client.begin().await?;
    let err = txn
        .execute(
            A,
            "UPDATE ledger SET amount = $1 WHERE id = 1",
            &[0.1f64.into()],
        )
        .await
        .expect_err("a float for a numeric");
    assert_eq!(err.reason(), Some(ErrorReason::UnsupportedType), "{err}");
    // Malformed values are refused the same way, before anything runs.
    for (what, sql, bad) in [
        (
            "a huge exponent",
            "UPDATE ledger SET amount = $1 WHERE id = 1",
            Value::decimal("1e99999"),
        ),
        (
            "a decimal of garbage",
            "UPDATE ledger SET amount = $1 WHERE id = 1",
            Value::decimal("12a"),
        ),
        (
            "a malformed uuid",
            "UPDATE ledger SET ref = $1 WHERE id = 1",
            Value::uuid("not-a-uuid"),
        ),
        (
            "a timestamp for a date",
            "UPDATE ledger SET day = $1 WHERE id = 1",
            Value::timestamptz_micros(0),
        ),
    ] {
        let err = txn.execute(A, sql, &[bad]).await.expect_err(what);
        assert_eq!(
            err.reason(),
            Some(ErrorReason::UnsupportedType),
            "{what}: {err}"
        );
    }
    txn.abort().await?;
    let text: String = db
        .query_one("SELECT amount::text FROM ledger WHERE id = 1", &[])
        .await?
        .get(0);
    assert_eq!(text, "0.3", "a refused value changed the row");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_type_is_refused_before_it_has_an_effect() -> Result<()> {
    let c = deployment("run-unsupported").await?;
    let txn = c.client.begin().await?;
    // A result column of a type Value cannot carry (interval): refused before it ran.
    let err = txn
        .execute(
            A,
            "UPDATE accounts SET balance = balance - 10 WHERE id = 1 \
             RETURNING now() - now() AS gap",
            &[],
        )
        .await
        .expect_err("an interval column");
    eprintln!("{err}");
    assert_eq!(err.reason(), Some(ErrorReason::UnsupportedType), "{err}");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    // A parameter of one (point), likewise.
    let err = txn
        .execute(
            A,
            "UPDATE accounts SET balance = balance - 10 WHERE id = 1 AND $1::point IS NOT NULL",
            &["(1,2)".into()],
        )
        .await
        .expect_err("a point parameter");
    assert_eq!(err.reason(), Some(ErrorReason::UnsupportedType), "{err}");
    // The branch is intact: the same change with a cast runs once, and commits.
    let r = txn
        .execute(
            A,
            "UPDATE accounts SET balance = balance - 10 WHERE id = 1 \
             RETURNING (now() - now())::text AS gap",
            &[],
        )
        .await?;
    assert_eq!(r.rows.len(), 1);
    let d = txn.commit().await?;
    assert_eq!(d.outcome, paxos_commit_core::Outcome::Committed, "{d:?}");
    assert_eq!(bank::balance(&c, A, 1).await?, 990, "applied once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_with_an_idempotency_key_returns_the_same_transaction() -> Result<()> {
    // (And the logs: bank_b's agent logs JSON lines, and no log holds a colour code.)
    let mut spec = Spec::new("run-idempotent", 1, &[A, B]);
    spec.agent_env
        .entry(B.to_string())
        .or_default()
        .push(("PAXOS_COMMIT_LOG_FORMAT".into(), "json".into()));
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 8, 1_000).await?;
    let first = c.client.begin_idempotent("order-1234").await?;
    first
        .execute(
            A,
            "UPDATE accounts SET balance = balance - 1 WHERE id = 1",
            &[],
        )
        .await?;
    let again = c.client.begin_idempotent("order-1234").await?;
    assert_eq!(
        again.id(),
        first.id(),
        "the same key began another transaction"
    );
    // Only one handle should finish it.
    again.detach();
    let other = c.client.begin_idempotent("order-1235").await?;
    assert_ne!(other.id(), first.id());
    // Another client's certificate with the same key gets a transaction of its own.
    let stranger = Client::new(&ClientConfig {
        tls: c.tls_as(&Role::Client("stranger".into())),
        ..c.client_config(Duration::from_secs(10))
    })?;
    let theirs = stranger.begin_idempotent("order-1234").await?;
    assert_ne!(theirs.id(), first.id(), "a key is its caller's");
    // An oversized key is refused, typed.
    let err = c
        .client
        .begin_idempotent(&"k".repeat(200))
        .await
        .err()
        .context("an oversized key was accepted")?;
    assert_eq!(err.reason(), Some(ErrorReason::InvalidArgument), "{err}");
    // Decided, the key still answers with it (and Commit again is harmless).
    assert_eq!(
        first.commit().await?.outcome,
        paxos_commit_core::Outcome::Committed
    );
    let later = c.client.begin_idempotent("order-1234").await?;
    assert_eq!(later.id(), first.id());
    later.detach();
    for t in [other, theirs] {
        t.abort().await?;
    }
    assert_eq!(bank::balance(&c, A, 1).await?, 999);
    let status = c.status(first.id()).await?;
    assert_eq!(
        pb::TxnState::try_from(status.state),
        Ok(pb::TxnState::Committed)
    );

    let logs = c.logs_tail(10_000);
    ensure!(
        !logs.contains('\x1b'),
        "colour codes in a log file:\n{logs}"
    );
    let json = c.agent(B)?.log_tail(10_000);
    let lines: Vec<&str> = json.lines().filter(|l| l.starts_with('{')).collect();
    ensure!(!lines.is_empty(), "no JSON log lines:\n{json}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON log line: {line}"))?;
        ensure!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    Ok(())
}
