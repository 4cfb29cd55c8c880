//! A UDP impairment proxy for the link's tests: it stands between one edge and the cloud,
//! forwards datagrams both ways, drops a share of them (seeded, so that a failing run can be
//! replayed with the seed it printed), can cut the path entirely for a while, and can move
//! to a new source port towards the cloud, which the cloud sees as the edge changing its
//! address (as behind a NAT that rebinds, or an edge that moved to another network).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;

/// The proxy's controls, shared with the test.
#[derive(Debug)]
pub struct Impairment {
    /// Datagrams dropped per thousand, each direction.
    pub loss_permille: AtomicU32,
    /// While true, every datagram is dropped.
    pub cut: AtomicBool,
    /// Datagrams forwarded and dropped so far.
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    /// Notified to send from a new socket towards the cloud from now on.
    pub rebind: tokio::sync::Notify,
    /// Rebinds done: sends towards the cloud come from a new socket since then. A rebind
    /// that could not get a socket is not counted (and the old socket stays).
    pub rebinds: AtomicU32,
}

/// A running proxy: edges connect to `addr`.
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    pub control: Arc<Impairment>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 towards `upstream`, dropping `loss_permille` ‰ of the
    /// datagrams with decisions drawn from `seed`.
    pub async fn start(upstream: SocketAddr, loss_permille: u32, seed: u64) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let mut back = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        back.connect(upstream).await.expect("connect the proxy");
        let addr = front.local_addr().expect("proxy address");
        let control = Arc::new(Impairment {
            loss_permille: AtomicU32::new(loss_permille),
            cut: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            rebind: tokio::sync::Notify::new(),
            rebinds: AtomicU32::new(0),
        });
        let c = control.clone();
        let task = tokio::spawn(async move {
            let mut rng = seed | 1;
            let mut pass = move |c: &Impairment| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let ok = !c.cut.load(Ordering::Relaxed)
                    && (rng % 1000) as u32 >= c.loss_permille.load(Ordering::Relaxed);
                let counter = if ok { &c.forwarded } else { &c.dropped };
                counter.fetch_add(1, Ordering::Relaxed);
                ok
            };
            let mut client: Option<SocketAddr> = None;
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { continue };
                        // The edge's latest address: a new one is a migration or a new
                        // connection, as a NAT would see it.
                        client = Some(from);
                        if pass(&c) {
                            let _ = back.send(&up[..n]).await;
                        }
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { continue };
                        if let Some(to) = client {
                            if pass(&c) {
                                let _ = front.send_to(&down[..n], to).await;
                            }
                        }
                    }
                    _ = c.rebind.notified() => {
                        let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                        if socket.connect(upstream).await.is_ok() {
                            back = socket;
                            c.rebinds.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Self {
            addr,
            control,
            task,
        }
    }
}
