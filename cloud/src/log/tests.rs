use std::fs::OpenOptions;
use std::io::Write;

use ferry_protocol::kafka::batch::records;

use super::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn rec(value: &str) -> NewRecord {
    NewRecord {
        timestamp: 1_000,
        key: Some(Bytes::from_static(b"sensors/t1")),
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        headers: vec![("qos".into(), Some(Bytes::from_static(b"1")))],
    }
}

/// Every record value from `from` on, in offset order, with its offset.
fn values(log: &dyn Storage, stream: &str, from: i64) -> Result<Vec<(i64, String)>, LogError> {
    let mut out = Vec::new();
    let mut offset = from;
    loop {
        let r = log.read(stream, 0, offset, 64 * 1024)?;
        if r.batches.is_empty() {
            return Ok(out);
        }
        let mut at = 0;
        while at < r.batches.len() {
            let h = BatchHeader::parse(&r.batches[at..]).expect("header");
            for rec in records(&r.batches[at..]).expect("records") {
                let rec = rec.expect("record");
                if rec.offset >= offset {
                    out.push((
                        rec.offset,
                        String::from_utf8(rec.value.expect("value").to_vec()).expect("utf8"),
                    ));
                }
            }
            offset = h.last_offset() + 1;
            at += h.total_len();
        }
    }
}

/// A fresh log of each backend, named for the messages of a test that runs on both: what
/// one backend accepts and answers, the other must too.
fn backends(test: &str) -> Vec<(&'static str, Arc<dyn Storage>)> {
    let segment: Arc<dyn Storage> = SegmentLog::open(&temp_dir(test), true, 4096).expect("open");
    let object: Arc<dyn Storage> = ObjectLog::open(&object::tests::config(
        test,
        &temp_dir(&format!("{test}-objects")),
    ))
    .expect("open the object log");
    vec![
        ("segment", segment),
        ("memory", MemoryLog::new()),
        ("object", object),
    ]
}

fn small_segments() -> StreamConfig {
    StreamConfig {
        segment_bytes: 1024,
        index_interval_bytes: 200,
        ..StreamConfig::default()
    }
}

#[tokio::test]
async fn appends_get_consecutive_offsets_and_read_back_in_order() {
    for (kind, log) in backends("order") {
        log.create_stream("mqtt", &StreamConfig::default())
            .expect("create");
        let a = log
            .append("mqtt", 0, AppendData::Records(vec![rec("a"), rec("b")]))
            .await
            .expect("append");
        let b = log
            .append("mqtt", 0, AppendData::Records(vec![rec("c")]))
            .await
            .expect("append");
        assert_eq!(
            (a.base_offset, a.last_offset, b.base_offset, b.last_offset),
            (0, 1, 2, 2)
        );
        let got = values(&*log, "mqtt", 0).expect("read");
        assert_eq!(
            got,
            vec![(0, "a".into()), (1, "b".into()), (2, "c".into())],
            "{kind}"
        );
        assert_eq!(values(&*log, "mqtt", 1).expect("read")[0], (1, "b".into()));
        assert_eq!(
            log.offsets("mqtt", 0).expect("offsets"),
            Offsets {
                log_start: 0,
                high_watermark: 3
            }
        );
        assert!(matches!(
            log.read("mqtt", 0, 4, 100),
            Err(LogError::OffsetOutOfRange { .. })
        ));
        assert!(matches!(
            log.read("nope", 0, 0, 100),
            Err(LogError::UnknownStream(_))
        ));
    }
}

#[tokio::test]
async fn concurrent_appends_are_merged_into_few_batches_and_each_gets_its_own_offsets() {
    let dir = temp_dir("merge");
    let log = SegmentLog::open(&dir, true, 4096).expect("open");
    log.create_stream("s", &StreamConfig::default())
        .expect("create");
    let tasks: Vec<_> = (0..500)
        .map(|i| tokio::spawn(log.append("s", 0, AppendData::Records(vec![rec(&i.to_string())]))))
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task").expect("append"));
    }
    let got = values(&*log, "s", 0).expect("read");
    assert_eq!(got.len(), 500);
    for (i, r) in results.iter().enumerate() {
        // Request i appended the record "i": its reply points at that record.
        assert_eq!(r.base_offset, r.last_offset);
        assert_eq!(
            got[r.base_offset as usize].1,
            i.to_string(),
            "reply {i}: {r:?}"
        );
    }
    let mut offsets: Vec<_> = results.iter().map(|r| r.base_offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..500).collect::<Vec<_>>());
    // Requests queued behind each other were committed together, as fewer batches.
    let r = log.read("s", 0, 0, usize::MAX).expect("read");
    let mut batches = 0;
    let mut at = 0;
    while at < r.batches.len() {
        at += BatchHeader::parse(&r.batches[at..])
            .expect("header")
            .total_len();
        batches += 1;
    }
    assert!(batches < 500, "{batches} batches for 500 queued appends");
}

#[tokio::test]
async fn the_log_survives_a_reopen_across_many_segments() {
    let dir = temp_dir("reopen");
    {
        let log = SegmentLog::open(&dir, true, 64).expect("open");
        log.create_stream("s", &small_segments()).expect("create");
        for i in 0..100 {
            log.append("s", 0, AppendData::Records(vec![rec(&format!("{i:03}"))]))
                .await
                .expect("append");
        }
        assert!(log.streams()[0].partitions[0].segments > 5);
    }
    let log = SegmentLog::open(&dir, true, 64).expect("reopen");
    assert!(log.damage().is_empty(), "{:?}", log.damage());
    let got = values(&*log, "s", 0).expect("read");
    assert_eq!(got.len(), 100);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, (o, v))| *o == i as i64 && *v == format!("{i:03}")));
    // Reads that start in an older segment, found through its reloaded index.
    assert_eq!(values(&*log, "s", 37).expect("read")[0], (37, "037".into()));
    let next = log
        .append("s", 0, AppendData::Records(vec![rec("new")]))
        .await
        .expect("append");
    assert_eq!(next.base_offset, 100);
}

fn active_segment(dir: &Path, stream: &str) -> PathBuf {
    let pdir = dir.join(format!("{stream}-0"));
    let mut logs: Vec<_> = std::fs::read_dir(&pdir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().expect("a segment")
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_and_nothing_before_it_is_lost() {
    let dir = temp_dir("torn");
    let whole_len;
    {
        let log = SegmentLog::open(&dir, true, 64).expect("open");
        log.create_stream("s", &StreamConfig::default())
            .expect("create");
        for i in 0..10 {
            log.append("s", 0, AppendData::Records(vec![rec(&i.to_string())]))
                .await
                .expect("append");
        }
        let seg = active_segment(&dir, "s");
        whole_len = std::fs::metadata(&seg).expect("meta").len();
        // A crash in the middle of writing the next batch: half of a real batch.
        let mut b = BatchBuilder::new(5);
        b.push(5, None, Some(b"never acknowledged"), &[]);
        let torn = b.finish(10);
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("open")
            .write_all(&torn[..torn.len() / 2])
            .expect("write");
    }
    let log = SegmentLog::open(&dir, true, 64).expect("reopen");
    assert!(
        matches!(log.damage(), [(_, Damage::TornTail { at, .. })] if *at == whole_len),
        "{:?}",
        log.damage()
    );
    assert_eq!(
        std::fs::metadata(active_segment(&dir, "s"))
            .expect("meta")
            .len(),
        whole_len
    );
    let got = values(&*log, "s", 0).expect("read");
    assert_eq!(
        got.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>(),
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    );
    assert_eq!(
        log.append("s", 0, AppendData::Records(vec![rec("10")]))
            .await
            .expect("append")
            .base_offset,
        10
    );
}

#[tokio::test]
async fn a_flipped_bit_in_the_middle_is_reported_not_served_and_not_truncated() {
    let dir = temp_dir("bitflip");
    {
        let log = SegmentLog::open(&dir, true, 64).expect("open");
        log.create_stream("s", &StreamConfig::default())
            .expect("create");
        for i in 0..10 {
            log.append(
                "s",
                0,
                AppendData::Records(vec![rec(&format!("value-{i}"))]),
            )
            .await
            .expect("append");
        }
    }
    let seg = active_segment(&dir, "s");
    let mut bytes = std::fs::read(&seg).expect("read");
    // Find the fourth batch (offset 3) and flip a bit in its value.
    let mut at = 0;
    for _ in 0..3 {
        at += BatchHeader::parse(&bytes[at..])
            .expect("header")
            .total_len();
    }
    let len = BatchHeader::parse(&bytes[at..])
        .expect("header")
        .total_len();
    bytes[at + len - 4] ^= 0x01;
    std::fs::write(&seg, &bytes).expect("write");

    let log = SegmentLog::open(&dir, true, 64).expect("reopen");
    assert!(
        matches!(log.damage(), [(_, Damage::Corrupt { position, .. })] if *position == at as u64),
        "{:?}",
        log.damage()
    );
    assert_eq!(
        std::fs::metadata(&seg).expect("meta").len(),
        bytes.len() as u64,
        "nothing truncated"
    );
    assert!(matches!(
        log.read("s", 0, 3, 1024),
        Err(LogError::Corrupt { .. })
    ));
    assert!(matches!(
        log.read("s", 0, 0, usize::MAX),
        Err(LogError::Corrupt { .. })
    ));
    let after = values(&*log, "s", 4).expect("read after the damage");
    assert_eq!(after.first(), Some(&(4, "value-4".into())));
    assert_eq!(after.len(), 6);
    assert_eq!(
        log.append("s", 0, AppendData::Records(vec![rec("x")]))
            .await
            .expect("append")
            .base_offset,
        10
    );
}

#[tokio::test]
async fn retention_drops_whole_old_segments_by_bytes_and_by_age() {
    let dir = temp_dir("retention");
    let log = SegmentLog::open(&dir, true, 64).expect("open");
    let by_bytes = StreamConfig {
        retention_bytes: Some(3000),
        ..small_segments()
    };
    log.create_stream("b", &by_bytes).expect("create");
    let by_age = StreamConfig {
        retention_ms: Some(60_000),
        ..small_segments()
    };
    log.create_stream("a", &by_age).expect("create");
    let old = now_ms() - 3_600_000;
    for i in 0..100 {
        log.append("b", 0, AppendData::Records(vec![rec(&i.to_string())]))
            .await
            .expect("append");
        let mut r = rec(&i.to_string());
        r.timestamp = if i < 50 { old } else { now_ms() };
        log.append("a", 0, AppendData::Records(vec![r]))
            .await
            .expect("append");
    }
    assert!(log.enforce_retention().expect("retention") > 0);
    let b = log.offsets("b", 0).expect("offsets");
    let info = log.streams();
    let b_bytes = info.iter().find(|s| s.name == "b").expect("b").partitions[0].bytes;
    assert!(b.log_start > 0 && b.high_watermark == 100);
    assert!(b_bytes <= 3000 + 1024, "{b_bytes} bytes kept");
    assert!(matches!(
        log.read("b", 0, 0, 100),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    assert_eq!(
        values(&*log, "b", b.log_start).expect("read").len() as i64,
        100 - b.log_start
    );
    // By age: the segments holding only the hour-old records are gone, the new ones stay.
    let a = log.offsets("a", 0).expect("offsets");
    assert!(a.log_start > 0 && a.log_start <= 50, "{a:?}");
    assert!(values(&*log, "a", a.log_start)
        .expect("read")
        .iter()
        .any(|(o, _)| *o == 50));
}

#[tokio::test]
async fn producer_batches_are_stored_as_they_are_and_bad_ones_refused() {
    for (kind, log) in backends("batches") {
        log.create_stream("k", &StreamConfig::default())
            .expect("create");
        let mut b = BatchBuilder::new(7).producer(42, 0, 0);
        b.push(7, Some(b"k"), Some(b"v1"), &[]);
        b.push(8, Some(b"k"), Some(b"v2"), &[]);
        let produced = b.finish(0);
        let r = log
            .append("k", 0, AppendData::Batches(BytesMut::from(&produced[..])))
            .await
            .expect("append");
        assert_eq!((r.base_offset, r.last_offset), (0, 1));
        let stored = log.read("k", 0, 0, 1 << 20).expect("read").batches;
        // Byte for byte, but for the base offset the log assigned (0 here too).
        assert_eq!(&stored[..], &produced[..], "{kind}");
        let mut bad = BytesMut::from(&produced[..]);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(
            log.append("k", 0, AppendData::Batches(bad)).await,
            Err(LogError::BadBatch(_))
        ));
        assert_eq!(log.offsets("k", 0).expect("offsets").high_watermark, 2);
    }
}

#[tokio::test]
async fn offsets_are_found_by_timestamp() {
    for (kind, log) in backends("time") {
        log.create_stream("t", &small_segments()).expect("create");
        for i in 0..50i64 {
            let mut r = rec(&i.to_string());
            r.timestamp = 10_000 + i * 100;
            log.append("t", 0, AppendData::Records(vec![r]))
                .await
                .expect("append");
        }
        assert_eq!(
            log.offset_for_time("t", 0, 0).expect("lookup"),
            Some(0),
            "{kind}"
        );
        assert_eq!(
            log.offset_for_time("t", 0, 12_000).expect("lookup"),
            Some(20)
        );
        assert_eq!(
            log.offset_for_time("t", 0, 12_050).expect("lookup"),
            Some(21)
        );
        assert_eq!(log.offset_for_time("t", 0, 99_000).expect("lookup"), None);
    }
}

#[tokio::test]
async fn a_deleted_stream_is_gone_refuses_appends_and_comes_back_empty_when_made_again() {
    let dir = temp_dir("delete");
    {
        let log = SegmentLog::open(&dir, true, 64).expect("open");
        let two = StreamConfig {
            partitions: 2,
            ..small_segments()
        };
        log.create_stream("gone", &two).expect("create");
        log.create_stream("kept", &small_segments())
            .expect("create");
        for i in 0..50 {
            for s in ["gone", "kept"] {
                log.append(s, 0, AppendData::Records(vec![rec(&format!("{i}"))]))
                    .await
                    .expect("append");
            }
        }
        assert!(log.delete_stream("gone").expect("delete"));
        assert!(
            !log.delete_stream("gone").expect("a second delete"),
            "no such stream"
        );
        assert!(matches!(
            log.append("gone", 0, AppendData::Records(vec![rec("late")]))
                .await,
            Err(LogError::UnknownStream(_))
        ));
        assert!(matches!(
            values(&*log, "gone", 0),
            Err(LogError::UnknownStream(_))
        ));
        let names: Vec<_> = log.streams().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["kept"]);
        // Made again: empty, from offset 0.
        log.create_stream("gone", &small_segments())
            .expect("create again");
        let first = log
            .append("gone", 0, AppendData::Records(vec![rec("new")]))
            .await
            .expect("append");
        assert_eq!(first.base_offset, 0);
    }
    // What a crash mid-delete leaves is removed at open, not opened as a stream.
    std::fs::create_dir_all(dir.join(format!("{DELETED_PREFIX}old-0"))).expect("mkdir");
    let log = SegmentLog::open(&dir, true, 64).expect("reopen");
    let names: Vec<_> = log.streams().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["gone", "kept"]);
    assert_eq!(values(&*log, "gone", 0).expect("read"), [(0, "new".into())]);
    assert_eq!(values(&*log, "kept", 0).expect("read").len(), 50);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n.starts_with(DELETED_PREFIX)),
        "{left:?}"
    );
}

#[test]
fn a_read_result_walks_its_batches_and_ends_at_one_cut_short() {
    let batch = |base: i64, n: i32| {
        let mut b = ferry_protocol::kafka::BatchBuilder::new(1_000);
        for i in 0..n {
            b.push(i64::from(i), Some(b"k"), Some(b"v"), &[]);
        }
        b.finish(base)
    };
    let (a, b) = (batch(0, 3), batch(3, 2));
    let whole = ReadResult {
        batches: Bytes::from([a.to_vec(), b.to_vec()].concat()),
        high_watermark: 5,
    };
    let walked: Vec<(i64, i64, usize)> = whole
        .iter()
        .map(|r| r.map(|(h, bytes)| (h.base_offset, h.last_offset(), bytes.len())))
        .collect::<Result<_, _>>()
        .expect("whole batches");
    assert_eq!(walked, vec![(0, 2, a.len()), (3, 4, b.len())]);
    // The second batch cut short: the first is served, then an error, then nothing.
    let cut = ReadResult {
        batches: whole.batches.slice(..whole.batches.len() - 1),
        high_watermark: 5,
    };
    let mut it = cut.iter();
    assert_eq!(it.next().expect("one").expect("whole").0.base_offset, 0);
    assert!(matches!(it.next(), Some(Err(LogError::BadBatch(_)))));
    assert!(it.next().is_none());
}

#[tokio::test]
async fn a_segment_older_than_segment_ms_is_rolled_at_the_next_append() {
    let dir = temp_dir("roll-age");
    let log = SegmentLog::open(&dir, true, 64).expect("open");
    let config = StreamConfig {
        segment_ms: 300,
        ..StreamConfig::default()
    };
    log.create_stream("t", &config).expect("create");
    let segments = || {
        std::fs::read_dir(dir.join("t-0"))
            .expect("the partition's directory")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count()
    };
    for i in 0..3 {
        log.append("t", 0, AppendData::Records(vec![rec(&i.to_string())]))
            .await
            .expect("append");
    }
    assert_eq!(
        segments(),
        1,
        "young and far below segment_bytes: one segment"
    );
    // Not a wait for something to happen: the active segment must be older than 300 ms.
    std::thread::sleep(std::time::Duration::from_millis(400));
    log.append("t", 0, AppendData::Records(vec![rec("3")]))
        .await
        .expect("append");
    assert_eq!(segments(), 2, "the old segment rolled");
    let got = values(&*log, "t", 0).expect("read");
    assert_eq!(
        got,
        (0..4).map(|i| (i, i.to_string())).collect::<Vec<_>>(),
        "read across both segments"
    );
}

#[tokio::test]
async fn readers_are_told_of_each_commit_and_streams_report_their_offsets() {
    for (kind, log) in backends("watch") {
        let two = StreamConfig {
            partitions: 2,
            ..StreamConfig::default()
        };
        log.create_stream("w", &two).expect("create");
        let mut commits = log.watch_commits();
        commits.borrow_and_update();
        log.append("w", 1, AppendData::Records(vec![rec("x"), rec("y")]))
            .await
            .expect("append");
        // The change is there by the time the append is answered.
        assert!(commits.has_changed().expect("open"), "{kind}");
        let info = log.streams();
        assert_eq!(info.len(), 1, "{kind}");
        let offsets: Vec<_> = info[0]
            .partitions
            .iter()
            .map(|p| p.offsets.high_watermark)
            .collect();
        assert_eq!(offsets, [0, 2], "{kind}");
        assert!(info[0].partitions[1].bytes > 0, "{kind}");
        assert!(matches!(
            log.offsets("w", 2),
            Err(LogError::UnknownPartition { partition: 2, .. })
        ));
        assert!(matches!(
            log.create_stream("no/slash", &two),
            Err(LogError::BadStreamName(_))
        ));
        assert!(matches!(
            log.append("w", 0, AppendData::Records(Vec::new())).await,
            Err(LogError::BadBatch(_))
        ));
        let stats = log.stats();
        assert_eq!(stats.records, 2, "{kind}: {stats:?}");
        assert!(log.delete_stream("w").expect("delete"), "{kind}");
        assert!(log.streams().is_empty(), "{kind}");
    }
}

#[tokio::test]
async fn memory_retention_drops_old_batches_from_the_front_and_keeps_the_newest() {
    let log = MemoryLog::new();
    let config = StreamConfig {
        retention_bytes: Some(1),
        ..StreamConfig::default()
    };
    log.create_stream("r", &config).expect("create");
    for i in 0..5 {
        log.append("r", 0, AppendData::Records(vec![rec(&i.to_string())]))
            .await
            .expect("append");
    }
    assert_eq!(log.enforce_retention().expect("retention"), 4);
    let offsets = log.offsets("r", 0).expect("offsets");
    assert_eq!((offsets.log_start, offsets.high_watermark), (4, 5));
    assert_eq!(values(&*log, "r", 4).expect("read"), [(4, "4".into())]);
    assert!(matches!(
        log.read("r", 0, 3, 100),
        Err(LogError::OffsetOutOfRange { start: 4, .. })
    ));
}
