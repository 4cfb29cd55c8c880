//! The object backend against a real PostgreSQL: `FERRY_TEST_PG` names the server (a libpq
//! connection string), as `scripts/test.sh` sets it after starting one; each test gets a
//! database of its own. The object store is a directory (`file://`) here; S3 (SeaweedFS)
//! is tested end to end in `tests/tests/`.

use super::*;
use crate::log::NewRecord;

/// An object log's settings for `test`: its own database, objects under `dir`, flushes
/// every 5 ms.
pub(crate) fn config(test: &str, dir: &std::path::Path) -> ObjectConfig {
    let _ = std::fs::remove_dir_all(dir);
    ObjectConfig {
        object_url: format!("file://{}", dir.display()),
        postgres_url: super::testing::database(test),
        flush_ms: 5,
        ..ObjectConfig::default()
    }
}

fn rec(v: &str) -> NewRecord {
    NewRecord {
        timestamp: 1_000,
        key: None,
        value: Some(Bytes::copy_from_slice(v.as_bytes())),
        headers: Vec::new(),
    }
}

fn dir(test: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ferry-object-{test}-{}", std::process::id()))
}

/// Every record value of partition 0 from `from` on.
fn values(log: &ObjectLog, stream: &str, from: i64) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    let mut offset = from;
    loop {
        let r = log.read(stream, 0, offset, 1 << 20).expect("read");
        if r.batches.is_empty() {
            return out;
        }
        for b in r.iter() {
            let (h, whole) = b.expect("batch");
            for rec in ferry_protocol::kafka::batch::records(whole).expect("records") {
                let rec = rec.expect("record");
                if rec.offset >= offset {
                    out.push((
                        rec.offset,
                        String::from_utf8(rec.value.expect("value").to_vec()).expect("utf8"),
                    ));
                }
            }
            offset = h.last_offset() + 1;
        }
    }
}

#[tokio::test]
async fn concurrent_appends_share_one_object_per_flush_and_survive_a_reopen() {
    let d = dir("reopen");
    let mut config = config("reopen", &d);
    config.flush_ms = 50;
    let log = ObjectLog::open(&config).expect("open");
    let two = StreamConfig {
        partitions: 2,
        ..StreamConfig::default()
    };
    log.create_stream("s", &two).expect("create");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(log.append(
                "s",
                (i % 2) as u32,
                AppendData::Records(vec![rec(&i.to_string())]),
            ))
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("append");
    }
    let objects = std::fs::read_dir(d.join("data"))
        .expect("data dir")
        .flat_map(|node| std::fs::read_dir(node.expect("node").path()).expect("node dir"))
        .count();
    assert!(
        objects < 20,
        "{objects} objects for 200 appends queued together"
    );
    let before = values(&log, "s", 0);
    assert_eq!(before.len(), 100);
    drop(log);
    // A new node on the same store and database sees everything, and goes on after it.
    config.node = Some("second".into());
    config.cache_bytes = 0;
    let log = ObjectLog::open(&config).expect("reopen");
    assert_eq!(values(&log, "s", 0), before, "read back from the store");
    assert_eq!(log.offsets("s", 1).expect("offsets").high_watermark, 100);
    let next = log
        .append("s", 0, AppendData::Records(vec![rec("new")]))
        .await
        .expect("append");
    assert_eq!(next.base_offset, 100);
}

#[tokio::test]
async fn a_commit_tried_again_with_its_id_assigns_its_offsets_once() {
    let d = dir("idempotent");
    let config = config("idempotent", &d);
    let log = ObjectLog::open(&config).expect("open");
    log.create_stream("s", &StreamConfig::default())
        .expect("create");
    let run = format::Run {
        stream: "s".into(),
        partition: 0,
        data_offset: 36,
        data_len: 100,
        records: 5,
        batches: 1,
        first_timestamp: 1,
        max_timestamp: 2,
        crc: 7,
    };
    let first = pg::commit_flush(
        &log.pool,
        "abc",
        "data/x/abc.fob",
        136,
        std::slice::from_ref(&run),
    )
    .await
    .expect("commit");
    // The answer was lost: the same flush commits again.
    let again = pg::commit_flush(
        &log.pool,
        "abc",
        "data/x/abc.fob",
        136,
        std::slice::from_ref(&run),
    )
    .await
    .expect("commit again");
    assert_eq!(first, again);
    let other = pg::commit_flush(&log.pool, "def", "data/x/def.fob", 136, &[run])
        .await
        .expect("another commit");
    assert_eq!(other, vec![first[0] + 5], "the retry took no offsets");
}

#[tokio::test]
async fn retention_drops_old_runs_and_hands_their_objects_to_the_collector() {
    let d = dir("retention");
    let config = config("retention", &d);
    let log = ObjectLog::open(&config).expect("open");
    let small = StreamConfig {
        retention_bytes: Some(1),
        retention_ms: None,
        ..StreamConfig::default()
    };
    log.create_stream("r", &small).expect("create");
    for i in 0..5 {
        log.append("r", 0, AppendData::Records(vec![rec(&i.to_string())]))
            .await
            .expect("append");
    }
    assert_eq!(log.enforce_retention().expect("retention"), 4);
    let o = log.offsets("r", 0).expect("offsets");
    assert_eq!((o.log_start, o.high_watermark), (4, 5));
    assert_eq!(values(&log, "r", 4), vec![(4, "4".into())]);
    assert!(matches!(
        log.read("r", 0, 0, 100),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    let client = log.pool.get().await.expect("client");
    let marked: i64 = client
        .query_one(
            "SELECT count(*) FROM objects WHERE deleted_after IS NOT NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        marked, 4,
        "each dropped run's object is left to the collector"
    );
}

#[tokio::test]
async fn a_damaged_object_is_refused_not_served() {
    let d = dir("damaged");
    let mut config = config("damaged", &d);
    config.cache_bytes = 0;
    let log = ObjectLog::open(&config).expect("open");
    log.create_stream("s", &StreamConfig::default())
        .expect("create");
    log.append("s", 0, AppendData::Records(vec![rec("precious")]))
        .await
        .expect("append");
    let node = std::fs::read_dir(d.join("data"))
        .expect("data")
        .next()
        .expect("a node dir")
        .expect("entry")
        .path();
    let object = std::fs::read_dir(node)
        .expect("objects")
        .next()
        .expect("an object")
        .expect("entry")
        .path();
    let mut bytes = std::fs::read(&object).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&object, bytes).expect("write");
    let err = log.read("s", 0, 0, 1 << 20).expect_err("a damaged run");
    assert!(err.to_string().contains("CRC"), "{err}");
}
