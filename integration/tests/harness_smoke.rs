//! Checks the test harness itself, so that a failure in an end-to-end test can be trusted to
//! be about paxos-commit and not about how the harness starts databases or processes.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use paxos_commit_integration::pg::PgCluster;
use paxos_commit_integration::process::{binary_path, free_port, wait_for_port, Proc, TestDir};

async fn show(client: &tokio_postgres::Client, setting: &str) -> Result<String> {
    let row = client.query_one(&format!("SHOW {setting}"), &[]).await?;
    Ok(row.get(0))
}

async fn prepared_gids(client: &tokio_postgres::Client) -> Result<Vec<String>> {
    let rows = client
        .query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn clusters_do_two_phase_commit_and_keep_prepared_transactions_across_a_crash() -> Result<()>
{
    let started = Instant::now();
    let clusters =
        tokio::task::spawn_blocking(|| PgCluster::start_all(&["smoke_a", "smoke_b"])).await??;
    eprintln!("two clusters started in {:?}", started.elapsed());
    let [a, b]: [PgCluster; 2] = clusters
        .try_into()
        .map_err(|_| anyhow!("expected two clusters"))?;
    assert_ne!(a.port(), b.port());
    assert_eq!(
        a.url(),
        format!("postgres://postgres@127.0.0.1:{}/smoke_a", a.port())
    );

    for cluster in [&a, &b] {
        let client = cluster.connect().await?;
        assert_eq!(show(&client, "max_prepared_transactions").await?, "100");
        assert_eq!(show(&client, "fsync").await?, "on");
        assert_eq!(show(&client, "synchronous_commit").await?, "on");
        let db: String = client
            .query_one("SELECT current_database()", &[])
            .await?
            .get(0);
        assert_eq!(db, cluster.db_name());

        client
            .batch_execute(
                "BEGIN; CREATE TABLE t(x int); INSERT INTO t VALUES (1); \
                 PREPARE TRANSACTION 'x'",
            )
            .await?;
        assert_eq!(prepared_gids(&client).await?, ["x"]);
        client.batch_execute("COMMIT PREPARED 'x'").await?;
        assert!(prepared_gids(&client).await?.is_empty());
        let xs: Vec<i32> = client
            .query("SELECT x FROM t", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(xs, [1]);
    }

    let client = b.connect().await?;
    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (2); PREPARE TRANSACTION 'survivor'")
        .await?;
    let crash = Instant::now();
    b.stop_immediate()?;
    assert!(!b.is_running());
    assert!(client.simple_query("SELECT 1").await.is_err());
    assert!(b.connect().await.is_err());
    b.start_again()?;
    eprintln!("crash-stop and restart took {:?}", crash.elapsed());
    assert!(b.is_running());
    assert!(
        b.log_tail(200).contains("not properly shut down"),
        "expected crash recovery in the server log:\n{}",
        b.log_tail(40)
    );

    let client = b.connect().await?;
    assert_eq!(prepared_gids(&client).await?, ["survivor"]);
    let count: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await?
        .get(0);
    assert_eq!(
        count, 1,
        "a prepared row must not be visible before COMMIT PREPARED"
    );
    client.batch_execute("COMMIT PREPARED 'survivor'").await?;
    let count: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await?
        .get(0);
    assert_eq!(count, 2);
    assert!(prepared_gids(&client).await?.is_empty());

    // The other cluster is independent of b's crash.
    let count: i64 = a
        .connect()
        .await?
        .query_one("SELECT count(*) FROM t", &[])
        .await?
        .get(0);
    assert_eq!(count, 1);

    let data_dir = b.data_dir();
    drop(b);
    assert!(
        !data_dir.exists(),
        "the cluster directory must be removed on drop"
    );
    eprintln!("smoke test body took {:?}", started.elapsed());
    Ok(())
}

/// The scheduler state letter from /proc/PID/stat: `T` means stopped by a signal.
fn sched_state(pid: u32) -> Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is parenthesized and may contain spaces; the state follows it.
    let after = stat
        .rsplit_once(')')
        .context("malformed /proc stat")?
        .1
        .trim_start();
    after.chars().next().context("missing state")
}

/// Log headers repeat the command line, so needles are computed by the shell (`$((1 + 1))`)
/// to make sure they come from the process's output, not from the header.
async fn wait_for_log(proc: &Proc, needle: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !proc.log_tail(100).contains(needle) {
        if Instant::now() > deadline {
            anyhow::bail!("{needle:?} not in log:\n{}", proc.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn procs_can_be_killed_paused_stopped_and_restarted() -> Result<()> {
    let dir = TestDir::new("proc")?;
    let log = dir.join("logs/sleeper.log");
    let args = [
        "-c".to_owned(),
        "echo started $GREETING; echo on-stderr-$((1 + 1)) >&2; exec sleep 1000".to_owned(),
    ];
    let envs = [("GREETING".to_owned(), "hello".to_owned())];
    let sleeper = Proc::spawn("sleeper", "/bin/sh", &args, &envs, &log)?;
    wait_for_log(&sleeper, "started hello").await?;
    wait_for_log(&sleeper, "on-stderr-2").await?;

    let pid = sleeper.pid().context("sleeper should run")?;
    sleeper.pause()?;
    assert_eq!(sched_state(pid)?, 'T');
    sleeper.resume()?;
    assert_ne!(sched_state(pid)?, 'T');

    sleeper.kill9()?;
    assert!(!sleeper.is_running());
    assert_eq!(sleeper.exit_status().and_then(|s| s.signal()), Some(9));
    assert!(sleeper.pause().is_err());

    sleeper.restart()?;
    assert!(sleeper.is_running());
    assert_ne!(sleeper.pid(), Some(pid));
    assert!(
        sleeper.restart().is_err(),
        "restart must refuse a running process"
    );
    wait_for_log(&sleeper, "start #2").await?;
    let log_has_second_run = || sleeper.log_tail(1000).matches("started hello").count() == 2;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log_has_second_run() {
        assert!(Instant::now() < deadline, "{}", sleeper.log_tail(20));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // SIGTERM must reach a paused process too.
    sleeper.pause()?;
    let status = sleeper.stop()?.context("was running")?;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert_eq!(sleeper.stop()?, None);

    let stubborn_args = [
        "-c".to_owned(),
        "trap '' TERM; echo ready-$((1 + 1)); exec sleep 1000".to_owned(),
    ];
    let stubborn = Proc::spawn(
        "stubborn",
        "/bin/sh",
        &stubborn_args,
        &[],
        dir.join("s.log"),
    )?;
    wait_for_log(&stubborn, "ready-2").await?;
    let status = stubborn
        .stop_with_grace(Duration::from_millis(300))?
        .context("was running")?;
    assert_eq!(status.signal(), Some(libc::SIGKILL));

    let failing_args = ["-c".to_owned(), "echo boom-$((1 + 1)); exit 3".to_owned()];
    let failing = Proc::spawn("failing", "/bin/sh", &failing_args, &[], dir.join("f.log"))?;
    assert_eq!(failing.wait_exit(Duration::from_secs(5))?.code(), Some(3));
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let err = failing
        .wait_for_port(addr, Duration::from_secs(30))
        .await
        .expect_err("an exited process never listens");
    assert!(format!("{err:#}").contains("boom-2"), "{err:#}");

    // Dropping a Proc kills it, so nothing outlives the test.
    let orphan = Proc::spawn(
        "orphan",
        "/bin/sleep",
        &["1000".to_owned()],
        &[],
        dir.join("o.log"),
    )?;
    let orphan_pid = orphan.pid().context("orphan should run")?;
    drop(orphan);
    assert!(!std::path::Path::new(&format!("/proc/{orphan_pid}")).exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ports_and_binaries_are_found() -> Result<()> {
    let (p1, p2) = (free_port()?, free_port()?);
    assert_ne!(p1, p2);

    let addr: SocketAddr = ([127, 0, 0, 1], p1).into();
    assert!(wait_for_port(addr, Duration::from_millis(100))
        .await
        .is_err());
    let listener = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let _ = listener.accept().await?;
        anyhow::Ok(())
    });
    wait_for_port(addr, Duration::from_secs(5)).await?;
    listener.await??;

    // Built by cargo for this package's integration tests, so always present here.
    let demo = binary_path("bank-demo")?;
    assert!(demo.is_file(), "{}", demo.display());
    Ok(())
}
