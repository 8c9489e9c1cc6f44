//! A loopback TCP fault proxy, so that tests can cut, delay and "lose" the traffic of each
//! directed link between two components (client → replica, agent → replica, replica → agent,
//! replica → replica) while the components themselves stay unmodified processes.
//!
//! Every component is given proxy addresses instead of its peers' real ones (see
//! [`crate::cluster::Spec::with_proxies`]). A proxy listens on `127.0.0.1:0`, forwards each
//! accepted connection to one target, and attributes the connection to a [`Link`]
//! `(from, to)`. The link's [`LinkFault`] can be changed at any time and applies at once to new
//! and already open connections:
//!
//! * **cut, reset mode** — new connections are accepted and reset at once, open ones are reset
//!   (RST, via `SO_LINGER` 0): what a peer sees when a host is down or a firewall rejects.
//! * **cut, blackhole mode** — new connections are accepted but never forwarded, open ones stop
//!   forwarding (the data waits, and flows again when the cut heals, like TCP retransmitting
//!   through a partition that ends): what a peer sees when packets are silently dropped.
//!   Only timeouts notice it.
//! * **delay** — every chunk is delivered `delay` (+ up to `jitter`) after it was read, in
//!   order, without limiting throughput (a delay line, not a stop-and-wait).
//! * **loss** — a TCP stream cannot drop bytes without corrupting the HTTP/2 framing gRPC runs
//!   on, and a real network's packet loss only shows up above TCP as latency or, at worst, as a
//!   broken connection. So "loss `p`" here means: each chunk forwarded, and each new
//!   connection, kills its connection (reset both ways) with probability `p`. What was in
//!   flight on it is lost, exactly as a gRPC client sees a lost connection.
//!
//! Cuts are counted (`resets`, `blackholes`) rather than boolean so that two faults that cut
//! overlapping sets of links heal independently.
//!
//! A replica reaches an agent at the one address the agent advertises (it travels in the
//! transaction's participant set), so one proxy sits in front of each agent for all replicas;
//! it tells the replicas apart by looking up which process owns the connecting socket
//! (`/proc/net/tcp` → inode → `/proc/<pid>/fd`, matched by a command-line argument), which
//! gives per-replica links there too.

use crate::process::free_port;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

/// A component at one end of a link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    /// The test's client library (every client task shares it).
    Client,
    Replica(usize),
    /// An agent, by participant id.
    Agent(String),
    /// A connection the proxy could not attribute (e.g. from a process that just died); its
    /// links are never faulted.
    Other,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Client => write!(f, "client"),
            Node::Replica(i) => write!(f, "replica-{i}"),
            Node::Agent(p) => write!(f, "agent-{p}"),
            Node::Other => write!(f, "other"),
        }
    }
}

/// How a cut link treats traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Reset connections (peers get an immediate error).
    Reset,
    /// Hold traffic silently (peers wait for their timeouts).
    Blackhole,
}

impl fmt::Display for CutMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CutMode::Reset => write!(f, "reset"),
            CutMode::Blackhole => write!(f, "blackhole"),
        }
    }
}

/// The faults active on one directed link.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkFault {
    /// Active reset-mode cuts.
    pub resets: u32,
    /// Active blackhole-mode cuts.
    pub blackholes: u32,
    /// Added one-way latency per chunk.
    pub delay: Duration,
    /// Up to this much more latency, uniformly (never reordering).
    pub jitter: Duration,
    /// Probability that a chunk or a new connection kills its connection.
    pub loss: f64,
}

impl LinkFault {
    /// The effective cut: a reset wins over a blackhole.
    pub fn cut(&self) -> Option<CutMode> {
        if self.resets > 0 {
            Some(CutMode::Reset)
        } else if self.blackholes > 0 {
            Some(CutMode::Blackhole)
        } else {
            None
        }
    }

    pub fn is_clean(&self) -> bool {
        *self == LinkFault::default()
    }

    /// Adds (`on`) or removes one cut of `mode`.
    pub fn set_cut(&mut self, mode: CutMode, on: bool) {
        let counter = match mode {
            CutMode::Reset => &mut self.resets,
            CutMode::Blackhole => &mut self.blackholes,
        };
        *counter = if on {
            counter.saturating_add(1)
        } else {
            counter.saturating_sub(1)
        };
    }
}

/// What happened on one link, for the test's report.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connections: AtomicU64,
    /// Connections reset or left unforwarded because the link was cut when they arrived.
    pub refused: AtomicU64,
    /// Open connections reset because the link was cut (reset mode).
    pub cut_resets: AtomicU64,
    /// Connections killed by the loss fault.
    pub loss_resets: AtomicU64,
    pub bytes: AtomicU64,
}

/// Totals over links, for the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSummary {
    pub connections: u64,
    pub refused: u64,
    pub cut_resets: u64,
    pub loss_resets: u64,
    pub bytes: u64,
    /// Connections whose source could not be told (they bypass faults; should stay rare).
    pub unattributed: u64,
}

impl fmt::Display for StatsSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections ({} unattributed), {} refused while cut, {} reset by cuts, \
             {} reset by loss, {:.1} MB",
            self.connections,
            self.unattributed,
            self.refused,
            self.cut_resets,
            self.loss_resets,
            self.bytes as f64 / 1e6
        )
    }
}

/// One directed link and its runtime-controllable faults.
#[derive(Debug)]
pub struct Link {
    pub from: Node,
    pub to: Node,
    fault: watch::Sender<LinkFault>,
    pub stats: LinkStats,
}

impl Link {
    fn new(from: Node, to: Node) -> Link {
        Link {
            from,
            to,
            fault: watch::Sender::new(LinkFault::default()),
            stats: LinkStats::default(),
        }
    }

    pub fn fault(&self) -> LinkFault {
        self.fault.borrow().clone()
    }

    /// Changes the faults; open connections react at once.
    pub fn modify(&self, f: impl FnOnce(&mut LinkFault)) {
        self.fault.send_modify(f);
    }

    fn subscribe(&self) -> watch::Receiver<LinkFault> {
        self.fault.subscribe()
    }
}

/// Who is on the other side of a proxy's accepted connections.
#[derive(Clone, Debug)]
pub enum Source {
    /// Every connection comes from this node.
    Fixed(Node),
    /// One of these nodes, told apart by the owner of the connecting socket: a process whose
    /// command line has the given argument (e.g. a replica's data directory).
    ByProcess(Vec<(Node, String)>),
}

type LinkTable = Mutex<BTreeMap<(Node, Node), Arc<Link>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn link_in(table: &LinkTable, from: &Node, to: &Node) -> Arc<Link> {
    lock(table)
        .entry((from.clone(), to.clone()))
        .or_insert_with(|| Arc::new(Link::new(from.clone(), to.clone())))
        .clone()
}

/// All the proxies of a deployment and their links. Dropping it stops every proxy and closes
/// every connection through them.
#[derive(Debug, Default)]
pub struct Net {
    links: Arc<LinkTable>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Net {
    pub fn new() -> Arc<Net> {
        Arc::new(Net::default())
    }

    /// The link `from → to` (created clean if it did not exist).
    pub fn link(&self, from: &Node, to: &Node) -> Arc<Link> {
        link_in(&self.links, from, to)
    }

    pub fn links(&self) -> Vec<Arc<Link>> {
        lock(&self.links).values().cloned().collect()
    }

    /// Applies `f` to every known link for which `select(from, to)` holds; returns how many.
    /// Links are created when their proxy is, so this reaches every link of the deployment.
    pub fn modify_where(
        &self,
        select: impl Fn(&Node, &Node) -> bool,
        f: impl Fn(&mut LinkFault),
    ) -> usize {
        let links: Vec<Arc<Link>> = lock(&self.links)
            .iter()
            .filter(|((from, to), _)| select(from, to))
            .map(|(_, l)| l.clone())
            .collect();
        for l in &links {
            l.modify(&f);
        }
        links.len()
    }

    /// Clears every fault on every link.
    pub fn heal_all(&self) {
        for l in self.links() {
            l.modify(|f| *f = LinkFault::default());
        }
    }

    /// Links that still carry a fault.
    pub fn faulty_links(&self) -> Vec<(Node, Node, LinkFault)> {
        self.links()
            .iter()
            .map(|l| (l.from.clone(), l.to.clone(), l.fault()))
            .filter(|(_, _, f)| !f.is_clean())
            .collect()
    }

    pub fn stats(&self) -> StatsSummary {
        let mut s = StatsSummary::default();
        for l in self.links() {
            let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
            s.connections += get(&l.stats.connections);
            s.refused += get(&l.stats.refused);
            s.cut_resets += get(&l.stats.cut_resets);
            s.loss_resets += get(&l.stats.loss_resets);
            s.bytes += get(&l.stats.bytes);
            if l.from == Node::Other {
                s.unattributed += get(&l.stats.connections);
            }
        }
        s
    }

    /// Starts a proxy to `target` for connections from `source` to `to`; returns the address
    /// to give the connecting side. Runs on the current tokio runtime until the `Net` drops.
    pub async fn proxy(&self, source: Source, to: Node, target: SocketAddr) -> Result<SocketAddr> {
        let listener = bind_proxy().await?;
        let addr = listener.local_addr().context("reading a proxy's address")?;
        // Links exist from the start, so that a fault set before the first connection (or on
        // a link whose process is down) applies when traffic arrives.
        match &source {
            Source::Fixed(from) => {
                self.link(from, &to);
            }
            Source::ByProcess(candidates) => {
                for (from, _) in candidates {
                    self.link(from, &to);
                }
            }
        }
        let links = self.links.clone();
        let task = tokio::spawn(serve(listener, addr, source, to, target, links));
        lock(&self.tasks).push(task.abort_handle());
        Ok(addr)
    }
}

/// Binds a proxy's listener on a port from [`free_port`], not on port 0: the harness hands
/// out ports for processes that bind them later (`free_port` never repeats one), and a
/// kernel-chosen port could be one of those, stealing a replica's or an agent's address.
async fn bind_proxy() -> Result<TcpListener> {
    let mut last = None;
    for _ in 0..10 {
        let port = free_port()?;
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return Ok(l),
            // Taken between free_port and now: try another one.
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::anyhow!(
        "could not bind a proxy on a free loopback port: {last:?}"
    ))
}

impl Drop for Net {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

/// Accepts connections for one proxy. Connection tasks live in a JoinSet owned here, so
/// aborting this task closes them all.
async fn serve(
    listener: TcpListener,
    local: SocketAddr,
    source: Source,
    to: Node,
    target: SocketAddr,
    links: Arc<LinkTable>,
) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (inbound, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::debug!("proxy {local}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let source = source.clone();
        let to = to.clone();
        let links = links.clone();
        conns.spawn(async move {
            let from = match source {
                Source::Fixed(n) => n,
                Source::ByProcess(candidates) => {
                    tokio::task::spawn_blocking(move || identify(peer, local, &candidates))
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(Node::Other)
                }
            };
            let link = link_in(&links, &from, &to);
            connection(inbound, target, link).await;
        });
    }
}

fn reset(stream: &TcpStream) {
    // SO_LINGER 0 makes the close send RST: the peer sees a broken connection, not a clean
    // end of stream.
    let _ = stream.set_zero_linger();
}

async fn connection(mut inbound: TcpStream, target: SocketAddr, link: Arc<Link>) {
    link.stats.connections.fetch_add(1, Ordering::Relaxed);
    let mut faults = link.subscribe();
    // While blackholed, the accepted connection is held without connecting onwards.
    let mut counted = false;
    loop {
        let cut = faults.borrow_and_update().cut();
        match cut {
            None => break,
            Some(CutMode::Reset) => {
                if !counted {
                    link.stats.refused.fetch_add(1, Ordering::Relaxed);
                }
                reset(&inbound);
                return;
            }
            Some(CutMode::Blackhole) => {
                if !counted {
                    link.stats.refused.fetch_add(1, Ordering::Relaxed);
                    counted = true;
                }
                if faults.changed().await.is_err() {
                    return;
                }
            }
        }
    }
    if lost(&link) {
        reset(&inbound);
        return;
    }
    let mut outbound =
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            _ => {
                // Target down: pass the failure on as the peer would have seen it directly.
                reset(&inbound);
                return;
            }
        };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let broken = {
        let (in_rd, in_wr) = inbound.split();
        let (out_rd, out_wr) = outbound.split();
        let forward = async {
            tokio::try_join!(
                pipe(in_rd, out_wr, &link, link.subscribe()),
                pipe(out_rd, in_wr, &link, link.subscribe()),
            )
        };
        tokio::select! {
            r = forward => r.is_err(),
            () = reset_cut(link.subscribe()) => {
                link.stats.cut_resets.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    };
    if broken {
        reset(&inbound);
        reset(&outbound);
    }
}

/// Rolls the loss fault once.
fn lost(link: &Link) -> bool {
    let p = link.fault.borrow().loss;
    if p > 0.0 && rand::random::<f64>() < p {
        link.stats.loss_resets.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        false
    }
}

/// Resolves when the link is cut in reset mode.
async fn reset_cut(mut faults: watch::Receiver<LinkFault>) {
    loop {
        if faults.borrow_and_update().cut() == Some(CutMode::Reset) {
            return;
        }
        if faults.changed().await.is_err() {
            // The link is gone with its Net; the proxy task is being aborted anyway.
            std::future::pending::<()>().await;
        }
    }
}

/// Waits while the link is blackholed; fails if it is cut in reset mode.
async fn passable(faults: &mut watch::Receiver<LinkFault>) -> io::Result<()> {
    loop {
        let cut = faults.borrow_and_update().cut();
        match cut {
            None => return Ok(()),
            Some(CutMode::Reset) => {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "link cut"))
            }
            Some(CutMode::Blackhole) => faults
                .changed()
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::ConnectionAborted, "proxy gone"))?,
        }
    }
}

/// Chunks in flight per direction: enough to keep a delayed link's throughput up, small
/// enough that a blackholed link pushes back on the sender through TCP.
const IN_FLIGHT: usize = 64;
const CHUNK: usize = 16 * 1024;

/// Forwards one direction: a reader stamps each chunk with its delivery time, a writer
/// delivers it then (while the link is not blackholed). End of stream is passed on as a
/// half-close; any error breaks the whole connection.
async fn pipe(
    mut rd: ReadHalf<'_>,
    mut wr: WriteHalf<'_>,
    link: &Link,
    mut faults: watch::Receiver<LinkFault>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        let mut last = Instant::now();
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            if lost(link) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "injected loss",
                ));
            }
            let f = link.fault();
            let jitter = if f.jitter.is_zero() {
                Duration::ZERO
            } else {
                f.jitter.mul_f64(rand::random::<f64>())
            };
            // Never before an earlier chunk: TCP delivers in order.
            let at = (Instant::now() + f.delay + jitter).max(last);
            last = at;
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            passable(&mut faults).await?;
            wr.write_all(&data).await?;
            link.stats
                .bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        wr.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Which candidate process owns the client socket of the connection `peer → local`.
fn identify(peer: SocketAddr, local: SocketAddr, candidates: &[(Node, String)]) -> Option<Node> {
    let inode = socket_inode(peer, local)?;
    let needle = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let Some((node, _)) = candidates
            .iter()
            .find(|(_, marker)| args.contains(&marker.as_bytes()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()) {
                return Some(node.clone());
            }
        }
    }
    None
}

/// The inode of the IPv4 socket whose local end is `local_end` and remote end `remote_end`.
fn socket_inode(local_end: SocketAddr, remote_end: SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 {
            continue;
        }
        if parse_proc_addr(fields[1]) == Some(local_end)
            && parse_proc_addr(fields[2]) == Some(remote_end)
        {
            return fields[9].parse().ok().filter(|i| *i != 0);
        }
    }
    None
}

/// `0100007F:1F90` → 127.0.0.1:8080. The kernel prints the address as the native-endian
/// integer of its network-order bytes, so the native bytes are the address bytes.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::from((Ipv4Addr::from(ip.to_ne_bytes()), port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[test]
    fn proc_addresses_parse() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
        }
        assert_eq!(parse_proc_addr("zz"), None);
    }

    #[tokio::test]
    async fn forwards_delays_and_cuts() {
        let echo = echo_server().await;
        let net = Net::new();
        let addr = net
            .proxy(Source::Fixed(Node::Client), Node::Replica(0), echo)
            .await
            .unwrap();
        let link = net.link(&Node::Client, &Node::Replica(0));

        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"hello").await.unwrap(), b"hello");

        link.modify(|f| f.delay = Duration::from_millis(100));
        let t = std::time::Instant::now();
        assert_eq!(roundtrip(&mut s, b"slow").await.unwrap(), b"slow");
        // Both directions pass the proxy's delay line once each.
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        link.modify(|f| f.delay = Duration::ZERO);

        // Blackhole: nothing comes back until it heals, then the data flows.
        link.modify(|f| f.set_cut(CutMode::Blackhole, true));
        s.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await;
        assert!(r.is_err(), "data crossed a blackholed link");
        link.modify(|f| f.set_cut(CutMode::Blackhole, false));
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"held");

        // Reset: the open connection breaks, new ones are refused.
        link.modify(|f| f.set_cut(CutMode::Reset, true));
        assert!(roundtrip(&mut s, b"x").await.is_err());
        let mut s2 = TcpStream::connect(addr).await.unwrap();
        assert!(roundtrip(&mut s2, b"x").await.is_err());
        link.modify(|f| f.set_cut(CutMode::Reset, false));
        let mut s3 = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut s3, b"back").await.unwrap(), b"back");

        // Certain loss kills the connection at the first chunk.
        link.modify(|f| f.loss = 1.0);
        assert!(roundtrip(&mut s3, b"x").await.is_err());
        link.modify(|f| f.loss = 0.0);
        assert!(net.stats().loss_resets >= 1);
        assert!(net.faulty_links().is_empty());
    }

    #[tokio::test]
    async fn tells_connecting_processes_apart() {
        // This test process is the "candidate": its own command line has argv[0].
        let echo = echo_server().await;
        let net = Net::new();
        let me: String = std::env::args().next().unwrap();
        let addr = net
            .proxy(
                Source::ByProcess(vec![(Node::Replica(7), me)]),
                Node::Agent("a".into()),
                echo,
            )
            .await
            .unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"who").await.unwrap(), b"who");
        let link = net.link(&Node::Replica(7), &Node::Agent("a".into()));
        assert_eq!(link.stats.connections.load(Ordering::Relaxed), 1);
    }
}
