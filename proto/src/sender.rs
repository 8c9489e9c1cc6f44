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
//! A stream ends when its peer goes away (killed, restarted, stopped), and the peer that
//! comes back is reached on a new one. The sender watches the call itself, so it notices the
//! end at once rather than when it next has something to send, and it keeps every batch it
//! handed to a stream until the stream takes it: a batch the failed stream never took cannot
//! have reached the peer, so it goes out again, first, on the next stream (for a few seconds
//! at most). Only what a stream took just before it broke can be lost. Without that, the
//! first message after a peer's restart (typically the leader's answer to the restarted
//! agent's first enlistment) went into the dead stream and was lost.
//!
//! The queue to each peer is bounded ([`QUEUE`] messages, and at most [`STREAM_BUFFER`]
//! batches handed to a stream): a peer that is down or slow must not make this process grow
//! without limit. A full queue drops the message, which Paxos tolerates like any other loss.

use crate::pb;
use crate::pb::acceptor_client::AcceptorClient;
use crate::pb::agent_client::AgentClient;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tonic::transport::Channel;

/// Most messages shipped in one batch.
const MAX_BATCH: usize = 4096;

/// Most messages queued for one peer.
pub const QUEUE: usize = 65_536;

/// Most batches handed to a stream and not taken by it yet.
const STREAM_BUFFER: usize = 64;

/// How long a batch no stream took is offered again on new streams. Past that, the peer has
/// been unreachable for a while and the protocol's own retries are the better judge of what
/// still matters.
const RESEND_FOR: Duration = Duration::from_secs(5);

/// The wait before opening a new stream after one ended, doubled while streams fail without
/// taking anything (the peer is down), up to the maximum: no spinning against a dead peer,
/// and a peer that comes back is reached within a quarter of a second.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The sending end of one peer's queue.
#[derive(Clone, Debug)]
pub struct Link {
    tx: mpsc::Sender<pb::PaxosMessage>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
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

type Call = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

/// The metadata in which a replica names its incarnation on every call to a peer's
/// `Acceptor` service (see `paxos_commit_core::admission`).
pub const INCARNATION_HEADER: &str = "paxos-commit-incarnation";

/// Starts a sender to a replica's `Acceptor.DeliverStream`, as incarnation `incarnation` of
/// the sending replica (`None` for an agent).
pub fn to_replica(client: AcceptorClient<Channel>, incarnation: Option<u64>) -> Link {
    spawn(move |batches| {
        let mut client = client.clone();
        let mut request = tonic::Request::new(batches);
        if let Some(incarnation) = incarnation {
            request
                .metadata_mut()
                .insert(INCARNATION_HEADER, incarnation.into());
        }
        Box::pin(async move { client.deliver_stream(request).await.map(|_| ()) })
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

/// A batch and when it was first handed to a stream.
struct Queued {
    batch: pb::PaxosBatch,
    since: Instant,
}

/// The batches handed to one stream, shared between the sender (which adds) and the stream
/// (which takes). What is still here when the stream ended never left this process.
struct Outbox {
    state: Mutex<OutboxState>,
    /// Woken when the stream took a batch: there is room for another.
    room: Notify,
}

struct OutboxState {
    queue: VecDeque<Queued>,
    /// The stream waiting for a batch.
    waker: Option<Waker>,
    /// No more batches: the stream ends once it has taken what is queued.
    closed: bool,
    /// The stream took at least one batch: the connection to the peer worked.
    took_any: bool,
}

impl Outbox {
    fn new(queue: VecDeque<Queued>) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState {
                queue,
                waker: None,
                closed: false,
                took_any: false,
            }),
            room: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        // A panic while holding this lock leaves the queue itself consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, batch: pb::PaxosBatch) {
        let waker = {
            let mut s = self.lock();
            s.queue.push_back(Queued {
                batch,
                since: Instant::now(),
            });
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Waits until the stream has room for another batch.
    async fn has_room(&self) {
        loop {
            let taken = self.room.notified();
            if self.lock().queue.len() < STREAM_BUFFER {
                return;
            }
            taken.await;
        }
    }

    /// Lets the stream end after what is queued (the sender is going away).
    fn close(&self) {
        let waker = {
            let mut s = self.lock();
            s.closed = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ends the stream now and takes back what it never took; with whether it took anything.
    fn take_back(&self) -> (VecDeque<Queued>, bool) {
        let mut s = self.lock();
        s.closed = true;
        s.waker = None;
        (std::mem::take(&mut s.queue), s.took_any)
    }
}

/// The request body of one stream: the batches of its [`Outbox`], in order.
struct Batches(Arc<Outbox>);

impl futures::Stream for Batches {
    type Item = pb::PaxosBatch;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<pb::PaxosBatch>> {
        let outbox = &self.0;
        let mut s = outbox.lock();
        if let Some(q) = s.queue.pop_front() {
            s.took_any = true;
            drop(s);
            outbox.room.notify_one();
            return Poll::Ready(Some(q.batch));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// `first` and whatever else is queued, up to [`MAX_BATCH`] messages.
fn batch(first: pb::PaxosMessage, rx: &mut mpsc::Receiver<pb::PaxosMessage>) -> pb::PaxosBatch {
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
    batch
}

async fn run(
    open: impl Fn(Batches) -> Call + Send + 'static,
    mut rx: mpsc::Receiver<pb::PaxosMessage>,
) {
    // Batches a stream that ended never took: they go first on the next one.
    let mut unsent: VecDeque<Queued> = VecDeque::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        if unsent.is_empty() {
            // Wait for traffic before opening a stream: an idle destination costs nothing.
            let Some(first) = rx.recv().await else { return };
            unsent.push_back(Queued {
                batch: batch(first, &mut rx),
                since: Instant::now(),
            });
        }
        let outbox = Outbox::new(std::mem::take(&mut unsent));
        let mut call = tokio::spawn(open(Batches(outbox.clone())));
        let ended = loop {
            tokio::select! {
                ended = &mut call => break ended,
                next = async {
                    outbox.has_room().await;
                    rx.recv().await
                } => match next {
                    Some(first) => outbox.push(batch(first, &mut rx)),
                    None => {
                        // Every Link is gone: the stream ends after what is queued.
                        outbox.close();
                        return;
                    }
                },
            }
        };
        let (left, took_any) = outbox.take_back();
        match ended {
            Ok(Ok(())) => tracing::debug!("message stream ended by the peer"),
            // The peer refuses this sender for good (a replaced incarnation, say): worth an
            // operator's eye, unlike a connection that merely dropped. The backoff bounds it.
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                tracing::warn!(
                    "a peer refuses this process's messages: {}",
                    status.message()
                )
            }
            Ok(Err(status)) => tracing::debug!("message stream closed: {}", status.message()),
            Err(e) => tracing::debug!("message stream task failed: {e}"),
        }
        let before = left.len();
        unsent = left
            .into_iter()
            .filter(|q| q.since.elapsed() < RESEND_FOR)
            .collect();
        if unsent.len() < before {
            tracing::debug!(
                batches = before - unsent.len(),
                "dropping batches no stream took within {RESEND_FOR:?}"
            );
        }
        backoff = if took_any {
            BACKOFF_MIN
        } else {
            (backoff * 2).min(BACKOFF_MAX)
        };
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn msg(n: u64) -> pb::PaxosMessage {
        pb::PaxosMessage {
            from_replica: n as u32,
            ..Default::default()
        }
    }

    /// A peer whose first `fail` streams break before taking anything, then takes batches.
    fn peer(
        fail: usize,
    ) -> (
        impl Fn(Batches) -> Call + Send + 'static,
        mpsc::UnboundedReceiver<u32>,
        Arc<AtomicUsize>,
    ) {
        let (got_tx, got) = mpsc::unbounded_channel();
        let opened = Arc::new(AtomicUsize::new(0));
        let count = opened.clone();
        let open = move |mut batches: Batches| -> Call {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let got_tx = got_tx.clone();
            Box::pin(async move {
                if n < fail {
                    tokio::task::yield_now().await;
                    return Err(tonic::Status::unavailable("connection refused"));
                }
                while let Some(b) = batches.next().await {
                    for m in b.messages {
                        let _ = got_tx.send(m.from_replica);
                    }
                }
                Ok(())
            })
        };
        (open, got, opened)
    }

    #[tokio::test]
    async fn what_a_failed_stream_never_took_goes_out_on_the_next_one() {
        let (open, mut got, opened) = peer(2);
        let link = spawn(open);
        link.send(msg(1));
        link.send(msg(2));
        for want in [1, 2] {
            let m = tokio::time::timeout(Duration::from_secs(5), got.recv()).await;
            assert_eq!(m.ok().flatten(), Some(want));
        }
        // Two streams failed before the third took the messages.
        assert_eq!(opened.load(Ordering::SeqCst), 3);
        link.send(msg(3));
        let m = tokio::time::timeout(Duration::from_secs(5), got.recv()).await;
        assert_eq!(m.ok().flatten(), Some(3));
        assert_eq!(
            opened.load(Ordering::SeqCst),
            3,
            "the live stream is reused"
        );
    }

    #[tokio::test]
    async fn a_stream_the_peer_ends_is_noticed_before_the_next_message() {
        let (got_tx, mut got) = mpsc::unbounded_channel();
        let opened = Arc::new(AtomicUsize::new(0));
        let count = opened.clone();
        // The first stream takes one batch, then the peer goes away.
        let open = move |mut batches: Batches| -> Call {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let got_tx = got_tx.clone();
            Box::pin(async move {
                while let Some(b) = batches.next().await {
                    for m in b.messages {
                        let _ = got_tx.send(m.from_replica);
                    }
                    if n == 0 {
                        return Err(tonic::Status::unavailable("peer restarted"));
                    }
                }
                Ok(())
            })
        };
        let link = spawn(open);
        link.send(msg(1));
        let m = tokio::time::timeout(Duration::from_secs(5), got.recv()).await;
        assert_eq!(m.ok().flatten(), Some(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Sent after the stream ended: not lost in the dead stream.
        link.send(msg(2));
        let m = tokio::time::timeout(Duration::from_secs(5), got.recv()).await;
        assert_eq!(m.ok().flatten(), Some(2));
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }
}
