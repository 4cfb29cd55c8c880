//! Tests of [`EdgeEnd`]: frame sequences with a fake clock, no sockets.

use super::*;
use crate::records::tests::rec;
use bytes::Bytes;
use ferry_protocol::kafka::BatchBuilder;
use ferry_protocol::kafka::{records, uncompressed};
use ferry_protocol::link_frames::VERSION;

const STALL: Duration = Duration::from_secs(30);

fn config() -> EdgeEndConfig {
    EdgeEndConfig {
        max_batch_bytes: 1 << 20,
        compression: Compression::None,
        stall_timeout: STALL,
        handshake_timeout: Duration::from_secs(30),
        software: "test".into(),
        version: VERSION,
        status_interval: STATUS_EVERY,
    }
}

const STATUS_EVERY: Duration = Duration::from_secs(5);

fn recs(seqs: std::ops::RangeInclusive<u64>) -> Vec<OutRecord> {
    seqs.map(rec).collect()
}

/// WELCOME of a version 1 cloud: no STATUS frames, so the only deadlines are the stall
/// timeout's (the version 2 tests use [`welcome_v`]).
fn welcome(credit_bytes: u64, committed: Vec<(u8, u64)>) -> Frame {
    welcome_v(1, credit_bytes, committed)
}

fn welcome_v(version: u16, credit_bytes: u64, committed: Vec<(u8, u64)>) -> Frame {
    Frame::Welcome {
        version,
        max_frame_bytes: 4 << 20,
        credit_bytes,
        committed,
    }
}

/// A link the cloud welcomed, HELLO taken off, and the effects of the welcome.
fn up(now: Instant, credit: u64, committed: Vec<(u8, u64)>) -> (EdgeEnd, Vec<Effect>) {
    let mut end = EdgeEnd::new(config(), now, 0);
    assert!(matches!(end.poll_transmit(), Some(Frame::Hello { .. })));
    end.handle_frame(now, welcome(credit, committed))
        .expect("welcome");
    let effects = effects(&mut end);
    (end, effects)
}

fn effects(end: &mut EdgeEnd) -> Vec<Effect> {
    std::iter::from_fn(|| end.poll_effect()).collect()
}

fn frames(end: &mut EdgeEnd) -> Vec<Frame> {
    std::iter::from_fn(|| end.poll_transmit()).collect()
}

/// The read an effect list asks for: the cursor of `class` and the budget.
fn read_of(effects: &[Effect], class: u8) -> Option<(u64, usize)> {
    effects.iter().find_map(|e| match e {
        Effect::Read {
            after, max_bytes, ..
        } => Some((after[class as usize], *max_bytes)),
        _ => None,
    })
}

fn deletes(effects: &[Effect]) -> Vec<(u8, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Delete { class, seq, .. } => Some((*class, *seq)),
            _ => None,
        })
        .collect()
}

/// The sequences of the BATCH frames, per frame.
fn batch_seqs(frames: &[Frame]) -> Vec<(u8, Vec<u64>)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Batch { class, batch } => {
                let plain = uncompressed(batch, 1 << 20).expect("decompress");
                let seqs = records(&plain)
                    .expect("records")
                    .map(|r| r.expect("record").offset as u64)
                    .collect();
                Some((*class, seqs))
            }
            _ => None,
        })
        .collect()
}

/// Sends `seqs` of `class` as one read's records; returns the BATCH frames' bytes.
fn send(end: &mut EdgeEnd, now: Instant, class: u8, seqs: std::ops::RangeInclusive<u64>) {
    end.read_done(now, Some((class, recs(seqs))));
}

#[test]
fn hello_carries_the_downlink_applied_and_the_version() {
    let mut end = EdgeEnd::new(config(), Instant::now(), 42);
    assert_eq!(
        end.poll_transmit(),
        Some(Frame::Hello {
            version: VERSION,
            max_frame_bytes: MAX_FRAME_BYTES as u32,
            down_acked: 42,
            software: "test".into(),
        })
    );
    // Nothing is read before the cloud says where to resume.
    assert_eq!(effects(&mut end), vec![]);
}

#[test]
fn resume_after_partial_acks_sends_from_the_committed_sequence() {
    let t0 = Instant::now();
    let (mut end, fx) = up(t0, 1 << 20, vec![]);
    assert_eq!(read_of(&fx, 0), Some((0, 1 << 20)));
    send(&mut end, t0, 0, 1..=10);
    assert_eq!(batch_seqs(&frames(&mut end)), vec![(0, (1..=10).collect())]);
    // The cloud committed up to 4, then the link went.
    end.handle_frame(
        t0,
        Frame::Ack {
            class: 0,
            committed_seq: 4,
        },
    )
    .expect("ack");
    assert_eq!(deletes(&effects(&mut end)), vec![(0, 4)]);

    // The next link: the cloud's WELCOME says 4 in class 0 and 7 in class 2; the edge
    // deletes that much and reads each class after it, not after what it had sent.
    let (mut end, fx) = up(t0, 1 << 20, vec![(0, 4), (2, 7)]);
    assert_eq!(deletes(&fx), vec![(0, 4), (2, 7)]);
    assert_eq!(fx[0], Effect::Connected);
    assert_eq!(read_of(&fx, 0), Some((4, 1 << 20)));
    assert_eq!(read_of(&fx, 2), Some((7, 1 << 20)));
    send(&mut end, t0, 0, 5..=10);
    assert_eq!(batch_seqs(&frames(&mut end)), vec![(0, (5..=10).collect())]);
    // The next read goes on after what was sent.
    assert_eq!(read_of(&effects(&mut end), 0).map(|r| r.0), Some(10));
}

#[test]
fn one_read_at_a_time_and_none_after_the_outbox_ran_dry_until_records_are_added() {
    let t0 = Instant::now();
    let (mut end, fx) = up(t0, 1 << 20, vec![]);
    assert!(read_of(&fx, 0).is_some());
    // A read is in flight: no second one.
    assert_eq!(effects(&mut end), vec![]);
    end.read_done(t0, None);
    assert_eq!(effects(&mut end), vec![]);
    end.outbox_added();
    let fx = effects(&mut end);
    // The last read was small (empty): live traffic is read on the I/O thread.
    assert!(
        matches!(fx[..], [Effect::Read { blocking: false, max_bytes, .. }] if max_bytes == SMALL_READ_BYTES),
        "{fx:?}"
    );
}

#[test]
fn credit_exhausted_the_edge_stops_sending_until_credit_arrives() {
    let t0 = Instant::now();
    let (mut end, fx) = up(t0, 300, vec![]);
    // The budget of a read is the credit left.
    assert_eq!(read_of(&fx, 0), Some((0, 300)));
    send(&mut end, t0, 0, 1..=5);
    let sent = frames(&mut end);
    let Frame::Batch { batch, .. } = &sent[0] else {
        panic!("{sent:?}")
    };
    let wire = batch.len() as u64 + 6;
    // The frame's size on the wire is what the credit counts.
    let mut encoded = bytes::BytesMut::new();
    sent[0].encode(&mut encoded);
    assert_eq!(encoded.len() as u64, wire);
    assert!(wire < 300);
    // Credit left: the edge reads again, within what is left.
    let fx = effects(&mut end);
    assert_eq!(read_of(&fx, 0), Some((5, 300 - wire as usize)));
    send(&mut end, t0, 0, 6..=10);
    let sent = frames(&mut end);
    let [Frame::Batch { batch, .. }] = &sent[..] else {
        panic!("{sent:?}")
    };
    let wire2 = batch.len() as u64 + 6;
    // The credit is spent (overdrawn): no read, whatever happens, until CREDIT.
    assert!(read_of(&effects(&mut end), 0).is_none());
    end.outbox_added();
    end.handle_frame(
        t0,
        Frame::Ack {
            class: 0,
            committed_seq: 5,
        },
    )
    .expect("ack");
    assert_eq!(deletes(&effects(&mut end)), vec![(0, 5)]);
    assert!(read_of(&effects(&mut end), 0).is_none());
    // Giving back less than the overdraft still leaves nothing to spend.
    let overdraft = wire + wire2 - 300;
    end.handle_frame(t0, Frame::Credit { bytes: overdraft })
        .expect("credit");
    assert_eq!(effects(&mut end), vec![]);
    end.handle_frame(t0, Frame::Credit { bytes: 100 })
        .expect("credit");
    assert_eq!(read_of(&effects(&mut end), 0), Some((10, 100)));
}

#[test]
fn duplicate_and_out_of_order_acks_are_ignored_and_never_move_back() {
    let t0 = Instant::now();
    let (mut end, _) = up(t0, 1 << 20, vec![]);
    send(&mut end, t0, 0, 1..=3);
    let _ = effects(&mut end);
    send(&mut end, t0, 0, 4..=6);
    let _ = effects(&mut end);
    frames(&mut end);
    end.handle_frame(
        t0,
        Frame::Ack {
            class: 0,
            committed_seq: 6,
        },
    )
    .expect("ack");
    let fx = effects(&mut end);
    assert_eq!(
        fx,
        vec![
            Effect::Delete { class: 0, seq: 6 },
            Effect::Acknowledged { records: 6 }
        ]
    );
    // The same ACK again, and an older one arriving late: nothing is deleted again and
    // the acknowledged sequence stays at 6.
    for seq in [6, 3, 5, 6] {
        end.handle_frame(
            t0,
            Frame::Ack {
                class: 0,
                committed_seq: seq,
            },
        )
        .expect("old ack");
        assert_eq!(deletes(&effects(&mut end)), vec![], "ack {seq}");
    }
    // Nothing waits for an ACK any more, so no stall deadline.
    assert_eq!(end.poll_timeout(), None);
    // An ACK of a class or sequence never sent is the cloud's error.
    let err = end
        .handle_frame(
            t0,
            Frame::Ack {
                class: 0,
                committed_seq: 7,
            },
        )
        .expect_err("past sent");
    assert!(matches!(
        err,
        LinkError::AckPastSent {
            class: 0,
            acked: 7,
            sent: 6
        }
    ));
}

#[test]
fn an_ack_counts_the_records_of_the_batches_it_covers() {
    let t0 = Instant::now();
    let (mut end, _) = up(t0, 1 << 20, vec![]);
    send(&mut end, t0, 0, 1..=3);
    send(&mut end, t0, 0, 4..=6);
    send(&mut end, t0, 1, 1..=2);
    let _ = effects(&mut end);
    end.handle_frame(
        t0,
        Frame::Ack {
            class: 0,
            committed_seq: 5,
        },
    )
    .expect("ack");
    // Batch 4..=6 is not wholly acknowledged yet.
    assert!(effects(&mut end).contains(&Effect::Acknowledged { records: 3 }));
    end.handle_frame(
        t0,
        Frame::Ack {
            class: 0,
            committed_seq: 6,
        },
    )
    .expect("ack");
    assert!(effects(&mut end).contains(&Effect::Acknowledged { records: 3 }));
    // Class 1 still waits: the stall deadline stands.
    assert!(end.poll_timeout().is_some());
    assert!(end.made_progress());
}

#[test]
fn records_unacknowledged_for_the_stall_timeout_stall_the_link() {
    let t0 = Instant::now();
    let (mut end, _) = up(t0, 1 << 20, vec![]);
    // Nothing sent: no deadline, however long the link is quiet.
    assert_eq!(end.poll_timeout(), None);
    end.handle_timeout(t0 + 10 * STALL)
        .expect("idle is no stall");

    let t1 = t0 + Duration::from_secs(100);
    send(&mut end, t1, 0, 1..=3);
    assert_eq!(end.poll_timeout(), Some(t1 + STALL));
    // More sent while waiting does not move the deadline.
    send(&mut end, t1 + Duration::from_secs(5), 0, 4..=6);
    assert_eq!(end.poll_timeout(), Some(t1 + STALL));
    // An ACK is progress: the deadline starts again from it.
    let t2 = t1 + Duration::from_secs(20);
    end.handle_frame(
        t2,
        Frame::Ack {
            class: 0,
            committed_seq: 3,
        },
    )
    .expect("ack");
    assert_eq!(end.poll_timeout(), Some(t2 + STALL));
    end.handle_timeout(t1 + STALL).expect("not stalled yet");
    end.handle_timeout(t2 + STALL - Duration::from_millis(1))
        .expect("not stalled yet");
    let err = end.handle_timeout(t2 + STALL).expect_err("stalled");
    assert!(matches!(err, LinkError::Stalled { secs: 30 }), "{err}");
}

#[test]
fn no_welcome_within_the_handshake_timeout_ends_the_link() {
    let t0 = Instant::now();
    let mut end = EdgeEnd::new(config(), t0, 0);
    let deadline = t0 + Duration::from_secs(30);
    assert_eq!(end.poll_timeout(), Some(deadline));
    end.handle_timeout(deadline - Duration::from_millis(1))
        .expect("not yet");
    assert!(matches!(
        end.handle_timeout(deadline),
        Err(LinkError::HandshakeTimeout {
            frame: "WELCOME",
            ..
        })
    ));
}

#[test]
fn a_refusal_or_another_version_ends_the_handshake() {
    let now = Instant::now();
    let mut end = EdgeEnd::new(config(), now, 0);
    let err = end
        .handle_frame(
            now,
            Frame::GoAway {
                code: GoAwayCode::Denied,
                reason: "no".into(),
            },
        )
        .expect_err("refused");
    assert!(matches!(
        err,
        LinkError::Refused {
            code: GoAwayCode::Denied,
            ..
        }
    ));
    let mut end = EdgeEnd::new(config(), now, 0);
    let Frame::Welcome {
        max_frame_bytes,
        credit_bytes,
        committed,
        ..
    } = welcome(1, vec![])
    else {
        unreachable!()
    };
    let err = end
        .handle_frame(
            now,
            Frame::Welcome {
                version: VERSION + 1,
                max_frame_bytes,
                credit_bytes,
                committed,
            },
        )
        .expect_err("version");
    assert!(
        matches!(err, LinkError::VersionMismatch { ours: VERSION, theirs } if theirs == VERSION + 1)
    );
    assert!(!end.is_up());
}

#[test]
fn a_version_2_cloud_gets_the_edges_figures_at_once_and_every_interval() {
    let t0 = Instant::now();
    let mut end = EdgeEnd::new(config(), t0, 0);
    frames(&mut end);
    end.handle_frame(t0, welcome_v(2, 1 << 20, vec![]))
        .expect("welcome");
    assert_eq!(end.version(), 2);
    assert!(!effects(&mut end).contains(&Effect::Status));
    // Due at once; asked for once, however often the time comes while it is gathered.
    assert_eq!(end.poll_timeout(), Some(t0));
    end.handle_timeout(t0).expect("timeout");
    end.handle_timeout(t0).expect("timeout");
    let asked = effects(&mut end);
    assert_eq!(asked.iter().filter(|e| **e == Effect::Status).count(), 1);
    assert_eq!(
        end.poll_timeout(),
        None,
        "nothing is due while it is gathered"
    );
    let figures = EdgeStatus {
        outbox_records: 7,
        last_seq: 9,
        ..EdgeStatus::default()
    };
    let t1 = t0 + Duration::from_millis(3);
    end.status_ready(t1, Some(figures));
    assert_eq!(frames(&mut end), vec![Frame::Status(figures)]);
    assert_eq!(end.poll_timeout(), Some(t1 + STATUS_EVERY));
    end.handle_timeout(t1 + Duration::from_secs(1))
        .expect("timeout");
    assert!(effects(&mut end).is_empty(), "not due yet");
    // Records waiting: the sooner of the stall deadline and the next STATUS.
    send(&mut end, t1, 0, 1..=3);
    assert_eq!(end.poll_timeout(), Some(t1 + STATUS_EVERY));
    end.handle_timeout(t1 + STATUS_EVERY).expect("timeout");
    assert!(effects(&mut end).contains(&Effect::Status));
    assert_eq!(end.poll_timeout(), Some(t1 + STALL));
    // Figures that could not be had: no frame, and the next asked for after the interval.
    let t2 = t1 + STATUS_EVERY;
    end.status_ready(t2, None);
    assert!(!frames(&mut end)
        .iter()
        .any(|f| matches!(f, Frame::Status(_))));
    assert_eq!(end.poll_timeout(), Some(t2 + STATUS_EVERY));
    end.handle_timeout(t2 + STATUS_EVERY).expect("timeout");
    assert!(effects(&mut end).contains(&Effect::Status));
}

#[test]
fn a_version_1_cloud_gets_no_status_and_a_newer_one_than_ours_is_refused() {
    let t0 = Instant::now();
    let (mut end, _) = up(t0, 1 << 20, vec![]);
    assert_eq!(end.version(), 1);
    assert_eq!(end.poll_timeout(), None);
    end.handle_timeout(t0 + Duration::from_secs(60))
        .expect("timeout");
    assert!(effects(&mut end).is_empty());
    // An edge that announced version 1 (after an old cloud refused 2) takes no 2.
    let mut end = EdgeEnd::new(
        EdgeEndConfig {
            version: 1,
            ..config()
        },
        t0,
        0,
    );
    let Some(Frame::Hello { version: 1, .. }) = end.poll_transmit() else {
        panic!("HELLO announces the configured version");
    };
    let err = end
        .handle_frame(t0, welcome_v(2, 1, vec![]))
        .expect_err("a version it did not offer");
    assert!(matches!(
        err,
        LinkError::VersionMismatch { ours: 1, theirs: 2 }
    ));
}

#[test]
fn an_unexpected_frame_on_a_link_that_is_up_gets_goaway_protocol_error() {
    let now = Instant::now();
    let (mut end, _) = up(now, 1 << 20, vec![]);
    let err = end
        .handle_frame(now, Frame::DownAck { seq: 1 })
        .expect_err("unexpected");
    assert!(matches!(err, LinkError::UnexpectedFrame("DOWN_ACK")));
    assert!(matches!(
        frames(&mut end)[..],
        [Frame::GoAway {
            code: GoAwayCode::ProtocolError,
            ..
        }]
    ));
}

fn down_batch(seqs: &[u64]) -> Bytes {
    let mut b = BatchBuilder::with_capacity(0, 256);
    for &s in seqs {
        b.push_at(
            (s - seqs[0]) as i32,
            7,
            Some(format!("d/{s}").as_bytes()),
            Some(b"v"),
            &[],
        );
    }
    b.finish_with(seqs[0] as i64, Compression::None)
}

#[test]
fn the_downlink_is_applied_once_and_acknowledged_after_it_is_durable() {
    let now = Instant::now();
    let mut end = EdgeEnd::new(config(), now, 2);
    frames(&mut end);
    end.handle_frame(now, welcome(1 << 20, vec![]))
        .expect("welcome");
    let _ = effects(&mut end);
    // 1 and 2 were applied before this link: only 3 and 5 are new.
    end.handle_frame(
        now,
        Frame::Down {
            batch: down_batch(&[1, 2, 3, 5]),
        },
    )
    .expect("down");
    let fx = effects(&mut end);
    let Some(Effect::ApplyDown { seq, messages }) = fx.first() else {
        panic!("{fx:?}")
    };
    assert_eq!(*seq, 5);
    let got: Vec<_> = messages.iter().map(|m| (m.seq, m.topic.as_str())).collect();
    assert_eq!(got, vec![(3, "d/3"), (5, "d/5")]);
    // Not acknowledged before it is applied.
    assert_eq!(frames(&mut end), vec![]);
    end.down_applied(5);
    assert_eq!(frames(&mut end), vec![Frame::DownAck { seq: 5 }]);
    // A resend of what is applied: acknowledged again, not applied twice.
    end.handle_frame(
        now,
        Frame::Down {
            batch: down_batch(&[4, 5]),
        },
    )
    .expect("down");
    assert!(!effects(&mut end)
        .iter()
        .any(|e| matches!(e, Effect::ApplyDown { .. })));
    assert_eq!(frames(&mut end), vec![Frame::DownAck { seq: 5 }]);
}

/// The ApplyDown effects among `effects`: (seq, the messages' sequences).
fn applies(effects: &[Effect]) -> Vec<(u64, Vec<u64>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ApplyDown { seq, messages } => {
                Some((*seq, messages.iter().map(|m| m.seq).collect()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn one_downlink_apply_at_a_time_and_the_link_goes_on_while_it_waits() {
    let now = Instant::now();
    let (mut end, _) = up(now, 1 << 20, vec![]);
    let down = |end: &mut EdgeEnd, seqs: &[u64]| {
        end.handle_frame(
            now,
            Frame::Down {
                batch: down_batch(seqs),
            },
        )
        .expect("down");
    };
    down(&mut end, &[1, 2]);
    assert_eq!(applies(&effects(&mut end)), vec![(2, vec![1, 2])]);
    // While the edge applies it (a local subscriber may have no room for a long time), the
    // uplink goes on: records are sent and acknowledged, and deleted.
    send(&mut end, now, 0, 1..=3);
    assert_eq!(batch_seqs(&frames(&mut end)), vec![(0, vec![1, 2, 3])]);
    end.handle_frame(
        now,
        Frame::Ack {
            class: 0,
            committed_seq: 3,
        },
    )
    .expect("ack");
    assert_eq!(deletes(&effects(&mut end)), vec![(0, 3)]);
    // More downlink meanwhile waits for the apply before it: one at a time, in order.
    down(&mut end, &[3, 4]);
    down(&mut end, &[5]);
    assert_eq!(applies(&effects(&mut end)), vec![]);
    assert_eq!(frames(&mut end), vec![]);
    end.down_applied(2);
    assert_eq!(frames(&mut end), vec![Frame::DownAck { seq: 2 }]);
    assert_eq!(applies(&effects(&mut end)), vec![(5, vec![3, 4, 5])]);
    end.down_applied(5);
    assert_eq!(frames(&mut end), vec![Frame::DownAck { seq: 5 }]);
    assert_eq!(applies(&effects(&mut end)), vec![]);
}

#[test]
fn the_driver_stops_taking_frames_while_too_much_downlink_waits_behind_an_apply() {
    let now = Instant::now();
    let (mut end, _) = up(now, 1 << 20, vec![]);
    let big = |seq: u64| {
        let mut b = BatchBuilder::with_capacity(0, 1 << 20);
        let value = vec![b'x'; MAX_DOWN_QUEUED_BYTES / 2];
        b.push_at(0, 7, Some(b"d/big"), Some(&value), &[]);
        Frame::Down {
            batch: b.finish_with(seq as i64, Compression::None),
        }
    };
    end.handle_frame(now, big(1)).expect("down");
    assert_eq!(applies(&effects(&mut end)), vec![(1, vec![1])]);
    // Two more wait behind it: together past the bound.
    end.handle_frame(now, big(2)).expect("down");
    assert!(end.wants_frames(), "one waiting is within the bound");
    end.handle_frame(now, big(3)).expect("down");
    assert!(!end.wants_frames());
    // The apply is done: what waited is the next one, and frames are read again.
    end.down_applied(1);
    assert_eq!(applies(&effects(&mut end)), vec![(3, vec![2, 3])]);
    assert!(end.wants_frames());
}

#[test]
fn shutdown_sends_goaway_and_stops_reading() {
    let now = Instant::now();
    let (mut end, _) = up(now, 1 << 20, vec![]);
    end.read_done(now, None);
    end.shutdown();
    end.outbox_added();
    assert_eq!(effects(&mut end), vec![]);
    assert!(matches!(
        frames(&mut end)[..],
        [Frame::GoAway {
            code: GoAwayCode::Shutdown,
            ..
        }]
    ));
}
