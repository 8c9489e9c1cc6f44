//! The Python client (`proto/python`) for end-to-end tests: a virtual environment with its
//! pinned dependencies and generated stubs, and a way to run its scripts against a
//! [`Cluster`].
//!
//! The environment is made once and cached under the cargo target directory
//! (`target/python-venv/<hash>`), keyed by a hash of `requirements.txt`, the `.proto` and
//! `generate.py`, so that changing any of them makes a fresh one. Nothing here skips: a
//! machine without `python3 -m venv`, or without PyPI, fails the test and says why.

use crate::cluster::Cluster;
use crate::process::workspace_root;
use anyhow::{bail, Context, Result};
use paxos_commit_proto::tls::Role;
use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

/// Where the Python client lives: its package, generate.py, requirements.txt, tests.
pub fn python_dir() -> PathBuf {
    workspace_root().join("proto").join("python")
}

/// The virtual environment's interpreter, with requirements.txt installed and the stubs
/// generated into `proto/python/paxos_commit/_pb`. Made on first use; later calls in the same
/// process return the same path (or the same error).
pub fn interpreter() -> Result<PathBuf> {
    static READY: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);
    let mut ready = READY.lock().unwrap_or_else(|p| p.into_inner());
    if ready.is_none() {
        *ready = Some(prepare().map_err(|e| format!("{e:#}")));
    }
    match ready.as_ref() {
        Some(Ok(python)) => Ok(python.clone()),
        Some(Err(e)) => bail!("the Python client's environment: {e}"),
        None => unreachable!("set above"),
    }
}

fn prepare() -> Result<PathBuf> {
    let dir = python_dir();
    let venv = venv(
        "python-venv",
        &dir.join("requirements.txt"),
        &[
            dir.join("generate.py"),
            workspace_root().join("proto/proto/paxoscommit.proto"),
        ],
    )?;
    let python = venv.join("bin").join("python");
    // Stubs go into the source tree (gitignored), which may have been cleaned since the
    // environment was cached: generating takes a second, so it runs every time.
    check(
        Command::new(&python)
            .arg("generate.py")
            .current_dir(python_dir()),
        "python generate.py",
    )?;
    Ok(python)
}

/// `target/<kind>/<hash>`, made if missing: python3 -m venv, pip install -r `requirements`.
/// The hash covers the requirements and `inputs`, so that changing any of them makes a fresh
/// one. Built in a temporary directory and renamed into place, so that an interrupted build
/// is never taken for a finished one.
pub fn venv(kind: &str, requirements: &Path, inputs: &[PathBuf]) -> Result<PathBuf> {
    let mut hasher = DefaultHasher::new();
    for file in std::iter::once(requirements).chain(inputs.iter().map(PathBuf::as_path)) {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        hasher.write(&bytes);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let root = target.join(kind);
    let venv = root.join(format!("{:016x}", hasher.finish()));
    if venv.join("bin").join("python").is_file() {
        return Ok(venv);
    }
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let building = root.join(format!("building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    eprintln!(
        "[python] making {} (python3 -m venv, pip install -r {})",
        venv.display(),
        requirements.display()
    );
    check(
        Command::new("python3").arg("-m").arg("venv").arg(&building),
        "python3 -m venv (on Debian: apt-get install python3-venv)",
    )?;
    check(
        Command::new(building.join("bin").join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                "-r",
            ])
            .arg(requirements),
        &format!("pip install -r {}", requirements.display()),
    )?;
    // A venv's scripts name its own path, so it is renamed before anything records it;
    // another process that finished first wins, and this copy goes.
    if std::fs::rename(&building, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&building);
        if !venv.join("bin").join("python").is_file() {
            bail!("could not move {} into place", building.display());
        }
    }
    Ok(venv)
}

/// Runs a command to completion and fails with what it printed when it fails.
fn check(command: &mut Command, what: &str) -> Result<Output> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: could not start it"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// What the Python scripts read to reach `cluster` (the variables `Client.from_env` and
/// txctl read), as the client `client/<name>`.
pub fn client_env(cluster: &Cluster, name: &str) -> Result<Vec<(String, String)>> {
    let files = cluster
        .tls_files(&Role::Client(name.to_string()))?
        .context("the Python client needs a cluster with TLS")?;
    let agents = cluster
        .client_agent_addrs
        .iter()
        .map(|(p, a)| format!("{p}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok(vec![
        (
            "PAXOS_COMMIT_REPLICAS".into(),
            cluster.client_replica_addrs.join(","),
        ),
        ("PAXOS_COMMIT_AGENTS".into(), agents),
        ("PAXOS_COMMIT_TLS_CA".into(), path(&files.ca)),
        ("PAXOS_COMMIT_TLS_CERT".into(), path(&files.cert)),
        ("PAXOS_COMMIT_TLS_KEY".into(), path(&files.key)),
    ])
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `python <args>` in `proto/python` with `env`, echoes what it printed, and fails
/// when it exits non-zero. Blocks: call it from `tokio::task::block_in_place`.
pub fn run(args: &[&str], env: &[(String, String)]) -> Result<String> {
    let python = interpreter()?;
    let output = Command::new(&python)
        .args(args)
        .current_dir(python_dir())
        .env("PYTHONPATH", python_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", python.display(), args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("[python {}]\n{stdout}{stderr}", args.join(" "));
    if !output.status.success() {
        bail!(
            "python {} failed ({}):\n{stdout}{stderr}",
            args.join(" "),
            output.status
        );
    }
    Ok(stdout)
}
