//! txctl, the operator's CLI, run as a separate process against a test deployment, with the
//! deployment's addresses and an operator certificate in its environment.

use crate::cluster::Cluster;
use crate::process::binary_path;
use anyhow::{Context, Result};
use paxos_commit_proto::tls::Role;
use serde_json::Value;
use std::process::Command;

pub struct Txctl {
    bin: std::path::PathBuf,
    env: Vec<(String, String)>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Txctl {
    pub fn new(c: &Cluster) -> Result<Txctl> {
        let agents: Vec<String> = c
            .agent_addrs
            .iter()
            .map(|(p, a)| format!("{p}={a}"))
            .collect();
        let mut env: Vec<(String, String)> = vec![
            ("PAXOS_COMMIT_REPLICAS".into(), c.replica_addrs.join(",")),
            ("PAXOS_COMMIT_AGENTS".into(), agents.join(",")),
            ("PAXOS_COMMIT_GROUP".into(), c.spec.group.clone()),
        ];
        if let Some(f) = c.tls_files(&Role::Operator("test".into()))? {
            env.extend([
                ("PAXOS_COMMIT_TLS_CA".into(), f.ca.display().to_string()),
                ("PAXOS_COMMIT_TLS_CERT".into(), f.cert.display().to_string()),
                ("PAXOS_COMMIT_TLS_KEY".into(), f.key.display().to_string()),
            ]);
        }
        Ok(Txctl {
            bin: binary_path("txctl")?,
            env,
        })
    }

    pub fn run(&self, args: &[&str]) -> Result<Run> {
        let out = Command::new(&self.bin)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .context("running txctl")?;
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!(
            "$ txctl {}\n{}{}[exit {}]",
            args.join(" "),
            run.stdout,
            run.stderr,
            run.code
        );
        Ok(run)
    }

    pub fn json(&self, args: &[&str]) -> Result<(i32, Value)> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let r = self.run(&all)?;
        let v = serde_json::from_str(&r.stdout)
            .with_context(|| format!("txctl {args:?} printed no JSON: {}", r.stdout))?;
        Ok((r.code, v))
    }
}
