//! Runs the servers from the container image instead of the workspace's binaries, so that a
//! test can show the image itself works: the same command lines, inside `podman run`.
//!
//! The containers share the host's network (the tests listen on loopback ports), see the
//! test's directory at the same path (certificates, data directories, crash markers), and
//! run as the image's unprivileged user. podman runs with runc and cgroupfs, and lowers the
//! resource limits instead of raising them: the same as `.ci/image`, for the same reasons.

use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The unprivileged user the image runs as (Dockerfile).
pub const IMAGE_UID: u32 = 10001;

/// The image `.ci/image` builds, unless `PAXOS_COMMIT_IMAGE` names another.
pub fn image() -> String {
    std::env::var("PAXOS_COMMIT_IMAGE").unwrap_or_else(|_| "localhost/paxos-commit:ci".into())
}

/// Whether `image` is there to run (podman installed and the image built).
pub fn image_exists(image: &str) -> Result<bool> {
    let status = Command::new("podman")
        .args(["image", "exists", image])
        .status()
        .context("running podman (is it installed? .ci/run installs it)")?;
    Ok(status.success())
}

fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    command
}

/// How one server runs in a container.
#[derive(Debug, Clone)]
pub struct Container {
    pub image: String,
    /// Visible inside at the same path.
    pub shared_dir: PathBuf,
}

impl Container {
    /// The podman arguments that run `program` (a path inside the image) with `args` and
    /// `envs` as the container `name` (with its own `hostname`, if given), replacing a
    /// leftover of the same name.
    pub fn run_args(
        &self,
        name: &str,
        hostname: Option<&str>,
        program: &str,
        args: &[String],
        envs: &[(String, String)],
    ) -> Vec<String> {
        let mut out = run_prefix(name);
        out.extend(
            [
                "--volume",
                &format!("{0}:{0}", self.shared_dir.display()),
                "--entrypoint",
                program,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        if let Some(hostname) = hostname {
            out.push("--hostname".into());
            out.push(hostname.into());
        }
        for (k, v) in envs {
            out.push("--env".into());
            out.push(format!("{k}={v}"));
        }
        out.push(self.image.clone());
        out.extend(args.iter().cloned());
        out
    }

    /// Lets the image's user read the certificates and write where the servers write.
    pub fn share(&self, writable: &[PathBuf], readable: &Path) -> Result<()> {
        let open = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", p.display()))
        };
        open(&self.shared_dir, 0o755)?;
        for dir in writable {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::os::unix::fs::chown(dir, Some(IMAGE_UID), Some(IMAGE_UID))
                .with_context(|| format!("chown {}", dir.display()))?;
        }
        open(readable, 0o755)?;
        for entry in std::fs::read_dir(readable)? {
            let path = entry?.path();
            // Test certificates and keys only: made for this test, gone with its directory.
            open(&path, 0o644)?;
        }
        Ok(())
    }
}

/// The start of every `podman run` of the tests: runc and cgroupfs, the container `name`
/// (replacing a leftover of that name, removed when it exits), the host's network, and
/// resource limits lowered to the test's own (a container may not raise them here).
pub fn run_prefix(name: &str) -> Vec<String> {
    let nofile = soft_nofile();
    [
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
        "run",
        "--rm",
        "--replace",
        "--name",
        name,
        "--network",
        "host",
        "--ulimit",
        &format!("nofile={nofile}:{nofile}"),
        "--ulimit",
        "nproc=4096:4096",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Removes container `name` at once, whatever it is doing: the client process being killed
/// does not stop a container.
pub fn remove(name: &str) {
    let _ = podman()
        .args(["rm", "--force", "--time", "0", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

fn soft_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    }
}
