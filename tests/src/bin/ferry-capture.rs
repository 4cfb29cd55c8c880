//! `ferry-capture [ADDR]`: listens (default 127.0.0.1:1883) and prints every MQTT packet a
//! client sends, decoded by Ferry's codec, answering just enough for the client to go on
//! (see `ferry_tests::capture`). For seeing what a device or client library puts on the wire:
//!
//! ```text
//! cargo run -p ferry-tests --bin ferry-capture
//! mosquitto_pub -V mqttv5 -t sensors/t1 -m 21.5 -q 1 -D publish user-property unit C
//! ```

use std::time::Duration;

use ferry_tests::capture::{CaptureServer, Seen};

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1883".into());
    let server = match CaptureServer::bind(&addr) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("ferry-capture: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!("ferry-capture: listening on {addr}; Ctrl-C to stop");
    loop {
        match server.next(Duration::from_secs(3600)) {
            Some(Seen::Packet(p)) => println!("{p:#?}"),
            Some(Seen::DecodeError(e)) => println!("decode error: {e} (connection closed)"),
            Some(Seen::Closed) => println!("-- connection closed"),
            None => {}
        }
    }
}
