//! The AMQP front's metadata writer: a thread of its own that commits queue positions and
//! topology to `meta.redb`, so that an acknowledgement's commit (an fsync, up to several
//! milliseconds) does not hold the broker thread's next round of appends and confirms.
//!
//! Jobs are committed in the order they were sent; whatever queued up while a commit ran
//! goes in the next one (one commit in flight), and positions nobody waits for gather for
//! up to 10 ms after the last commit. A job sent with [`StateWriter::write`] returns once it
//! is durable (a reply follows it: declare-ok, purge-ok, tx.commit-ok), at once if need be;
//! one sent with [`StateWriter::send`] returns at once.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::error;

use crate::meta::{Command, Meta, MetaError};

/// Jobs waiting for the writer; a full queue makes the broker thread wait (the metadata
/// store is then the limit, as it was when the broker committed itself).
const QUEUE: usize = 64;
/// The least time between two commits of positions that nobody waits for: a crash may
/// bring back, marked redelivered, what was acknowledged in the last GATHER (at most
/// 1 / GATHER fsyncs a second for acknowledgements).
const GATHER: Duration = Duration::from_millis(10);

struct Job {
    commands: Vec<Command>,
    done: Option<SyncSender<Result<(), String>>>,
}

/// The handle the broker thread holds; dropping it lets the thread finish what is queued
/// and end.
pub(crate) struct StateWriter {
    jobs: SyncSender<Job>,
}

impl StateWriter {
    /// Starts the writer thread over `meta`.
    pub(crate) fn start(meta: Arc<Meta>) -> std::io::Result<Self> {
        let (jobs, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("ferry-amqp-state".into())
            .spawn(move || run(&meta, &rx))?;
        Ok(Self { jobs })
    }

    /// Queues `commands` behind what was sent before; does not wait for the commit.
    pub(crate) fn send(&self, commands: Vec<Command>) {
        if commands.is_empty() {
            return;
        }
        if self
            .jobs
            .send(Job {
                commands,
                done: None,
            })
            .is_err()
        {
            error!("the AMQP state writer is gone; queue positions are not stored");
        }
    }

    /// Commits `commands` behind what was sent before and returns once they are durable.
    pub(crate) fn write(&self, commands: Vec<Command>) -> Result<(), String> {
        let (done, wait) = sync_channel(1);
        self.jobs
            .send(Job {
                commands,
                done: Some(done),
            })
            .map_err(|_| "the AMQP state writer is gone".to_owned())?;
        wait.recv()
            .map_err(|_| "the AMQP state writer is gone".to_owned())?
    }
}

fn run(meta: &Meta, rx: &Receiver<Job>) {
    let mut last_commit = Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = Batch::default();
        batch.add(first);
        // Positions nobody waits for gather until GATHER after the last commit (a job that
        // is waited for ends the wait), so a stream of acknowledgements costs a bounded
        // number of fsyncs, not one per round, and leaves the disk to the log's appends.
        let deadline = last_commit + GATHER;
        loop {
            while let Ok(next) = rx.try_recv() {
                batch.add(next);
            }
            let now = Instant::now();
            if !batch.waiting.is_empty() || now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(next) => batch.add(next),
                Err(_) => break,
            }
        }
        let commands = batch.commands();
        // An empty job is a barrier: what came before it is durable once it is answered.
        let result = if commands.is_empty() {
            Ok(())
        } else {
            meta.apply(&commands).map_err(|e: MetaError| e.to_string())
        };
        last_commit = Instant::now();
        if let Err(e) = &result {
            error!(error = %e, "cannot write the AMQP state");
        }
        for w in batch.waiting {
            let _ = w.send(result.clone());
        }
    }
}

/// The jobs of one commit: per key only the last command counts (they are applied in one
/// transaction), so a queue's position written in many rounds is written once.
#[derive(Default)]
struct Batch {
    keyed: BTreeMap<String, Command>,
    /// Commands without a key of the AMQP front's (it sends none today), in order.
    other: Vec<Command>,
    waiting: Vec<SyncSender<Result<(), String>>>,
}

impl Batch {
    fn add(&mut self, job: Job) {
        for c in job.commands {
            match &c {
                Command::AmqpPut { key, .. } | Command::AmqpDelete { key } => {
                    self.keyed.insert(key.clone(), c);
                }
                _ => self.other.push(c),
            }
        }
        self.waiting.extend(job.done);
    }

    fn commands(&mut self) -> Vec<Command> {
        let mut all = std::mem::take(&mut self.other);
        all.extend(std::mem::take(&mut self.keyed).into_values());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Command {
        Command::AmqpPut {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn jobs_are_committed_in_order_and_write_waits_for_its_own() {
        let dir = std::env::temp_dir().join(format!("ferry-amqp-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let meta = Arc::new(Meta::open(&dir.join("meta.redb")).expect("meta"));
        let w = StateWriter::start(meta.clone()).expect("writer");
        for i in 0..200 {
            w.send(vec![put("c/%2F/q", &i.to_string())]);
        }
        // A later write of the same key wins over every queued send before it, and is
        // durable when write returns.
        w.write(vec![put("c/%2F/q", "last"), put("q/%2F/q", "def")])
            .expect("written");
        let entries = meta.amqp_entries("").expect("entries");
        assert!(
            entries.contains(&("c/%2F/q".to_owned(), b"last".to_vec())),
            "{entries:?}"
        );
        assert!(entries.contains(&("q/%2F/q".to_owned(), b"def".to_vec())));
        // A delete after a queued put is not undone by it.
        w.send(vec![put("c/%2F/gone", "1")]);
        w.write(vec![Command::AmqpDelete {
            key: "c/%2F/gone".into(),
        }])
        .expect("written");
        let entries = meta.amqp_entries("").expect("entries");
        assert!(
            !entries.iter().any(|(k, _)| k == "c/%2F/gone"),
            "{entries:?}"
        );
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
