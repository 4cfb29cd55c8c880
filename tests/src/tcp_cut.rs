//! A TCP forwarder that can be cut: the object store or PostgreSQL "going down" for a test
//! while the real server keeps running for the others. Cut, it drops every connection it
//! carries and closes each new one at once (the client sees a reset or an end of stream);
//! restored, it forwards again. Armed with [`TcpCut::drop_answer_to`], it lets one request
//! through to the server and drops the connection before the answer comes back: a commit
//! that happened whose answer was lost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A running forwarder; see the module docs. It stops with the runtime it was started on.
#[derive(Debug, Clone)]
pub struct TcpCut {
    /// Where clients connect.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    carried: Arc<Mutex<Vec<AbortHandle>>>,
    trap: Arc<Trap>,
}

/// What `drop_answer_to` armed: the bytes to look for, and how often it fired.
#[derive(Debug, Default)]
struct Trap {
    pattern: Mutex<Option<Vec<u8>>>,
    fired: AtomicUsize,
}

impl Trap {
    /// True (and disarmed) if `chunk` holds the pattern.
    fn springs(&self, chunk: &[u8]) -> bool {
        let mut p = self.pattern.lock().expect("trap");
        let hit = p
            .as_deref()
            .is_some_and(|p| chunk.windows(p.len()).any(|w| w == p));
        if hit {
            *p = None;
            self.fired.fetch_add(1, Ordering::SeqCst);
        }
        hit
    }
}

impl TcpCut {
    /// As [`TcpCut::start`], on a runtime of its own (a thread that lives as long as the
    /// test process): for a node running in the test's own runtime, whose blocking calls
    /// must not keep the forwarder from its work.
    pub fn start_apart(target: SocketAddr) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let _ = tx.send(Self::start(target).await);
                std::future::pending::<()>().await
            });
        });
        rx.recv().expect("the forwarder starts")
    }

    /// Forwards a loopback port of its own to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let carried: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let trap: Arc<Trap> = Arc::default();
        let (u, c, t) = (up.clone(), carried.clone(), trap.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let trap = t.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    forward(client, server, trap).await;
                });
                c.lock().expect("carried").push(task.abort_handle());
            }
        });
        Self {
            addr,
            up,
            carried,
            trap,
        }
    }

    /// Arms the trap: the next request whose bytes hold `pattern` goes through to the server,
    /// then its connection is dropped before the server's answer is forwarded.
    pub fn drop_answer_to(&self, pattern: &[u8]) {
        *self.trap.pattern.lock().expect("trap") = Some(pattern.to_vec());
    }

    /// How many times the trap fired.
    pub fn answers_dropped(&self) -> usize {
        self.trap.fired.load(Ordering::SeqCst)
    }

    /// Down: every connection dropped, new ones closed at once.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.carried.lock().expect("carried").drain(..) {
            task.abort();
        }
    }

    /// Up again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Copies both ways until either side ends; a chunk from the client that springs the trap is
/// sent on, and then nothing more comes back from the server.
async fn forward(client: TcpStream, server: TcpStream, trap: Arc<Trap>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    let back = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if f.load(Ordering::SeqCst) || client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_rx.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // The client is done sending: the server's last answers still go back.
                let _ = server_tx.shutdown().await;
                let _ = back.await;
                return;
            }
            Ok(n) => n,
        };
        let springs = trap.springs(&buf[..n]);
        if springs {
            frozen.store(true, Ordering::SeqCst);
        }
        if server_tx.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if springs {
            // Time for the server to act on it; then the connection goes, answer unsent.
            tokio::time::sleep(Duration::from_millis(300)).await;
            break;
        }
    }
    back.abort();
}
