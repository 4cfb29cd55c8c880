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
