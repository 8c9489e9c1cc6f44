//! Paxos messages to one replica over one long-lived gRPC stream.
//!
//! A unary call per message costs an HTTP/2 stream, headers and a reply each; on a busy
//! replica that overhead, not the protocol, dominates. One sender task per destination keeps
//! a client stream open, ships whatever queued up as one batch, and reopens the stream when
//! it breaks. Delivery is best effort: Paxos tolerates loss, and its timers retry.

use crate::convert::msg_to_pb;
use crate::pb;
use crate::pb::acceptor_client::AcceptorClient;
use paxos_commit_core::{Msg, ReplicaId};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Most messages shipped in one batch.
const MAX_BATCH: usize = 4096;

/// Starts the sender task; messages sent into the returned channel go to `client`, marked as
/// coming from `from` (a replica index; agents use 0, which acceptors ignore for phase 2a).
pub fn spawn(from: ReplicaId, client: AcceptorClient<Channel>) -> mpsc::UnboundedSender<Msg> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(from, client, rx));
    tx
}

async fn run(
    from: ReplicaId,
    client: AcceptorClient<Channel>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    loop {
        // Wait for traffic before opening a stream: an idle destination costs nothing.
        let Some(first) = rx.recv().await else { return };
        let (stream_tx, stream_rx) = mpsc::channel::<pb::PaxosBatch>(64);
        let mut call_client = client.clone();
        let call = tokio::spawn(async move {
            call_client
                .deliver_stream(tokio_stream::wrappers::ReceiverStream::new(stream_rx))
                .await
        });
        let mut pending = Some(first);
        loop {
            let first = match pending.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let mut batch = pb::PaxosBatch::default();
            batch.messages.extend(msg_to_pb(from, &first));
            while batch.messages.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.messages.extend(msg_to_pb(from, &m)),
                    Err(_) => break,
                }
            }
            if stream_tx.send(batch).await.is_err() {
                // The stream ended (peer down or restarted): this batch is lost; reopen.
                break;
            }
            if call.is_finished() {
                break;
            }
        }
        drop(stream_tx);
        match call.await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => tracing::debug!("paxos stream closed: {}", status.message()),
            Err(e) => tracing::debug!("paxos stream task failed: {e}"),
        }
        // Do not spin against a peer that is down.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
