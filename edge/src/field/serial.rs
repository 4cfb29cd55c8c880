//! The serial source (`[[field.serial]]`): a line read with `tokio-serial`, cut into frames
//! ([`super::framing`]), each frame published. A line that goes away (a USB adapter pulled,
//! a pseudo-terminal closed) is opened again every `reopen_ms` until it is back; the source's
//! status topic says `down` meanwhile.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;
use tracing::{info, warn};

use super::framing::{parse, FrameError, Framer, Framing, Parse};
use super::stats::now_ms;
use super::{ts_property, until_stopped, Ctx};

/// One `[[field.serial]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// The source's name: one topic level, unique among the sources.
    pub name: String,
    /// The device, e.g. `/dev/ttyUSB0`.
    pub path: PathBuf,
    /// Default 9600.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5 to 8. Default 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `odd` or `even`. Default `none`.
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2. Default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// `none`, `software` (XON/XOFF) or `hardware` (RTS/CTS). Default `none`.
    #[serde(default)]
    pub flow_control: FlowControl,
    /// `line`, `fixed` or `length_prefix`. Default `line`.
    #[serde(default)]
    pub framing: FramingKind,
    /// For `line`: the terminator. Default `"\n"` (a `\r` before it is dropped too).
    #[serde(default = "default_terminator")]
    pub terminator: String,
    /// For `fixed`: every frame's length in bytes.
    #[serde(default)]
    pub frame_len: usize,
    /// For `length_prefix`: the prefix's size, 1, 2 or 4 bytes. Default 1.
    #[serde(default = "default_length_bytes")]
    pub length_bytes: u8,
    /// For `length_prefix`: the prefix is little-endian. Default false (big-endian).
    #[serde(default)]
    pub length_little_endian: bool,
    /// The longest frame; a longer one is dropped and counted as an error. Default 4096.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// `none` (the frame as it is), `kv` or `csv` (a JSON object). Default `none`.
    #[serde(default)]
    pub parse: Parse,
    /// For `csv`: the fields' names, in order.
    #[serde(default)]
    pub csv_fields: Vec<String>,
    /// How long to wait before opening a line again that failed or went away. Default 1000.
    #[serde(default = "default_reopen")]
    pub reopen_ms: u64,
    /// Where frames go: a template with `{prefix}` and `{name}`. Default `{prefix}/{name}`.
    pub topic: Option<String>,
    /// 0 or 1. Default 1: a frame the broker took is in the outbox before it is acknowledged.
    #[serde(default = "super::one")]
    pub qos: u8,
    /// Publish frames retained. Default false.
    #[serde(default)]
    pub retain: bool,
    /// The most frames a second this source publishes; more are dropped and counted.
    /// Default 20,000.
    #[serde(default = "super::default_rate")]
    pub max_per_sec: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FramingKind {
    #[default]
    Line,
    Fixed,
    LengthPrefix,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_terminator() -> String {
    "\n".into()
}
fn default_length_bytes() -> u8 {
    1
}
fn default_max_frame() -> usize {
    4096
}
fn default_reopen() -> u64 {
    1000
}

impl SerialConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(5..=8).contains(&self.data_bits) {
            return Err(format!("data_bits must be 5 to 8, not {}", self.data_bits));
        }
        if !(1..=2).contains(&self.stop_bits) {
            return Err(format!("stop_bits must be 1 or 2, not {}", self.stop_bits));
        }
        if self.max_frame_bytes == 0 || self.max_frame_bytes > 1024 * 1024 {
            return Err("max_frame_bytes must be 1 to 1 MiB".into());
        }
        match self.framing {
            FramingKind::Line if self.terminator.is_empty() => {
                return Err("terminator must not be empty".into())
            }
            FramingKind::Fixed if self.frame_len == 0 || self.frame_len > self.max_frame_bytes => {
                return Err("frame_len must be 1 to max_frame_bytes".into())
            }
            FramingKind::LengthPrefix if ![1, 2, 4].contains(&self.length_bytes) => {
                return Err("length_bytes must be 1, 2 or 4".into())
            }
            _ => {}
        }
        if self.reopen_ms == 0 {
            return Err("reopen_ms must be at least 1".into());
        }
        Ok(())
    }

    fn framing(&self) -> Framing {
        match self.framing {
            FramingKind::Line => Framing::Line {
                terminator: self.terminator.as_bytes().to_vec(),
            },
            FramingKind::Fixed => Framing::Fixed {
                len: self.frame_len,
            },
            FramingKind::LengthPrefix => Framing::LengthPrefix {
                bytes: self.length_bytes,
                little_endian: self.length_little_endian,
            },
        }
    }

    fn open(&self) -> tokio_serial::Result<tokio_serial::SerialStream> {
        use tokio_serial::{DataBits, StopBits};
        let data_bits = match self.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            _ => DataBits::Eight,
        };
        tokio_serial::new(self.path.to_string_lossy(), self.baud)
            .data_bits(data_bits)
            .parity(match self.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::Even => tokio_serial::Parity::Even,
            })
            .stop_bits(if self.stop_bits == 2 {
                StopBits::Two
            } else {
                StopBits::One
            })
            .flow_control(match self.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Software => tokio_serial::FlowControl::Software,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            })
            .open_native_async()
    }
}

/// The source's task: open, read and publish, open again, until stopped.
pub(crate) async fn run(mut ctx: Ctx, config: SerialConfig) {
    let Some((client, _commands)) = ctx.connect(false).await else {
        return;
    };
    let topic = match ctx.config.topic(&ctx.publishing, &ctx.name, None) {
        Ok(t) => t,
        Err(e) => return warn!(source = %ctx.name, error = %e, "field source not started"),
    };
    let mut stop = ctx.stop.clone();
    let mut was_down = false;
    let mut buf = vec![0u8; 4096];
    while !ctx.stopping() {
        let mut port = match config.open() {
            Ok(port) => port,
            Err(e) => {
                let why = format!("cannot open {}: {e}", config.path.display());
                if !ctx
                    .down_then_wait(&client, &mut was_down, why, config.reopen_ms)
                    .await
                {
                    return;
                }
                continue;
            }
        };
        info!(source = %ctx.name, path = %config.path.display(), "serial line open");
        ctx.stats
            .up
            .store(true, std::sync::atomic::Ordering::Relaxed);
        ctx.status(&client, true, None).await;
        was_down = false;
        let mut framer = Framer::new(config.framing(), config.max_frame_bytes);
        let why = loop {
            let n = tokio::select! {
                read = port.read(&mut buf) => match read {
                    Ok(0) => break "the line closed".to_owned(),
                    Ok(n) => n,
                    Err(e) => break format!("read failed: {e}"),
                },
                _ = until_stopped(&mut stop) => return,
            };
            let started = Instant::now();
            framer.push(&buf[..n]);
            while let Some(frame) = framer.next_frame() {
                match frame {
                    Ok(frame) => {
                        ctx.stats.read_ok(started.elapsed().as_micros() as u64);
                        if !ctx.admit() {
                            continue;
                        }
                        let p = publish_frame(&ctx, &config, topic.clone(), frame);
                        if client.publish(p).await.is_err() {
                            return;
                        }
                    }
                    Err(e @ (FrameError::TooLong { .. } | FrameError::LengthTooLarge { .. })) => {
                        warn!(source = %ctx.name, error = %e, "bad frame");
                        ctx.stats.read_failed(e.to_string(), false);
                    }
                }
            }
        };
        if !ctx
            .down_then_wait(&client, &mut was_down, why, config.reopen_ms)
            .await
        {
            return;
        }
    }
}

/// A frame as a message: parsed into JSON with its timestamp, or as it is with the
/// timestamp in the user property `ts` (also when it does not parse).
fn publish_frame(
    ctx: &Ctx,
    config: &SerialConfig,
    topic: ferry_protocol::topic::TopicName,
    frame: Bytes,
) -> ferry_protocol::mqtt::Publish {
    let ts = now_ms();
    match parse(config.parse, &frame, &config.csv_fields, ts) {
        Some(doc) => {
            let mut props = ferry_protocol::mqtt::Properties::default();
            props.content_type = Some("application/json".into());
            ctx.reading(topic, Bytes::from(doc), props)
        }
        None => ctx.reading(topic, frame, ts_property(ts)),
    }
}
