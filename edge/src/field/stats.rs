//! What each field source has done, for the metrics and `/api/field`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_protocol::mqtt::ReasonCode;
use serde::Serialize;

/// One source's counters. Shared between the source's task, its MQTT client and the
/// metrics listener; every field is updated without a lock but for the last error.
#[derive(Debug)]
pub struct SourceStats {
    pub name: Arc<str>,
    /// `serial`, `modbus`.
    pub kind: &'static str,
    /// Readings taken (frames from a serial line, polls of a Modbus device that answered).
    pub reads: AtomicU64,
    /// Failed reads: a device that did not answer, an exception, a frame too long, a line
    /// that could not be opened.
    pub errors: AtomicU64,
    /// Messages the broker took.
    pub published: AtomicU64,
    /// Messages the broker refused (outbox full, ACL), or that the rate limit dropped.
    pub dropped: AtomicU64,
    /// Commands written to the device, and refused or failed ones.
    pub writes: AtomicU64,
    pub writes_failed: AtomicU64,
    /// When the last read succeeded, in ms since the Unix epoch (0: never).
    pub last_success_ms: AtomicU64,
    /// How long the last successful read took, in µs.
    pub last_latency_us: AtomicU64,
    /// Whether the device answers now.
    pub up: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

impl SourceStats {
    pub(crate) fn new(name: &str, kind: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            kind,
            reads: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            writes_failed: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
            up: AtomicBool::new(false),
            last_error: Mutex::new(None),
        })
    }

    pub(crate) fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, reason: ReasonCode) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(source = %self.name, ?reason, "the broker refused a reading");
    }

    /// A read that worked, and took `latency_us`.
    pub(crate) fn read_ok(&self, latency_us: u64) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.last_success_ms.store(now_ms(), Ordering::Relaxed);
        self.last_latency_us.store(latency_us, Ordering::Relaxed);
        self.up.store(true, Ordering::Relaxed);
    }

    /// A read that failed; `down` says the device is not reachable at all.
    pub(crate) fn read_failed(&self, error: String, down: bool) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if down {
            self.up.store(false, Ordering::Relaxed);
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// What `/api/field` shows of this source.
    pub fn snapshot(&self) -> SourceSnapshot {
        SourceSnapshot {
            name: self.name.to_string(),
            kind: self.kind,
            up: self.up.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            writes_failed: self.writes_failed.load(Ordering::Relaxed),
            last_success_ms: self.last_success_ms.load(Ordering::Relaxed),
            last_latency_us: self.last_latency_us.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// One source as `/api/field` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceSnapshot {
    pub name: String,
    pub kind: &'static str,
    pub up: bool,
    pub reads: u64,
    pub errors: u64,
    pub published: u64,
    pub dropped: u64,
    pub writes: u64,
    pub writes_failed: u64,
    pub last_success_ms: u64,
    pub last_latency_us: u64,
    pub last_error: Option<String>,
}

/// Milliseconds since the Unix epoch: the timestamp every reading carries.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
