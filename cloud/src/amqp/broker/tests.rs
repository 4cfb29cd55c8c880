//! The broker core on frame sequences, without sockets: a client is connected by feeding it
//! the frames a client sends, and what the broker answers is read back from its actions.

use std::sync::Arc;
use std::time::Instant;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{basic, channel, confirm, connection, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::BytesMut;
use ferry_edge::auth::Auth;

use super::*;
use crate::amqp::codec::take_frame;
use crate::log::{MemoryLog, StreamConfig};
use crate::routes::{RouteTable, Routes};

fn broker() -> Broker {
    let log = MemoryLog::new();
    log.create_stream(super::super::AMQP_STREAM, &StreamConfig::default())
        .expect("stream");
    let settings = Settings {
        vhosts: vec!["/".into()],
        frame_max: 131_072,
        channel_max: 16,
        heartbeat_secs: 0,
        ack_timeout: Duration::from_secs(1800),
        handshake_timeout: Duration::from_secs(10),
    };
    let routes = Arc::new(RouteTable::new(Routes::new(&[]).expect("routes")));
    Broker::new(settings, Arc::new(Auth::open()), routes, log, Vec::new())
}

/// What one round sent to `conn`, as frames, and the other actions.
fn round(b: &mut Broker, conn: ConnId) -> (Vec<AMQPFrame>, Vec<Action>) {
    let mut frames = Vec::new();
    let mut rest = Vec::new();
    for a in b.take_actions(Instant::now()) {
        match a {
            Action::Send { conn: c, bytes } if c == conn => {
                let mut buf = BytesMut::from(&bytes[..]);
                while let Some(f) = take_frame(&mut buf, 0).expect("the broker writes frames") {
                    frames.push(f);
                }
            }
            other => rest.push(other),
        }
    }
    (frames, rest)
}

fn method(b: &mut Broker, conn: ConnId, channel: u16, m: AMQPClass) {
    b.handle(
        Input::Frame {
            conn,
            frame: AMQPFrame::Method(channel, m),
        },
        Instant::now(),
    );
}

/// Connects `conn` as a client that takes connection.blocked, and opens channel 1.
fn open(b: &mut Broker, conn: ConnId) {
    b.handle(Input::Connected { conn }, Instant::now());
    let mut caps = FieldTable::default();
    caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
    caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    method(
        b,
        conn,
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: props,
            mechanism: "PLAIN".into(),
            response: "\0guest\0guest".into(),
            locale: "en_US".into(),
        })),
    );
    method(
        b,
        conn,
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 16,
            frame_max: 131_072,
            heartbeat: 0,
        })),
    );
    method(
        b,
        conn,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    );
    method(
        b,
        conn,
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    );
    let (frames, _) = round(b, conn);
    assert!(
        frames.iter().any(|f| matches!(
            f,
            AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))
        )),
        "{frames:?}"
    );
}

fn publish(b: &mut Broker, conn: ConnId, key: &str, body: &[u8]) {
    method(
        b,
        conn,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: key.into(),
            mandatory: false,
            immediate: false,
        })),
    );
    b.handle(
        Input::Frame {
            conn,
            frame: AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: body.len() as u64,
                    properties: AMQPProperties::default(),
                },
            ),
        },
        Instant::now(),
    );
    b.handle(
        Input::Frame {
            conn,
            frame: AMQPFrame::Body(1, body.to_vec()),
        },
        Instant::now(),
    );
}

fn declare(b: &mut Broker, conn: ConnId, name: &str) {
    declare_as(b, conn, name, false, false);
}

fn declare_as(b: &mut Broker, conn: ConnId, name: &str, durable: bool, passive: bool) {
    method(
        b,
        conn,
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: name.into(),
            passive,
            durable,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    );
}

/// Puts channel 1 of connection 1 in confirm mode.
fn confirm_select(b: &mut Broker) {
    method(
        b,
        1,
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    );
}

#[test]
fn confirms_wait_for_the_log_and_go_out_in_order_as_one_multiple_ack() {
    let mut b = broker();
    open(&mut b, 1);
    declare(&mut b, 1, "q");
    confirm_select(&mut b);
    for i in 0..3 {
        publish(&mut b, 1, "q", format!("m{i}").as_bytes());
    }
    let (frames, actions) = round(&mut b, 1);
    let tokens: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Append { token, .. } => Some(*token),
            _ => None,
        })
        .collect();
    assert_eq!(tokens.len(), 3, "{actions:?}");
    assert!(
        !frames.iter().any(|f| matches!(
            f,
            AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Ack(_)))
        )),
        "no confirm before the log answered"
    );
    // The second and third are durable before the first: nothing yet; then the first.
    b.handle(
        Input::Appended {
            token: tokens[1],
            ok: true,
        },
        Instant::now(),
    );
    b.handle(
        Input::Appended {
            token: tokens[2],
            ok: true,
        },
        Instant::now(),
    );
    let (frames, _) = round(&mut b, 1);
    assert!(frames.is_empty(), "{frames:?}");
    b.handle(
        Input::Appended {
            token: tokens[0],
            ok: true,
        },
        Instant::now(),
    );
    let (frames, _) = round(&mut b, 1);
    assert_eq!(
        frames,
        vec![AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 3,
                multiple: true
            }))
        )]
    );
}

/// A confirm means the message is in its queue: a passive declare right after the confirms
/// counts every confirmed message, even before the log's own change notice comes.
#[test]
fn a_confirmed_message_is_counted_by_its_queue_at_once() {
    let mut b = broker();
    open(&mut b, 1);
    declare(&mut b, 1, "q");
    confirm_select(&mut b);
    round(&mut b, 1);
    for i in 0..5 {
        publish(&mut b, 1, "q", format!("m{i}").as_bytes());
    }
    let (_, actions) = round(&mut b, 1);
    append_all(&mut b, actions); // no Input::LogChanged
    let (frames, _) = round(&mut b, 1);
    assert!(
        frames.iter().any(|f| matches!(
            f,
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: 5,
                    ..
                }))
            )
        )),
        "{frames:?}"
    );
    declare_as(&mut b, 1, "q", false, true);
    let (frames, _) = round(&mut b, 1);
    let count = frames.iter().find_map(|f| match f {
        AMQPFrame::Method(1, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => {
            Some(ok.message_count)
        }
        _ => None,
    });
    assert_eq!(count, Some(5), "{frames:?}");
}

#[test]
fn pressure_blocks_publishing_connections_and_lets_consumers_go_on() {
    let mut b = broker();
    open(&mut b, 1);
    open(&mut b, 2);
    declare(&mut b, 1, "q");
    publish(&mut b, 1, "q", b"x");
    round(&mut b, 1);
    b.handle(Input::Pressure(true), Instant::now());
    let (frames, actions) = round(&mut b, 1);
    assert!(
        frames.iter().any(|f| matches!(
            f,
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(_)))
        )),
        "{frames:?}"
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::PauseReads {
            conn: 1,
            paused: true
        }
    )));
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::PauseReads { conn: 2, .. })),
        "a connection that only consumes is not paused"
    );
    b.handle(Input::Pressure(false), Instant::now());
    let (frames, actions) = round(&mut b, 1);
    assert!(frames.iter().any(|f| matches!(
        f,
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))
        )
    )));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::PauseReads {
            conn: 1,
            paused: false
        }
    )));
}

#[test]
fn frames_out_of_place_close_the_connection_with_their_reply_code() {
    for (what, frame, code) in [
        (
            "a body without publish",
            AMQPFrame::Body(1, b"x".to_vec()),
            code::UNEXPECTED_FRAME,
        ),
        (
            "a method on a channel that is not open",
            AMQPFrame::Method(
                5,
                AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                    prefetch_count: 1,
                    global: false,
                })),
            ),
            code::CHANNEL_ERROR,
        ),
        (
            "a channel over channel_max",
            AMQPFrame::Method(
                99,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ),
            code::CHANNEL_ERROR,
        ),
    ] {
        let mut b = broker();
        open(&mut b, 1);
        b.handle(Input::Frame { conn: 1, frame }, Instant::now());
        let (frames, actions) = round(&mut b, 1);
        let closed = frames.iter().find_map(|f| match f {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                Some(c.reply_code)
            }
            _ => None,
        });
        assert_eq!(closed, Some(code), "{what}: {frames:?}");
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Close { conn: 1 })),
            "{what}"
        );
    }
}

#[test]
fn a_handshake_not_done_in_time_closes_the_connection_and_an_open_one_stays() {
    let mut b = broker();
    let start = Instant::now();
    open(&mut b, 1);
    // Conn 2 sends its header and nothing more.
    b.handle(Input::Connected { conn: 2 }, start);
    let _ = b.take_actions(start);
    b.handle(Input::Tick, start + Duration::from_secs(5));
    let (_, actions) = round(&mut b, 2);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Close { .. })),
        "within the timeout: {actions:?}"
    );
    b.handle(Input::Tick, start + Duration::from_secs(11));
    let (frames, actions) = round(&mut b, 2);
    let closed = frames.iter().find_map(|f| match f {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
            Some(c.reply_code)
        }
        _ => None,
    });
    assert_eq!(closed, Some(code::CONNECTION_FORCED), "{frames:?}");
    let closes: Vec<ConnId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Close { conn } => Some(*conn),
            _ => None,
        })
        .collect();
    assert_eq!(
        closes,
        vec![2],
        "only the connection still in its handshake"
    );
}

#[test]
fn an_empty_queue_name_is_the_channels_last_declared_queue() {
    let mut b = broker();
    open(&mut b, 1);
    declare(&mut b, 1, "last");
    publish(&mut b, 1, "last", b"hi");
    let (_, actions) = round(&mut b, 1);
    // The append lands in the log (the memory log answers at once) and is read back.
    append_all(&mut b, actions);
    let frames = get(&mut b, "", true);
    assert!(
        frames.iter().any(|f| matches!(
            f,
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok))) if ok.message_count == 0
        )),
        "{frames:?}"
    );
    assert!(frames
        .iter()
        .any(|f| matches!(f, AMQPFrame::Body(1, body) if body == b"hi")));
}

/// basic.get on channel 1 of connection 1: what the round answered.
fn get(b: &mut Broker, queue: &str, no_ack: bool) -> Vec<AMQPFrame> {
    method(
        b,
        1,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: queue.into(),
            no_ack,
        })),
    );
    round(b, 1).0
}

/// Makes every append among `actions` in the (memory) log and answers the broker.
fn append_all(b: &mut Broker, actions: Vec<Action>) {
    for a in actions {
        if let Action::Append {
            token,
            stream,
            partition,
            record,
            ..
        } = a
        {
            let done = futures_util::FutureExt::now_or_never(b.log.append(
                &stream,
                partition,
                crate::log::AppendData::Records(vec![record]),
            ));
            assert!(matches!(done, Some(Ok(_))));
            b.handle(Input::Appended { token, ok: true }, Instant::now());
        }
    }
}

fn cursor_writes(actions: &[Action]) -> (usize, usize) {
    let is_cursor =
        |c: &Command| matches!(c, Command::AmqpPut { key, .. } if key.starts_with("c/"));
    let sync = actions
        .iter()
        .filter(|a| matches!(a, Action::Meta(c) if is_cursor(c)))
        .count();
    let lazy = actions
        .iter()
        .filter(|a| matches!(a, Action::Position(c) if is_cursor(c)))
        .count();
    (sync, lazy)
}

#[test]
fn an_ack_moves_the_position_without_a_reply_waiting_and_a_purge_waits_for_it() {
    let mut b = broker();
    open(&mut b, 1);
    declare_as(&mut b, 1, "dq", true, false);
    let (_, actions) = round(&mut b, 1);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Meta(Command::AmqpPut { key, .. }) if key == "q/%2F/dq")),
        "a durable queue's definition is stored before declare-ok: {actions:?}"
    );
    publish(&mut b, 1, "dq", b"one");
    publish(&mut b, 1, "dq", b"two");
    let (_, actions) = round(&mut b, 1);
    append_all(&mut b, actions);
    b.handle(Input::LogChanged, Instant::now());
    round(&mut b, 1);
    let frames = get(&mut b, "dq", false);
    let tag = frames
        .iter()
        .find_map(|f| match f {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok))) => {
                Some(ok.delivery_tag)
            }
            _ => None,
        })
        .expect("get-ok");
    method(
        &mut b,
        1,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple: false,
        })),
    );
    let (_, actions) = round(&mut b, 1);
    assert_eq!(cursor_writes(&actions), (0, 1), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::Barrier)));
    // A synchronous method after the ack: its reply waits for the position.
    declare_as(&mut b, 1, "dq", true, true);
    let (_, actions) = round(&mut b, 1);
    assert!(
        actions.iter().any(|a| matches!(a, Action::Barrier)),
        "{actions:?}"
    );
    method(
        &mut b,
        1,
        1,
        AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
            queue: "dq".into(),
            nowait: false,
        })),
    );
    let (frames, actions) = round(&mut b, 1);
    assert!(frames.iter().any(|f| matches!(
        f,
        AMQPFrame::Method(1, AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok))) if ok.message_count == 1
    )));
    assert_eq!(cursor_writes(&actions), (1, 0), "{actions:?}");
}

#[test]
fn records_appended_by_others_are_read_when_the_log_says_it_changed() {
    let mut b = broker();
    open(&mut b, 1);
    declare(&mut b, 1, "q");
    method(
        &mut b,
        1,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "q".into(),
            consumer_tag: "c1".into(),
            no_local: false,
            no_ack: true,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    );
    round(&mut b, 1);
    // Another front (or node part) appends to the stream this exchange writes to.
    let (stream, partition, record) = crate::amqp::message::to_log(
        &b.routes.get(),
        "",
        "q",
        &AMQPProperties::default(),
        bytes::Bytes::from_static(b"from elsewhere"),
        1_000,
    );
    let done = futures_util::FutureExt::now_or_never(b.log.append(
        &stream,
        partition,
        crate::log::AppendData::Records(vec![record]),
    ));
    assert!(matches!(done, Some(Ok(_))));
    let body = |frames: &[AMQPFrame]| {
        frames
            .iter()
            .any(|f| matches!(f, AMQPFrame::Body(1, body) if body == b"from elsewhere"))
    };
    let (frames, _) = round(&mut b, 1);
    assert!(!body(&frames), "a round without news reads nothing");
    b.handle(Input::LogChanged, Instant::now());
    let (frames, _) = round(&mut b, 1);
    assert!(body(&frames), "{frames:?}");
}

#[test]
fn a_dead_lettered_copy_is_marked_so_its_round_positions_wait_for_it() {
    let mut b = broker();
    open(&mut b, 1);
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dlq".into()),
    );
    method(
        &mut b,
        1,
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "src".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: args,
        })),
    );
    declare_as(&mut b, 1, "dlq", true, false);
    round(&mut b, 1);
    publish(&mut b, 1, "src", b"doomed");
    let (_, actions) = round(&mut b, 1);
    assert!(
        actions.iter().all(|a| !matches!(
            a,
            Action::Append {
                dead_letter: true,
                ..
            }
        )),
        "a client's publish is no dead-lettered copy"
    );
    append_all(&mut b, actions);
    b.handle(Input::LogChanged, Instant::now());
    round(&mut b, 1);
    let tag = get(&mut b, "src", false)
        .iter()
        .find_map(|f| match f {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok))) => {
                Some(ok.delivery_tag)
            }
            _ => None,
        })
        .expect("get-ok");
    method(
        &mut b,
        1,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: tag,
            requeue: false,
        })),
    );
    let (_, actions) = round(&mut b, 1);
    let copies = actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Append {
                    dead_letter: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(copies, 1, "{actions:?}");
    // The source queue let go of it in the same round: its position comes with the copy.
    assert_eq!(cursor_writes(&actions), (0, 1), "{actions:?}");
}
