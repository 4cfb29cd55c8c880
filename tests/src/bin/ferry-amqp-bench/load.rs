//! The load's clients: publishers with confirms and a window, the consumer with manual
//! acks and prefetch, and the connection helpers they share.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{Args, Res};

/// Publishes handed to lapin whose frames are not written yet, per publisher: enough to keep
/// lapin's I/O thread writing batches (each `basic_publish` resolves once its frames are out),
/// few enough that the confirm window, not this, bounds what is in flight.
const MAX_UNWRITTEN: usize = 64;

/// What a run counts; the optional parts only in the modes that need them.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) confirmed: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) consumed: AtomicU64,
    pub(crate) latencies_ns: Option<Mutex<Vec<u64>>>,
    pub(crate) confirmed_ids: Option<Mutex<Vec<u64>>>,
    pub(crate) consumed_ids: Option<Mutex<Vec<u64>>>,
}

impl Tally {
    pub(crate) fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    pub(crate) fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }
}

/// How one publisher publishes.
pub(crate) struct Plan {
    /// Publishes unconfirmed at most.
    pub(crate) window: usize,
    /// Messages in all (else until the stop flag).
    pub(crate) limit: Option<u64>,
    /// One publish per interval (else as fast as the window allows).
    pub(crate) interval: Option<Duration>,
    /// Ids are `id_base << 40 | sequence`: distinct across publishers.
    pub(crate) id_base: u64,
}

impl Plan {
    pub(crate) fn flat_out(args: &Args, publisher: u64, limit: Option<u64>) -> Self {
        Self {
            window: args.window,
            limit,
            interval: None,
            id_base: publisher,
        }
    }
}

/// A publisher on a connection of its own, with confirms; ends at the plan's limit or when
/// `stop` is set, once every publish it made has been confirmed.
pub(crate) async fn spawn_publisher(
    args: &Args,
    queue: &str,
    plan: Plan,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Res<tokio::task::JoinHandle<Res<()>>> {
    let (conn, ch) = open(&args.uri).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (queue, payload) = (queue.to_string(), args.payload);
    Ok(tokio::spawn(async move {
        let result = publish(ch, queue, payload, plan, stop, tally).await;
        close(conn).await;
        result
    }))
}

async fn publish(
    ch: Channel,
    queue: String,
    payload: usize,
    plan: Plan,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Res<()> {
    let window = Arc::new(Semaphore::new(plan.window));
    // Confirms are awaited in publish order: the broker confirms in that order. Each entry
    // holds a permit of the window, so the channel never holds more than the window.
    let (confirms, mut to_confirm) =
        tokio::sync::mpsc::channel::<(u64, Instant, PublisherConfirm, OwnedSemaphorePermit)>(
            plan.window,
        );
    let counts = tally.clone();
    let collector = tokio::spawn(async move {
        while let Some((id, sent, confirm, permit)) = to_confirm.recv().await {
            let confirmation = confirm.await?;
            let took = sent.elapsed();
            drop(permit);
            if !confirmation.is_ack() {
                counts.nacked.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            counts.confirmed.fetch_add(1, Ordering::Relaxed);
            if let Some(l) = &counts.latencies_ns {
                l.lock().expect("not poisoned").push(took.as_nanos() as u64);
            }
            if let Some(ids) = &counts.confirmed_ids {
                ids.lock().expect("not poisoned").push(id);
            }
        }
        Res::Ok(())
    });
    let props = BasicProperties::default().with_delivery_mode(2);
    let start = tokio::time::Instant::now();
    let mut unwritten = FuturesOrdered::new();
    let mut seq = 0u64;
    loop {
        let more = !stop.load(Ordering::Relaxed) && plan.limit.is_none_or(|l| seq < l);
        if !more && unwritten.is_empty() {
            break;
        }
        let next_slot = async {
            let permit = window.clone().acquire_owned().await;
            if let Some(interval) = plan.interval {
                tokio::time::sleep_until(start + interval * seq as u32).await;
            }
            permit
        };
        tokio::select! {
            biased;
            Some(written) = unwritten.next(), if !unwritten.is_empty() => {
                let (id, sent, confirm, permit) = written;
                if confirms.send((id, sent, confirm?, permit)).await.is_err() {
                    break;
                }
            }
            permit = next_slot, if more && unwritten.len() < MAX_UNWRITTEN => {
                let permit = permit?;
                let id = plan.id_base << 40 | seq;
                seq += 1;
                let mut body = vec![b'x'; payload];
                body[..8].copy_from_slice(&id.to_be_bytes());
                let (ch, queue, props) = (ch.clone(), queue.clone(), props.clone());
                unwritten.push_back(async move {
                    let sent = Instant::now();
                    let confirm = ch
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &body,
                            props,
                        )
                        .await;
                    (id, sent, confirm, permit)
                });
            }
        }
    }
    drop(confirms);
    collector.await?
}

/// How the consumer consumes.
pub(crate) struct Consumer {
    pub(crate) prefetch: u16,
    pub(crate) ack_every: u64,
    /// Stop after this many deliveries.
    pub(crate) until: Option<u64>,
    /// Stop once the queue is quiet (else only at `until` or the stop flag).
    pub(crate) quiet_stop: Option<QuietStop>,
}

/// When a queue counts as drained.
pub(crate) struct QuietStop {
    /// Nothing came this long after the consumer started: stop without a delivery.
    pub(crate) first_within: Duration,
    /// Nothing came this long after the last delivery.
    pub(crate) after: Duration,
}

/// The consumer on a connection of its own; ends at `until` deliveries or when `stop` is set.
pub(crate) async fn spawn_consumer(
    args: &Args,
    queue: &str,
    until: Option<u64>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Res<tokio::task::JoinHandle<Res<()>>> {
    let (conn, ch) = open(&args.uri).await?;
    let consumer = Consumer {
        prefetch: args.prefetch,
        ack_every: args.ack_every,
        until,
        quiet_stop: None,
    };
    let queue = queue.to_string();
    Ok(tokio::spawn(async move {
        let result = consumer.run(ch, &queue, stop, tally).await;
        close(conn).await;
        result.map(|_first| ())
    }))
}

impl Consumer {
    pub(crate) async fn run(
        self,
        ch: Channel,
        queue: &str,
        stop: Arc<AtomicBool>,
        tally: Arc<Tally>,
    ) -> Res<Option<Instant>> {
        ch.basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let mut deliveries = ch
            .basic_consume(
                queue.into(),
                "bench-consumer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Acks go through the channel: lapin's `Acker` refuses `multiple` (its tag is then
        // unknown to the broker), and a tag is all an ack needs.
        let mut acks = FuturesUnordered::new();
        let (mut n, mut unacked, mut last_tag) = (0u64, 0u64, 0u64);
        let (started, mut first, mut last_at) = (Instant::now(), None, Instant::now());
        let multiple = self.ack_every > 1;
        loop {
            let quiet = self.quiet_stop.as_ref().is_some_and(|q| match first {
                None => started.elapsed() >= q.first_within,
                Some(_) => last_at.elapsed() >= q.after,
            });
            let done = stop.load(Ordering::Relaxed) || self.until.is_some_and(|u| n >= u) || quiet;
            if done {
                break;
            }
            tokio::select! {
                biased;
                Some(acked) = acks.next(), if !acks.is_empty() => {
                    let acked: lapin::Result<()> = acked;
                    acked?;
                }
                next = tokio::time::timeout(Duration::from_millis(100), deliveries.next()) => {
                    let delivery = match next {
                        Err(_) => continue,
                        Ok(None) => return Err("the consumer was cancelled".into()),
                        Ok(Some(d)) => d?,
                    };
                    last_at = Instant::now();
                    first.get_or_insert(last_at);
                    n += 1;
                    tally.consumed.fetch_add(1, Ordering::Relaxed);
                    if let Some(ids) = &tally.consumed_ids {
                        let id = delivery.data.get(..8).map_or(u64::MAX, |b| {
                            u64::from_be_bytes(b.try_into().expect("8 bytes"))
                        });
                        ids.lock().expect("not poisoned").push(id);
                    }
                    unacked += 1;
                    last_tag = delivery.delivery_tag;
                    if unacked >= self.ack_every {
                        unacked = 0;
                        acks.push(ack(ch.clone(), last_tag, multiple));
                    }
                }
            }
        }
        if unacked > 0 {
            acks.push(ack(ch.clone(), last_tag, true));
        }
        while let Some(acked) = acks.next().await {
            acked?;
        }
        Ok(first)
    }
}

async fn ack(ch: Channel, delivery_tag: u64, multiple: bool) -> lapin::Result<()> {
    ch.basic_ack(delivery_tag, BasicAckOptions { multiple })
        .await
}

pub(crate) async fn open(uri: &str) -> Res<(Connection, Channel)> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// Closes `conn` with 200 (a broker gone already is no error here).
pub(crate) async fn close(conn: Connection) {
    let _ = conn.close(200, "done".into()).await;
}

/// Opens a connection, trying again for up to `patience` (a broker that is restarting).
pub(crate) async fn open_retrying(uri: &str, patience: Duration) -> Res<(Connection, Channel)> {
    let until = Instant::now() + patience;
    loop {
        match open(uri).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub(crate) async fn declare(ch: &Channel, queue: &str) -> Res<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, FieldTable::default())
        .await?;
    Ok(())
}
