//! Helpers around the real MQTT clients the tests drive.

use std::time::Duration;

/// How long a test waits for what a client should receive.
pub const WAIT: Duration = Duration::from_secs(15);

/// The next packet rumqttc's event loop received (outgoing events skipped); panics with
/// `what` if none comes within [`WAIT`] or the connection fails.
pub async fn next_incoming(eventloop: &mut rumqttc::EventLoop, what: &str) -> rumqttc::Incoming {
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Err(_) => panic!("{what}: nothing within {WAIT:?}"),
            Ok(Err(e)) => panic!("{what}: {e}"),
            Ok(Ok(rumqttc::Event::Incoming(packet))) => return packet,
            Ok(Ok(_)) => {}
        }
    }
}

/// Publishes the numbers of `range` (as text) at QoS 1 to `sensors/t` on the broker at
/// `port`, as client `sensor`; returns how many were acknowledged (all of them, or it
/// panics).
pub async fn publish_numbers(port: u16, range: std::ops::Range<usize>) -> usize {
    use rumqttc::{AsyncClient, Incoming, MqttOptions, QoS};
    let mut opts = MqttOptions::new("sensor", "127.0.0.1", port);
    opts.set_inflight(100);
    let (client, mut ev) = AsyncClient::new(opts, 200);
    let n = range.len();
    tokio::spawn(async move {
        for i in range {
            if client
                .publish("sensors/t", QoS::AtLeastOnce, false, i.to_string())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    while acked < n {
        if let Incoming::PubAck(_) = next_incoming(&mut ev, "acks keep coming").await {
            acked += 1;
        }
    }
    acked
}

/// A sensor on the broker at a port: [`publish_numbers`] in rounds of 50 every 250 ms, from
/// 0 on, until stopped.
#[derive(Debug)]
pub struct Sensor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl Sensor {
    pub fn start(port: u16) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += publish_numbers(port, n..n + 50).await;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                n
            }
        });
        Self { stop, task }
    }

    /// Stops it after its round; how many it published (every one acknowledged).
    pub async fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("the sensor")
    }
}
