//! Entry points for the fuzz targets (`fuzz/fuzz_targets/amqp_*.rs`): the frame decoder and
//! the broker core driven by arbitrary frames. Not an API; it is public only so that the
//! fuzz crate, outside the workspace, can reach it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{channel, connection, AMQPClass};
use amq_protocol::types::FieldTable;
use bytes::BytesMut;
use ferry_edge::auth::Auth;
use futures_util::FutureExt;

use super::broker::{Action, Broker, Input, Settings};
use super::codec::{put_frame, take_frame};
use crate::log::{AppendData, MemoryLog, Storage, StreamConfig};
use crate::routes::{RouteTable, Routes};

/// Decodes every frame of `data`; each one must encode to bytes that decode to a frame
/// that encodes to the same bytes (bytes, not values, are compared: a NaN in a field table
/// is not equal to itself). Panics if not (that is what the fuzzer looks for).
pub fn frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = take_frame(&mut buf, 0) {
        let mut out = Vec::new();
        put_frame(&mut out, &frame);
        let mut again = BytesMut::from(&out[..]);
        let back = take_frame(&mut again, 0)
            .expect("a frame we wrote decodes")
            .expect("whole");
        assert!(again.is_empty());
        let mut out_again = Vec::new();
        put_frame(&mut out_again, &back);
        assert_eq!(out_again, out, "{frame:?} came back as {back:?}");
    }
}

/// A client that completed the handshake and opened channel 1 sends the frames of `data`;
/// appends complete at once over an in-memory log. The broker must never panic, and must
/// answer a frame error with a close.
pub fn session(data: &[u8]) {
    let log = MemoryLog::new();
    let _ = log.create_stream(super::AMQP_STREAM, &StreamConfig::default());
    let settings = Settings {
        vhosts: vec!["/".into()],
        frame_max: 131_072,
        channel_max: 8,
        heartbeat_secs: 0,
        ack_timeout: Duration::from_secs(1800),
        handshake_timeout: Duration::from_secs(10),
    };
    let routes = match Routes::new(&[]) {
        Ok(r) => Arc::new(RouteTable::new(r)),
        Err(_) => return,
    };
    let mut b = Broker::new(
        settings,
        Arc::new(Auth::open()),
        routes,
        log.clone(),
        Vec::new(),
    );
    let now = Instant::now();
    let conn = 1;
    b.handle(Input::Connected { conn }, now);
    let method = |m| Input::Frame {
        conn,
        frame: AMQPFrame::Method(0, m),
    };
    b.handle(
        method(AMQPClass::Connection(connection::AMQPMethod::StartOk(
            connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            },
        ))),
        now,
    );
    b.handle(
        method(AMQPClass::Connection(connection::AMQPMethod::TuneOk(
            connection::TuneOk {
                channel_max: 8,
                frame_max: 131_072,
                heartbeat: 0,
            },
        ))),
        now,
    );
    b.handle(
        method(AMQPClass::Connection(connection::AMQPMethod::Open(
            connection::Open {
                virtual_host: "/".into(),
            },
        ))),
        now,
    );
    b.handle(
        Input::Frame {
            conn,
            frame: AMQPFrame::Method(
                1,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ),
        },
        now,
    );
    drive(&mut b, &*log, now);
    let mut buf = BytesMut::from(data);
    // The broker closed the connection already (an error in an earlier frame): what the
    // peer sends after is not acted on, and a frame error needs no second close.
    let mut closed = false;
    loop {
        match take_frame(&mut buf, 131_072) {
            Ok(Some(frame)) => b.handle(Input::Frame { conn, frame }, now),
            Ok(None) => break,
            Err(error) => {
                b.handle(Input::Bad { conn, error }, now);
                closed |= drive(&mut b, &*log, now);
                assert!(closed, "a frame error closes the connection");
                return;
            }
        }
        closed |= drive(&mut b, &*log, now);
    }
    b.handle(Input::Tick, now + Duration::from_secs(3600));
    b.handle(Input::Lost { conn }, now);
    drive(&mut b, &*log, now);
}

/// Runs the broker's actions: appends go to the log and are answered at once. True if the
/// connection was closed.
fn drive(b: &mut Broker, log: &dyn Storage, now: Instant) -> bool {
    let mut closed = false;
    for _ in 0..16 {
        let actions = b.take_actions(now);
        if actions.is_empty() {
            break;
        }
        for a in actions {
            match a {
                Action::Append {
                    token,
                    stream,
                    partition,
                    record,
                    ..
                } => {
                    let done = log
                        .append(&stream, partition, AppendData::Records(vec![record]))
                        .now_or_never();
                    let ok = matches!(done, Some(Ok(_)));
                    b.handle(Input::Appended { token, ok }, now);
                }
                Action::Close { .. } => closed = true,
                _ => {}
            }
        }
        b.handle(Input::LogChanged, now);
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_entry_points_run_on_a_few_inputs() {
        // Whole frames (a qos, a heartbeat) and garbage: no panic, garbage closes.
        let mut data = Vec::new();
        put_frame(
            &mut data,
            &AMQPFrame::Method(
                1,
                AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Qos(
                    amq_protocol::protocol::basic::Qos {
                        prefetch_count: 3,
                        global: false,
                    },
                )),
            ),
        );
        put_frame(&mut data, &AMQPFrame::Heartbeat);
        frames(&data);
        session(&data);
        data.extend_from_slice(&[9, 9, 9, 9, 9, 9, 9, 9]);
        frames(&data);
        session(&data);
    }

    #[test]
    fn inputs_the_fuzzers_found_run_clean() {
        // fuzz/regressions/<target>/: inputs that broke a target once (a frame error after
        // the broker had closed the connection; a size field of 4 GiB that the decoder
        // reserved room for).
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
        let mut n = 0;
        for target in ["amqp_frames", "amqp_session"] {
            for entry in std::fs::read_dir(root.join(target)).expect("regressions") {
                let data = std::fs::read(entry.expect("entry").path()).expect("input");
                frames(&data);
                session(&data);
                n += 1;
            }
        }
        assert!(n >= 2, "{n} inputs");
    }

    #[test]
    fn the_committed_seeds_are_whole_frames_and_run_through_a_session() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/amqp_session");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("seeds") {
            let data = std::fs::read(entry.expect("entry").path()).expect("seed");
            let mut buf = BytesMut::from(&data[..]);
            let mut count = 0;
            while take_frame(&mut buf, 131_072)
                .expect("a seed is valid frames")
                .is_some()
            {
                count += 1;
            }
            assert!(count > 3 && buf.is_empty());
            frames(&data);
            session(&data);
            n += 1;
        }
        assert!(n >= 4, "{n} seeds");
    }
}
