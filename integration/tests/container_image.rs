//! The container image runs a deployment: three replicas and two agents started from it
//! (`podman run`, as the image's unprivileged user) commit a transfer on real PostgreSQL,
//! and stop cleanly when asked. The replicas are configured as the StatefulSet in
//! deploy/kubernetes configures them: no id given, `PAXOS_COMMIT_ID_FROM_HOSTNAME` and a
//! host name `coordinator-<i>`, `{id}` in the certificate, key and data paths.
//!
//! The image is the one `.ci/image` builds (`PAXOS_COMMIT_IMAGE` names another); this test
//! fails, rather than passes silently, when it is not there.

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_integration::container::{self, IMAGE_UID};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

const A: &str = "bank_a";
const B: &str = "bank_b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_and_two_agents_from_the_image_commit_a_transfer() -> Result<()> {
    let image = container::image();
    ensure!(
        container::image_exists(&image)?,
        "the image {image} is not built: run .ci/image (as .ci/run does)"
    );
    let c = Cluster::start(Spec::new("image", 3, &[A, B]).with_image(&image)).await?;
    bank::create_accounts(&c, 4, 100).await?;

    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 2), 30).await?;
    ensure!(outcome == TransferOutcome::Committed, "{txid}: {outcome:?}");
    ensure!(bank::balance(&c, A, 1).await? == 70);
    ensure!(bank::balance(&c, B, 2).await? == 130);
    c.wait_no_prepared(Duration::from_secs(10)).await?;

    // Each replica took its id from its host name (coordinator-<i>) and found its data
    // directory through `{id}`, and ran as the image's user, not as root: its lock file,
    // which names the id it runs as, is that user's.
    for i in 0..3 {
        let lock = c.dir.join(format!("replica-{i}")).join("LOCK");
        let meta = std::fs::metadata(&lock).with_context(|| format!("{}", lock.display()))?;
        ensure!(
            meta.uid() == IMAGE_UID,
            "replica {i}'s LOCK belongs to uid {}",
            meta.uid()
        );
        let holder = std::fs::read_to_string(&lock)?;
        ensure!(
            holder.contains(&format!("coordinator replica {i} of group")),
            "replica-{i}/LOCK: {holder}"
        );
    }

    // SIGTERM reaches the server through podman, and it stops as it does outside.
    for replica in &c.replicas {
        let status = replica.stop()?.context("the replica had already exited")?;
        ensure!(status.success(), "{} stopped with {status}", replica.name());
    }
    Ok(())
}
