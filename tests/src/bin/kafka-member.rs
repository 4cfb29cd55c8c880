//! `kafka-member`: one member of a Kafka consumer group (librdkafka, through the rdkafka
//! crate), as its own process so that a test can kill it with SIGKILL.
//!
//! ```text
//! kafka-member BOOTSTRAP GROUP TOPIC
//! ```
//!
//! Subscribes, commits automatically every 200 ms, and prints one line per record,
//! `partition offset value`, flushed as it goes. Runs until killed.

use std::io::Write;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, group, topic] = args.as_slice() else {
        eprintln!("usage: kafka-member BOOTSTRAP GROUP TOPIC");
        std::process::exit(2);
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("client.id", "kafka-member")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "200")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap_or_else(|e| fail(&format!("consumer: {e}")));
    consumer
        .subscribe(&[topic])
        .unwrap_or_else(|e| fail(&format!("subscribe: {e}")));
    let mut out = std::io::stdout().lock();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let value = String::from_utf8_lossy(message.payload().unwrap_or_default());
                let line = format!("{} {} {value}", message.partition(), message.offset());
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return;
                }
            }
            Some(Err(e)) => eprintln!("kafka-member: {e}"),
            None => {}
        }
    }
}

fn fail(what: &str) -> ! {
    eprintln!("kafka-member: {what}");
    std::process::exit(1);
}
