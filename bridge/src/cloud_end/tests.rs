//! Tests of [`CloudEnd`]: frame sequences with a fake clock, no sockets.

use super::*;
use crate::error::FailureKind;
use ferry_protocol::kafka::{BatchBuilder, Compression};

const CREDIT: u64 = 10_000;
const MAX_FRAME: usize = 1_000;

fn config() -> CloudEndConfig {
    CloudEndConfig {
        credit_bytes: CREDIT,
        max_frame_bytes: MAX_FRAME,
        handshake_timeout: Duration::from_secs(30),
    }
}

/// The commit handle of the tests: the sequence the commit makes durable.
type End = CloudEnd<u64>;

fn hello(version: u16, down_acked: u64) -> Frame {
    Frame::Hello {
        version,
        max_frame_bytes: 1 << 20,
        down_acked,
        software: "test".into(),
    }
}

/// A link past WELCOME (the edge applied `edge_down`, the cloud recorded `cloud_down`),
/// with WELCOME taken off.
fn up(now: Instant, edge_down: u64, cloud_down: u64) -> End {
    let mut end = End::new(config(), now);
    end.handle_frame(now, hello(VERSION, edge_down))
        .expect("hello");
    let fx = effects(&mut end);
    assert!(
        matches!(&fx[..], [Effect::Hello { down_acked, .. }] if *down_acked == edge_down),
        "{fx:?}"
    );
    end.welcome(now, vec![(0, 3)], cloud_down);
    assert!(matches!(
        frames(&mut end)[..],
        [Frame::Welcome {
            credit_bytes: CREDIT,
            version: VERSION,
            ..
        }]
    ));
    // The downlink's first read, from the further of the two; left in flight.
    assert_eq!(
        effects(&mut end),
        vec![Effect::ReadDown {
            after: edge_down.max(cloud_down)
        }]
    );
    end
}

fn effects(end: &mut End) -> Vec<Effect<u64>> {
    std::iter::from_fn(|| end.poll_effect()).collect()
}

fn frames(end: &mut End) -> Vec<Frame> {
    std::iter::from_fn(|| end.poll_transmit()).collect()
}

/// A record batch of records `first..=last` (offsets = sequences), `pad` bytes each.
fn batch(first: u64, last: u64, pad: usize) -> Bytes {
    let mut b = BatchBuilder::with_capacity(0, 64);
    for s in first..=last {
        b.push_at((s - first) as i32, 0, Some(b"t"), Some(&vec![0; pad]), &[]);
    }
    b.finish_with(first as i64, Compression::None)
}

fn batch_frame(class: u8, first: u64, last: u64) -> Frame {
    Frame::Batch {
        class,
        batch: batch(first, last, 1),
    }
}

#[test]
fn an_edge_of_either_version_is_welcomed_in_its_own_and_status_is_version_2s() {
    let now = Instant::now();
    let status = EdgeStatus {
        outbox_records: 5,
        ..EdgeStatus::default()
    };
    // A version 2 edge: WELCOME says 2, and its STATUS reaches the driver.
    let mut end = up(now, 0, 0);
    end.handle_frame(now, Frame::Status(status))
        .expect("status");
    assert_eq!(effects(&mut end), vec![Effect::Status(status)]);
    // A version 1 edge (released before STATUS): welcomed in version 1, and a STATUS on
    // its link is a protocol error.
    let mut end = End::new(config(), now);
    end.handle_frame(now, hello(1, 0)).expect("hello");
    assert!(matches!(
        effects(&mut end)[..],
        [Effect::Hello { version: 1, .. }]
    ));
    end.welcome(now, vec![], 0);
    assert!(matches!(
        frames(&mut end)[..],
        [Frame::Welcome { version: 1, .. }]
    ));
    let err = end
        .handle_frame(now, Frame::Status(status))
        .expect_err("no STATUS in version 1");
    assert!(matches!(err, LinkError::UnexpectedFrame("STATUS")));
}

#[test]
fn hello_of_another_version_gets_goaway_unsupported_version() {
    let now = Instant::now();
    let mut end = End::new(config(), now);
    let err = end
        .handle_frame(now, hello(VERSION + 1, 0))
        .expect_err("version");
    assert!(
        matches!(err, LinkError::VersionMismatch { ours: VERSION, theirs } if theirs == VERSION + 1)
    );
    assert!(matches!(
        End::new(config(), now).handle_frame(now, hello(0, 0)),
        Err(LinkError::VersionMismatch { theirs: 0, .. })
    ));
    assert!(matches!(
        frames(&mut end)[..],
        [Frame::GoAway {
            code: GoAwayCode::UnsupportedVersion,
            ..
        }]
    ));
}

#[test]
fn a_refused_edge_gets_goaway_and_nothing_else() {
    let now = Instant::now();
    let mut end = End::new(config(), now);
    end.handle_frame(now, hello(VERSION, 0)).expect("hello");
    let _ = effects(&mut end);
    // No frame is read while the driver decides.
    assert!(!end.wants_frames());
    end.refuse(GoAwayCode::Denied, "denied".into());
    assert!(end.is_closed());
    assert!(matches!(
        frames(&mut end)[..],
        [Frame::GoAway {
            code: GoAwayCode::Denied,
            ..
        }]
    ));
    assert!(effects(&mut end).is_empty());
}

#[test]
fn a_batch_before_hello_or_no_hello_in_time_ends_the_link() {
    let now = Instant::now();
    let mut end = End::new(config(), now);
    assert!(matches!(
        end.handle_frame(now, batch_frame(0, 1, 1)),
        Err(LinkError::UnexpectedFrame("BATCH"))
    ));
    let mut end = End::new(config(), now);
    let deadline = now + Duration::from_secs(30);
    assert_eq!(end.poll_timeout(), Some(deadline));
    end.handle_timeout(deadline - Duration::from_millis(1))
        .expect("not yet");
    assert!(matches!(
        end.handle_timeout(deadline),
        Err(LinkError::HandshakeTimeout { frame: "HELLO", .. })
    ));
}

#[test]
fn an_edge_that_sends_past_its_credit_is_refused() {
    let now = Instant::now();
    let mut end = up(now, 0, 0);
    // The credit plus one frame may be outstanding, not a byte more.
    let limit = CREDIT + MAX_FRAME as u64;
    let frame = |len: u64| Frame::Batch {
        class: 0,
        batch: Bytes::from(vec![0; len as usize - 6]),
    };
    let mut sent = 0;
    while sent + 500 <= limit {
        end.handle_frame(now, frame(500)).expect("within credit");
        sent += 500;
    }
    let rest = limit - sent;
    if rest > 6 {
        end.handle_frame(now, frame(rest))
            .expect("exactly the credit");
        sent += rest;
    }
    let err = end.handle_frame(now, frame(7)).expect_err("past credit");
    assert!(
        matches!(err, LinkError::PastCredit { sent: s, credit } if s == sent + 7 && credit == limit),
        "{err}"
    );
}

#[test]
fn credit_comes_back_once_acknowledged_so_the_edge_may_send_again() {
    let t0 = Instant::now();
    let mut end = up(t0, 0, 0);
    let big = |n| Frame::Batch {
        class: 0,
        batch: batch(n, n, 3_000),
    };
    end.handle_frame(t0, big(4)).expect("1");
    end.handle_frame(t0, big(5)).expect("2");
    end.handle_frame(t0, big(6)).expect("3");
    // Ingest and acknowledge everything: CREDIT gives back every byte.
    let fx = effects(&mut end);
    assert!(matches!(&fx[..], [Effect::Ingest { batches, .. }] if batches.len() == 3));
    end.ingest_done(Ok(6)).expect("ingest");
    end.handle_timeout(t0 + ACK_INTERVAL).expect("round");
    assert!(matches!(
        effects(&mut end)[..],
        [Effect::Commit { commit: 6, .. }]
    ));
    end.commit_done(Ok(6)).expect("commit");
    let out = frames(&mut end);
    let [Frame::Ack { .. }, Frame::Credit { bytes }] = out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(bytes, 3 * (batch(4, 4, 3_000).len() as u64 + 6));
    // The same again would have been past the credit without that CREDIT.
    for n in 7..=9 {
        end.handle_frame(t0, big(n)).expect("credit given back");
    }
}

#[test]
fn acknowledgements_are_coalesced_one_round_per_ack_interval_newest_commit_per_class() {
    let t0 = Instant::now();
    let mut end = up(t0, 0, 0);
    end.handle_frame(t0, batch_frame(0, 4, 5)).expect("batch");
    assert!(matches!(
        &effects(&mut end)[..],
        [Effect::Ingest { class: 0, batches }] if batches.len() == 1
    ));
    // Batches that come while one group is appended wait for it, then go as one group.
    end.handle_frame(t0, batch_frame(0, 6, 7)).expect("batch");
    end.handle_frame(t0, batch_frame(0, 8, 9)).expect("batch");
    end.handle_frame(t0, batch_frame(2, 1, 1)).expect("batch");
    assert!(effects(&mut end).is_empty());
    end.ingest_done(Ok(5)).expect("ingest");
    let fx = effects(&mut end);
    assert!(
        matches!(&fx[..], [Effect::Ingest { class: 0, batches }] if batches.len() == 2),
        "{fx:?}"
    );
    end.ingest_done(Ok(9)).expect("ingest");
    // Another class is another group.
    assert!(matches!(
        &effects(&mut end)[..],
        [Effect::Ingest { class: 2, .. }]
    ));
    end.ingest_done(Ok(1)).expect("ingest");
    // Nothing is acknowledged before the interval since the last round (here: since
    // the link came up) is over.
    let t1 = t0 + Duration::from_millis(3);
    assert_eq!(end.poll_timeout(), Some(t0 + ACK_INTERVAL));
    end.handle_timeout(t1).expect("early");
    assert!(effects(&mut end).is_empty());
    assert!(frames(&mut end).is_empty());
    end.handle_timeout(t0 + ACK_INTERVAL).expect("round");
    // One commit per class, the newest: 9 covers 5.
    let Some(Effect::Commit {
        class: 0,
        commit: 9,
    }) = end.poll_effect()
    else {
        panic!("commit of class 0")
    };
    // One commit at a time.
    assert!(end.poll_effect().is_none());
    // What is appended during the round waits for the next one.
    end.handle_frame(t0, batch_frame(0, 10, 10)).expect("batch");
    let _ = effects(&mut end);
    end.ingest_done(Ok(10)).expect("ingest");
    end.commit_done(Ok(9)).expect("commit");
    assert_eq!(
        frames(&mut end),
        vec![Frame::Ack {
            class: 0,
            committed_seq: 9
        }]
    );
    let Some(Effect::Commit {
        class: 2,
        commit: 1,
    }) = end.poll_effect()
    else {
        panic!("commit of class 2")
    };
    end.commit_done(Ok(1)).expect("commit");
    let out = frames(&mut end);
    assert!(
        matches!(
            out[..],
            [
                Frame::Ack {
                    class: 2,
                    committed_seq: 1
                },
                Frame::Credit { .. }
            ]
        ),
        "{out:?}"
    );
    assert!(matches!(
        effects(&mut end)[..],
        [Effect::Acknowledged { records: 7, .. }]
    ));
    // The next round: ACK_INTERVAL after the last one started.
    let t2 = t0 + ACK_INTERVAL + Duration::from_millis(4);
    assert_eq!(end.poll_timeout(), Some(t0 + 2 * ACK_INTERVAL));
    end.handle_timeout(t2).expect("early");
    assert!(end.poll_effect().is_none());
    end.handle_timeout(t0 + 2 * ACK_INTERVAL).expect("round");
    assert!(matches!(
        end.poll_effect(),
        Some(Effect::Commit {
            class: 0,
            commit: 10
        })
    ));
}

#[test]
fn a_failed_append_or_commit_gets_goaway_unavailable() {
    let t0 = Instant::now();
    let mut end = up(t0, 0, 0);
    end.handle_frame(t0, batch_frame(0, 4, 4)).expect("batch");
    let _ = effects(&mut end);
    let err = end
        .ingest_done(Err(SinkError::new(FailureKind::Storage, "disk full")))
        .expect_err("fails");
    assert!(matches!(err, LinkError::Ingest(ref why) if why.kind() == FailureKind::Storage));
    assert!(matches!(
        &frames(&mut end)[..],
        [Frame::GoAway {
            code: GoAwayCode::Unavailable,
            reason,
        }] if reason == "ingest failed: storage: disk full"
    ));

    let mut end = up(t0, 0, 0);
    end.handle_frame(t0, batch_frame(0, 4, 4)).expect("batch");
    let _ = effects(&mut end);
    end.ingest_done(Ok(4)).expect("ingest");
    end.handle_timeout(t0 + ACK_INTERVAL).expect("round");
    let _ = effects(&mut end);
    assert!(end
        .commit_done(Err(SinkError::new(FailureKind::Storage, "meta")))
        .is_err());
    // No ACK for what did not commit.
    assert!(matches!(
        frames(&mut end)[..],
        [Frame::GoAway {
            code: GoAwayCode::Unavailable,
            ..
        }]
    ));
}

#[test]
fn a_full_batch_queue_stops_reading_and_a_full_commit_queue_stops_appending() {
    let t0 = Instant::now();
    let mut end = End::new(
        CloudEndConfig {
            credit_bytes: 1 << 20,
            ..config()
        },
        t0,
    );
    end.handle_frame(t0, hello(VERSION, 0)).expect("hello");
    let _ = effects(&mut end);
    end.welcome(t0, vec![], 0);
    frames(&mut end);
    end.handle_frame(t0, batch_frame(0, 4, 4)).expect("batch");
    let _ = effects(&mut end);
    // While that group is appended, batches queue up to QUEUED_BATCHES.
    for i in 0..QUEUED_BATCHES as u64 {
        assert!(end.wants_frames());
        end.handle_frame(t0, batch_frame(1, i + 1, i + 1))
            .expect("batch");
    }
    assert!(!end.wants_frames());
    end.ingest_done(Ok(4)).expect("ingest");
    let _ = effects(&mut end);
    assert!(end.wants_frames());

    // Appended groups wait for a round, at most QUEUED_COMMITS of them.
    let mut end = up(t0, 0, 0);
    for i in 0..QUEUED_COMMITS as u64 + 1 {
        // Alternate classes so each batch is a group of its own.
        end.handle_frame(t0, batch_frame((i % 2) as u8, i + 4, i + 4))
            .expect("batch");
        let fx = effects(&mut end);
        if i < QUEUED_COMMITS as u64 {
            assert!(matches!(fx[..], [Effect::Ingest { .. }]), "{i}: {fx:?}");
            end.ingest_done(Ok(i + 4)).expect("ingest");
        } else {
            assert!(fx.is_empty(), "append held back: {fx:?}");
        }
    }
    end.handle_timeout(t0 + ACK_INTERVAL).expect("round");
    assert!(effects(&mut end)
        .iter()
        .any(|e| matches!(e, Effect::Ingest { .. })));
}

/// A downlink batch whose last offset is `last`.
fn down(first: u64, last: u64) -> Bytes {
    batch(first, last, 1)
}

#[test]
fn the_downlink_starts_from_the_further_of_the_edge_and_the_cloud_and_keeps_its_window() {
    let t0 = Instant::now();
    // `up` checks the first read: after the further of the edge's and the cloud's.
    let _ = up(t0, 50, 40);
    let mut end = up(t0, 10, 40);
    // One read at a time.
    end.downlink_changed();
    assert!(effects(&mut end).is_empty());
    // A read with nothing for this edge moves on without a frame.
    end.downlink_read(100, None);
    assert!(frames(&mut end).is_empty());
    assert!(matches!(
        effects(&mut end)[..],
        [Effect::ReadDown { after: 100 }]
    ));
    // DOWN up to 40 + DOWN_WINDOW - 1: the window is not full yet.
    end.downlink_read(200, Some(down(101, 40 + DOWN_WINDOW - 1)));
    assert!(matches!(frames(&mut end)[..], [Frame::Down { .. }]));
    assert!(matches!(
        effects(&mut end)[..],
        [Effect::ReadDown { after: 200 }]
    ));
    end.downlink_read(300, Some(down(201, 40 + DOWN_WINDOW)));
    assert!(matches!(frames(&mut end)[..], [Frame::Down { .. }]));
    // DOWN_WINDOW sequences unacknowledged: no read, even if the downlink changed.
    assert!(effects(&mut end).is_empty());
    end.downlink_changed();
    assert!(effects(&mut end).is_empty());
    // The edge's DOWN_ACK is recorded first; only then does the window move.
    end.handle_frame(t0, Frame::DownAck { seq: 41 })
        .expect("down ack");
    assert_eq!(effects(&mut end), vec![Effect::RecordDownAck { seq: 41 }]);
    // An older DOWN_ACK is no news.
    end.handle_frame(t0, Frame::DownAck { seq: 30 })
        .expect("down ack");
    assert!(effects(&mut end).is_empty());
    end.down_ack_recorded(41);
    assert_eq!(effects(&mut end), vec![Effect::ReadDown { after: 300 }]);
}

#[test]
fn frames_waiting_for_the_writer_hold_back_commits_and_downlink_reads() {
    let t0 = Instant::now();
    let mut end = End::new(config(), t0);
    end.handle_frame(t0, hello(VERSION, 0)).expect("hello");
    let _ = effects(&mut end);
    end.welcome(t0, vec![], 0);
    // WELCOME is not taken yet: no downlink read.
    assert!(effects(&mut end).is_empty());
    assert_eq!(frames(&mut end).len(), 1);
    assert!(matches!(
        effects(&mut end)[..],
        [Effect::ReadDown { after: 0 }]
    ));
}
