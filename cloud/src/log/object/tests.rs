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

/// Every batch of partition 0 of `stream`, as served (offsets absolute), in order.
fn batches(log: &ObjectLog, stream: &str) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let r = log.read(stream, 0, offset, 1 << 20).expect("read");
        if r.batches.is_empty() {
            return out;
        }
        for b in r.iter() {
            let (h, whole) = b.expect("batch");
            out.push(Bytes::copy_from_slice(whole));
            offset = h.last_offset() + 1;
        }
    }
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

/// The schema's migrations: a new database is brought to the newest version, a second run
/// (another node starting) changes nothing, version 6 brought back a `producers` table
/// (dropped by version 3), version 7 made `mqtt_clients` and version 8 gave it a `session`
/// column.
#[tokio::test]
async fn migrations_bring_a_database_to_the_newest_version_once() {
    let url = super::testing::database("migrations");
    let pool = pg::pool(&url, 2, Duration::from_secs(10)).expect("pool");
    assert_eq!(pg::migrate(&pool).await.expect("migrate"), 8);
    assert_eq!(pg::migrate(&pool).await.expect("again"), 8);
    let client = pool.get().await.expect("connection");
    let versions: Vec<i32> = client
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .expect("versions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7, 8], "each applied once");
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .expect("tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.iter().any(|t| t == "runs"), "{tables:?}");
    assert!(tables.iter().any(|t| t == "producers"), "{tables:?}");
    assert!(tables.iter().any(|t| t == "mqtt_clients"), "{tables:?}");
    assert!(tables.iter().any(|t| t == "mqtt_wills"), "{tables:?}");
    assert!(tables.iter().any(|t| t == "mqtt_retained"), "{tables:?}");
    let session: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_name = 'mqtt_clients' AND column_name = 'session'",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(session, ["session"]);
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
        "n",
        "abc",
        "data/x/abc.fob",
        136,
        std::slice::from_ref(&run),
        &[],
    )
    .await
    .expect("commit");
    // The answer was lost: the same flush commits again.
    let again = pg::commit_flush(
        &log.pool,
        "n",
        "abc",
        "data/x/abc.fob",
        136,
        std::slice::from_ref(&run),
        &[],
    )
    .await
    .expect("commit again");
    assert_eq!(first, again);
    let pg::Committed::Done(first) = first else {
        panic!("no producers, no conflicts: {first:?}")
    };
    let other = pg::commit_flush(&log.pool, "n", "def", "data/x/def.fob", 136, &[run], &[])
        .await
        .expect("another commit");
    assert_eq!(
        other,
        pg::Committed::Done(vec![first[0] + 5]),
        "the retry took no offsets"
    );
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

/// Waits (on `watch_commits`, up to 10 s) until `done` holds for `log`.
async fn until(log: &ObjectLog, what: &str, mut done: impl FnMut(&ObjectLog) -> bool) {
    let mut commits = log.watch_commits();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(log) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "not seen within 10 s: {what}");
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), commits.changed()).await;
    }
}

/// Two nodes on one database and one store: `a` and `b`.
fn two_nodes(test: &str) -> (Arc<ObjectLog>, Arc<ObjectLog>) {
    let (a, b, _) = two_nodes_with(test, |_| {});
    (a, b)
}

/// [`two_nodes`] with settings changed by `change`, and the store's directory.
fn two_nodes_with(
    test: &str,
    change: impl FnOnce(&mut ObjectConfig),
) -> (Arc<ObjectLog>, Arc<ObjectLog>, std::path::PathBuf) {
    let d = dir(test);
    let mut config = config(test, &d);
    change(&mut config);
    config.node = Some("a".into());
    let a = ObjectLog::open(&config).expect("open a");
    config.node = Some("b".into());
    let b = ObjectLog::open(&config).expect("open b");
    (a, b, d)
}

/// Stream `s` made on `a` with `n` records appended one flush each, seen by `b`: the
/// (offset, value) pairs.
async fn one_run_each(a: &ObjectLog, b: &ObjectLog, n: i64) -> Vec<(i64, String)> {
    a.create_stream("s", &StreamConfig::default())
        .expect("create");
    let sent: Vec<(i64, String)> = (0..n).map(|i| (i, format!("record {i}"))).collect();
    for (_, v) in &sent {
        a.append("s", 0, AppendData::Records(vec![rec(v)]))
            .await
            .expect("append");
    }
    until(b, "a's appends", |b| {
        b.offsets("s", 0).is_ok_and(|o| o.high_watermark == n)
    })
    .await;
    sent
}

#[tokio::test]
async fn another_nodes_streams_commits_and_retention_are_followed() {
    let (a, b) = two_nodes("follow");
    let small = StreamConfig {
        retention_bytes: Some(1),
        retention_ms: None,
        ..StreamConfig::default()
    };
    a.create_stream("s", &small).expect("create");
    until(&b, "the stream a made", |b| b.stream("s").is_ok()).await;
    let woken = b.watch_commits();
    for v in ["one", "two", "three"] {
        a.append("s", 0, AppendData::Records(vec![rec(v)]))
            .await
            .expect("append on a");
    }
    until(&b, "a's commits", |b| {
        b.offsets("s", 0).is_ok_and(|o| o.high_watermark == 3)
    })
    .await;
    assert!(
        woken.has_changed().expect("watch"),
        "b's readers were woken"
    );
    assert_eq!(
        values(&b, "s", 0),
        vec![(0, "one".into()), (1, "two".into()), (2, "three".into())]
    );
    // b writes after a, and a reads both, in one order.
    let appended = b
        .append("s", 0, AppendData::Records(vec![rec("four")]))
        .await
        .expect("append on b");
    assert_eq!(appended.base_offset, 3, "offsets follow on across nodes");
    until(&a, "b's commit", |a| {
        a.offsets("s", 0).is_ok_and(|o| o.high_watermark == 4)
    })
    .await;
    assert_eq!(
        values(&a, "s", 1)
            .iter()
            .map(|(o, _)| *o)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(values(&a, "s", 3), vec![(3, "four".into())]);
    // Retention on a moves b's start.
    assert_eq!(a.enforce_retention().expect("retention"), 3);
    until(&b, "a's retention", |b| {
        b.offsets("s", 0).is_ok_and(|o| o.log_start == 3)
    })
    .await;
    assert!(matches!(
        b.read("s", 0, 0, 100),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    // A stream a deletes is gone on b too.
    assert!(a.delete_stream("s").expect("delete"));
    until(&b, "a's delete", |b| b.streams().is_empty()).await;
    assert!(matches!(
        b.append("s", 0, AppendData::Records(vec![rec("late")]))
            .await,
        Err(LogError::UnknownStream(_))
    ));
}

#[tokio::test]
async fn a_lost_listening_connection_is_replaced_and_what_it_missed_caught_up() {
    let (a, b) = two_nodes("relisten");
    a.create_stream("s", &StreamConfig::default())
        .expect("create");
    until(&b, "the stream a made", |b| b.stream("s").is_ok()).await;
    let admin = a.pool.get().await.expect("client");
    let listeners = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'ferry-log-listen' AND datname = current_database()";
    let cut = admin.query(listeners, &[]).await.expect("terminate");
    assert_eq!(cut.len(), 2, "both nodes listen");
    // Written while b is not listening (it waits before connecting again): caught up with
    // when it is back.
    a.append("s", 0, AppendData::Records(vec![rec("missed")]))
        .await
        .expect("append");
    until(&b, "the commit made while b was not listening", |b| {
        b.offsets("s", 0).is_ok_and(|o| o.high_watermark == 1)
    })
    .await;
    // And b listens again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = \
                 'ferry-log-listen' AND datname = current_database()",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if n == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} listeners");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.append("s", 0, AppendData::Records(vec![rec("heard")]))
        .await
        .expect("append");
    until(&b, "a's commit after b listens again", |b| {
        b.offsets("s", 0).is_ok_and(|o| o.high_watermark == 2)
    })
    .await;
    assert_eq!(
        values(&b, "s", 0),
        vec![(0, "missed".into()), (1, "heard".into())]
    );
}

#[test]
fn a_notice_names_its_node_and_what_moved_or_says_everything_when_too_long() {
    let n = pg::Notice {
        node: "n1".into(),
        partitions: vec![("s.a-b_c".into(), 0), ("t".into(), 12)],
        rewritten: vec![("t".into(), 3)],
        streams: true,
        everything: false,
    };
    assert_eq!(n.encode(), "n1 + s.a-b_c/0 t/12 =t/3");
    assert_eq!(pg::Notice::parse(&n.encode()), Some(n));
    // Tokens a newer node may add are skipped; an empty payload is not ours.
    let odd = pg::Notice::parse("n2 ?x t/1 t/x").expect("parsed");
    assert_eq!(odd.partitions, vec![("t".to_owned(), 1)]);
    assert_eq!(pg::Notice::parse(""), None);
    let many = pg::Notice {
        node: "n1".into(),
        partitions: (0..2000).map(|p| ("stream".to_owned(), p)).collect(),
        ..pg::Notice::default()
    };
    let payload = many.encode();
    assert!(payload.len() < 8000, "{}", payload.len());
    assert!(pg::Notice::parse(&payload).expect("parsed").everything);
}

fn row(first: i64, last: i64, len: u64) -> RunRow {
    RunRow {
        first_offset: first,
        last_offset: last,
        object_key: format!("o{first}"),
        byte_start: 36,
        byte_len: len,
        crc: 0,
        first_timestamp: 0,
        max_timestamp: 0,
    }
}

/// Runs of `lens` bytes, one record each, offsets following on from 0.
fn rows(lens: &[u64]) -> Vec<RunRow> {
    lens.iter()
        .enumerate()
        .map(|(i, len)| row(i as i64, i as i64, *len))
        .collect()
}

#[test]
fn compaction_takes_windows_of_small_runs_that_follow_on() {
    use super::compact::{windows, COMPACT_RUNS};
    // Enough small runs are rewritten together; a few are left.
    assert_eq!(
        windows(&rows(&[10; COMPACT_RUNS]), 1000),
        vec![0..COMPACT_RUNS]
    );
    assert!(windows(&rows(&[10; COMPACT_RUNS - 1]), 1000).is_empty());
    // Or half the target in bytes; never more than the target in one.
    assert_eq!(
        windows(&rows(&[100; 30]), 1000),
        vec![0..10, 10..20, 20..30]
    );
    // A big run is left alone and splits windows.
    let mut lens = vec![300, 300, 600, 300, 300];
    assert_eq!(windows(&rows(&lens), 1000), vec![0..2, 3..5]);
    // A run bigger than all the rest of its window is not rewritten for them.
    lens = vec![450];
    lens.extend([10; COMPACT_RUNS]);
    assert_eq!(windows(&rows(&lens), 1000), vec![1..COMPACT_RUNS + 1]);
    // Offsets that do not follow on (retention, or a gap) split windows.
    let mut gap = rows(&[300, 300, 300]);
    gap[2].first_offset = 5;
    gap[2].last_offset = 5;
    assert_eq!(windows(&gap, 1000), vec![0..2]);
}

/// How many rows of `table` the log's database holds.
async fn count(log: &ObjectLog, table: &str) -> i64 {
    let client = log.pool.get().await.expect("client");
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn compaction_rewrites_small_runs_and_every_node_reads_the_same_records() {
    let (a, b, d) = two_nodes_with("compact", |c| {
        c.compact_bytes = 4096;
        c.orphan_grace_secs = 0;
    });
    let sent = one_run_each(&a, &b, 100).await;
    // b knows the runs as they were.
    assert_eq!(values(&b, "s", 0), sent);
    let served_before = batches(&a, "s");
    let runs_before = count(&a, "runs").await;
    assert_eq!(runs_before, 100, "one run per flush");
    let rewritten = a.compact().expect("compact");
    assert!(rewritten >= 1);
    let runs_after = count(&a, "runs").await;
    assert!(runs_after <= 10, "{runs_after} runs after compaction");
    // Nothing moved: the same batches byte for byte (CRCs included) at the same offsets,
    // on both nodes, from anywhere.
    assert_eq!(batches(&a, "s"), served_before);
    assert_eq!(batches(&b, "s"), served_before);
    assert_eq!(values(&a, "s", 0), sent);
    assert_eq!(values(&b, "s", 0), sent);
    assert_eq!(values(&b, "s", 57), sent[57..].to_vec());
    // The old objects go (grace 0); both nodes still read everything.
    a.collect().expect("collect");
    assert_eq!(count(&a, "objects").await, runs_after);
    let files = std::fs::read_dir(d.join("data/a"))
        .expect("objects")
        .count() as i64;
    assert_eq!(files, runs_after, "only the objects rows refer to are left");
    b.drop_cache();
    assert_eq!(values(&b, "s", 0), sent);
    assert_eq!(values(&a, "s", 30), sent[30..].to_vec());
    // And the log goes on after it.
    let next = b
        .append("s", 0, AppendData::Records(vec![rec("after")]))
        .await
        .expect("append");
    assert_eq!(next.base_offset, 100);
}

#[tokio::test]
async fn two_nodes_compacting_one_partition_at_once_rewrite_it_once() {
    let (a, b, _) = two_nodes_with("compact2", |c| c.compact_bytes = 1 << 20);
    let sent = one_run_each(&a, &b, 40).await;
    let (a2, b2) = (a.clone(), b.clone());
    let ta = std::thread::spawn(move || a2.compact().expect("compact on a"));
    let tb = std::thread::spawn(move || b2.compact().expect("compact on b"));
    let (na, nb) = (ta.join().expect("a"), tb.join().expect("b"));
    assert!(na + nb >= 1, "someone compacted");
    // Rows never overlap and cover every offset once.
    let client = a.pool.get().await.expect("client");
    let spans: Vec<(i64, i64)> = client
        .query(
            "SELECT first_offset, last_offset FROM runs ORDER BY first_offset",
            &[],
        )
        .await
        .expect("runs")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut expect = 0;
    for (first, last) in &spans {
        assert_eq!(*first, expect, "{spans:?}");
        expect = last + 1;
    }
    assert_eq!(expect, 40);
    assert!(spans.len() < 40, "{spans:?}");
    assert_eq!(values(&a, "s", 0), sent);
    assert_eq!(values(&b, "s", 0), sent);
}

#[test]
fn the_cache_lets_the_least_recently_used_run_go_first() {
    let mut c = Cache {
        max: 20,
        ..Cache::default()
    };
    let key = |n: u64| ("o".to_owned(), n);
    c.put(key(1), Bytes::from(vec![1; 10]));
    c.put(key(2), Bytes::from(vec![2; 10]));
    assert!(c.get(&key(1)).is_some(), "1 used last");
    c.put(key(3), Bytes::from(vec![3; 10]));
    assert!(c.get(&key(2)).is_none(), "2 went first");
    assert!(c.get(&key(1)).is_some() && c.get(&key(3)).is_some());
    assert_eq!(c.bytes, 20);
    c.put(key(4), Bytes::from(vec![4; 21]));
    assert!(c.get(&key(4)).is_none(), "bigger than the cache: not kept");
}

/// Membership: two nodes join with their addresses and each sees both; their leases
/// (3 s) are renewed, so both are still there after more than a lease's length; one dropped
/// without leaving (as a crash: nothing renews its lease) is gone for the other once its lease
/// ran out; the other leaves and is gone at once.
#[test]
fn nodes_are_members_while_their_lease_is_renewed() {
    let (a, b, _) = two_nodes_with("members", |c| c.lease_ms = 3_000);
    a.join(serde_json::json!({ "mqtt": ["127.0.0.1:1883"] }))
        .expect("a joins");
    b.join(serde_json::json!({ "mqtt": ["127.0.0.1:1884"] }))
        .expect("b joins");
    let names = |log: &ObjectLog| -> Vec<String> {
        log.members()
            .expect("members")
            .into_iter()
            .map(|m| m.name)
            .collect()
    };
    assert_eq!(names(&a), ["a", "b"]);
    let b_seen = a.members().expect("members").remove(1);
    assert_eq!(b_seen.addrs["mqtt"][0], "127.0.0.1:1884");
    assert!(b_seen.lease_left_ms > 0 && b_seen.lease_left_ms <= 3_000);
    // Longer than a lease later both are still members: their leases were renewed.
    std::thread::sleep(Duration::from_millis(4_000));
    assert_eq!(names(&b), ["a", "b"], "leases renewed");
    // b dies (nothing renews its lease, nothing deletes its row): gone once the lease ran out.
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while names(&a) != ["a"] {
        assert!(
            std::time::Instant::now() < deadline,
            "b's lease runs out: {:?}",
            names(&a)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    a.leave().expect("a leaves");
    assert!(names(&a).is_empty(), "gone at once");
}

/// Leases: one owner at a time. `a` takes a lease (token 1) and renews it (same token); `b`
/// cannot take it while it holds; once it runs out `b` takes it with token 2 and `a` can
/// neither renew it nor commit metadata fenced by its old token, while `b` can. Then both
/// nodes grab a 20 ms lease as fast as they can for 2 s, letting it lapse each time they
/// had it: every token was ever held by one owner only, and tokens only grow.
#[test]
fn a_lease_has_one_owner_at_a_time_and_fences_the_one_that_lost_it() {
    use crate::meta::{Command, Meta};
    let (a, b, d) = two_nodes_with("leases", |_| {});
    let short = Duration::from_millis(300);
    assert_eq!(a.acquire_lease("k", "g", short).expect("a"), Some(1));
    assert_eq!(a.acquire_lease("k", "g", short).expect("a again"), Some(1));
    assert_eq!(
        b.acquire_lease("k", "g", short).expect("b"),
        None,
        "a holds it"
    );
    let holder = b.lease_holder("k", "g").expect("holder").expect("held");
    assert_eq!((holder.owner.as_str(), holder.token), ("a", 1));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        b.acquire_lease("k", "g", Duration::from_secs(30))
            .expect("b"),
        Some(2)
    );
    assert_eq!(
        a.acquire_lease("k", "g", short).expect("a"),
        None,
        "b holds it now"
    );
    // Given up, it is free at once, and its next owner's token is a new one.
    a.release_lease("k", "g")
        .expect("not a's to give: nothing happens");
    assert_eq!(a.acquire_lease("k", "g", short).expect("a"), None);
    b.release_lease("k", "g").expect("release");
    assert_eq!(b.lease_holder("k", "g").expect("holder"), None);
    assert_eq!(a.acquire_lease("k", "g", short).expect("a"), Some(3));
    a.release_lease("k", "g").expect("release");
    assert_eq!(
        b.acquire_lease("k", "g", Duration::from_secs(30))
            .expect("b"),
        Some(4)
    );

    let meta_a =
        Meta::shared(&d.join("a.redb"), crate::log::PgMeta::new(a.clone())).expect("meta a");
    let commit = |offset| {
        vec![Command::CommitCursor {
            group: "g".into(),
            stream: "s".into(),
            partition: 0,
            offset,
        }]
    };
    let fence = |owner: &str, token| crate::log::Fence {
        kind: "k".into(),
        key: "g".into(),
        lease: crate::log::Lease {
            owner: owner.into(),
            token,
        },
    };
    assert!(!meta_a
        .apply_fenced(&commit(5), Some(&fence("a", 1)))
        .expect("apply"));
    assert_eq!(
        meta_a.cursor("g", "s", 0).expect("cursor"),
        None,
        "fenced out"
    );
    assert!(meta_a
        .apply_fenced(&commit(7), Some(&fence("b", 4)))
        .expect("apply"));
    assert_eq!(meta_a.cursor("g", "s", 0).expect("cursor"), Some(7));

    // Both grab a short lease over and over, each letting it lapse once it had it: each
    // token had one owner.
    let grab = |log: Arc<ObjectLog>, name: &'static str| {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while std::time::Instant::now() < until {
                if let Some(t) = log
                    .acquire_lease("k", "race", Duration::from_millis(20))
                    .expect("acquire")
                {
                    got.push((t, name));
                    // Let it lapse, so that the other may take it.
                    std::thread::sleep(Duration::from_millis(25));
                }
            }
            got
        })
    };
    let (ta, tb) = (grab(a.clone(), "a"), grab(b.clone(), "b"));
    let (ga, gb) = (ta.join().expect("a"), tb.join().expect("b"));
    assert!(ga.windows(2).all(|w| w[0].0 <= w[1].0) && gb.windows(2).all(|w| w[0].0 <= w[1].0));
    let mut owners: std::collections::HashMap<i64, &str> = Default::default();
    for (token, name) in ga.iter().chain(gb.iter()) {
        assert_eq!(
            *owners.entry(*token).or_insert(name),
            *name,
            "token {token}: one owner"
        );
    }
    assert!(
        owners.len() > 1,
        "the lease passed between them: {} tokens",
        owners.len()
    );
}

/// A batch of `count` records from producer 77 at `epoch`, first sequence `first`.
fn producer_batch(epoch: i16, first: i32, count: i32) -> AppendData {
    let mut b = ferry_protocol::kafka::batch::BatchBuilder::new(1_000).producer(77, epoch, first);
    for i in 0..count {
        b.push(1_000, None, Some(format!("v{}", first + i).as_bytes()), &[]);
    }
    AppendData::Batches(BytesMut::from(&b.finish(0)[..]))
}

/// An idempotent producer moving between two nodes: a batch one node committed and the
/// other is sent again is answered with its offsets, not appended twice; the producer goes
/// on from its sequence on either; a gap and an old epoch are refused.
#[tokio::test]
async fn a_producers_batch_resent_to_another_node_is_answered_not_appended_again() {
    let (a, b) = two_nodes("producer-moved");
    a.create_stream("s", &StreamConfig::default())
        .expect("create");
    until(&b, "the stream", |b| b.offsets("s", 0).is_ok()).await;
    let at = |r: Result<Appended, LogError>| r.map(|a| (a.base_offset, a.last_offset));
    assert_eq!(
        at(a.append("s", 0, producer_batch(0, 0, 5)).await).ok(),
        Some((0, 4))
    );
    assert_eq!(
        at(a.append("s", 0, producer_batch(0, 5, 5)).await).ok(),
        Some((5, 9))
    );
    // Its answer lost with a, the producer sends its last batch to b, then goes on there.
    assert_eq!(
        at(b.append("s", 0, producer_batch(0, 5, 5)).await).ok(),
        Some((5, 9))
    );
    assert_eq!(
        at(b.append("s", 0, producer_batch(0, 10, 5)).await).ok(),
        Some((10, 14))
    );
    assert!(matches!(
        b.append("s", 0, producer_batch(0, 20, 5)).await,
        Err(LogError::Sequence(
            crate::log::sequence::SequenceError::OutOfOrder
        ))
    ));
    // Back on a, which has not read what b appended.
    assert_eq!(
        at(a.append("s", 0, producer_batch(0, 10, 5)).await).ok(),
        Some((10, 14))
    );
    assert_eq!(
        at(a.append("s", 0, producer_batch(0, 15, 5)).await).ok(),
        Some((15, 19))
    );
    // A new epoch starts over and fences the old one.
    assert_eq!(
        at(b.append("s", 0, producer_batch(1, 0, 1)).await).ok(),
        Some((20, 20))
    );
    assert!(matches!(
        a.append("s", 0, producer_batch(0, 20, 1)).await,
        Err(LogError::Sequence(
            crate::log::sequence::SequenceError::StaleEpoch
        ))
    ));
    until(&a, "b's appends", |a| {
        a.offsets("s", 0).is_ok_and(|o| o.high_watermark == 21)
    })
    .await;
    let values: Vec<String> = values(&a, "s", 0).into_iter().map(|(_, v)| v).collect();
    let mut sent: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
    sent.push("v0".into());
    assert_eq!(values, sent, "every batch once, in order");
}

/// The same batch in flight on two nodes at once (a producer's resend to another node
/// while its first copy still waits for the store), beside other appends to the partition:
/// one copy is committed, both answers name it, and nothing else of either flush is lost.
#[tokio::test]
async fn one_batch_committing_on_two_nodes_at_once_is_appended_once() {
    let (a, b, _) = two_nodes_with("producer-race", |c| c.flush_ms = 30);
    a.create_stream("s", &StreamConfig::default())
        .expect("create");
    until(&b, "the stream", |b| b.offsets("s", 0).is_ok()).await;
    for round in 0..10 {
        let first = round * 3;
        let plain = |log: &Arc<ObjectLog>, v: String| {
            tokio::spawn(log.append("s", 0, AppendData::Records(vec![rec(&v)])))
        };
        let pa = plain(&a, format!("a{round}"));
        let on_a = tokio::spawn(a.append("s", 0, producer_batch(0, first, 3)));
        let on_b = tokio::spawn(b.append("s", 0, producer_batch(0, first, 3)));
        // The same node again too: a resend on a new connection.
        let again_a = tokio::spawn(a.append("s", 0, producer_batch(0, first, 3)));
        let pb = plain(&b, format!("b{round}"));
        let mut answers = Vec::new();
        for t in [on_a, on_b, again_a] {
            match t.await.expect("task") {
                Ok(x) => answers.push(x.base_offset),
                // Refused, retriable: sent again, it is a duplicate.
                Err(LogError::Unavailable(_)) => {
                    let x = b
                        .append("s", 0, producer_batch(0, first, 3))
                        .await
                        .expect("the resend");
                    answers.push(x.base_offset);
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "round {round}: one offset for every copy: {answers:?}"
        );
        pa.await.expect("task").expect("a's plain append");
        pb.await.expect("task").expect("b's plain append");
    }
    let end = 10 * 3 + 20;
    until(&a, "every append", |a| {
        a.offsets("s", 0).is_ok_and(|o| o.high_watermark == end)
    })
    .await;
    let values: Vec<String> = values(&a, "s", 0).into_iter().map(|(_, v)| v).collect();
    let batches: Vec<&String> = values.iter().filter(|v| v.starts_with('v')).collect();
    let sent: Vec<String> = (0..30).map(|i| format!("v{i}")).collect();
    assert_eq!(
        batches,
        sent.iter().collect::<Vec<_>>(),
        "each batch once, in order"
    );
    assert_eq!(
        values.len(),
        end as usize,
        "the plain appends are all there"
    );
}

/// An append made under a lease commits only while the lease is still its maker's: once
/// another node took the lease, the append is refused and nothing of it is in the log; the
/// appends that shared its flush are committed all the same.
#[tokio::test]
async fn an_append_under_a_lease_another_node_took_is_refused_and_the_rest_committed() {
    let (a, b, _) = two_nodes_with("fenced-append", |c| c.flush_ms = 30);
    a.create_stream("s", &StreamConfig::default())
        .expect("create");
    until(&b, "the stream", |b| b.offsets("s", 0).is_ok()).await;
    let lease = |log: &ObjectLog| {
        log.acquire_lease("edge-link", "gw1", Duration::from_millis(300))
            .expect("acquire")
            .expect("free")
    };
    let token = lease(&a);
    let fence = |owner: &str, token| crate::log::Fence {
        kind: "edge-link".into(),
        key: "gw1".into(),
        lease: crate::log::Lease {
            owner: owner.into(),
            token,
        },
    };
    let fenced = |log: &ObjectLog, v: &str, f| {
        log.append_fenced("s", 0, AppendData::Records(vec![rec(v)]), Some(f))
    };
    assert_eq!(
        fenced(&a, "held", fence("a", token))
            .await
            .expect("held")
            .base_offset,
        0
    );
    // a's lease lapses and b takes it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let taken = lease(&b);
    assert!(taken > token);
    let plain = tokio::spawn(a.append("s", 0, AppendData::Records(vec![rec("plain")])));
    let stale = fenced(&a, "stale", fence("a", token)).await;
    assert!(
        matches!(&stale, Err(LogError::Fenced { kind, key }) if kind == "edge-link" && key == "gw1"),
        "{stale:?}"
    );
    plain.await.expect("task").expect("the plain append");
    assert_eq!(
        fenced(&b, "b's", fence("b", taken))
            .await
            .expect("b holds it")
            .base_offset,
        2
    );
    until(&a, "b's append", |a| {
        a.offsets("s", 0).is_ok_and(|o| o.high_watermark == 3)
    })
    .await;
    let values: Vec<String> = values(&a, "s", 0).into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, ["held", "plain", "b's"]);
}
