//! A real browser for tests of the operator page: Debian's Chromium, headless, driven by
//! Playwright (`integration/browser`) from a virtual environment cached under the target
//! directory. Nothing here skips: without Chromium (`apt-get install chromium`) or PyPI the
//! test fails and says why.

use crate::process::workspace_root;
use crate::python::venv;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn browser_dir() -> PathBuf {
    workspace_root().join("integration").join("browser")
}

/// Debian's Chromium: `$CHROMIUM`, else `chromium` on the PATH, else /usr/bin/chromium.
pub fn chromium() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file());
    match on_path.or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.is_file())) {
        Some(p) => Ok(p),
        None => bail!("no Chromium: install Debian's (apt-get install chromium) or set CHROMIUM"),
    }
}

/// Runs `script` (in `integration/browser`) with `args` under the browser environment's
/// Python and returns what it printed on stdout. Blocks: call it from `block_in_place`.
pub fn run(script: &str, args: &[String]) -> Result<String> {
    let dir = browser_dir();
    let venv = venv("browser-venv", &dir.join("requirements.txt"), &[])?;
    let python = venv.join("bin").join("python");
    let output = Command::new(&python)
        .arg(dir.join(script))
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {script}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("{script} failed ({}):\n{stdout}{stderr}", output.status);
    }
    if !stderr.trim().is_empty() {
        eprintln!("[{script}] {stderr}");
    }
    Ok(stdout)
}
