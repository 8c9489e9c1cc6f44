//! Messages to one peer (a replica's acceptor or a participant agent) over one long-lived
//! gRPC stream.
//!
//! A unary call per message costs an HTTP/2 stream, headers and a reply each; on a busy
//! replica or agent that overhead, not the protocol, dominates. One sender task per
//! destination keeps a client stream open, ships whatever queued up as one batch, and
//! reopens the stream when it breaks. Delivery is best effort: Paxos tolerates loss, its
//! timers retry, and the one message that waits for an answer (an agent's enlistment) has a
//! deadline of its own.
//!
//! The queue to each peer is bounded ([`QUEUE`] messages): a peer that is down or slow must
//! not make this process grow without limit. A full queue drops the message, which Paxos
//! tolerates like any other loss.

use crate::pb;
use crate::pb::acceptor_client::AcceptorClient;
use crate::pb::agent_client::AgentClient;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Most messages shipped in one batch.
const MAX_BATCH: usize = 4096;

/// Most messages queued for one peer.
pub const QUEUE: usize = 65_536;

/// The sending end of one peer's queue.
#[derive(Clone, Debug)]
pub struct Link {
    tx: mpsc::Sender<pb::PaxosMessage>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Link {
    /// Queues a message; a full queue (the peer is down or far behind) drops it.
    pub fn send(&self, m: pb::PaxosMessage) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(m) {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "a peer's message queue is full ({QUEUE}): dropping messages to it"
                );
            }
        }
    }
}

type Batches = ReceiverStream<pb::PaxosBatch>;
type Call = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

/// Starts a sender to a replica's `Acceptor.DeliverStream`.
pub fn to_replica(client: AcceptorClient<Channel>) -> Link {
    spawn(move |batches| {
        let mut client = client.clone();
        Box::pin(async move { client.deliver_stream(batches).await.map(|_| ()) })
    })
}

/// Starts a sender to an agent's `Agent.DeliverStream`.
pub fn to_agent(client: AgentClient<Channel>) -> Link {
    spawn(move |batches| {
        let mut client = client.clone();
        Box::pin(async move { client.deliver_stream(batches).await.map(|_| ()) })
    })
}

fn spawn(open: impl Fn(Batches) -> Call + Send + 'static) -> Link {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(open, rx));
    Link {
        tx,
        dropped: Default::default(),
    }
}

async fn run(
    open: impl Fn(Batches) -> Call + Send + 'static,
    mut rx: mpsc::Receiver<pb::PaxosMessage>,
) {
    loop {
        // Wait for traffic before opening a stream: an idle destination costs nothing.
        let Some(first) = rx.recv().await else { return };
        let (stream_tx, stream_rx) = mpsc::channel::<pb::PaxosBatch>(64);
        let call = tokio::spawn(open(ReceiverStream::new(stream_rx)));
        let mut pending = Some(first);
        loop {
            let first = match pending.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let mut batch = pb::PaxosBatch {
                messages: Vec::with_capacity(1 + rx.len().min(MAX_BATCH)),
            };
            batch.messages.push(first);
            while batch.messages.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.messages.push(m),
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
            Ok(Ok(())) => {}
            Ok(Err(status)) => tracing::debug!("message stream closed: {}", status.message()),
            Err(e) => tracing::debug!("message stream task failed: {e}"),
        }
        // Do not spin against a peer that is down.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
