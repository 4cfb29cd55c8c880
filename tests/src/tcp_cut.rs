//! A TCP forwarder that can be cut: the object store or PostgreSQL "going down" for a test
//! while the real server keeps running for the others. Cut, it drops every connection it
//! carries and closes each new one at once (the client sees a reset or an end of stream);
//! restored, it forwards again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A running forwarder; see the module docs. It stops with the runtime it was started on.
#[derive(Debug, Clone)]
pub struct TcpCut {
    /// Where clients connect.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    carried: Arc<Mutex<Vec<AbortHandle>>>,
}

impl TcpCut {
    /// Forwards a loopback port of its own to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let carried: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (u, c) = (up.clone(), carried.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                c.lock().expect("carried").push(task.abort_handle());
            }
        });
        Self { addr, up, carried }
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
