//! Throwaway PostgreSQL clusters for end-to-end tests.
//!
//! Paxos Commit is only as correct as its participants' durability, so the tests run against
//! real PostgreSQL servers rather than mocks: each test gets private clusters (own data
//! directory, own port) with two-phase commit enabled (`max_prepared_transactions` is 0 by
//! default, which disables `PREPARE TRANSACTION`) and with `fsync` on, and can crash and
//! restart them (`pg_ctl stop -m immediate`) to check that prepared transactions survive.
//!
//! PostgreSQL refuses to run as root, and CI containers often run as root, so in that case the
//! server tools run as the unprivileged `postgres` OS user (created if missing) through
//! `runuser`, in a directory owned by that user.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::process::{free_port, log_tail};

/// Environment variable that overrides where the server binaries (`initdb`, `pg_ctl`) are.
pub const BINDIR_ENV: &str = "PG_BINDIR";

/// The database superuser created by initdb, reachable without a password (trust auth).
pub const SUPERUSER: &str = "postgres";

/// The OS account the server runs as when the tests run as root.
const OS_USER: &str = "postgres";

const MAX_PREPARED_TRANSACTIONS: u32 = 100;
const MAX_CONNECTIONS: u32 = 200;

/// Every cluster directory is named `<tmp>/paxos-commit-pg-<name>-XXXXXX`; the prefix lets a
/// later run find clusters leaked by a test process that was killed before Drop could run.
const DIR_PREFIX: &str = "paxos-commit-pg-";
const OWNER_FILE: &str = "owner.pid";
const KEPT_FILE: &str = "kept";
const CONF_FILE: &str = "paxos_commit_test.conf";
/// Kept logs of failed tests and unowned directories are removed after this long.
const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Upper bound for `pg_ctl -w`; a healthy start or stop takes about a second.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// The directory holding `initdb` and `pg_ctl`: `$PG_BINDIR` if set, else `pg_config --bindir`
/// if it has `initdb` (pg_config may come from a client-only package), else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian and Ubuntu layout).
pub fn pg_bindir() -> Result<PathBuf> {
    static BINDIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINDIR
        .get_or_init(|| find_bindir().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_bindir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
        bail!("{BINDIR_ENV}={} does not contain initdb", dir.display());
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        if output.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            if dir.join("initdb").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            if !bin.join("initdb").is_file() {
                continue;
            }
            // "15" and "9.6" alike: compare numerically so that 10 sorts above 9.6.
            let version: Vec<u32> = entry
                .file_name()
                .to_string_lossy()
                .split('.')
                .map(|part| part.parse().unwrap_or(0))
                .collect();
            if best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    best.map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!(
            "no PostgreSQL server binaries found: set {BINDIR_ENV} to the directory holding \
             initdb, or install PostgreSQL >= 13 (Debian/Ubuntu: apt-get install postgresql)"
        )
    })
}

#[derive(Clone, Copy, Debug)]
struct OsUser {
    uid: u32,
    gid: u32,
}

/// `Some(user)` when running as root, i.e. when the server must run as someone else.
fn server_os_user() -> Result<Option<OsUser>> {
    static USER: OnceLock<Result<Option<OsUser>, String>> = OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        ensure_os_user().map(Some).map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn ensure_os_user() -> Result<OsUser> {
    if id_of(OS_USER, "-u").is_err() {
        let output = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--shell", "/usr/sbin/nologin", OS_USER])
            .output()
            .context("running useradd")?;
        // Another test process may have created it concurrently; only the outcome matters.
        if !output.status.success() && id_of(OS_USER, "-u").is_err() {
            bail!(
                "running as root, PostgreSQL needs an unprivileged OS user, but `useradd {OS_USER}` \
                 failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    Ok(OsUser {
        uid: id_of(OS_USER, "-u")?,
        gid: id_of(OS_USER, "-g")?,
    })
}

fn id_of(user: &str, flag: &str) -> Result<u32> {
    let output = Command::new("id")
        .args([flag, user])
        .output()
        .context("running id")?;
    if !output.status.success() {
        bail!("no OS user {user:?}");
    }
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .with_context(|| format!("parsing the output of `id {flag} {user}`"))
}

/// Where cluster directories go. As root, `/tmp` rather than `$TMPDIR`, because the server's
/// user must be able to traverse every parent directory.
fn base_dir(user: Option<OsUser>) -> PathBuf {
    if user.is_some() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    }
}

/// A command running a server tool, as the server's OS user if we are root.
fn pg_command(bindir: &Path, user: Option<OsUser>, cwd: &Path, program: &str) -> Command {
    let program = bindir.join(program);
    let mut command = match user {
        Some(_) => {
            let mut c = Command::new("runuser");
            c.args(["-u", OS_USER, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    // The cwd matters as root: the postgres user usually cannot enter the test's cwd, and the
    // tools complain. LC_ALL=C keeps messages in English and avoids missing-locale failures.
    command
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    command
}

fn run(mut command: Command, what: &str) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("{what}: could not run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {command:?}\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    Ok(output)
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}

/// Stops servers and removes directories left by test processes that died without running
/// Drop (Ctrl-C, SIGKILL, a timeout). Best effort; runs once per process.
fn reap_orphans(bindir: &Path, user: Option<OsUser>) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir(base_dir(user)) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let root = entry.path();
            let owner = fs::read_to_string(root.join(OWNER_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            match owner {
                Some(pid) if process_alive(pid) => continue,
                // No owner yet may mean another process is creating it right now.
                None if !older_than(&root, STALE_AFTER) => continue,
                _ => {}
            }
            let data = root.join("data");
            if data.join("postmaster.pid").exists() {
                let mut stop = pg_command(bindir, user, &root, "pg_ctl");
                stop.arg("-D").arg(&data).args([
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    PG_CTL_TIMEOUT_SECS,
                    "stop",
                ]);
                if run(stop, "stopping an orphaned cluster").is_ok() {
                    eprintln!(
                        "[harness] stopped orphaned PostgreSQL in {}",
                        root.display()
                    );
                }
            }
            if root.join(KEPT_FILE).exists() && !older_than(&root.join(KEPT_FILE), STALE_AFTER) {
                continue;
            }
            let _ = fs::remove_dir_all(&root);
        }
    });
}

/// A private PostgreSQL server with one database, stopped and deleted on drop.
///
/// Methods take `&self` so a cluster can be shared with a fault-injection task; start/stop
/// operations are serialized internally. The API is synchronous (it runs `pg_ctl`); calling it
/// from a multi-threaded tokio test is fine, it blocks one worker for about a second.
#[derive(Debug)]
pub struct PgCluster {
    name: String,
    port: u16,
    root: PathBuf,
    bindir: PathBuf,
    os_user: Option<OsUser>,
    running: AtomicBool,
    /// Serializes start/stop so concurrent callers never run two pg_ctl on one data dir.
    ops: Mutex<()>,
}

impl PgCluster {
    /// Creates, configures and starts a cluster on a free loopback port, with a database
    /// called `name` (letters, digits, `_` and `-`; `postgres` reuses the default database).
    pub fn start(name: &str) -> Result<PgCluster> {
        validate_name(name)?;
        let bindir = pg_bindir()?;
        let os_user = server_os_user()?;
        reap_orphans(&bindir, os_user);

        let base = base_dir(os_user);
        let root = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{name}-"))
            .tempdir_in(&base)
            .with_context(|| format!("creating a cluster directory in {}", base.display()))?
            .keep();
        // From here on Drop owns the cleanup, including when a later step fails.
        let mut cluster = PgCluster {
            name: name.to_owned(),
            port: 0,
            root,
            bindir,
            os_user,
            running: AtomicBool::new(false),
            ops: Mutex::new(()),
        };
        cluster
            .prepare_root()
            .and_then(|()| cluster.initdb())
            .and_then(|()| cluster.first_start())
            .and_then(|()| cluster.create_database())
            .with_context(|| format!("starting PostgreSQL cluster {name:?}"))?;
        Ok(cluster)
    }

    /// Starts several clusters in parallel (each start is mostly waiting on initdb/pg_ctl).
    pub fn start_all(names: &[&str]) -> Result<Vec<PgCluster>> {
        let results: Vec<Result<PgCluster>> = std::thread::scope(|scope| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| scope.spawn(move || PgCluster::start(name)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("cluster start thread panicked")))
                })
                .collect()
        });
        // On any failure the clusters that did start are dropped, hence stopped and removed.
        results.into_iter().collect()
    }

    fn prepare_root(&self) -> Result<()> {
        fs::write(self.root.join(OWNER_FILE), std::process::id().to_string())
            .context("writing the owner file")?;
        if let Some(user) = self.os_user {
            std::os::unix::fs::chown(&self.root, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {} to {OS_USER}", self.root.display()))?;
            // Private to the server's user, like any data directory parent should be.
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod {}", self.root.display()))?;
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        pg_command(&self.bindir, self.os_user, &self.root, program)
    }

    fn initdb(&self) -> Result<()> {
        let mut initdb = self.command("initdb");
        // --no-sync only skips initdb's final flush of the fresh cluster; the server itself
        // runs with fsync=on, which is what the durability tests rely on.
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run(initdb, "initdb")?;
        let conf = self.data_dir().join("postgresql.conf");
        let mut text =
            fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
        // Our settings live in their own file so the port can be rewritten on a retry; the
        // include comes last so it overrides initdb's defaults.
        text.push_str(&format!("\ninclude '{CONF_FILE}'\n"));
        fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        Ok(())
    }

    fn write_settings(&self) -> Result<()> {
        let settings = format!(
            "# Written by the paxos-commit test harness.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{socket_dir}'\n\
             max_prepared_transactions = {MAX_PREPARED_TRANSACTIONS}\n\
             max_connections = {MAX_CONNECTIONS}\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n\
             shared_buffers = 32MB\n\
             lc_messages = 'C'\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            port = self.port,
            socket_dir = self.root.display(),
        );
        let path = self.data_dir().join(CONF_FILE);
        fs::write(&path, settings).with_context(|| format!("writing {}", path.display()))?;
        if let Some(user) = self.os_user {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }

    /// The port is only known to be free when the server binds it; another process can grab
    /// it between [`free_port`] and then, so a bind failure is retried on a new port.
    fn first_start(&mut self) -> Result<()> {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            self.port = free_port()?;
            self.write_settings()?;
            let log_len = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e)
                    if attempt < ATTEMPTS && self.log_since(log_len).contains("could not bind") =>
                {
                    eprintln!(
                        "[harness] cluster {}: port {} was taken, retrying ({e:#})",
                        self.name, self.port
                    );
                }
                Err(e) => return Err(e),
            }
        }
        bail!("could not find a port the server could bind")
    }

    fn log_since(&self, offset: u64) -> String {
        let bytes = fs::read(self.log_path()).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let mut start = self.command("pg_ctl");
        start
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]);
        run(start, "pg_ctl start").map_err(|e| {
            anyhow!(
                "{e:#}\nlast server log lines ({}):\n{}",
                self.log_path().display(),
                self.log_tail(30)
            )
        })?;
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<()> {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D").arg(self.data_dir()).args([
            "-m",
            mode,
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "stop",
        ]);
        run(stop, &format!("pg_ctl stop -m {mode}"))?;
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn create_database(&self) -> Result<()> {
        if self.name == "postgres" {
            return Ok(());
        }
        // Over TCP with trust auth, so no need to switch user.
        let mut createdb = Command::new(self.bindir.join("createdb"));
        createdb
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg(&self.name)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        run(createdb, "createdb")?;
        Ok(())
    }

    fn ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn url(&self) -> String {
        self.url_for_db(&self.name)
    }

    /// The URL of another database on the same server.
    pub fn url_for_db(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The name given at start, which is also the database name.
    pub fn db_name(&self) -> &str {
        &self.name
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The server log (the `pg_ctl -l` file), appended to across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// The last `n` lines of the server log, for assertion messages.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path(), n)
    }

    /// Whether the harness last left the server running.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Crash-stops the server (`pg_ctl stop -m immediate`): no checkpoint, all backends killed,
    /// so the next start runs crash recovery from the WAL. A no-op if already stopped.
    pub fn stop_immediate(&self) -> Result<()> {
        let _ops = self.ops();
        if !self.is_running() {
            return Ok(());
        }
        self.pg_ctl_stop("immediate")
            .with_context(|| format!("crash-stopping cluster {}", self.name))
    }

    /// Clean shutdown (`pg_ctl stop -m fast`). A no-op if already stopped.
    pub fn stop_fast(&self) -> Result<()> {
        let _ops = self.ops();
        if !self.is_running() {
            return Ok(());
        }
        self.pg_ctl_stop("fast")
            .with_context(|| format!("stopping cluster {}", self.name))
    }

    /// Starts the stopped server again on the same data directory and port, so URLs held by
    /// the system under test stay valid.
    pub fn start_again(&self) -> Result<()> {
        let _ops = self.ops();
        if self.is_running() {
            bail!("cluster {} is already running", self.name);
        }
        self.pg_ctl_start()
            .with_context(|| format!("restarting cluster {} on port {}", self.name, self.port))
    }

    /// Sets a server setting that takes a restart (max_prepared_transactions, say), kept
    /// across later restarts, and restarts the server cleanly.
    pub fn set_and_restart(&self, name: &str, value: &str) -> Result<()> {
        let path = self.data_dir().join(CONF_FILE);
        let mut text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        text.push_str(&format!("{name} = {value}\n"));
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        self.stop_fast()?;
        self.start_again()
    }

    /// Crash and recover: [`PgCluster::stop_immediate`] then [`PgCluster::start_again`].
    pub fn restart(&self) -> Result<()> {
        self.stop_immediate()?;
        self.start_again()
    }

    /// Turns TLS on (server certificate and key in PEM) and reloads the configuration; kept
    /// across restarts. Plaintext connections stay allowed: the client decides.
    pub async fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.data_dir();
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = dir.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            // PostgreSQL refuses a key that others may read.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            if let Some(user) = self.os_user {
                std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                    .with_context(|| format!("chown {}", path.display()))?;
            }
        }
        let conf = dir.join("postgresql.conf");
        let mut text =
            fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        self.connect()
            .await?
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .context("reloading the configuration")?;
        Ok(())
    }

    /// A client for the cluster's database; the connection runs on a spawned tokio task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        connect_url(&self.url())
            .await
            .with_context(|| format!("connecting to cluster {}", self.name))
    }
}

/// Connects to `url` and drives the connection on a spawned task, logging how it ended.
pub async fn connect_url(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let url = url.to_owned();
    tokio::spawn(async move {
        // Errors are expected when a test crash-stops the server, hence debug level.
        if let Err(e) = connection.await {
            tracing::debug!(%url, error = %e, "postgres connection ended with an error");
        }
    });
    Ok(client)
}

fn validate_name(name: &str) -> Result<()> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    // The name ends up in a URL, a directory name and a 63-byte database name unquoted.
    if name.is_empty() || name.len() > 40 || !valid_chars {
        bail!("invalid cluster name {name:?}: use 1-40 ASCII letters, digits, '_' or '-'");
    }
    Ok(())
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ops = self.ops();
        if self.is_running() {
            if let Err(e) = self.pg_ctl_stop("immediate") {
                eprintln!(
                    "[harness] cluster {}: {e:#}; killing the postmaster",
                    self.name
                );
                kill_postmaster(&self.data_dir());
            }
        }
        if std::thread::panicking() {
            // The log explains most failures; the data directory would be tens of MB per
            // cluster per failed run.
            let _ = fs::remove_dir_all(self.data_dir());
            let _ = fs::write(self.root.join(KEPT_FILE), "");
            eprintln!(
                "[harness] test panicked; log of cluster {} kept at {}",
                self.name,
                self.log_path().display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.root) {
            eprintln!(
                "[harness] could not remove cluster directory {}: {e}",
                self.root.display()
            );
        }
    }
}

/// Last resort when pg_ctl cannot stop the server: SIGKILL the postmaster named in
/// postmaster.pid. Its backends notice the postmaster is gone and exit by themselves.
fn kill_postmaster(data_dir: &Path) {
    let pid = fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|text| {
            text.lines()
                .next()
                .and_then(|l| l.trim().parse::<i32>().ok())
        });
    if let Some(pid) = pid.filter(|&p| p > 0) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
