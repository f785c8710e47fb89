//! A fault-injecting TCP proxy on 127.0.0.1, placed between ferry and Mosquitto.
//!
//! The kernel on the test machines has no netem, and shaping `lo` would disturb every other
//! process, so link faults are made here, in user space, on one test's connections only:
//!
//! - [`Proxy::cut`] closes every current connection at once. Both sockets are dropped and
//!   whatever the proxy held for them is lost, as when a link goes down mid-packet.
//! - [`Proxy::blackhole`] stops forwarding in both directions **without closing anything**, like a
//!   dead satellite link: nothing arrives, nothing is refused. The proxy stops reading, so bytes
//!   wait in the senders' kernel buffers. New connections are still accepted (the kernel
//!   completes the handshake anyway) and are just as silent. When the blackhole ends, whatever
//!   waited is delivered, as TCP retransmission would after a short outage, unless an end has
//!   given up on the connection meanwhile.
//! - [`Proxy::throttle`] limits each direction to N bytes per second with a token bucket (burst:
//!   a tenth of a second's worth). The two buckets are shared by all connections, as the link's
//!   capacity is. Bytes over the rate wait in the proxy and then in the sender's buffers: the
//!   sender is slowed by back-pressure, nothing is dropped.
//! - [`Proxy::latency`] holds every chunk it reads for the given time before forwarding it, in
//!   both directions (the round trip grows by twice the value); order is kept.
//!
//! Faults apply to current and new connections from the moment they are set and combine
//! (latency and throttling together make a satellite profile). Counters: bytes forwarded each
//! way, connections accepted, connections open.
//!
//! The proxy runs on its own single-worker tokio runtime, so a test that blocks its own threads
//! (waiting for a broker or agent process) does not distort the proxy's timing, and every method
//! here is a plain call usable from sync or async code. Dropping the proxy stops the runtime and
//! closes every socket.
//!
//! A new connection is connected to the target at once; if the target refuses, the client's
//! connection is closed (what a client sees when the broker is down).

use std::net::{Ipv4Addr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Largest chunk read at once.
const READ_CHUNK: usize = 16 * 1024;
/// Chunks read but not yet forwarded, per direction of a connection. Bounds what the proxy
/// itself holds (with latency, what is "on the wire"); beyond it the proxy stops reading and
/// the sender's kernel buffers fill, as on a real link.
const PIPE_CHUNKS: usize = 256;

/// Which way bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to target (ferry to the broker).
    Up = 0,
    /// Target to client.
    Down = 1,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Bytes forwarded from clients to the target.
    pub bytes_up: u64,
    /// Bytes forwarded from the target to clients.
    pub bytes_down: u64,
    /// Connections accepted since the start.
    pub connections: u64,
    /// Connections open now.
    pub open: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    blackhole: bool,
    latency: Duration,
}

/// A token bucket; `rate: None` lets everything through.
struct Bucket {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn burst(rate: u64) -> f64 {
        (rate as f64 / 10.0).max(1.0)
    }

    /// Takes tokens for up to `want` bytes: `Ok(n)` may be sent now (`n >= 1`), `Err(wait)` is
    /// how long until enough tokens for the next piece have accumulated.
    fn take(&mut self, want: usize) -> Result<usize, Duration> {
        let Some(rate) = self.rate else {
            return Ok(want);
        };
        let now = Instant::now();
        let burst = Self::burst(rate);
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * rate as f64).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            let n = (self.tokens.floor() as usize).min(want);
            self.tokens -= n as f64;
            Ok(n)
        } else {
            // Wait for a whole piece (up to a burst) rather than trickling single bytes.
            let need = (want as f64).min(burst);
            Err(Duration::from_secs_f64((need - self.tokens) / rate as f64))
        }
    }
}

struct Shared {
    target: u16,
    faults: watch::Sender<Faults>,
    /// Bumped by every cut; each connection watches it from its accept on.
    cuts: watch::Sender<u64>,
    buckets: [Mutex<Bucket>; 2],
    bytes: [AtomicU64; 2],
    connections: AtomicU64,
    open: AtomicU64,
}

impl Shared {
    fn bucket(&self, dir: Direction) -> std::sync::MutexGuard<'_, Bucket> {
        self.buckets[dir as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until up to `want` bytes may be sent in direction `dir`; returns how many.
    async fn tokens(&self, dir: Direction, want: usize) -> usize {
        loop {
            let taken = self.bucket(dir).take(want);
            match taken {
                Ok(n) => return n,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to
    /// 127.0.0.1:`target`. Forwarding starts clean (no faults).
    pub fn start(target: u16) -> Proxy {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("make the proxy's listener non-blocking");
        let port = listener.local_addr().expect("local_addr").port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("proxy-{port}"))
            .enable_all()
            .build()
            .expect("build the proxy's runtime");
        let now = Instant::now();
        let bucket = || {
            Mutex::new(Bucket {
                rate: None,
                tokens: 0.0,
                last: now,
            })
        };
        let shared = Arc::new(Shared {
            target,
            faults: watch::Sender::new(Faults::default()),
            cuts: watch::Sender::new(0),
            buckets: [bucket(), bucket()],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
        });
        runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
        Proxy {
            port,
            shared,
            runtime: Some(runtime),
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port connections are forwarded to.
    pub fn target(&self) -> u16 {
        self.shared.target
    }

    /// Closes every connection open now (connections accepted afterwards are not affected).
    /// Returns how many were open.
    pub fn cut(&self) -> u64 {
        let open = self.shared.open.load(Ordering::SeqCst);
        self.shared.cuts.send_modify(|n| *n += 1);
        open
    }

    /// Stops (`true`) or resumes (`false`) forwarding in both directions, without closing.
    pub fn blackhole(&self, on: bool) {
        self.shared.faults.send_modify(|f| f.blackhole = on);
    }

    /// Limits each direction to `bytes_per_sec` (`None`: unlimited).
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        assert_ne!(bytes_per_sec, Some(0), "a rate of 0 is a blackhole");
        let now = Instant::now();
        for dir in [Direction::Up, Direction::Down] {
            let mut b = self.shared.bucket(dir);
            b.rate = bytes_per_sec;
            b.tokens = 0.0;
            b.last = now;
        }
    }

    /// Holds each chunk for `delay` before forwarding it (each direction).
    pub fn latency(&self, delay: Duration) {
        self.shared.faults.send_modify(|f| f.latency = delay);
    }

    /// Ends every fault: no blackhole, no throttle, no latency.
    pub fn clear(&self) {
        self.blackhole(false);
        self.throttle(None);
        self.latency(Duration::ZERO);
    }

    pub fn bytes(&self, dir: Direction) -> u64 {
        self.shared.bytes[dir as usize].load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }

    pub fn counters(&self) -> Counters {
        Counters {
            bytes_up: self.bytes(Direction::Up),
            bytes_down: self.bytes(Direction::Down),
            connections: self.connections(),
            open: self.open_connections(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Not `drop(runtime)`: that blocks, which panics inside a test's async context.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(listener: StdListener, shared: Arc<Shared>) {
    let listener = TcpListener::from_std(listener).expect("register the proxy's listener");
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // Out of file descriptors and the like: try again shortly.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Subscribed before the task starts, so a cut from now on reaches this connection.
        let cuts = shared.cuts.subscribe();
        shared.connections.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve(client, Arc::clone(&shared), cuts));
    }
}

/// Decrements the open-connection count however a connection ends.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>, mut cuts: watch::Receiver<u64>) {
    let _open = OpenGuard(Arc::clone(&shared));
    let Ok(upstream) = TcpStream::connect((Ipv4Addr::LOCALHOST, shared.target)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_rx, client_tx) = client.into_split();
    let (upstream_rx, upstream_tx) = upstream.into_split();
    let both = async {
        tokio::try_join!(
            pipe(client_rx, upstream_tx, Direction::Up, &shared),
            pipe(upstream_rx, client_tx, Direction::Down, &shared),
        )
    };
    tokio::select! {
        // A cut: returning drops both sockets and every chunk held for them.
        _ = cuts.changed() => {}
        // Both directions ended (EOF forwarded both ways), or one failed: close everything.
        _ = both => {}
    }
}

/// Forwards one direction until EOF (then half-closes `to`) or an error.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    dir: Direction,
    shared: &Shared,
) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(PIPE_CHUNKS);
    let mut read_faults = shared.faults.subscribe();
    let reader = async move {
        loop {
            // A blackholed link carries nothing: leave the bytes in the sender's buffers.
            let _ = read_faults.wait_for(|f| !f.blackhole).await;
            let mut buf = vec![0; READ_CHUNK];
            let n = from.read(&mut buf).await?;
            if n == 0 {
                // Dropping `tx` lets the writer finish the queue, then forward the EOF.
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            let due = Instant::now() + read_faults.borrow().latency;
            if tx.send((due, buf)).await.is_err() {
                return Ok(());
            }
        }
    };
    let mut write_faults = shared.faults.subscribe();
    let writer = async move {
        while let Some((due, buf)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let mut rest = &buf[..];
            while !rest.is_empty() {
                let _ = write_faults.wait_for(|f| !f.blackhole).await;
                let n = shared.tokens(dir, rest.len()).await;
                to.write_all(&rest[..n]).await?;
                shared.bytes[dir as usize].fetch_add(n as u64, Ordering::SeqCst);
                rest = &rest[n..];
            }
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}
