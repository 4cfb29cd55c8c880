//! Compaction: a partition's small runs rewritten as one, so the number of objects and of
//! index rows stays bounded as data grows (`docs/object-log.md`, "Compaction").
//!
//! A run is small below half of `compact_bytes`. A window is consecutive small runs whose
//! offsets follow on, at most `compact_bytes` in all; it is rewritten when it holds at least
//! two runs and either [`COMPACT_RUNS`] of them or half of `compact_bytes`, after leading
//! runs bigger than all the rest of the window are left out (so each rewrite at least
//! doubles the run a record is in, and a record is rewritten a few times at most). The
//! runs' stored bytes (relative offsets) are checked, concatenated, numbered from 0 again,
//! written as one object, and swapped for the old rows in one transaction that first checks
//! they are all still there ([`pg::swap_runs`]): retention, or another node compacting the
//! same partition, may have come first; then the new object is deleted and nothing changed.
//! The old objects are deleted by the collector a grace later, so a read that found an old
//! row still finds its object.

use std::ops::Range;

use bytes::BytesMut;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use tracing::warn;

use super::pg::{self, RunRow};
use super::{failed, format, lock, random_id, wait, ObjectLog};
use crate::log::{now_ms, LogError};

/// A window of this many small runs is rewritten whatever its size.
pub(super) const COMPACT_RUNS: usize = 16;
/// Runs of a partition looked at in one pass.
const RUNS_PER_PASS: i64 = 1000;

/// The windows of `runs` (one partition's, in offset order) to rewrite, as index ranges.
pub(super) fn windows(runs: &[RunRow], target: u64) -> Vec<Range<usize>> {
    let small = |r: &RunRow| r.byte_len < target / 2;
    let mut out = Vec::new();
    let mut i = 0;
    while i < runs.len() {
        if !small(&runs[i]) {
            i += 1;
            continue;
        }
        // The longest window from i.
        let mut end = i + 1;
        let mut total = runs[i].byte_len;
        while end < runs.len()
            && small(&runs[end])
            && runs[end - 1].last_offset + 1 == runs[end].first_offset
            && total + runs[end].byte_len <= target
        {
            total += runs[end].byte_len;
            end += 1;
        }
        // Leading runs bigger than the rest of the window stay as they are.
        let mut start = i;
        while start < end && runs[start].byte_len > total - runs[start].byte_len {
            total -= runs[start].byte_len;
            start += 1;
        }
        let n = end - start;
        if n >= 2 && (n >= COMPACT_RUNS || total >= target / 2) {
            out.push(start..end);
        }
        i = end;
    }
    out
}

impl ObjectLog {
    /// One compaction pass over every partition; returns how many windows were rewritten.
    pub(super) fn compact(&self) -> Result<usize, LogError> {
        let streams: Vec<(String, usize)> = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, s)| (n.clone(), s.parts.len()))
            .collect();
        let mut done = 0;
        for (stream, parts) in streams {
            for partition in 0..parts as u32 {
                let start = self.with_part(&stream, partition, |p| p.start)?;
                let runs = self.runs_in_db(&stream, partition, start, RUNS_PER_PASS)?;
                for w in windows(&runs, self.compact_bytes) {
                    if self.rewrite(&stream, partition, &runs[w])? {
                        done += 1;
                    }
                }
            }
        }
        Ok(done)
    }

    /// Rewrites `runs` (consecutive, of one partition) as one; false if they changed
    /// meanwhile and nothing was done.
    fn rewrite(&self, stream: &str, partition: u32, runs: &[RunRow]) -> Result<bool, LogError> {
        let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
            return Ok(false);
        };
        let mut bytes = BytesMut::new();
        for run in runs {
            let stored = self.run_bytes(run)?;
            // Checked as a read checks it, its offsets left relative (from 0).
            let checked = format::serve_run(&stored, run.crc, 0)
                .map_err(|e| failed(&format!("run at offset {}", run.first_offset), e))?;
            bytes.extend_from_slice(&checked);
        }
        let stats = format::relativize(&mut bytes).map_err(|e| failed("compaction", e))?;
        let records = (last.last_offset - first.first_offset + 1) as u64;
        if stats.records != records {
            return Err(LogError::Failed(format!(
                "compaction of {stream}/{partition} at {}: {} records in runs holding {records}",
                first.first_offset, stats.records
            )));
        }
        let payload = bytes.freeze();
        let (object, index) = format::encode(
            vec![(stream.to_owned(), partition, payload.clone(), stats)],
            now_ms(),
        )
        .map_err(|e| failed("object", e))?;
        let id = random_id();
        let key = format!("data/{}/{id}.fob", self.node);
        let size = object.len() as u64;
        let store = self.store.clone();
        let path = ObjectPath::from(key.as_str());
        let put = path.clone();
        super::count(&self.requests.put, 1);
        wait(&self.io, async move {
            store.put(&put, PutPayload::from(object)).await.map(|_| ())
        })?
        .map_err(|e| failed("object store PUT", e))?;
        let replaces: Vec<i64> = runs.iter().map(|r| r.first_offset).collect();
        let pool = self.pool.clone();
        let node = self.node.clone();
        let grace = self.grace.as_secs_f64();
        let (run, k, i) = (index[0].clone(), key.clone(), id.clone());
        let swapped = wait(&self.io, async move {
            let c = pg::Compacted {
                id: &i,
                key: &k,
                size,
                run: &run,
                replaces: &replaces,
            };
            pg::swap_runs(&pool, &node, &c, grace).await
        })?;
        let swapped = match swapped {
            Ok(s) => s,
            Err(e) => {
                // The commit's answer may have been lost: the collector decides (the object
                // is deleted after the grace only if no row refers to it).
                return Err(failed("PostgreSQL", e));
            }
        };
        if !swapped {
            let store = self.store.clone();
            super::count(&self.requests.delete, 1);
            if let Err(e) = wait(&self.io, async move { store.delete(&path).await })? {
                warn!(error = %e, "a compaction's unused object is left to the collector");
            }
            return Ok(false);
        }
        let run = &index[0];
        // Its records were counted against the runs it replaces: it ends where they did.
        let row = RunRow::of(run, first.first_offset, &key);
        lock(&self.cache).put((key, run.data_offset), payload);
        self.with_part(stream, partition, |p| {
            let old: Vec<i64> = p
                .runs
                .range(first.first_offset..=last.last_offset)
                .map(|(k, _)| *k)
                .collect();
            for k in old {
                p.runs.remove(&k);
            }
            p.remember(row);
        })?;
        Ok(true)
    }
}
