//! The Modbus source (`[[field.modbus]]`): a device polled over Modbus TCP or RTU with
//! `tokio-modbus`, its map of named points read in as few requests as the map allows and
//! published as one JSON document per poll and/or one message per point; and writes of
//! writable points, from commands on `<prefix>/<name>/set/<point>`.
//!
//! Devices on one serial line (RTU, several unit ids on a bus: the tables that name the same
//! `path`) share one connection and are polled in turn; each TCP device has its own. A
//! device that does not answer (an I/O error, a timeout) is marked down on its status topic,
//! its connection dropped, and polled again after a backoff that doubles from `poll_ms` up
//! to `backoff_max_ms`; readings are published only from polls that answered, so a value is
//! never republished as fresh. A read refused with a Modbus exception (a map that names
//! addresses the device does not have) is logged and counted, and the rest of the map is
//! still read.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::mqtt::Properties;
use ferry_protocol::topic::TopicName;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;
use tokio_serial::SerialPortBuilderExt;
use tracing::{debug, info, warn};

use super::client::{Client, Command};
use super::serial::Parity;
use super::stats::now_ms;
use super::{command_point, until_stopped, Ctx, Outcome};

/// The most registers one read asks for (the protocol's limit is 125).
const MAX_REGISTERS: u16 = 125;
/// The most coils or discrete inputs one read asks for (the protocol's limit is 2000).
const MAX_BITS: u16 = 2000;

/// One `[[field.modbus]]` table: a device and its map.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// The source's name: one topic level, unique among the sources.
    pub name: String,
    /// Modbus TCP: `host:port`. Either this or `path`.
    pub address: Option<String>,
    /// Modbus RTU: the serial line. Devices with the same `path` share it.
    pub path: Option<PathBuf>,
    /// RTU: the line's speed. Default 9600 (8 data bits; `parity`, `stop_bits` below).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// RTU: `none`, `odd` or `even`. Default `even` (Modbus's own default).
    #[serde(default = "default_parity")]
    pub parity: Parity,
    /// RTU: 1 or 2. Default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// The unit (slave) id. Default 1 (TCP devices mostly ignore it; gateways route by it).
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// How often the map is read. Default 1000.
    #[serde(default = "default_poll")]
    pub poll_ms: u64,
    /// How long one request may take. Default 1000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// The longest wait between tries at a device that does not answer. Default 30000.
    #[serde(default = "default_backoff")]
    pub backoff_max_ms: u64,
    /// `document` (one JSON object per poll on the source's topic), `points` (one message
    /// per point on `<topic>/<point>`) or `both`. Default `document`.
    #[serde(default)]
    pub publish: PublishMode,
    /// Publish only what changed (by more than its `deadband`); a document then goes out
    /// when any of its points changed. Default false: every poll.
    #[serde(default)]
    pub on_change: bool,
    /// Two points of a table are read in one request when at most this many unused
    /// registers (or bits) lie between them. Default 8.
    #[serde(default = "default_gap")]
    pub max_gap: u16,
    /// The map.
    #[serde(default)]
    pub points: Vec<Point>,
    /// Where readings go: a template with `{prefix}` and `{name}`. Default `{prefix}/{name}`.
    pub topic: Option<String>,
    /// 0 or 1. Default 1.
    #[serde(default = "super::one")]
    pub qos: u8,
    /// Publish readings retained. Default false.
    #[serde(default)]
    pub retain: bool,
    /// The most messages a second; more are dropped and counted. Default 20,000.
    #[serde(default = "super::default_rate")]
    pub max_per_sec: u32,
}

/// One named point of a device's map.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// The point's name: a key in the document, a topic level.
    pub name: String,
    /// `coil`, `discrete_input`, `holding_register` or `input_register`.
    pub table: Table,
    /// The first register's (or bit's) address, from 0.
    pub address: u16,
    /// `bool` (coils and discrete inputs; the default there), `u16` (the default for
    /// registers), `i16`, `u32`, `i32`, `u64`, `i64`, `f32`, `f64`, or `string`.
    #[serde(rename = "type")]
    pub kind: Option<Kind>,
    /// For `string`: how many registers (two characters each).
    #[serde(default)]
    pub length: u16,
    /// The byte order within a register: `big` (Modbus's own) or `little`. Default `big`.
    #[serde(default)]
    pub byte_order: Order,
    /// The register order of a value over several: `big` (the first register is the most
    /// significant) or `little`. Default `big`.
    #[serde(default)]
    pub word_order: Order,
    /// value = raw × scale + offset. Defaults 1 and 0.
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// Shown beside the value (`"unit"` in a point's message, `<name>_unit` in a document).
    pub unit: Option<String>,
    /// With `on_change`: a change no larger than this is not published. Default 0.
    #[serde(default)]
    pub deadband: f64,
    /// Commands may write it (coils and holding registers only). Default false.
    #[serde(default)]
    pub writable: bool,
    /// The range a written value must be in (after scale and offset).
    pub min: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Coil,
    DiscreteInput,
    HoldingRegister,
    InputRegister,
}

impl Table {
    fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    #[default]
    Big,
    Little,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    #[default]
    Document,
    Points,
    Both,
}

fn default_baud() -> u32 {
    9600
}
fn default_parity() -> Parity {
    Parity::Even
}
fn default_stop_bits() -> u8 {
    1
}
fn default_unit() -> u8 {
    1
}
fn default_poll() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    1000
}
fn default_backoff() -> u64 {
    30_000
}
fn default_gap() -> u16 {
    8
}
fn default_scale() -> f64 {
    1.0
}

impl Point {
    /// The point's type, with the table's default.
    pub fn kind(&self) -> Kind {
        self.kind.unwrap_or(if self.table.is_bits() {
            Kind::Bool
        } else {
            Kind::U16
        })
    }

    /// How many registers (or bits) it spans.
    pub fn width(&self) -> u16 {
        match self.kind() {
            Kind::Bool | Kind::U16 | Kind::I16 => 1,
            Kind::U32 | Kind::I32 | Kind::F32 => 2,
            Kind::U64 | Kind::I64 | Kind::F64 => 4,
            Kind::String => self.length,
        }
    }

    fn scaled(&self) -> bool {
        self.scale != 1.0 || self.offset != 0.0
    }
}

impl ModbusConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match (&self.address, &self.path) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err("needs either address (TCP) or path (RTU)".into()),
        }
        if self.poll_ms == 0 || self.timeout_ms == 0 {
            return Err("poll_ms and timeout_ms must be at least 1".into());
        }
        if self.points.is_empty() {
            return Err("has no points".into());
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.points {
            super::check_level("a point's name", &p.name)?;
            if !names.insert(&p.name) {
                return Err(format!("two points are named {:?}", p.name));
            }
            let bits = p.table.is_bits();
            if bits != (p.kind() == Kind::Bool) {
                return Err(format!(
                    "point {:?}: bool is for coils and discrete inputs, and only bool",
                    p.name
                ));
            }
            if p.kind() == Kind::String && p.length == 0 {
                return Err(format!("point {:?}: a string needs a length", p.name));
            }
            if p.width() > MAX_REGISTERS || u32::from(p.address) + u32::from(p.width()) > 65536 {
                return Err(format!("point {:?}: past the end of its table", p.name));
            }
            if p.writable && !matches!(p.table, Table::Coil | Table::HoldingRegister) {
                return Err(format!(
                    "point {:?}: only coils and holding registers are writable",
                    p.name
                ));
            }
            if p.scale == 0.0 || !p.scale.is_finite() || !p.offset.is_finite() {
                return Err(format!(
                    "point {:?}: scale must be finite and not 0",
                    p.name
                ));
            }
        }
        Ok(())
    }
}

/// The sources grouped by connection: each TCP device alone, the RTU devices of one line
/// together.
pub(crate) fn buses(configs: &[ModbusConfig]) -> Vec<Vec<ModbusConfig>> {
    let mut rtu: HashMap<&PathBuf, usize> = HashMap::new();
    let mut buses: Vec<Vec<ModbusConfig>> = Vec::new();
    for c in configs {
        match &c.path {
            Some(path) => match rtu.get(path) {
                Some(&i) => buses[i].push(c.clone()),
                None => {
                    rtu.insert(path, buses.len());
                    buses.push(vec![c.clone()]);
                }
            },
            None => buses.push(vec![c.clone()]),
        }
    }
    buses
}

/// One request of a poll: `count` registers (or bits) of `table` from `start`, covering the
/// points `points` (indexes into the map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub table: Table,
    pub start: u16,
    pub count: u16,
    pub points: Vec<usize>,
}

/// The fewest requests that read every point: per table, points in address order, joined
/// while the gap between them is at most `max_gap` and the request stays within the
/// protocol's size.
pub fn plan(points: &[Point], max_gap: u16) -> Vec<Read> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|&i| (points[i].table, points[i].address));
    let mut reads: Vec<Read> = Vec::new();
    for i in order {
        let p = &points[i];
        let end = u32::from(p.address) + u32::from(p.width());
        let limit = if p.table.is_bits() {
            MAX_BITS
        } else {
            MAX_REGISTERS
        };
        if let Some(last) = reads.last_mut() {
            let last_end = u32::from(last.start) + u32::from(last.count);
            let joined = end.max(last_end) - u32::from(last.start);
            if last.table == p.table
                && u32::from(p.address) <= last_end + u32::from(max_gap)
                && joined <= u32::from(limit)
            {
                last.count = joined as u16;
                last.points.push(i);
                continue;
            }
        }
        reads.push(Read {
            table: p.table,
            start: p.address,
            count: p.width(),
            points: vec![i],
        });
    }
    reads
}

/// A point's value read from the registers it spans, scaled.
pub fn decode(p: &Point, words: &[u16]) -> Value {
    let bytes = to_bytes(p, words);
    let raw: Value = match p.kind() {
        Kind::Bool => return Value::Bool(words.first().is_some_and(|&w| w != 0)),
        Kind::String => {
            let text: String = String::from_utf8_lossy(&bytes)
                .trim_end_matches(['\0', ' '])
                .to_owned();
            return Value::String(text);
        }
        Kind::U16 => u16::from_be_bytes(take(&bytes)).into(),
        Kind::I16 => i16::from_be_bytes(take(&bytes)).into(),
        Kind::U32 => u32::from_be_bytes(take(&bytes)).into(),
        Kind::I32 => i32::from_be_bytes(take(&bytes)).into(),
        Kind::U64 => u64::from_be_bytes(take(&bytes)).into(),
        Kind::I64 => i64::from_be_bytes(take(&bytes)).into(),
        Kind::F32 => number(f64::from(f32::from_be_bytes(take(&bytes)))),
        Kind::F64 => number(f64::from_be_bytes(take(&bytes))),
    };
    if !p.scaled() {
        return raw;
    }
    number(raw.as_f64().unwrap_or(f64::NAN) * p.scale + p.offset)
}

/// The registers' bytes in value order (most significant first).
fn to_bytes(p: &Point, words: &[u16]) -> Vec<u8> {
    let mut ordered: Vec<u16> = words.to_vec();
    if p.word_order == Order::Little && p.kind() != Kind::String {
        ordered.reverse();
    }
    let mut out = Vec::with_capacity(ordered.len() * 2);
    for w in ordered {
        let b = w.to_be_bytes();
        match p.byte_order {
            Order::Big => out.extend_from_slice(&b),
            Order::Little => out.extend_from_slice(&[b[1], b[0]]),
        }
    }
    out
}

fn take<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[..N]);
    a
}

/// A JSON number, or null for NaN and infinities (which JSON has no way to say).
pub(crate) fn number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// Why a value cannot be written to a point.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteRefused {
    #[error("no point named {0:?}")]
    NoSuchPoint(String),
    #[error("point {0:?} is not writable")]
    NotWritable(String),
    #[error("{0}")]
    BadValue(String),
    #[error("{value} is outside the point's range [{min}, {max}]")]
    OutOfRange { value: f64, min: f64, max: f64 },
}

/// What a write puts on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Coil(u16, bool),
    Registers(u16, Vec<u16>),
}

/// The write of `value` to `p`: its type and range checked, scale and offset undone, the
/// registers in the point's byte and word order.
pub fn encode(p: &Point, value: &Value) -> Result<WriteOp, WriteRefused> {
    if !p.writable {
        return Err(WriteRefused::NotWritable(p.name.clone()));
    }
    let bad = |why: &str| WriteRefused::BadValue(format!("point {:?}: {why}", p.name));
    match p.kind() {
        Kind::Bool => {
            let on = match value {
                Value::Bool(b) => *b,
                Value::Number(n) if n.as_u64() == Some(0) => false,
                Value::Number(n) if n.as_u64() == Some(1) => true,
                _ => return Err(bad("needs true or false")),
            };
            return Ok(WriteOp::Coil(p.address, on));
        }
        Kind::String => {
            let Value::String(s) = value else {
                return Err(bad("needs a string"));
            };
            let max = usize::from(p.length) * 2;
            if s.len() > max {
                return Err(bad(&format!("at most {max} bytes")));
            }
            let mut bytes = s.as_bytes().to_vec();
            bytes.resize(max, 0);
            return Ok(WriteOp::Registers(p.address, from_bytes(p, &bytes)));
        }
        _ => {}
    }
    let v = value.as_f64().ok_or_else(|| bad("needs a number"))?;
    let (min, max) = (p.min.unwrap_or(f64::MIN), p.max.unwrap_or(f64::MAX));
    if !(min..=max).contains(&v) {
        return Err(WriteRefused::OutOfRange { value: v, min, max });
    }
    let raw = (v - p.offset) / p.scale;
    let int = |lo: f64, hi: f64| -> Result<f64, WriteRefused> {
        let r = raw.round();
        if (r - raw).abs() > 1e-9 * raw.abs().max(1.0) {
            return Err(bad("needs a whole number of its units"));
        }
        if !(lo..=hi).contains(&r) {
            return Err(bad("out of its type's range"));
        }
        Ok(r)
    };
    let bytes: Vec<u8> = match p.kind() {
        Kind::U16 => (int(0.0, 65535.0)? as u16).to_be_bytes().to_vec(),
        Kind::I16 => (int(-32768.0, 32767.0)? as i16).to_be_bytes().to_vec(),
        Kind::U32 => (int(0.0, 4294967295.0)? as u32).to_be_bytes().to_vec(),
        Kind::I32 => (int(-2147483648.0, 2147483647.0)? as i32)
            .to_be_bytes()
            .to_vec(),
        Kind::U64 => match value.as_u64().filter(|_| !p.scaled()) {
            Some(n) => n.to_be_bytes().to_vec(),
            None => (int(0.0, 1.8446744073709552e19)? as u64)
                .to_be_bytes()
                .to_vec(),
        },
        Kind::I64 => match value.as_i64().filter(|_| !p.scaled()) {
            Some(n) => n.to_be_bytes().to_vec(),
            None => (int(-9.223372036854776e18, 9.223372036854776e18)? as i64)
                .to_be_bytes()
                .to_vec(),
        },
        Kind::F32 => (raw as f32).to_be_bytes().to_vec(),
        Kind::F64 => raw.to_be_bytes().to_vec(),
        Kind::Bool | Kind::String => unreachable!("handled above"),
    };
    Ok(WriteOp::Registers(p.address, from_bytes(p, &bytes)))
}

/// Value-order bytes into registers in the point's byte and word order (the inverse of
/// [`to_bytes`]).
fn from_bytes(p: &Point, bytes: &[u8]) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| match p.byte_order {
            Order::Big => u16::from_be_bytes([c[0], c[1]]),
            Order::Little => u16::from_le_bytes([c[0], c[1]]),
        })
        .collect();
    if p.word_order == Order::Little && p.kind() != Kind::String {
        words.reverse();
    }
    words
}

/// The value of a command's payload: JSON (`21.5`, `true`, `"text"`, or `{"value": …}`),
/// or plain text taken as a number or boolean where it reads as one.
pub fn command_value(payload: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(mut o)) if o.contains_key("value") => {
            o.remove("value").unwrap_or_default()
        }
        Ok(v) => v,
        Err(_) => {
            let text = String::from_utf8_lossy(payload).trim().to_owned();
            match text.as_str() {
                "true" | "on" => Value::Bool(true),
                "false" | "off" => Value::Bool(false),
                _ => text
                    .parse::<f64>()
                    .ok()
                    .map(number)
                    .unwrap_or(Value::String(text)),
            }
        }
    }
}

/// What has changed since the last published values, with deadbands.
fn changed(p: &Point, old: Option<&Value>, new: &Value) -> bool {
    match (old, new) {
        (None, _) => true,
        (Some(Value::Number(a)), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            (a - b).abs() > p.deadband || (p.deadband == 0.0 && a != b)
        }
        (Some(a), b) => a != b,
    }
}

/// One device of a bus, as its poller keeps it.
struct Device {
    ctx: Ctx,
    config: ModbusConfig,
    plan: Vec<Read>,
    client: Client,
    topic: TopicName,
    point_topics: Vec<TopicName>,
    /// The values last published (per point), for `on_change`.
    last: Vec<Option<Value>>,
    next_poll: Instant,
    failures: u32,
    up: Option<bool>,
    /// Reads that failed with an exception in the last poll (logged once until they work).
    refused: Vec<bool>,
}

/// The connection of one bus.
enum Link {
    Tcp(String),
    Rtu(ModbusConfig),
}

impl Link {
    async fn open(&self, timeout: Duration) -> Result<Context, String> {
        match self {
            Link::Tcp(address) => {
                let addr = tokio::time::timeout(timeout, tokio::net::lookup_host(address))
                    .await
                    .map_err(|_| format!("cannot resolve {address}: timed out"))?
                    .map_err(|e| format!("cannot resolve {address}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("{address} has no address"))?;
                let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| format!("cannot connect to {address}: timed out"))?
                    .map_err(|e| format!("cannot connect to {address}: {e}"))?;
                let _ = stream.set_nodelay(true);
                Ok(tokio_modbus::client::tcp::attach(stream))
            }
            Link::Rtu(c) => {
                let path = c.path.as_ref().expect("RTU has a path");
                let port = tokio_serial::new(path.to_string_lossy(), c.baud)
                    .parity(match c.parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Odd => tokio_serial::Parity::Odd,
                        Parity::Even => tokio_serial::Parity::Even,
                    })
                    .stop_bits(if c.stop_bits == 2 {
                        tokio_serial::StopBits::Two
                    } else {
                        tokio_serial::StopBits::One
                    })
                    .open_native_async()
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                Ok(tokio_modbus::client::rtu::attach(port))
            }
        }
    }
}

/// A bus's task: connects, polls each device when it is due, writes commands in between.
pub(crate) async fn run_bus(ctxs: Vec<Ctx>, configs: Vec<ModbusConfig>) {
    let link = match (&configs[0].address, &configs[0].path) {
        (Some(a), _) => Link::Tcp(a.clone()),
        _ => Link::Rtu(configs[0].clone()),
    };
    let mut stop = ctxs[0].stop.clone();
    let (commands_tx, mut commands) = mpsc::channel::<(usize, Command)>(64);
    let mut devices = Vec::new();
    for (i, (ctx, config)) in ctxs.into_iter().zip(configs).enumerate() {
        let writable = config.points.iter().any(|p| p.writable);
        let Some((client, mut rx)) = ctx.connect(writable).await else {
            return;
        };
        let tx = commands_tx.clone();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                if tx.send((i, cmd)).await.is_err() {
                    return;
                }
            }
        });
        let topic = match ctx.config.topic(&ctx.publishing, &ctx.name, None) {
            Ok(t) => t,
            Err(e) => return warn!(source = %ctx.name, error = %e, "field source not started"),
        };
        let point_topics = config
            .points
            .iter()
            .map(|p| ctx.config.topic(&ctx.publishing, &ctx.name, Some(&p.name)))
            .collect::<Result<Vec<_>, _>>();
        let Ok(point_topics) = point_topics else {
            return warn!(source = %ctx.name, "a point's topic is not valid; field source not started");
        };
        let plan = plan(&config.points, config.max_gap);
        debug!(source = %ctx.name, requests = plan.len(), points = config.points.len(), "Modbus read plan");
        devices.push(Device {
            last: vec![None; config.points.len()],
            refused: vec![false; plan.len()],
            plan,
            ctx,
            config,
            client,
            topic,
            point_topics,
            next_poll: Instant::now(),
            failures: 0,
            up: None,
        });
    }
    drop(commands_tx);
    let mut conn: Option<Context> = None;
    loop {
        let (due, at) = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (i, d.next_poll))
            .min_by_key(|&(_, at)| at)
            .expect("a bus has devices");
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {
                let d = &mut devices[due];
                poll(d, &link, &mut conn).await;
            }
            cmd = commands.recv() => {
                let Some((i, cmd)) = cmd else { return };
                command(&mut devices[i], &link, &mut conn, cmd).await;
            }
            _ = until_stopped(&mut stop) => return,
        }
    }
}

/// Opens the bus's connection if it is not open, and selects the device's unit.
async fn connected<'a>(
    d: &Device,
    link: &Link,
    conn: &'a mut Option<Context>,
) -> Result<&'a mut Context, String> {
    if conn.is_none() {
        *conn = Some(
            link.open(Duration::from_millis(d.config.timeout_ms))
                .await?,
        );
    }
    let c = conn.as_mut().expect("opened above");
    c.set_slave(Slave(d.config.unit));
    Ok(c)
}

/// What one request read.
enum ReadOutcome {
    Words(Vec<u16>),
    /// The device answered with an exception: the map is wrong for it.
    Exception(String),
}

async fn read_once(c: &mut Context, r: &Read, timeout: Duration) -> Result<ReadOutcome, String> {
    let call = async {
        Ok::<_, tokio_modbus::Error>(match r.table {
            Table::Coil => c
                .read_coils(r.start, r.count)
                .await?
                .map(|b| b.into_iter().map(u16::from).collect()),
            Table::DiscreteInput => c
                .read_discrete_inputs(r.start, r.count)
                .await?
                .map(|b| b.into_iter().map(u16::from).collect()),
            Table::HoldingRegister => c.read_holding_registers(r.start, r.count).await?,
            Table::InputRegister => c.read_input_registers(r.start, r.count).await?,
        })
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err("no answer within timeout_ms".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(Ok(words))) => Ok(ReadOutcome::Words(words)),
        Ok(Ok(Err(exception))) => Ok(ReadOutcome::Exception(format!("{exception:?}"))),
    }
}

/// One poll of a device: every request of its plan, then what is to be published.
async fn poll(d: &mut Device, link: &Link, conn: &mut Option<Context>) {
    let started = Instant::now();
    let timeout = Duration::from_millis(d.config.timeout_ms);
    let ts = now_ms();
    let mut values: Vec<Option<Value>> = vec![None; d.config.points.len()];
    let result: Result<(), String> = async {
        let c = connected(d, link, conn).await?;
        for (ri, r) in d.plan.iter().enumerate() {
            match read_once(c, r, timeout).await? {
                ReadOutcome::Words(words) => {
                    if d.refused[ri] {
                        info!(source = %d.ctx.name, table = ?r.table, start = r.start, "Modbus read works again");
                        d.refused[ri] = false;
                    }
                    for &pi in &r.points {
                        let p = &d.config.points[pi];
                        let from = usize::from(p.address - r.start);
                        let Some(span) = words.get(from..from + usize::from(p.width())) else {
                            return Err(format!("short answer to a read of {} at {}", r.count, r.start));
                        };
                        values[pi] = Some(decode(p, span));
                    }
                }
                ReadOutcome::Exception(e) => {
                    let why = format!(
                        "the device refused a read of {} {:?} at {}: {e}",
                        r.count, r.table, r.start
                    );
                    if !d.refused[ri] {
                        warn!(source = %d.ctx.name, error = %why, "Modbus map not readable");
                        d.refused[ri] = true;
                    }
                    d.ctx.stats.read_failed(why, false);
                }
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            d.ctx.stats.read_ok(started.elapsed().as_micros() as u64);
            d.failures = 0;
            d.next_poll += Duration::from_millis(d.config.poll_ms);
            if d.next_poll < Instant::now() {
                // Late (a slow device, a long backoff): the next poll is a period from now,
                // not a burst of the missed ones.
                d.next_poll = Instant::now() + Duration::from_millis(d.config.poll_ms);
            }
            if d.up != Some(true) {
                info!(source = %d.ctx.name, "Modbus device answers");
                d.up = Some(true);
                d.ctx.status(&d.client, true, None).await;
            }
            publish_values(d, values, ts).await;
        }
        Err(why) => {
            *conn = None;
            d.failures = d.failures.saturating_add(1);
            let backoff = d
                .config
                .poll_ms
                .saturating_mul(1u64 << d.failures.min(16))
                .min(d.config.backoff_max_ms.max(d.config.poll_ms));
            d.next_poll = Instant::now() + Duration::from_millis(backoff);
            d.ctx.stats.read_failed(why.clone(), true);
            // What was last published is not fresh any more: after the device is back,
            // everything is published again.
            d.last.iter_mut().for_each(|v| *v = None);
            if d.up != Some(false) {
                warn!(source = %d.ctx.name, error = %why, retry_ms = backoff, "Modbus device does not answer");
                d.up = Some(false);
                d.ctx.status(&d.client, false, Some(&why)).await;
            } else {
                debug!(source = %d.ctx.name, error = %why, retry_ms = backoff, "Modbus device still does not answer");
            }
        }
    }
}

/// Publishes a poll's values: the document and/or each point, all or what changed.
async fn publish_values(d: &mut Device, values: Vec<Option<Value>>, ts: u64) {
    let mut doc = serde_json::Map::new();
    let mut any_changed = false;
    let mut points = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let Some(v) = v else { continue };
        let p = &d.config.points[i];
        let changed = !d.config.on_change || changed(p, d.last[i].as_ref(), &v);
        if changed {
            any_changed = true;
            d.last[i] = Some(v.clone());
            if d.config.publish != PublishMode::Document {
                let mut msg = json!({ "value": v, "ts": ts });
                if let Some(unit) = &p.unit {
                    msg["unit"] = unit.clone().into();
                }
                points.push((d.point_topics[i].clone(), msg));
            }
        }
        if let Some(unit) = &p.unit {
            doc.insert(format!("{}_unit", p.name), unit.clone().into());
        }
        doc.insert(p.name.clone(), v);
    }
    if doc.is_empty() {
        return;
    }
    doc.insert("ts".into(), ts.into());
    let mut out = Vec::new();
    if d.config.publish != PublishMode::Points && any_changed {
        out.push((d.topic.clone(), Value::Object(doc)));
    }
    out.extend(points);
    for (topic, body) in out {
        if !d.ctx.admit() {
            continue;
        }
        let mut props = Properties::default();
        props.content_type = Some("application/json".into());
        let p = d.ctx.reading(topic, Bytes::from(body.to_string()), props);
        let _ = d.client.publish(p).await;
    }
}

/// A command: the write of one point, and the answer.
async fn command(d: &mut Device, link: &Link, conn: &mut Option<Context>, cmd: Command) {
    let point_name = command_point(&cmd);
    let value = command_value(&cmd.payload);
    let op = match d.config.points.iter().find(|p| p.name == point_name) {
        None => Err(WriteRefused::NoSuchPoint(point_name.clone())),
        Some(p) => encode(p, &value),
    };
    let outcome = match op {
        Err(refused) => Outcome::Refused(refused.to_string()),
        Ok(op) => match write(d, link, conn, &op).await {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(e),
        },
    };
    if outcome == Outcome::Done {
        // The next poll shows the new value soon, not a period later.
        d.next_poll = d.next_poll.min(Instant::now() + Duration::from_millis(50));
    }
    d.ctx
        .answer(&d.client, &cmd, &point_name, &value, outcome)
        .await;
}

async fn write(
    d: &Device,
    link: &Link,
    conn: &mut Option<Context>,
    op: &WriteOp,
) -> Result<(), String> {
    let timeout = Duration::from_millis(d.config.timeout_ms);
    let c = connected(d, link, conn).await?;
    let call = async {
        match op {
            WriteOp::Coil(addr, on) => c.write_single_coil(*addr, *on).await,
            WriteOp::Registers(addr, words) if words.len() == 1 => {
                c.write_single_register(*addr, words[0]).await
            }
            WriteOp::Registers(addr, words) => c.write_multiple_registers(*addr, words).await,
        }
    };
    let result = match tokio::time::timeout(timeout, call).await {
        Err(_) => Err("no answer within timeout_ms".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(Err(exception))) => {
            return Err(format!("the device refused the write: {exception:?}"))
        }
        Ok(Ok(Ok(()))) => Ok(()),
    };
    if result.is_err() {
        *conn = None;
    }
    result
}

/// The answer to a command: to its response topic with its correlation data (MQTT 5
/// request/response), else to `<prefix>/<name>/reply/<point>`.
#[cfg(test)]
mod tests {
    use super::*;

    fn point(name: &str, table: Table, address: u16, kind: Kind) -> Point {
        Point {
            name: name.into(),
            table,
            address,
            kind: Some(kind),
            length: 0,
            byte_order: Order::Big,
            word_order: Order::Big,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            deadband: 0.0,
            writable: true,
            min: None,
            max: None,
        }
    }

    #[test]
    fn the_plan_joins_near_points_of_a_table_and_splits_far_ones() {
        let points = vec![
            point("a", Table::HoldingRegister, 10, Kind::F32),
            point("b", Table::HoldingRegister, 0, Kind::U16),
            point("c", Table::HoldingRegister, 200, Kind::U16),
            point("d", Table::InputRegister, 0, Kind::U64),
            point("e", Table::Coil, 3, Kind::Bool),
            point("f", Table::Coil, 0, Kind::Bool),
        ];
        let reads = plan(&points, 10);
        assert_eq!(
            reads,
            vec![
                Read {
                    table: Table::Coil,
                    start: 0,
                    count: 4,
                    points: vec![5, 4]
                },
                Read {
                    table: Table::HoldingRegister,
                    start: 0,
                    count: 12,
                    points: vec![1, 0]
                },
                Read {
                    table: Table::HoldingRegister,
                    start: 200,
                    count: 1,
                    points: vec![2]
                },
                Read {
                    table: Table::InputRegister,
                    start: 0,
                    count: 4,
                    points: vec![3]
                },
            ]
        );
        // No gap allowed: coils 0 and 3, registers 0 and 10 are read apart.
        assert_eq!(plan(&points, 0).len(), 6);
        // A request never goes past 125 registers.
        let many: Vec<Point> = (0..300)
            .map(|i| point(&format!("p{i}"), Table::HoldingRegister, i, Kind::U16))
            .collect();
        let reads = plan(&many, 8);
        assert_eq!(
            reads.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![125, 125, 50]
        );
    }

    #[test]
    fn every_type_and_order_decodes_and_encodes_back() {
        let cases: Vec<(Kind, Order, Order, Value)> = vec![
            (Kind::U16, Order::Big, Order::Big, json!(65000)),
            (Kind::I16, Order::Big, Order::Big, json!(-1234)),
            (
                Kind::U32,
                Order::Big,
                Order::Little,
                json!(3_000_000_000u64),
            ),
            (Kind::I32, Order::Little, Order::Big, json!(-70000)),
            (Kind::U64, Order::Little, Order::Little, json!(u64::MAX - 5)),
            (
                Kind::I64,
                Order::Big,
                Order::Little,
                json!(-5_000_000_000i64),
            ),
            (Kind::F32, Order::Big, Order::Big, json!(21.5)),
            (Kind::F64, Order::Little, Order::Little, json!(-0.125)),
        ];
        for (kind, byte_order, word_order, v) in cases {
            let mut p = point("x", Table::HoldingRegister, 7, kind);
            p.byte_order = byte_order;
            p.word_order = word_order;
            let WriteOp::Registers(7, words) = encode(&p, &v).expect("encodes") else {
                panic!("registers")
            };
            assert_eq!(words.len(), usize::from(p.width()), "{kind:?}");
            assert_eq!(
                decode(&p, &words),
                v,
                "{kind:?} {byte_order:?} {word_order:?}"
            );
        }
        // The wire layout of 0x11223344 in the four orders.
        let mut p = point("x", Table::HoldingRegister, 0, Kind::U32);
        assert_eq!(decode(&p, &[0x1122, 0x3344]), json!(0x11223344));
        p.word_order = Order::Little;
        assert_eq!(decode(&p, &[0x3344, 0x1122]), json!(0x11223344));
        p.byte_order = Order::Little;
        assert_eq!(decode(&p, &[0x4433, 0x2211]), json!(0x11223344));
        p.word_order = Order::Big;
        assert_eq!(decode(&p, &[0x2211, 0x4433]), json!(0x11223344));
        let mut s = point("s", Table::HoldingRegister, 0, Kind::String);
        s.length = 3;
        assert_eq!(decode(&s, &[0x4142, 0x4300, 0]), json!("ABC"));
        let WriteOp::Registers(0, words) = encode(&s, &json!("ABC")).expect("encodes") else {
            panic!()
        };
        assert_eq!(words, vec![0x4142, 0x4300, 0]);
    }

    #[test]
    fn scale_offset_and_range_apply_both_ways() {
        let mut p = point("t", Table::HoldingRegister, 0, Kind::I16);
        p.scale = 0.1;
        p.offset = -40.0;
        p.min = Some(-40.0);
        p.max = Some(120.0);
        // raw 615 → 21.5 °C
        assert_eq!(
            decode(&p, &[615]).as_f64().map(|v| (v * 10.0).round()),
            Some(215.0)
        );
        assert_eq!(
            encode(&p, &json!(21.5)),
            Ok(WriteOp::Registers(0, vec![615]))
        );
        assert!(matches!(
            encode(&p, &json!(130)),
            Err(WriteRefused::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&p, &json!(21.55)),
            Err(WriteRefused::BadValue(_))
        ));
        assert!(matches!(
            encode(&p, &json!("hot")),
            Err(WriteRefused::BadValue(_))
        ));
        p.writable = false;
        assert!(matches!(
            encode(&p, &json!(20)),
            Err(WriteRefused::NotWritable(_))
        ));
        let u = point("u", Table::HoldingRegister, 0, Kind::U16);
        assert!(matches!(
            encode(&u, &json!(-1)),
            Err(WriteRefused::BadValue(_))
        ));
        assert!(matches!(
            encode(&u, &json!(70000)),
            Err(WriteRefused::BadValue(_))
        ));
        let c = point("c", Table::Coil, 5, Kind::Bool);
        assert_eq!(encode(&c, &json!(true)), Ok(WriteOp::Coil(5, true)));
        assert_eq!(decode(&c, &[1]), json!(true));
    }

    #[test]
    fn commands_take_json_or_plain_text_and_changes_respect_the_deadband() {
        assert_eq!(command_value(b"21.5"), json!(21.5));
        assert_eq!(command_value(br#"{"value": true}"#), json!(true));
        assert_eq!(command_value(b" 42 "), json!(42));
        assert_eq!(command_value(b"on"), json!(true));
        assert_eq!(command_value(b"ab c"), json!("ab c"));
        let mut p = point("t", Table::HoldingRegister, 0, Kind::F32);
        p.deadband = 0.5;
        assert!(changed(&p, None, &json!(1.0)));
        assert!(!changed(&p, Some(&json!(1.0)), &json!(1.4)));
        assert!(changed(&p, Some(&json!(1.0)), &json!(1.6)));
        p.deadband = 0.0;
        assert!(changed(&p, Some(&json!(1)), &json!(2)));
        assert!(!changed(&p, Some(&json!(2)), &json!(2)));
    }
}
