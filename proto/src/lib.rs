//! The wire protocol of paxos-commit (generated from `proto/paxoscommit.proto`), its mapping
//! onto the core's types, and a thin client library that tests, the demo and applications use;
//! with the processes' shared plumbing: logs and traces ([`telemetry`]), TLS identities
//! ([`tls`]), server bootstrap ([`run_server`]).

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("paxoscommit.v1");

    /// The encoded descriptors of `paxoscommit.proto`, for the reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/paxoscommit_descriptor.bin"));
}

/// The gRPC reflection service of a server: our services and the health service, so that
/// grpcurl and other generic tools can list and call them.
pub fn reflection_service() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
}

pub mod client;
pub mod convert;
pub mod health;
pub mod heuristic;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod reason;
pub mod run;
pub mod sender;
pub mod telemetry;
pub mod tls;

/// The tokio runtime of the server binaries (coordinator replica, participant agent).
///
/// A deployment runs several of these processes per host (the benchmark runs eight on two
/// cores), and each request crosses a few tasks: with a multi-threaded scheduler most of
/// the CPU goes to waking idle worker threads and switching between them, not to the work.
/// A single-threaded scheduler keeps a request's hops on one thread; blocking work (the
/// acceptor log's fsync) still runs on the blocking pool. `PAXOS_COMMIT_WORKER_THREADS=n`
/// (n > 0) selects a multi-threaded scheduler with n workers instead.
pub fn server_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("PAXOS_COMMIT_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

/// Exit code of a server that refused to start because doing so could be unsafe: another
/// process holds its data directory or its database, or its acceptor log is damaged.
/// Restarting it will not help until an operator acts, so supervisors (systemd's
/// `RestartPreventExitStatus`) should not restart on it.
pub const EXIT_REFUSED: u8 = 78;

/// Exit code of a replica whose acceptor log could not be written: it stopped rather than
/// answer with promises it could not keep. Restarting it is safe.
pub const EXIT_LOG_FAILED: u8 = 70;

/// How long a server may take to stop after SIGTERM before it is made to exit anyway
/// (`PAXOS_COMMIT_STOP_DEADLINE_MS`, default 9000): stop means stop, whatever a peer or a
/// disk does.
fn stop_deadline() -> std::time::Duration {
    let ms = std::env::var("PAXOS_COMMIT_STOP_DEADLINE_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(9000);
    std::time::Duration::from_millis(ms)
}

/// A fatal error of a server binary and the exit code it ends the process with.
pub trait ServeFailure: std::fmt::Display {
    /// 1 unless the error says restarting will not help ([`EXIT_REFUSED`]).
    fn exit_code(&self) -> u8 {
        1
    }
}

/// Logs of the server binaries, on stderr: `RUST_LOG` filters (default `info`); colour only
/// when stderr is a terminal, so that files and journald get plain text; one JSON object per
/// line when `PAXOS_COMMIT_LOG_FORMAT=json`, for log collectors. No traces: see
/// [`telemetry::init_telemetry`] for logs and traces.
pub fn init_logging() {
    telemetry::install(None);
}

/// The life of a server binary (coordinator replica, participant agent): its configuration
/// or the usage error that exits with 2, logs and traces ([`telemetry::init_telemetry`], as
/// the service `service(&config)` names unless `OTEL_SERVICE_NAME` does), the runtime,
/// serving until Ctrl-C or SIGTERM, the last spans exported, and the exit code.
///
/// The shutdown future handed to `serve` resolves on the first SIGTERM or Ctrl-C; `serve`
/// then drains and returns. Should it not manage within the stop deadline (a hung disk, a
/// stuck peer), a watchdog ends the process with exit code 1 anyway.
pub fn run_server<C, E, S, Fut, SE>(
    name: &str,
    config: Result<C, E>,
    service: impl FnOnce(&C) -> String,
    serve: S,
) -> std::process::ExitCode
where
    E: std::fmt::Display,
    S: FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), SE>>,
    SE: ServeFailure,
{
    let cfg = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let telemetry = telemetry::init_telemetry(&service(&cfg));
    let runtime = match server_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let deadline = stop_deadline();
    let owner = name.to_string();
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("{owner}: asked to stop; draining (at most {deadline:?})");
        let owner = owner.clone();
        std::thread::spawn(move || {
            std::thread::sleep(deadline);
            eprintln!("{owner}: did not stop within {deadline:?} of being asked to; exiting now");
            std::process::exit(1);
        });
    };
    let result = runtime.block_on(serve(cfg, Box::pin(shutdown)));
    // Blocking tasks (an fsync on a sick disk) must not keep a stopped process alive.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    // The spans of the last transactions, before the process goes (the watchdog above still
    // bounds the wait should the collector not answer).
    telemetry.shutdown();
    match result {
        Ok(()) => {
            tracing::info!("{name}: stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM: how every server of the project is told to stop.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Fault injection for the kill -9 tests: when the environment names this crash point in
/// `PAXOS_COMMIT_CRASH_POINT`, the process SIGKILLs itself here (no destructors, no flush, as
/// an operator's kill -9 would), once: `PAXOS_COMMIT_CRASH_ONCE` names a marker file that
/// is created first, and a marker that exists disarms the point after a restart.
pub fn crash_point(name: &str) {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("PAXOS_COMMIT_CRASH_POINT").ok());
    if armed.as_deref() != Some(name) {
        return;
    }
    if let Ok(marker) = std::env::var("PAXOS_COMMIT_CRASH_ONCE") {
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_err()
        {
            return;
        }
    }
    eprintln!("crash point {name}: killing this process with SIGKILL");
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
