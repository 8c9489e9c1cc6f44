//! Real OS processes for end-to-end tests.
//!
//! Fault-injection tests need to do to the coordinator and the participant agents exactly what
//! production does to them: SIGKILL them mid-protocol, freeze them (SIGSTOP) to simulate a
//! stalled node, restart them from the same command line and data directory. In-process tasks
//! cannot be killed that way, so the tests drive the built binaries. This module finds those
//! binaries, runs them with their output in a log file (so a failing test can show what each
//! process said), and makes sure none of them outlives the test.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

/// Environment variable naming a directory that holds prebuilt binaries; when set, nothing is
/// looked up elsewhere and nothing is built (useful to test release binaries or an install).
pub const BIN_DIR_ENV: &str = "PAXOS_COMMIT_BIN_DIR";

/// How long [`Proc::stop`] waits after SIGTERM before it resorts to SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The workspace root, derived at compile time so it does not depend on the test's cwd.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// Path of the workspace binary `name` (`coordinator`, `txctl`, `participant-agent`, ...).
///
/// Looks in [`BIN_DIR_ENV`] if set (and only there), else in the target directory the running
/// test was built into, else in `<workspace>/target/debug`. `cargo test` does not rebuild the
/// binaries of other packages, so this runs `cargo build --workspace --bins` (with the running
/// executable's profile) once per process before looking.
pub fn binary_path(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let path = PathBuf::from(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "binary {name:?} not found at {} ({BIN_DIR_ENV} is set, so nothing else is searched)",
            path.display()
        );
    }
    // Always (once per process) let cargo bring the binaries up to date: a test must never
    // run a stale server. When nothing changed this takes about a second.
    let candidates = binary_dirs();
    build_workspace_binaries_once()
        .with_context(|| format!("building the workspace binaries for {name:?} failed"))?;
    find_in(&candidates, name).ok_or_else(|| {
        anyhow!(
            "binary {name:?} not found after `cargo build --bins`; searched {}",
            candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The profile directory (`target/<profile>`) the current executable lives in, if it looks like
/// one: test executables live in `target/<profile>/deps`, binaries in `target/<profile>`.
fn current_profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

fn binary_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = current_profile_dir() {
        dirs.push(dir);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(target).join("debug"));
    }
    dirs.push(workspace_root().join("target").join("debug"));
    dirs.dedup();
    dirs
}

/// Builds with the profile the running test was built with, so the binaries land next to it.
fn profile_args() -> Vec<String> {
    let profile = current_profile_dir()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "debug".to_owned());
    match profile.as_str() {
        "debug" => Vec::new(),
        "release" => vec!["--release".to_owned()],
        other => vec!["--profile".to_owned(), other.to_owned()],
    }
}

fn build_workspace_binaries_once() -> Result<()> {
    // The outcome is remembered so that concurrent tests wait for one build instead of racing
    // several cargos on the same target lock, and a broken build is reported once, not retried.
    static BUILT: Mutex<Option<Result<(), String>>> = Mutex::new(None);
    let mut built = lock(&BUILT);
    if built.is_none() {
        *built = Some(build_workspace_binaries().map_err(|e| format!("{e:#}")));
    }
    match built.as_ref() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(anyhow!("{e}")),
        None => Err(anyhow!("workspace build outcome missing")),
    }
}

fn build_workspace_binaries() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let started = Instant::now();
    eprintln!(
        "[harness] building workspace binaries (cargo build --workspace --bins; a few minutes the first time)"
    );
    let output = Command::new(&cargo)
        .args(["build", "--workspace", "--bins"])
        .args(profile_args())
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        bail!(
            "cargo build --workspace --bins failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    eprintln!(
        "[harness] workspace binaries built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A loopback TCP port that was free a moment ago.
///
/// Racy by nature (someone may take it before our process binds it), but never returns the same
/// port twice within a process, so parallel tests in one test binary do not collide.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
        let port = listener
            .local_addr()
            .context("reading the address of a bound socket")?
            .port();
        drop(listener);
        if lock(&HANDED_OUT)
            .get_or_insert_with(HashSet::new)
            .insert(port)
        {
            return Ok(port);
        }
    }
    bail!("could not find a free loopback port that was not already handed out")
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| {
                    format!("nothing accepted connections on {addr} within {timeout:?}")
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Locks a mutex even if a panicking test poisoned it: the harness state stays consistent
/// because no critical section leaves it half-updated, and Drop impls must not panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type SpawnRequest = (Command, mpsc::SyncSender<io::Result<Child>>);

/// Children are spawned from one thread that lives as long as the process.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Tests
/// may spawn from tokio worker or blocking-pool threads, which come and go; a child forked from
/// one of those would be SIGKILLed when that thread is retired, in the middle of a test.
fn spawner() -> Option<&'static mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            let thread = std::thread::Builder::new()
                .name("harness-spawner".to_owned())
                .spawn(move || {
                    for (mut command, reply) in rx {
                        // The requester may have given up; nothing to do about that here.
                        let _ = reply.send(command.spawn());
                    }
                });
            match thread {
                Ok(_) => Some(tx),
                Err(e) => {
                    eprintln!("[harness] cannot start the spawner thread ({e}); spawning inline");
                    None
                }
            }
        })
        .as_ref()
}

fn spawn_child(mut command: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (prctl, getppid); it allocates nothing on success.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect; the signal would never come.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("test process exited during spawn"));
            }
            Ok(())
        });
    }
    match spawner() {
        Some(tx) => {
            let (reply_tx, reply_rx) = mpsc::sync_channel(1);
            tx.send((command, reply_tx))
                .map_err(|_| io::Error::other("harness spawner thread is gone"))?;
            reply_rx
                .recv()
                .map_err(|_| io::Error::other("harness spawner thread dropped the request"))?
        }
        None => command.spawn(),
    }
}

struct ProcState {
    child: Option<Child>,
    last_exit: Option<ExitStatus>,
    spawn_count: u32,
}

impl ProcState {
    /// Reaps the child if it has exited. While a child is not reaped its pid cannot be reused,
    /// which is what makes signalling `child.id()` safe.
    fn poll(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.last_exit = Some(status);
                self.child = None;
            }
        }
    }

    fn running_pid(&mut self) -> Option<u32> {
        self.poll();
        self.child.as_ref().map(Child::id)
    }
}

/// A child process started from a binary, with stdout and stderr appended to a log file.
///
/// Methods take `&self` so a `Proc` can be shared (e.g. in an `Arc`) between the test body and
/// a fault-injection task. Dropping it SIGKILLs the process and reaps it.
pub struct Proc {
    name: String,
    binary: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log_path: PathBuf,
    state: Mutex<ProcState>,
    /// The container this process is the `podman run` of, removed when it is killed.
    container: Option<String>,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("binary", &self.binary)
            .field("args", &self.args)
            .field("log_path", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl Proc {
    /// Starts `binary` with `args` and extra `envs` (the test's environment is inherited),
    /// appending its output to `log_path`. `name` labels log headers and error messages.
    pub fn spawn(
        name: &str,
        binary: impl AsRef<Path>,
        args: &[String],
        envs: &[(String, String)],
        log_path: impl AsRef<Path>,
    ) -> Result<Proc> {
        Proc::start(name, binary.as_ref(), args, envs, log_path.as_ref(), None)
    }

    /// Like [`Proc::spawn`], with `program` (its path inside the image) run in a container
    /// named `name` from `container`'s image, with its own `hostname` if given.
    pub fn spawn_in_container(
        name: &str,
        container: &crate::container::Container,
        hostname: Option<&str>,
        program: &str,
        args: &[String],
        envs: &[(String, String)],
        log_path: impl AsRef<Path>,
    ) -> Result<Proc> {
        let run = container.run_args(name, hostname, program, args, envs);
        Proc::spawn_podman(name, &run, log_path)
    }

    /// Runs `podman` with `run_args` (a `podman run` of the container `name`, made by the
    /// caller), removing that container when the process is killed or dropped.
    pub fn spawn_podman(
        name: &str,
        run_args: &[String],
        log_path: impl AsRef<Path>,
    ) -> Result<Proc> {
        Proc::start(
            name,
            Path::new("podman"),
            run_args,
            &[],
            log_path.as_ref(),
            Some(name.to_owned()),
        )
    }

    fn start(
        name: &str,
        binary: &Path,
        args: &[String],
        envs: &[(String, String)],
        log_path: &Path,
        container: Option<String>,
    ) -> Result<Proc> {
        let proc = Proc {
            name: name.to_owned(),
            binary: binary.to_path_buf(),
            args: args.to_vec(),
            envs: envs.to_vec(),
            log_path: log_path.to_path_buf(),
            state: Mutex::new(ProcState {
                child: None,
                last_exit: None,
                spawn_count: 0,
            }),
            container,
        };
        proc.spawn_locked(&mut lock(&proc.state))?;
        Ok(proc)
    }

    fn spawn_locked(&self, state: &mut ProcState) -> Result<()> {
        if let Some(parent) = self.log_path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("creating log directory {}", parent.display()))?;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening log file {}", self.log_path.display()))?;
        state.spawn_count += 1;
        // A header per start makes restarts visible when reading a log after a failure.
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        writeln!(
            log,
            "\n===== [harness] {} start #{} at unix {}.{:03}: {} {} =====",
            self.name,
            state.spawn_count,
            since_epoch.as_secs(),
            since_epoch.subsec_millis(),
            self.binary.display(),
            self.args.join(" ")
        )
        .with_context(|| format!("writing to {}", self.log_path.display()))?;
        let stderr: File = log
            .try_clone()
            .with_context(|| format!("duplicating handle of {}", self.log_path.display()))?;

        let mut command = Command::new(&self.binary);
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let child = spawn_child(command).with_context(|| {
            format!(
                "spawning {} ({} {})",
                self.name,
                self.binary.display(),
                self.args.join(" ")
            )
        })?;
        state.child = Some(child);
        state.last_exit = None;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The pid while the process runs (or is paused); `None` once it has exited.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.state).running_pid()
    }

    /// Whether the process has not exited yet (a paused process counts as running).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// How the last run ended, once it has ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut state = lock(&self.state);
        state.poll();
        state.last_exit
    }

    /// SIGKILL and reap: the crash-stop fault. A no-op if the process already exited.
    pub fn kill9(&self) -> Result<()> {
        let mut state = lock(&self.state);
        state.poll();
        if let Some(mut child) = state.child.take() {
            // kill() sends SIGKILL, which also ends a SIGSTOPped process.
            child
                .kill()
                .with_context(|| format!("sending SIGKILL to {}", self.name))?;
            let status = child
                .wait()
                .with_context(|| format!("reaping {} after SIGKILL", self.name))?;
            state.last_exit = Some(status);
        }
        if let Some(container) = &self.container {
            crate::container::remove(container);
        }
        Ok(())
    }

    /// Graceful stop: SIGTERM, then SIGKILL if still running after [`STOP_GRACE`].
    /// Returns how the process ended, or `None` if it was not running.
    pub fn stop(&self) -> Result<Option<ExitStatus>> {
        self.stop_with_grace(STOP_GRACE)
    }

    /// [`Proc::stop`] with an explicit grace period.
    pub fn stop_with_grace(&self, grace: Duration) -> Result<Option<ExitStatus>> {
        let mut state = lock(&self.state);
        let Some(pid) = state.running_pid() else {
            return Ok(None);
        };
        self.signal(pid, libc::SIGTERM)?;
        // A paused process would keep SIGTERM pending forever.
        self.signal(pid, libc::SIGCONT)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            state.poll();
            if state.child.is_none() {
                return Ok(state.last_exit);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(state);
        eprintln!(
            "[harness] {} ignored SIGTERM for {grace:?}; sending SIGKILL",
            self.name
        );
        self.kill9()?;
        Ok(self.exit_status())
    }

    /// SIGSTOP: the process stays alive (sockets open, pid taken) but makes no progress, like a
    /// node stuck in a long GC pause or a partitioned VM.
    ///
    /// Returns once the kernel reports the process stopped: signal delivery is asynchronous,
    /// and a test that pauses a node expects it to make no further progress from then on.
    pub fn pause(&self) -> Result<()> {
        let pid = self.require_running("pause")?;
        self.signal(pid, libc::SIGSTOP)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match sched_state(pid) {
                Some('T') | Some('t') | None => return Ok(()),
                Some(_) if Instant::now() >= deadline => {
                    bail!(
                        "{} (pid {pid}) did not stop within 5 s of SIGSTOP",
                        self.name
                    )
                }
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// SIGCONT: undoes [`Proc::pause`].
    pub fn resume(&self) -> Result<()> {
        let pid = self.require_running("resume")?;
        self.signal(pid, libc::SIGCONT)
    }

    /// Starts the same command line again, appending to the same log. The previous run must
    /// have ended (call [`Proc::kill9`] or [`Proc::stop`] first) so a test never ends up with
    /// two copies of a node by accident.
    pub fn restart(&self) -> Result<()> {
        let mut state = lock(&self.state);
        if let Some(pid) = state.running_pid() {
            bail!(
                "cannot restart {}: still running as pid {pid}; kill or stop it first",
                self.name
            );
        }
        self.spawn_locked(&mut state)
    }

    /// Waits for the process to exit on its own, e.g. a binary expected to refuse to start.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut state = lock(&self.state);
                state.poll();
                if state.child.is_none() {
                    return state.last_exit.ok_or_else(|| {
                        anyhow!(
                            "{} was never started or its exit was not recorded",
                            self.name
                        )
                    });
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running after {timeout:?}; last log lines:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Like [`wait_for_port`], but fails fast, with the log tail, if the process exits first:
    /// a node that crashed at startup should not cost the whole timeout.
    pub async fn wait_for_port(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                bail!(
                    "{} exited ({}) before listening on {addr}; last log lines:\n{}",
                    self.name,
                    self.exit_status()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "unknown status".to_owned()),
                    self.log_tail(30)
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen on {addr} within {timeout:?}; last log lines:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The last `n` lines of the log, for assertion messages. Never fails: a missing log is
    /// reported inline because this is typically called while a test is already failing.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }

    fn require_running(&self, action: &str) -> Result<u32> {
        let mut state = lock(&self.state);
        match state.running_pid() {
            Some(pid) => Ok(pid),
            None => bail!(
                "cannot {action} {}: it is not running (last exit: {:?})",
                self.name,
                state.last_exit
            ),
        }
    }

    /// Callers hold or have just checked the child is unreaped, so `pid` is still ours.
    fn signal(&self, pid: u32, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("sending signal {signal} to {} (pid {pid})", self.name));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(mut child) = state.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(container) = &self.container {
            crate::container::remove(container);
        }
    }
}

/// The scheduler state letter of a process (`T` = stopped by a signal), from /proc; `None`
/// if the process is gone.
fn sched_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is parenthesized and may contain spaces or ')'; the state follows it.
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.trim_start().chars().next()
}

/// The last `n` lines of a text file, or a note saying why it could not be read.
pub fn log_tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A per-test working directory for logs and node data.
///
/// Removed when dropped, except when the test is panicking (or [`TestDir::keep`] was called):
/// then it is left in place and its path printed, so the logs of a failed test can be read.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
    keep: bool,
}

impl TestDir {
    /// Creates `<tmp>/paxos-commit-test-<name>-XXXXXX`.
    pub fn new(name: &str) -> Result<TestDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("paxos-commit-test-{name}-"))
            .tempdir()
            .with_context(|| format!("creating a temporary directory for test {name}"))?;
        Ok(TestDir {
            path: dir.keep(),
            keep: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.path.join(relative)
    }

    /// Keeps the directory even if the test passes.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            eprintln!("[harness] test directory kept: {}", self.path.display());
        } else if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "[harness] could not remove test directory {}: {e}",
                self.path.display()
            );
        }
    }
}
