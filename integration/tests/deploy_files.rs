//! The deployment files run as written: a test reads deploy/kubernetes (the coordinator
//! StatefulSet and the agent sidecars of bank-a and bank-b) and deploy/systemd (the units and
//! the example TOML files), starts the replicas and agents from the container image exactly
//! as the kubelet or systemd would (same program, arguments, environment, files, user, host
//! name), and commits a transfer through them. container_image.rs shows the image works with
//! the harness's own command lines; this shows the files an operator copies work, and fails
//! when one of them drifts from what the servers accept.
//!
//! Neither Kubernetes nor systemd runs here, and pods cannot cheaply get a network namespace
//! each, so the test plays their part and makes a few substitutions, every one listed in
//! [`K8S_SUBSTITUTIONS`] and [`SYSTEMD_SUBSTITUTIONS`] (and printed when the test runs).
//!
//! The image is the one `.ci/image` builds (`PAXOS_COMMIT_IMAGE` names another); these tests
//! fail, rather than pass silently, when it or podman is not there.

use anyhow::{bail, ensure, Context, Result};
use paxos_commit_core::Outcome;
use paxos_commit_integration::certs::TestPki;
use paxos_commit_integration::container::{self, IMAGE_UID};
use paxos_commit_integration::deploy::{self, PodmanRun, Secrets, Specifiers, Unit};
use paxos_commit_integration::pg::{pg_bindir, PgCluster, SUPERUSER};
use paxos_commit_integration::process::{workspace_root, Proc, TestDir};
use paxos_commit_proto::client::{Client, ClientConfig};
use paxos_commit_proto::pki::Validity;
use paxos_commit_proto::tls::Role;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Both tests start five containers and two PostgreSQL servers on a 2-core CI machine; run
/// one at a time so that neither's start-up deadlines depend on the other's load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Kubernetes test's pod addresses: loopback addresses no other test uses (they all
/// listen on 127.0.0.1), so that every pod can bind the ports its manifest names.
const K8S_POD_IPS: &[(&str, &str)] = &[
    ("coordinator-0", "127.0.16.1"),
    ("coordinator-1", "127.0.16.2"),
    ("coordinator-2", "127.0.16.3"),
    ("bank-a-0", "127.0.16.11"),
    ("bank-b-0", "127.0.16.12"),
];

/// What the Kubernetes test changes in what the manifests say, and why. Nothing else.
const K8S_SUBSTITUTIONS: &[(&str, &str, &str)] = &[
    (
        "image paxos-commit:latest",
        "$PAXOS_COMMIT_IMAGE (localhost/paxos-commit:ci)",
        "the image .ci/image builds from this tree",
    ),
    (
        "0.0.0.0:<port> in every env value (listen addresses)",
        "<pod IP>:<port> (K8S_POD_IPS)",
        "pods share the host's network here; two cannot both bind 0.0.0.0:7400",
    ),
    (
        "<pod>.<service> DNS names (coordinator-0.coordinator, bank-a-0.bank-a, ...)",
        "podman --add-host <name>:<pod IP> in every container",
        "no cluster DNS",
    ),
    (
        "127.0.0.1:5432 in the agent's PAXOS_AGENT_DATABASE_URL",
        "127.0.0.1:<port of the test's PostgreSQL 15>",
        "the postgres sidecar is the harness's server (its -c args and init SQL applied)",
    ),
    (
        "certificates for the DNS names the pods are dialled by",
        "the same, plus the pod IP",
        "the test's client runs on the host, without cluster DNS, and dials pod IPs",
    ),
    (
        "a PersistentVolumeClaim / Secret volume",
        "a test directory (root:fsGroup, the Secret's keys as files with defaultMode)",
        "no kubelet",
    ),
];

/// The systemd test's hosts: each example address of the TOML files (10.0.0.<n> replicas,
/// 10.0.1.<n> agents) becomes a loopback address no other test uses.
const SYSTEMD_HOST_IPS: &[(&str, &str, &str)] = &[
    ("pxc-replica-0", "10.0.0.1", "127.0.17.1"),
    ("pxc-replica-1", "10.0.0.2", "127.0.17.2"),
    ("pxc-replica-2", "10.0.0.3", "127.0.17.3"),
    ("db-bank-a", "10.0.1.1", "127.0.17.11"),
    ("db-bank-b", "10.0.1.2", "127.0.17.12"),
];

/// What the systemd test changes in what the units and example files say, and why.
const SYSTEMD_SUBSTITUTIONS: &[(&str, &str, &str)] = &[
    (
        "the host (systemd, /usr/local/bin, /etc/paxos-commit, /var/lib/paxos-commit)",
        "a container of the image per host, test directories mounted at those paths",
        "no systemd here; the image has the unit's program at the unit's path",
    ),
    (
        "example addresses 10.0.0.<n> / 10.0.1.<n> in the TOML files",
        "127.0.17.<n> / 127.0.17.1<n> (SYSTEMD_HOST_IPS)",
        "the test's hosts are loopback addresses",
    ),
    (
        "listen = \"0.0.0.0:<port>\"",
        "this host's address:<port>",
        "the hosts share one network namespace",
    ),
    (
        "per-host fields of the examples (written for replica 0 and bank_a)",
        "id, replica-<i> / the instance name, this host's address, the database's port",
        "what an operator edits per host; every other field is the example's",
    ),
    (
        "DynamicUser=yes",
        "a fixed uid from systemd's dynamic range (61184 + n)",
        "no systemd to allocate one",
    ),
    (
        "LimitNOFILE=65536, the SystemCallFilter=/Protect*= sandboxing",
        "not applied (podman's own seccomp profile; limits lowered, not raised)",
        "a container here may not raise its limits; podman has no equivalent of most",
    ),
];

const GROUP_WAIT: Duration = Duration::from_secs(60);

fn require_image() -> Result<String> {
    let image = container::image();
    ensure!(
        container::image_exists(&image)?,
        "the image {image} is not built: run .ci/image (as .ci/run does)"
    );
    Ok(image)
}

fn print_table(title: &str, rows: &[(&str, &str, &str)]) {
    eprintln!("{title}:");
    for (from, to, why) in rows {
        eprintln!("  {from}\n    -> {to}\n    because {why}");
    }
}

/// The name the test's containers start with: unique per run, so that a leftover of a
/// killed run is never taken for one of this run's.
fn unique(dir: &TestDir) -> String {
    dir.path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn deploy_file(relative: &str) -> PathBuf {
    workspace_root().join("deploy").join(relative)
}

fn random_hex() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// Runs the first-start script of deploy/kubernetes/postgres-init.yaml on `pg`, as the
/// postgres image runs the scripts of /docker-entrypoint-initdb.d (bash, psql as the
/// superuser, the container's environment); over TCP here, where the image uses its socket.
fn postgres_init(pg: &PgCluster, env: &[(String, String)]) -> Result<()> {
    let map = deploy::k8s_object(
        &deploy_file("kubernetes/postgres-init.yaml"),
        "ConfigMap",
        "postgres-init",
    )?;
    let data = map["data"].as_mapping().context("postgres-init: no data")?;
    let path = std::env::var("PATH").unwrap_or_default();
    for (name, script) in data {
        let (name, script) = (
            name.as_str().context("a key")?,
            script.as_str().context("a script")?,
        );
        let out = std::process::Command::new("bash")
            .args(["-c", script])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("POSTGRES_USER", SUPERUSER)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port().to_string())
            .env("PATH", format!("{}:{path}", pg_bindir()?.display()))
            .output()
            .with_context(|| format!("running {name}"))?;
        ensure!(
            out.status.success(),
            "{name} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The example table's rows, a transfer of 30 from bank_a's account 1 to bank_b's, and the
/// checks: both balances moved, and no branch stays prepared.
async fn transfer_and_check(client: &Client, pgs: &BTreeMap<String, PgCluster>) -> Result<()> {
    for pg in pgs.values() {
        pg.connect()
            .await?
            .batch_execute("INSERT INTO accounts (id, balance) VALUES (1, 100)")
            .await
            .context("the example table (from postgres-init) is not there")?;
    }
    let txn = client.begin().await?;
    // Literals, so that the example table's numeric column needs no parameter conversion.
    txn.execute(
        "bank_a",
        "UPDATE accounts SET balance = balance - 30 WHERE id = 1",
        &[],
    )
    .await?;
    txn.execute(
        "bank_b",
        "UPDATE accounts SET balance = balance + 30 WHERE id = 1",
        &[],
    )
    .await?;
    let txid = txn.id().to_string();
    let decision = txn.commit().await?;
    ensure!(
        decision.outcome == Outcome::Committed,
        "{txid}: {decision:?}"
    );
    for (p, want) in [("bank_a", "70.00"), ("bank_b", "130.00")] {
        let pg = pgs.get(p).with_context(|| format!("no database {p}"))?;
        let row = pg
            .connect()
            .await?
            .query_one("SELECT balance::text FROM accounts WHERE id = 1", &[])
            .await?;
        let got: String = row.get(0);
        ensure!(got == want, "{p}: balance {got}, expected {want}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = Vec::new();
        for pg in pgs.values() {
            for row in pg
                .connect()
                .await?
                .query("SELECT gid FROM pg_prepared_xacts", &[])
                .await?
            {
                left.push(row.get::<_, String>(0));
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "still prepared: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The replica's LOCK file names the id it runs as, and belongs to the user it ran as.
fn check_lock(lock: &Path, id: usize, uid: u32) -> Result<()> {
    let meta = std::fs::metadata(lock).with_context(|| format!("{}", lock.display()))?;
    ensure!(
        meta.uid() == uid,
        "{} belongs to uid {}",
        lock.display(),
        meta.uid()
    );
    let holder = std::fs::read_to_string(lock)?;
    ensure!(
        holder.contains(&format!("coordinator replica {id} of group")),
        "{}: {holder}",
        lock.display()
    );
    Ok(())
}

async fn wait_listening(proc: &Proc, addr: &str) -> Result<()> {
    proc.wait_for_port(addr.parse()?, GROUP_WAIT).await
}

/// SIGTERM (what the kubelet and the unit's KillSignal send), then the exit status 0.
fn stop_cleanly(procs: &[Proc], grace: Duration) -> Result<()> {
    for p in procs {
        let status = p
            .stop_with_grace(grace)?
            .with_context(|| format!("{} had already exited:\n{}", p.name(), p.log_tail(20)))?;
        ensure!(
            status.success(),
            "{} stopped with {status}:\n{}",
            p.name(),
            p.log_tail(20)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

fn pod_ip(pod: &str) -> Result<&'static str> {
    K8S_POD_IPS
        .iter()
        .find(|(p, _)| *p == pod)
        .map(|(_, ip)| *ip)
        .with_context(|| format!("no test address for pod {pod}: add it to K8S_POD_IPS"))
}

/// The pods of a StatefulSet: (pod name, its DNS name through the governing Service).
fn pods(set: &deploy::StatefulSet) -> Vec<(String, String)> {
    (0..set.spec.replicas)
        .map(|i| {
            let pod = format!("{}-{i}", set.metadata.name);
            let dns = format!("{pod}.{}", set.spec.service_name);
            (pod, dns)
        })
        .collect()
}

/// The gRPC health service on `addr` answers SERVING (the kubelet's gRPC probe).
async fn wait_serving(addr: &str, who: &Proc) -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let deadline = Instant::now() + GROUP_WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
        {
            match HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
            {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                Ok(r) => last = format!("{:?}", r.get_ref().status),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "{} not SERVING on {addr} ({last}):\n{}",
        who.name(),
        who.log_tail(30)
    )
}

/// The probe port of a container's readinessProbe.grpc, as the manifest names it.
fn readiness_port(doc: &serde_yaml::Value, container: &str) -> Result<u64> {
    doc["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(container)))
        .and_then(|c| c["readinessProbe"]["grpc"]["port"].as_u64())
        .with_context(|| format!("{container}: no readinessProbe.grpc.port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_run_as_written_and_commit_a_transfer() -> Result<()> {
    let image = require_image()?;
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    print_table("substitutions made to deploy/kubernetes", K8S_SUBSTITUTIONS);
    let dir = TestDir::new("deploy-k8s")?;
    let unique = unique(&dir);

    let coord_file = deploy_file("kubernetes/coordinator-statefulset.yaml");
    let coord = deploy::stateful_set(&coord_file, "coordinator")?;
    let coord_doc = deploy::k8s_object(&coord_file, "StatefulSet", "coordinator")?;
    let banks: Vec<(PathBuf, deploy::StatefulSet, serde_yaml::Value)> = ["bank-a", "bank-b"]
        .iter()
        .map(|name| {
            let file = deploy_file(&format!("kubernetes/{name}.yaml"));
            Ok((
                file.clone(),
                deploy::stateful_set(&file, name)?,
                deploy::k8s_object(&file, "StatefulSet", name)?,
            ))
        })
        .collect::<Result<_>>()?;

    // Every pod's DNS name, resolvable in every container.
    let mut hosts = Vec::new();
    for set in std::iter::once(&coord).chain(banks.iter().map(|(_, s, _)| s)) {
        for (pod, dns) in pods(set) {
            hosts.push((dns, pod_ip(&pod)?.to_string()));
        }
    }
    let dns_of = |pod: &str| -> Result<String> {
        let ip = pod_ip(pod)?;
        hosts
            .iter()
            .find(|(_, a)| a == ip)
            .map(|(d, _)| d.clone())
            .context("a pod without a DNS name")
    };

    let coord_pod = &coord.spec.template.spec;
    let coordinator = coord_pod.container("coordinator")?;
    let group = coordinator
        .env
        .iter()
        .find(|e| e.name == "PAXOS_COMMIT_GROUP")
        .and_then(|e| e.value.clone())
        .context("the StatefulSet sets no PAXOS_COMMIT_GROUP")?;

    // The Secrets docs/DEPLOY.md has the operator make, made here with the project's PKI
    // code (`txctl certs issue`'s): coordinator-tls and agent-<bank>-tls, <bank>-postgres.
    let pki = TestPki::new(&dir.join("pki"), &group)?;
    let ca_pem = std::fs::read(dir.join("pki").join("ca.pem"))?;
    let issue = |role: &Role, hosts: Vec<String>| -> Result<(Vec<u8>, Vec<u8>)> {
        let issued = pki.ca.issue(&group, role, &hosts, Validity::days(2))?;
        Ok((issued.cert_pem.into_bytes(), issued.key_pem.into_bytes()))
    };
    let mut secrets = Secrets::new();
    let secret_of = |pod: &deploy::PodSpec, volume: &str| -> Result<String> {
        pod.volume(volume)
            .and_then(|v| v.secret.as_ref())
            .map(|s| s.secret_name.clone())
            .with_context(|| format!("no Secret volume {volume}"))
    };
    let coord_tls = secrets
        .entry(secret_of(coord_pod, "all-replica-certificates")?)
        .or_default();
    coord_tls.insert("ca.pem".into(), ca_pem.clone());
    for (i, (pod, dns)) in pods(&coord).into_iter().enumerate() {
        let (cert, key) = issue(
            &Role::Replica(u32::try_from(i)?),
            vec![dns, pod_ip(&pod)?.into()],
        )?;
        coord_tls.insert(format!("replica-{i}.pem"), cert);
        coord_tls.insert(format!("replica-{i}-key.pem"), key);
    }

    // The databases: the harness's PostgreSQL 15 in place of each postgres sidecar, with
    // the sidecar's `-c` settings and its first-start SQL.
    let mut pgs = BTreeMap::new();
    let mut bank_pods = Vec::new();
    for (_, set, _) in &banks {
        let pod = &set.spec.template.spec;
        let postgres = pod.container("postgres")?;
        for env in &postgres.env {
            if let Some(r) = env
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
            {
                secrets
                    .entry(r.name.clone())
                    .or_default()
                    .entry(r.key.clone())
                    .or_insert_with(|| random_hex().into_bytes());
            }
        }
        let pg_env = deploy::container_env(postgres, &secrets)?;
        let db = pg_env
            .iter()
            .find(|(k, _)| k == "POSTGRES_DB")
            .map(|(_, v)| v.clone())
            .context("the postgres container sets no POSTGRES_DB")?;
        let agent = pod.container("agent")?;
        let participant = agent
            .env
            .iter()
            .find(|e| e.name == "PAXOS_AGENT_PARTICIPANT")
            .and_then(|e| e.value.clone())
            .context("the agent sets no PAXOS_AGENT_PARTICIPANT")?;
        let pg = tokio::task::block_in_place(|| PgCluster::start(&db))?;
        for pair in postgres.args.chunks(2) {
            if let [flag, setting] = pair {
                ensure!(
                    flag == "-c",
                    "postgres argument {flag}: only -c is understood"
                );
                let (k, v) = setting.split_once('=').context("-c name=value")?;
                let now: String = pg
                    .connect()
                    .await?
                    .query_one(&format!("SHOW {k}"), &[])
                    .await?
                    .get(0);
                if now != v {
                    tokio::task::block_in_place(|| pg.set_and_restart(k, &format!("'{v}'")))?;
                }
            }
        }
        tokio::task::block_in_place(|| postgres_init(&pg, &pg_env))?;

        let (pod_name, dns) = pods(set)
            .into_iter()
            .next()
            .context("a bank StatefulSet with no pod")?;
        let (cert, key) = issue(
            &Role::Agent(participant.clone()),
            vec![dns_of(&pod_name)?, pod_ip(&pod_name)?.into()],
        )?;
        let agent_tls = secrets.entry(secret_of(pod, "tls")?).or_default();
        agent_tls.insert("ca.pem".into(), ca_pem.clone());
        agent_tls.insert(format!("agent-{participant}.pem"), cert);
        agent_tls.insert(format!("agent-{participant}-key.pem"), key);
        bank_pods.push((pod_name, dns, participant.clone(), set.clone()));
        pgs.insert(participant, pg);
    }

    // The pods' containers, each run as its manifest says.
    let pod_run = |pod_name: &str,
                   set: &deploy::StatefulSet,
                   container: &str,
                   db_port: Option<u16>|
     -> Result<PodmanRun> {
        let pod = &set.spec.template.spec;
        let c = pod.container(container)?;
        let ip = pod_ip(pod_name)?;
        let env = deploy::container_env(c, &secrets)?
            .into_iter()
            .map(|(k, v)| {
                let mut v = v.replace("0.0.0.0:", &format!("{ip}:"));
                if let Some(port) = db_port {
                    v = v.replace("127.0.0.1:5432", &format!("127.0.0.1:{port}"));
                }
                (k, v)
            })
            .collect();
        let mounts = deploy::pod_mounts(
            pod,
            c,
            &set.spec.volume_claim_templates,
            &secrets,
            &dir.join("pods").join(pod_name),
        )?;
        let mut run = PodmanRun {
            name: format!("{unique}-{pod_name}-{container}"),
            image: image.clone(),
            // A pod's host name is its name.
            hostname: Some(pod_name.to_string()),
            entrypoint: c.command.clone(),
            args: c.args.clone(),
            env,
            mounts,
            hosts: hosts.clone(),
            ..PodmanRun::default()
        };
        deploy::apply_security(pod, c, &mut run)?;
        Ok(run)
    };
    // A pod's init containers run first, one after the other, and must succeed.
    let init = |pod_name: &str, set: &deploy::StatefulSet| -> Result<()> {
        for c in &set.spec.template.spec.init_containers {
            let run = pod_run(pod_name, set, &c.name, None)?;
            let proc = run.spawn(&dir.join(format!("{pod_name}-{}.log", c.name)))?;
            let status = proc.wait_exit(Duration::from_secs(60))?;
            ensure!(
                status.success(),
                "init container {} of {pod_name}: {status}\n{}",
                c.name,
                proc.log_tail(20)
            );
        }
        Ok(())
    };
    let mut replicas = Vec::new();
    let mut replica_addrs = Vec::new();
    for (i, (pod_name, _)) in pods(&coord).into_iter().enumerate() {
        init(&pod_name, &coord)?;
        // The server's container holds its own key and no other replica's.
        let own: BTreeSet<String> =
            std::fs::read_dir(dir.join("pods").join(&pod_name).join("tls"))?
                .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_>>()?;
        let expected: BTreeSet<String> = [
            "ca.pem".to_string(),
            format!("replica-{i}.pem"),
            format!("replica-{i}-key.pem"),
        ]
        .into_iter()
        .collect();
        ensure!(
            own == expected,
            "{pod_name}'s coordinator container sees {own:?}"
        );
        let run = pod_run(&pod_name, &coord, "coordinator", None)?;
        replicas.push(run.spawn(&dir.join(format!("{pod_name}.log")))?);
        replica_addrs.push(format!("{}:7400", pod_ip(&pod_name)?));
    }
    let mut agents = Vec::new();
    let mut agent_addrs = BTreeMap::new();
    for (pod_name, _, participant, set) in &bank_pods {
        init(pod_name, set)?;
        let port = pgs.get(participant).map(PgCluster::port);
        let run = pod_run(pod_name, set, "agent", port)?;
        agents.push(run.spawn(&dir.join(format!("{pod_name}.log")))?);
        agent_addrs.insert(participant.clone(), format!("{}:7500", pod_ip(pod_name)?));
    }

    // Ready as the kubelet's probes see it: each readinessProbe's gRPC health port.
    let replica_probe = readiness_port(&coord_doc, "coordinator")?;
    for ((pod_name, _), proc) in pods(&coord).iter().zip(&replicas) {
        let ip = pod_ip(pod_name)?;
        wait_listening(proc, &format!("{ip}:7400")).await?;
        wait_serving(&format!("{ip}:{replica_probe}"), proc).await?;
    }
    for ((pod_name, ..), (proc, (_, _, doc))) in bank_pods.iter().zip(agents.iter().zip(&banks)) {
        let ip = pod_ip(pod_name)?;
        wait_listening(proc, &format!("{ip}:7500")).await?;
        wait_serving(&format!("{ip}:{}", readiness_port(doc, "agent")?), proc).await?;
    }

    let client = Client::new(&ClientConfig {
        replicas: replica_addrs,
        agents: agent_addrs,
        rpc_timeout: Some(Duration::from_secs(30)),
        tls: Some(pki.tls(&Role::Client("test".into()))?),
    })?;
    transfer_and_check(&client, &pgs).await?;

    // Each replica took its id from its host name: its LOCK (in the claim, under the
    // replica-{id} directory the manifest names) says which, and is the pod user's.
    let uid = coord_pod
        .security_context
        .run_as_user
        .context("the StatefulSet sets no runAsUser")?;
    for (i, (pod_name, _)) in pods(&coord).iter().enumerate() {
        let lock = dir
            .join("pods")
            .join(pod_name)
            .join("data")
            .join(format!("replica-{i}"))
            .join("LOCK");
        check_lock(&lock, i, uid)?;
    }

    let grace = |set: &deploy::StatefulSet| {
        Duration::from_secs(
            set.spec
                .template
                .spec
                .termination_grace_period_seconds
                .unwrap_or(30),
        )
    };
    stop_cleanly(&agents, grace(&banks[0].1))?;
    stop_cleanly(&replicas, grace(&coord))?;
    eprintln!("kubernetes manifests: ok in {:?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

/// Maps every example address in every string of `value` to the test's (SYSTEMD_HOST_IPS).
fn map_example_addresses(value: &mut toml::Value) {
    match value {
        toml::Value::String(s) => {
            for (_, example, test) in SYSTEMD_HOST_IPS {
                *s = s.replace(&format!("{example}:"), &format!("{test}:"));
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(map_example_addresses),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| map_example_addresses(v)),
        _ => {}
    }
}

/// Replaces `from` by `to` in the string field `key`, if the example has it.
fn edit(table: &mut toml::Table, key: &str, from: &str, to: &str) -> Result<()> {
    if let Some(v) = table.get_mut(key) {
        let s = v
            .as_str()
            .with_context(|| format!("{key} is not a string"))?;
        *v = toml::Value::String(s.replace(from, to));
    }
    Ok(())
}

fn example_ip(host: &str) -> Result<(&'static str, &'static str)> {
    SYSTEMD_HOST_IPS
        .iter()
        .find(|(h, ..)| *h == host)
        .map(|(_, example, test)| (*example, *test))
        .with_context(|| format!("no host {host} in SYSTEMD_HOST_IPS"))
}

/// The per-host rewrite of an example TOML file: only `fields` of this host change (the
/// example host's address becomes this one's, `0.0.0.0` this host's, and `from` → `to`, the
/// example's replica id or participant for this host's), then every example address becomes
/// a test address. Every other field stays as the example has it, so a field added there is
/// run here too.
fn per_host(
    example: &toml::Table,
    fields: &[&str],
    example_host: &str,
    host: &str,
    (from, to): (&str, &str),
) -> Result<toml::Table> {
    let mut t = example.clone();
    let (template_ip, _) = example_ip(example_host)?;
    let (own_ip, own_test_ip) = example_ip(host)?;
    for key in fields {
        edit(
            &mut t,
            key,
            &format!("{template_ip}:"),
            &format!("{own_ip}:"),
        )?;
        edit(&mut t, key, "0.0.0.0:", &format!("{own_test_ip}:"))?;
        edit(&mut t, key, from, to)?;
    }
    let mut v = toml::Value::Table(t);
    map_example_addresses(&mut v);
    match v {
        toml::Value::Table(t) => Ok(t),
        _ => bail!("not a table"),
    }
}

/// A path under /etc/paxos-commit, on the test's host directory mounted there.
fn in_etc(etc: &Path, path: &str) -> Result<PathBuf> {
    let rest = path
        .strip_prefix("/etc/paxos-commit/")
        .with_context(|| format!("{path} is not under /etc/paxos-commit"))?;
    Ok(etc.join(rest))
}

/// The environment systemd gives the unit's process: Environment=, then each
/// EnvironmentFile= (whose assignments win, as systemd documents), read from `etc`.
fn unit_env(unit: &Unit, spec: &Specifiers, etc: &Path) -> Result<Vec<(String, String)>> {
    let mut env = deploy::unit_environment(unit, spec)?;
    for (path, optional) in deploy::environment_files(unit, spec)? {
        let file = in_etc(etc, &path)?;
        if optional && !file.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&file).with_context(|| path.clone())?;
        for (k, v) in deploy::parse_environment_file(&text)? {
            env.retain(|(old, _)| *old != k);
            env.push((k, v));
        }
    }
    Ok(env)
}

/// The `podman run` of a unit on a host: `host` (its container's name, image, host name,
/// user and state or credentials mounts) plus ExecStart as its program and arguments, the
/// unit's environment, its sandboxing where podman has the same (ProtectSystem=strict: a
/// read-only root; NoNewPrivileges; an empty CapabilityBoundingSet), and `etc` mounted at
/// /etc/paxos-commit.
fn unit_run(unit: &Unit, spec: &Specifiers, etc: &Path, host: PodmanRun) -> Result<PodmanRun> {
    let mut exec = deploy::exec_start(unit, spec)?;
    ensure!(!exec.is_empty(), "an empty ExecStart");
    let args = exec.split_off(1);
    let mut run = host;
    run.mounts
        .push((etc.to_path_buf(), "/etc/paxos-commit".to_string(), true));
    run.entrypoint = Some(exec);
    run.args = args;
    run.env = unit_env(unit, spec, etc)?;
    run.read_only = unit.get("ProtectSystem") == Some("strict");
    run.no_new_privileges = unit.flag("NoNewPrivileges");
    run.drop_all_caps = unit.get("CapabilityBoundingSet") == Some("");
    Ok(run)
}

fn write_toml(path: &Path, table: &toml::Table) -> Result<()> {
    std::fs::write(path, toml::to_string(table)?).with_context(|| format!("{}", path.display()))?;
    deploy::set_owner_mode(path, (0, 0), 0o644)
}

fn string_field(t: &toml::Table, key: &str) -> Result<String> {
    t.get(key)
        .and_then(toml::Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("no string field {key}"))
}

/// The host part of `host:port`.
fn host_of(addr: &str) -> Result<String> {
    addr.rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .with_context(|| format!("{addr} is not host:port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_run_as_written_and_commit_a_transfer() -> Result<()> {
    let image = require_image()?;
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    print_table(
        "substitutions made to deploy/systemd",
        SYSTEMD_SUBSTITUTIONS,
    );
    let dir = TestDir::new("deploy-systemd")?;
    let unique = unique(&dir);

    let coord_unit = Unit::load(&deploy_file("systemd/paxos-commit-coordinator.service"))?;
    let agent_unit = Unit::load(&deploy_file("systemd/paxos-commit-agent@.service"))?;
    let read_toml = |name: &str| -> Result<toml::Table> {
        let path = deploy_file(&format!("systemd/{name}"));
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let coord_example = read_toml("coordinator.toml.example")?;
    let agent_example = read_toml("agent.toml.example")?;
    let group = string_field(&coord_example, "group")?;
    let template_id = coord_example
        .get("id")
        .and_then(toml::Value::as_integer)
        .context("the example has no id")?;
    let template_participant = string_field(&agent_example, "participant")?;
    let n_replicas = coord_example
        .get("replicas")
        .and_then(toml::Value::as_array)
        .map(Vec::len)
        .context("the example has no replicas")?;
    let participants: Vec<String> = coord_example
        .get("agents")
        .and_then(toml::Value::as_table)
        .context("the example has no [agents]")?
        .keys()
        .cloned()
        .collect();
    let replica_host = |i: usize| format!("pxc-replica-{i}");
    let agent_host = |p: &str| format!("db-{}", p.replace('_', "-"));
    let template_replica = replica_host(usize::try_from(template_id)?);
    let template_agent = agent_host(&template_participant);

    let pki = TestPki::new(&dir.join("pki"), &group)?;
    let ca_pem = std::fs::read(dir.join("pki").join("ca.pem"))?;

    // The coordinator unit's user: the static paxos-commit of paxos-commit.sysusers.conf,
    // which the image has as uid 10001 (Dockerfile).
    let user = coord_unit
        .get("User")
        .context("the coordinator unit has no User=")?;
    ensure!(
        user == "paxos-commit",
        "User={user}: the image has paxos-commit only"
    );
    let state = coord_unit
        .get("StateDirectory")
        .context("no StateDirectory=")?;
    let state_mode =
        u32::from_str_radix(coord_unit.get("StateDirectoryMode").unwrap_or("0755"), 8)?;
    let grace = deploy::time_span(coord_unit.get("TimeoutStopSec").unwrap_or("90s"))?;
    ensure!(
        coord_unit.get("KillSignal") == Some("SIGTERM"),
        "KillSignal is not SIGTERM"
    );

    let mut replicas = Vec::new();
    let mut replica_addrs = Vec::new();
    let mut agent_addrs = BTreeMap::new();
    let mut state_dirs = Vec::new();
    for i in 0..n_replicas {
        let host = replica_host(i);
        let mut conf = per_host(
            &coord_example,
            &[
                "tls_cert",
                "tls_key",
                "listen",
                "metrics_listen",
                "operator_listen",
            ],
            &template_replica,
            &host,
            (&format!("replica-{template_id}"), &format!("replica-{i}")),
        )?;
        conf.insert("id".into(), toml::Value::Integer(i64::try_from(i)?));
        let (_, ip) = example_ip(&host)?;
        let etc = dir.join(&host).join("etc");
        std::fs::create_dir_all(&etc)?;
        write_toml(&etc.join("coordinator.toml"), &conf)?;
        // The CA and this replica's certificate, issued for its address in `replicas`; the
        // key root:paxos-commit 0640, as the example says.
        let issued = pki.ca.issue(
            &group,
            &Role::Replica(u32::try_from(i)?),
            &[ip.to_string()],
            Validity::days(2),
        )?;
        for (key, contents, owner, mode) in [
            ("tls_ca", ca_pem.clone(), (0, 0), 0o644),
            ("tls_cert", issued.cert_pem.into_bytes(), (0, 0), 0o644),
            (
                "tls_key",
                issued.key_pem.into_bytes(),
                (0, IMAGE_UID),
                0o640,
            ),
        ] {
            let path = in_etc(&etc, &string_field(&conf, key)?)?;
            std::fs::write(&path, contents)?;
            deploy::set_owner_mode(&path, owner, mode)?;
        }
        // StateDirectory=: /var/lib/<name>, the unit's user's, StateDirectoryMode.
        let state_dir = dir.join(&host).join("state");
        std::fs::create_dir_all(&state_dir)?;
        deploy::set_owner_mode(&state_dir, (IMAGE_UID, IMAGE_UID), state_mode)?;
        let spec = Specifiers {
            instance: String::new(),
            credentials: String::new(),
        };
        let run = unit_run(
            &coord_unit,
            &spec,
            &etc,
            PodmanRun {
                name: format!("{unique}-{host}"),
                image: image.clone(),
                hostname: Some(host.clone()),
                user: Some(format!(
                    "{user}:{}",
                    coord_unit.get("Group").unwrap_or(user)
                )),
                mounts: vec![(state_dir.clone(), format!("/var/lib/{state}"), false)],
                ..PodmanRun::default()
            },
        )?;
        replicas.push(run.spawn(&dir.join(format!("{host}.log")))?);
        state_dirs.push(state_dir);
        if i == 0 {
            // Every replica's list is the same: the client's.
            for r in conf
                .get("replicas")
                .and_then(toml::Value::as_array)
                .context("replicas")?
            {
                replica_addrs.push(r.as_str().context("a replica address")?.to_string());
            }
            for (p, a) in conf
                .get("agents")
                .and_then(toml::Value::as_table)
                .context("[agents]")?
            {
                agent_addrs.insert(p.clone(), a.as_str().context("an agent")?.to_string());
            }
        }
    }

    // The databases, with the role postgres-init.yaml makes (the README's agent role).
    let names: Vec<&str> = participants.iter().map(String::as_str).collect();
    let started_pgs = tokio::task::block_in_place(|| PgCluster::start_all(&names))?;
    let pgs: BTreeMap<String, PgCluster> = participants.iter().cloned().zip(started_pgs).collect();

    let mut agents = Vec::new();
    for (n, p) in participants.iter().enumerate() {
        let host = agent_host(p);
        let pg = pgs.get(p).context("a database")?;
        let password = random_hex();
        tokio::task::block_in_place(|| {
            postgres_init(
                pg,
                &[
                    ("POSTGRES_DB".into(), p.clone()),
                    ("PXC_AGENT_PASSWORD".into(), password.clone()),
                ],
            )
        })?;
        let mut conf = per_host(
            &agent_example,
            &[
                "participant",
                "database_url",
                "tls_cert",
                "tls_key",
                "listen",
                "advertise",
                "metrics_listen",
            ],
            &template_agent,
            &host,
            (&template_participant, p),
        )?;
        edit(
            &mut conf,
            "database_url",
            "127.0.0.1:5432",
            &format!("127.0.0.1:{}", pg.port()),
        )?;
        let etc = dir.join(&host).join("etc");
        std::fs::create_dir_all(&etc)?;
        write_toml(&etc.join(format!("agent-{p}.toml")), &conf)?;
        // The password in the root-only environment file, as the example's comment says.
        let url = string_field(&conf, "database_url")?.replacen(
            "pxc_agent@",
            &format!("pxc_agent:{password}@"),
            1,
        );
        let env_file = etc.join(format!("agent-{p}.env"));
        std::fs::write(&env_file, format!("PAXOS_AGENT_DATABASE_URL={url}\n"))?;
        deploy::set_owner_mode(&env_file, (0, 0), 0o600)?;
        let advertise = string_field(&conf, "advertise")?;
        let issued = pki.ca.issue(
            &group,
            &Role::Agent(p.clone()),
            &[host_of(&advertise)?],
            Validity::days(2),
        )?;
        let ca_path = in_etc(&etc, &string_field(&conf, "tls_ca")?)?;
        std::fs::write(&ca_path, &ca_pem)?;
        deploy::set_owner_mode(&ca_path, (0, 0), 0o644)?;

        // DynamicUser=yes: a uid of systemd's dynamic range, the same for the credentials.
        ensure!(
            agent_unit.flag("DynamicUser"),
            "the agent unit is no DynamicUser"
        );
        let uid = 61184 + u32::try_from(n)?;
        let unit_name = format!("paxos-commit-agent@{p}.service");
        let spec = Specifiers {
            instance: p.clone(),
            credentials: format!("/run/credentials/{unit_name}"),
        };
        // The files LoadCredential= names, root-only on the host as the unit expects; then
        // systemd's copies, readable by the unit's user alone, in the directory %d names.
        let mut credentials = BTreeMap::new();
        for (id, path) in deploy::load_credentials(&agent_unit, &spec)? {
            let contents = match path.rsplit('/').next() {
                Some(f) if f == format!("agent-{p}.pem") => issued.cert_pem.clone().into_bytes(),
                Some(f) if f == format!("agent-{p}-key.pem") => issued.key_pem.clone().into_bytes(),
                _ => bail!("LoadCredential {id}:{path}: not a file this test makes"),
            };
            let on_host = in_etc(&etc, &path)?;
            std::fs::write(&on_host, &contents)?;
            deploy::set_owner_mode(&on_host, (0, 0), 0o600)?;
            credentials.insert(id, std::fs::read(&on_host)?);
        }
        let creds = dir.join(&host).join("credentials");
        deploy::write_files(&creds, &credentials, (uid, uid), 0o400)?;
        let run = unit_run(
            &agent_unit,
            &spec,
            &etc,
            PodmanRun {
                name: format!("{unique}-{host}"),
                image: image.clone(),
                hostname: Some(host.clone()),
                user: Some(format!("{uid}:{uid}")),
                mounts: vec![(creds, spec.credentials.clone(), true)],
                ..PodmanRun::default()
            },
        )?;
        agents.push(run.spawn(&dir.join(format!("{host}.log")))?);
    }

    for (proc, addr) in replicas.iter().zip(&replica_addrs) {
        wait_listening(proc, addr).await?;
    }
    for (proc, p) in agents.iter().zip(&participants) {
        wait_listening(proc, agent_addrs.get(p).context("an agent address")?).await?;
    }

    let client = Client::new(&ClientConfig {
        replicas: replica_addrs,
        agents: agent_addrs,
        rpc_timeout: Some(Duration::from_secs(30)),
        tls: Some(pki.tls(&Role::Client("test".into()))?),
    })?;
    transfer_and_check(&client, &pgs).await?;
    for (i, state_dir) in state_dirs.iter().enumerate() {
        check_lock(&state_dir.join("LOCK"), i, IMAGE_UID)?;
    }

    let agent_grace = deploy::time_span(agent_unit.get("TimeoutStopSec").unwrap_or("90s"))?;
    stop_cleanly(&agents, agent_grace)?;
    stop_cleanly(&replicas, grace)?;
    eprintln!("systemd units: ok in {:?}", started.elapsed());
    Ok(())
}
