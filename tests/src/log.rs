//! A stopped ferry-cloud's log, read back by a test: what is durable, in offset order.

use std::path::Path;
use std::sync::Arc;

use ferry_cloud::log::{ObjectLog, SegmentLog, Storage, READ_BUDGET_BYTES};
use ferry_protocol::kafka::batch::{records as batch_records, uncompressed};

/// A record as text (lossy UTF-8): key, value, headers.
pub type TextRecord = (String, String, Vec<(String, String)>);

/// Every record of `stream`'s `partition` in the log under `log_dir` (a node's
/// `<data_dir>/log`), in offset order. The node must be stopped: this opens its log (on the
/// object backend when the node ran on it, see [`crate::services::on_object_backend`]).
pub fn records(log_dir: &Path, stream: &str, partition: u32) -> Vec<TextRecord> {
    let object = log_dir
        .parent()
        .map(crate::services::object_config_file)
        .filter(|f| f.exists());
    let log: Arc<dyn Storage> = match object {
        Some(file) => {
            let text = std::fs::read_to_string(&file).expect("the object backend's config");
            let config: ferry_cloud::config::CloudConfig =
                toml::from_str(&text).expect("a cloud config");
            ObjectLog::open(&config.log.object.expect("[log.object]")).expect("the log opens")
        }
        None => SegmentLog::open(log_dir, true, 16).expect("the log opens"),
    };
    let end = log
        .offsets(stream, partition)
        .expect("the stream exists")
        .high_watermark;
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < end {
        let read = log
            .read(stream, partition, offset, READ_BUDGET_BYTES)
            .expect("read the log");
        for batch in read.iter() {
            let (header, whole) = batch.expect("a whole batch");
            let plain = uncompressed(whole, 64 << 20).expect("a batch that opens");
            for rec in batch_records(&plain).expect("records") {
                let rec = rec.expect("a record");
                let headers = rec
                    .headers
                    .iter()
                    .map(|h| (h.key.to_owned(), text(h.value)))
                    .collect();
                out.push((text(rec.key), text(rec.value), headers));
            }
            offset = header.last_offset() + 1;
        }
    }
    out
}
