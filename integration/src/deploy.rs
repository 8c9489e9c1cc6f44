//! Reads the deployment files under deploy/ (the Kubernetes manifests and the systemd units)
//! so that a test can run exactly what they say, instead of a hand-made copy of their
//! settings that would drift from them: a container's command, environment (with Secrets and
//! `$(VAR)` expanded as the kubelet does), volumes and user; a unit's ExecStart,
//! environment, credentials, state directory and user, with its specifiers expanded as
//! systemd does. Only the keys the project's files use are understood; an unknown one in a
//! place that changes how a process runs is an error rather than silently ignored.
//!
//! The processes then run with `podman run` ([`PodmanRun`]), from the project's image.

use crate::container;
use crate::process::Proc;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// Running a container
// ---------------------------------------------------------------------------------------

/// One `podman run` as a pod's container or a unit's process would be run: everything
/// beyond [`container::run_prefix`] (runtime, host network, lowered limits) comes from the
/// deployment file.
#[derive(Debug, Clone, Default)]
pub struct PodmanRun {
    /// The container's name (unique per test run).
    pub name: String,
    pub image: String,
    pub hostname: Option<String>,
    /// `uid[:gid]` or a user name of the image.
    pub user: Option<String>,
    /// Supplementary groups (a pod's fsGroup).
    pub groups: Vec<u32>,
    /// Replaces the image's entrypoint when set (a container's `command`, a unit's program).
    pub entrypoint: Option<Vec<String>>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// (directory on the host, path in the container, read-only).
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// (name, address) lines added to the container's /etc/hosts.
    pub hosts: Vec<(String, String)>,
    /// A read-only root file system (readOnlyRootFilesystem, ProtectSystem=strict).
    pub read_only: bool,
    /// No capabilities (capabilities.drop: ALL, an empty CapabilityBoundingSet=).
    pub drop_all_caps: bool,
    /// allowPrivilegeEscalation: false, NoNewPrivileges=yes.
    pub no_new_privileges: bool,
}

impl PodmanRun {
    /// The arguments of `podman`.
    pub fn args(&self) -> Result<Vec<String>> {
        let mut out = container::run_prefix(&self.name);
        let mut push = |a: &str, b: String| {
            out.push(a.to_string());
            // A flag and its value as one word: podman's boolean flags take no separate value.
            if let Some(last) = out.last_mut() {
                last.push('=');
                last.push_str(&b);
            }
        };
        if let Some(h) = &self.hostname {
            push("--hostname", h.clone());
        }
        if let Some(u) = &self.user {
            push("--user", u.clone());
        }
        for g in &self.groups {
            push("--group-add", g.to_string());
        }
        if let Some(entrypoint) = &self.entrypoint {
            // The JSON form keeps every word as it is (no shell splitting).
            push("--entrypoint", serde_json::to_string(entrypoint)?);
        }
        for (k, v) in &self.env {
            push("--env", format!("{k}={v}"));
        }
        for (host, inside, ro) in &self.mounts {
            let opts = if *ro { ":ro" } else { "" };
            push("--volume", format!("{}:{inside}{opts}", host.display()));
        }
        for (name, addr) in &self.hosts {
            push("--add-host", format!("{name}:{addr}"));
        }
        if self.read_only {
            push("--read-only", "true".into());
        }
        if self.drop_all_caps {
            push("--cap-drop", "ALL".into());
        }
        if self.no_new_privileges {
            push("--security-opt", "no-new-privileges".into());
        }
        out.push(self.image.clone());
        out.extend(self.args.iter().cloned());
        Ok(out)
    }

    /// Starts it, with its output in `log`; the container goes when the [`Proc`] does.
    pub fn spawn(&self, log: &Path) -> Result<Proc> {
        Proc::spawn_podman(&self.name, &self.args()?, log)
    }
}

/// Writes `files` (name → contents) into `dir`, each owned by `owner` (uid, gid) with
/// `mode`, and the directory readable by the same: how a Secret volume, a unit's
/// credentials or a host's /etc/paxos-commit are laid out for a test.
pub fn write_files(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    owner: (u32, u32),
    mode: u32,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, contents) in files {
        let path = dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        set_owner_mode(&path, owner, mode)?;
    }
    set_owner_mode(dir, owner, 0o755)
}

/// chown and chmod.
pub fn set_owner_mode(path: &Path, (uid, gid): (u32, u32), mode: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {uid}:{gid} {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

/// Every document of a multi-document YAML file.
pub fn yaml_documents(path: &Path) -> Result<Vec<serde_yaml::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).map_err(anyhow::Error::from))
        .collect::<Result<_>>()
        .with_context(|| format!("parsing {}", path.display()))
}

/// The object of `kind` named `name` in `path`.
pub fn k8s_object(path: &Path, kind: &str, name: &str) -> Result<serde_yaml::Value> {
    yaml_documents(path)?
        .into_iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .with_context(|| format!("no {kind} {name} in {}", path.display()))
}

/// The parts of a StatefulSet this harness runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatefulSet {
    pub metadata: Metadata,
    pub spec: StatefulSetSpec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatefulSetSpec {
    pub service_name: String,
    pub replicas: usize,
    pub template: PodTemplate,
    #[serde(default)]
    pub volume_claim_templates: Vec<ClaimTemplate>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClaimTemplate {
    pub metadata: Metadata,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodTemplate {
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub security_context: SecurityContext,
    /// Run to completion, in order, before the containers start (as the kubelet does).
    #[serde(default)]
    pub init_containers: Vec<ContainerSpec>,
    pub containers: Vec<ContainerSpec>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    pub termination_grace_period_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub run_as_non_root: Option<bool>,
    pub fs_group: Option<u32>,
    pub read_only_root_filesystem: Option<bool>,
    pub allow_privilege_escalation: Option<bool>,
    pub capabilities: Option<Capabilities>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub drop: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    pub security_context: SecurityContext,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<EnvSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvSource {
    pub secret_key_ref: Option<KeyRef>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KeyRef {
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub secret: Option<SecretVolume>,
    pub empty_dir: Option<serde_yaml::Value>,
    pub config_map: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretVolume {
    pub secret_name: String,
    /// As written: `0440` is octal to Kubernetes (YAML 1.1), a string to YAML 1.2 parsers.
    pub default_mode: Option<serde_yaml::Value>,
}

impl SecretVolume {
    /// The files' mode: 0644 when unset (Kubernetes' default); a leading 0 means octal.
    pub fn mode(&self) -> Result<u32> {
        match &self.default_mode {
            None => Ok(0o644),
            Some(serde_yaml::Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| format!("defaultMode {n}")),
            Some(serde_yaml::Value::String(s)) if s.starts_with('0') => {
                u32::from_str_radix(s, 8).with_context(|| format!("defaultMode {s}"))
            }
            Some(other) => bail!("defaultMode {other:?}"),
        }
    }
}

/// The StatefulSet `name` in `path`.
pub fn stateful_set(path: &Path, name: &str) -> Result<StatefulSet> {
    let doc = k8s_object(path, "StatefulSet", name)?;
    serde_yaml::from_value(doc).with_context(|| format!("StatefulSet {name}"))
}

/// Secrets by name, each key → bytes: what the test made instead of `kubectl create secret`.
pub type Secrets = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

impl PodSpec {
    /// A container or init container (their names are unique within a pod).
    pub fn container(&self, name: &str) -> Result<&ContainerSpec> {
        self.containers
            .iter()
            .chain(&self.init_containers)
            .find(|c| c.name == name)
            .with_context(|| format!("no container {name} in the pod"))
    }

    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// A container's environment as the kubelet gives it: `valueFrom.secretKeyRef` read from
/// `secrets`, and `$(NAME)` in a value replaced by the value of an earlier variable NAME of
/// the same container (left as written when there is none; `$$` is a literal `$`).
pub fn container_env(c: &ContainerSpec, secrets: &Secrets) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for var in &c.env {
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => expand_k8s(v, &out),
            (
                None,
                Some(EnvSource {
                    secret_key_ref: Some(r),
                }),
            ) => {
                let bytes = secrets
                    .get(&r.name)
                    .and_then(|s| s.get(&r.key))
                    .with_context(|| {
                        format!("{}: no key {} in Secret {}", var.name, r.key, r.name)
                    })?;
                String::from_utf8(bytes.clone())
                    .with_context(|| format!("Secret {}/{} is not text", r.name, r.key))?
            }
            (None, None) => String::new(),
            _ => bail!("env {}: a form this harness does not know", var.name),
        };
        out.push((var.name.clone(), value));
    }
    Ok(out)
}

/// Kubernetes' `$(VAR)` expansion against the variables defined before.
pub fn expand_k8s(value: &str, defined: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match defined.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Makes, under `dir`, what each of the container's `volumeMounts` would see, and returns
/// the mounts: a Secret volume as one file per key, owned by root and group fsGroup with the
/// volume's defaultMode (as the kubelet writes it); a claim of `claims` or an emptyDir as an
/// empty directory of group fsGroup, group-writable and setgid (the kubelet's fsGroup
/// change). A configMap volume is not supported (the agent and replica mount none).
pub fn pod_mounts(
    pod: &PodSpec,
    c: &ContainerSpec,
    claims: &[ClaimTemplate],
    secrets: &Secrets,
    dir: &Path,
) -> Result<Vec<(PathBuf, String, bool)>> {
    let fs_group = pod.security_context.fs_group.unwrap_or(0);
    let mut out = Vec::new();
    for m in &c.volume_mounts {
        let host = dir.join(&m.name);
        if let Some(v) = pod.volume(&m.name) {
            if let Some(s) = &v.secret {
                let files = secrets
                    .get(&s.secret_name)
                    .with_context(|| format!("no Secret {}", s.secret_name))?;
                write_files(&host, files, (0, fs_group), s.mode()?)?;
            } else if v.empty_dir.is_some() {
                std::fs::create_dir_all(&host)?;
                set_owner_mode(&host, (0, fs_group), 0o2777)?;
            } else {
                bail!(
                    "volume {}: only secret and emptyDir volumes are supported",
                    m.name
                );
            }
        } else if claims.iter().any(|t| t.metadata.name == m.name) {
            std::fs::create_dir_all(&host)?;
            set_owner_mode(&host, (0, fs_group), 0o2775)?;
        } else {
            bail!("volumeMount {}: no such volume or claim template", m.name);
        }
        out.push((host, m.mount_path.clone(), m.read_only));
    }
    Ok(out)
}

/// The container's user, supplementary group and restrictions, from its and its pod's
/// securityContext (the container's wins, as in Kubernetes).
pub fn apply_security(pod: &PodSpec, c: &ContainerSpec, run: &mut PodmanRun) -> Result<()> {
    let (p, s) = (&pod.security_context, &c.security_context);
    let uid = s.run_as_user.or(p.run_as_user);
    let gid = s.run_as_group.or(p.run_as_group);
    if s.run_as_non_root.or(p.run_as_non_root) == Some(true) {
        ensure!(
            uid.is_some_and(|u| u != 0),
            "{}: runAsNonRoot needs a non-root runAsUser",
            c.name
        );
    }
    run.user = match (uid, gid) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.to_string()),
        (None, _) => None,
    };
    run.groups.extend(p.fs_group);
    run.read_only = s.read_only_root_filesystem == Some(true);
    run.no_new_privileges = s.allow_privilege_escalation == Some(false);
    run.drop_all_caps = s
        .capabilities
        .as_ref()
        .is_some_and(|c| c.drop.iter().any(|d| d == "ALL"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

/// The [Service] section of a unit file, in order (a key may repeat).
#[derive(Debug, Clone)]
pub struct Unit {
    pub service: Vec<(String, String)>,
}

impl Unit {
    pub fn load(path: &Path) -> Result<Unit> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        Unit::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Unit> {
        let mut section = String::new();
        let mut service = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            ensure!(
                !line.ends_with('\\'),
                "continuation lines are not supported: {line}"
            );
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
            } else if section == "Service" {
                let (k, v) = line
                    .split_once('=')
                    .with_context(|| format!("no '=': {line}"))?;
                service.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ok(Unit { service })
    }

    /// Every value of `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The last value of `key` (a later assignment overrides an earlier one).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.all(key).last().copied()
    }

    /// Whether the boolean `key` is on.
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("yes" | "true" | "1" | "on"))
    }
}

/// What systemd's specifiers expand to for one instance of a unit.
#[derive(Debug, Clone)]
pub struct Specifiers {
    /// `%i`: the instance name (empty for a unit that is no template).
    pub instance: String,
    /// `%d`: the credentials directory.
    pub credentials: String,
}

impl Specifiers {
    /// Expands `%i`, `%d` and `%%`; any other specifier is an error, so that a unit that
    /// starts using one is noticed here.
    pub fn expand(&self, s: &str) -> Result<String> {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('i') => out.push_str(&self.instance),
                Some('d') => out.push_str(&self.credentials),
                Some('%') => out.push('%'),
                other => bail!(
                    "specifier %{} is not supported (in {s:?})",
                    other.unwrap_or(' ')
                ),
            }
        }
        Ok(out)
    }
}

/// Splits a value into words as systemd does: by white space, with "double" and 'single'
/// quoted words (a backslash escapes the next character).
pub fn split_words(s: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut word = String::new();
        let quote = (first == '"' || first == '\'').then_some(first);
        if quote.is_some() {
            chars.next();
        }
        loop {
            match chars.next() {
                None if quote.is_some() => bail!("unterminated quote in {s:?}"),
                None => break,
                Some(c) if Some(c) == quote => break,
                Some(c) if quote.is_none() && c.is_whitespace() => break,
                Some('\\') => word.push(chars.next().context("a trailing backslash")?),
                Some(c) => word.push(c),
            }
        }
        words.push(word);
    }
}

/// `Environment=` lines: each a list of (possibly quoted) `KEY=VALUE` words.
pub fn unit_environment(unit: &Unit, spec: &Specifiers) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for line in unit.all("Environment") {
        for word in split_words(line)? {
            let (k, v) = word
                .split_once('=')
                .with_context(|| format!("Environment: no '=' in {word:?}"))?;
            out.push((k.to_string(), spec.expand(v)?));
        }
    }
    Ok(out)
}

/// `EnvironmentFile=` entries: (path, optional) — a leading `-` makes a missing file fine.
pub fn environment_files(unit: &Unit, spec: &Specifiers) -> Result<Vec<(String, bool)>> {
    unit.all("EnvironmentFile")
        .into_iter()
        .map(|v| match v.strip_prefix('-') {
            Some(path) => Ok((spec.expand(path)?, true)),
            None => Ok((spec.expand(v)?, false)),
        })
        .collect()
}

/// The assignments of an environment file: `KEY=VALUE` lines, `#` and `;` comments, a value
/// optionally in double or single quotes.
pub fn parse_environment_file(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("environment file: no '=' in {line:?}"))?;
        let v = v.trim();
        let unquoted = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            &v[1..v.len() - 1]
        } else {
            v
        };
        out.push((k.trim().to_string(), unquoted.to_string()));
    }
    Ok(out)
}

/// `LoadCredential=ID:PATH` entries: (ID, PATH).
pub fn load_credentials(unit: &Unit, spec: &Specifiers) -> Result<Vec<(String, String)>> {
    unit.all("LoadCredential")
        .into_iter()
        .map(|v| {
            let (id, path) = v
                .split_once(':')
                .with_context(|| format!("LoadCredential: no ':' in {v:?}"))?;
            Ok((id.to_string(), spec.expand(path)?))
        })
        .collect()
}

/// ExecStart's program and arguments (its `-`, `@`, `+` prefixes are not supported).
pub fn exec_start(unit: &Unit, spec: &Specifiers) -> Result<Vec<String>> {
    let line = unit.get("ExecStart").context("no ExecStart")?;
    ensure!(
        line.starts_with('/'),
        "ExecStart prefixes are not supported: {line}"
    );
    split_words(line)?.iter().map(|w| spec.expand(w)).collect()
}

/// A time span of the kind TimeoutStopSec takes (`15s`, `15`, `1min`).
pub fn time_span(value: &str) -> Result<std::time::Duration> {
    let (n, unit) = value
        .find(|c: char| !c.is_ascii_digit())
        .map_or((value, ""), |at| value.split_at(at));
    let n: u64 = n.parse().with_context(|| format!("time span {value:?}"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "min" | "m" => n * 60,
        other => bail!("time unit {other:?} is not supported"),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_expansion() {
        let defined = vec![("P".to_string(), "s3cret".to_string())];
        assert_eq!(expand_k8s("a:$(P)@h", &defined), "a:s3cret@h");
        assert_eq!(expand_k8s("$(Q)", &defined), "$(Q)");
        assert_eq!(expand_k8s("$$(P) $x", &defined), "$(P) $x");
    }

    #[test]
    fn systemd_words_and_specifiers() -> Result<()> {
        let spec = Specifiers {
            instance: "bank_a".into(),
            credentials: "/run/credentials/x".into(),
        };
        assert_eq!(
            split_words(r#"A=1 "B=two words" 'C=x'"#)?,
            vec!["A=1", "B=two words", "C=x"]
        );
        assert_eq!(
            spec.expand("%d/tls-%i 100%%")?,
            "/run/credentials/x/tls-bank_a 100%"
        );
        assert!(spec.expand("%H").is_err());
        assert_eq!(
            parse_environment_file("# c\nK=\"v w\"\nL=x\n")?,
            vec![("K".into(), "v w".into()), ("L".into(), "x".into())]
        );
        assert_eq!(time_span("15s")?, std::time::Duration::from_secs(15));
        Ok(())
    }
}
