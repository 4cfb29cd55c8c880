//! The OPC UA source (`[[field.opcua]]`, feature `opcua`): a client of an OPC UA server
//! (async-opcua), subscribed to configured nodes; each data change is published with the
//! server's source and server timestamps and its status code, and writable nodes are
//! written by commands on `<prefix>/<name>/set/<node>`.
//!
//! async-opcua keeps the session: it reconnects after a lost connection (up to three tries,
//! backing off) and recreates the subscription there; the source reports the connection's
//! state on its status topic. When those tries fail, the client is made again after
//! `reconnect_ms`. A node the server refuses to monitor (an unknown node id) is logged and
//! counted; the others are still published.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_protocol::mqtt::{Properties, Publish};
use ferry_protocol::topic::TopicName;
use futures_util::StreamExt;
use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken, SessionPollResult};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    AttributeId, DataValue, DateTime, MessageSecurityMode, MonitoredItemCreateRequest, NodeId,
    NumericRange, TimestampsToReturn, Variant, WriteValue,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::client::{Client, Command};
use super::stats::now_ms;
use super::{Ctx, Outcome};

/// Data changes waiting for the source; more are dropped and counted.
const CHANGES: usize = 4096;

/// One `[[field.opcua]]` table: a server and the nodes read from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaConfig {
    /// The source's name: one topic level, unique among the sources.
    pub name: String,
    /// The server's endpoint URL, e.g. `opc.tcp://192.168.1.60:4840`.
    pub endpoint: String,
    /// `none` (the default), `basic256sha256`, `aes128_sha256_rsa_oaep` or
    /// `aes256_sha256_rsa_pss`.
    #[serde(default)]
    pub security_policy: Policy,
    /// `none` (the default with policy `none`), `sign` or `sign_and_encrypt` (the default
    /// with any other policy).
    pub security_mode: Option<Mode>,
    /// Who the client is: `anonymous` (the default), `user` (`username` with `password` or
    /// `password_file`) or `certificate` (the client certificate below).
    #[serde(default)]
    pub identity: Identity,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file whose first line is the password (kept out of the configuration).
    pub password_file: Option<PathBuf>,
    /// The client's certificate (DER) and private key (PEM), for a secure channel and the
    /// `certificate` identity. Without them a self-signed pair is made in `pki_dir`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Where the client keeps its certificates: the server's must be in `trusted/` there,
    /// unless `trust_server_certs`. Default `opcua-pki` (relative to the working directory,
    /// the data directory under systemd).
    #[serde(default = "default_pki")]
    pub pki_dir: PathBuf,
    /// Trust any server certificate (first use). Default false.
    #[serde(default)]
    pub trust_server_certs: bool,
    /// How often the server sends the changes it sampled. Default 1000.
    #[serde(default = "default_publishing")]
    pub publishing_ms: u64,
    /// How long to wait before making the client again after it gave up. Default 5000.
    #[serde(default = "default_reconnect")]
    pub reconnect_ms: u64,
    /// The nodes.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// Where changes go: a template with `{prefix}` and `{name}`, then `/<node>`. Default
    /// `{prefix}/{name}`.
    pub topic: Option<String>,
    /// 0 or 1. Default 1.
    #[serde(default = "super::one")]
    pub qos: u8,
    /// Publish changes retained. Default false.
    #[serde(default)]
    pub retain: bool,
    /// The most messages a second; more are dropped and counted. Default 20,000.
    #[serde(default = "super::default_rate")]
    pub max_per_sec: u32,
}

/// One monitored node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name here: a topic level.
    pub name: String,
    /// Its node id, e.g. `ns=2;s=Line1.Temperature` or `ns=3;i=1001`.
    pub node_id: String,
    /// How often the server samples it. Default `publishing_ms`.
    pub sampling_ms: Option<u64>,
    /// Commands may write it. Default false.
    #[serde(default)]
    pub writable: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    None,
    Basic256sha256,
    Aes128Sha256RsaOaep,
    Aes256Sha256RsaPss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    None,
    Sign,
    SignAndEncrypt,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    #[default]
    Anonymous,
    User,
    Certificate,
}

fn default_pki() -> PathBuf {
    "opcua-pki".into()
}
fn default_publishing() -> u64 {
    1000
}
fn default_reconnect() -> u64 {
    5000
}

impl OpcuaConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !self.endpoint.starts_with("opc.tcp://") {
            return Err(format!("endpoint {:?} is not opc.tcp://…", self.endpoint));
        }
        if self.nodes.is_empty() {
            return Err("has no nodes".into());
        }
        if self.publishing_ms == 0 || self.reconnect_ms == 0 {
            return Err("publishing_ms and reconnect_ms must be at least 1".into());
        }
        if (self.security_policy == Policy::None) != (self.mode() == MessageSecurityMode::None) {
            return Err(
                "security_mode none goes with security_policy none, and only with it".into(),
            );
        }
        match self.identity {
            Identity::User if self.username.is_none() => {
                return Err("identity user needs a username".into())
            }
            Identity::User if self.password.is_some() == self.password_file.is_some() => {
                return Err("identity user needs password or password_file (one)".into())
            }
            Identity::Certificate if self.cert_file.is_none() || self.key_file.is_none() => {
                return Err("identity certificate needs cert_file and key_file".into())
            }
            _ => {}
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("cert_file and key_file go together".into());
        }
        let mut names = std::collections::HashSet::new();
        for n in &self.nodes {
            super::check_level("a node's name", &n.name)?;
            if !names.insert(&n.name) {
                return Err(format!("two nodes are named {:?}", n.name));
            }
            NodeId::from_str(&n.node_id)
                .map_err(|_| format!("node {:?}: {:?} is not a node id", n.name, n.node_id))?;
        }
        Ok(())
    }

    fn policy(&self) -> SecurityPolicy {
        match self.security_policy {
            Policy::None => SecurityPolicy::None,
            Policy::Basic256sha256 => SecurityPolicy::Basic256Sha256,
            Policy::Aes128Sha256RsaOaep => SecurityPolicy::Aes128Sha256RsaOaep,
            Policy::Aes256Sha256RsaPss => SecurityPolicy::Aes256Sha256RsaPss,
        }
    }

    fn mode(&self) -> MessageSecurityMode {
        match (self.security_mode, self.security_policy) {
            (Some(Mode::None), _) | (None, Policy::None) => MessageSecurityMode::None,
            (Some(Mode::Sign), _) => MessageSecurityMode::Sign,
            (Some(Mode::SignAndEncrypt), _) | (None, _) => MessageSecurityMode::SignAndEncrypt,
        }
    }

    fn identity_token(&self) -> Result<IdentityToken, String> {
        Ok(match self.identity {
            Identity::Anonymous => IdentityToken::Anonymous,
            Identity::User => {
                let password = match (&self.password, &self.password_file) {
                    (Some(p), _) => p.clone(),
                    (None, Some(f)) => std::fs::read_to_string(f)
                        .map_err(|e| format!("cannot read {}: {e}", f.display()))?
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                    (None, None) => String::new(),
                };
                IdentityToken::new_user_name(self.username.clone().unwrap_or_default(), password)
            }
            Identity::Certificate => {
                let (cert, key) = (
                    self.cert_file.as_ref().ok_or("no cert_file")?,
                    self.key_file.as_ref().ok_or("no key_file")?,
                );
                let der = std::fs::read(cert)
                    .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
                let x509 = opcua::crypto::X509::from_der(&der)
                    .map_err(|e| format!("{}: {e}", cert.display()))?;
                let key = opcua::crypto::PrivateKey::read_pem_file(key)
                    .map_err(|e| format!("{}: {e:?}", key.display()))?;
                IdentityToken::X509(Box::new(x509), Box::new(key))
            }
        })
    }
}

/// An OPC UA time as ms since the Unix epoch.
fn epoch_ms(t: &DateTime) -> i64 {
    // Ticks are 100 ns since 1601-01-01.
    (t.ticks() - 116_444_736_000_000_000) / 10_000
}

/// A value as JSON: scalars as themselves, anything else as its text.
pub fn variant_json(v: &Variant) -> Value {
    match v {
        Variant::Empty => Value::Null,
        Variant::Boolean(b) => json!(b),
        Variant::SByte(n) => json!(n),
        Variant::Byte(n) => json!(n),
        Variant::Int16(n) => json!(n),
        Variant::UInt16(n) => json!(n),
        Variant::Int32(n) => json!(n),
        Variant::UInt32(n) => json!(n),
        Variant::Int64(n) => json!(n),
        Variant::UInt64(n) => json!(n),
        Variant::Float(f) => super::modbus::number(f64::from(*f)),
        Variant::Double(f) => super::modbus::number(*f),
        Variant::String(s) => json!(s.as_ref()),
        Variant::DateTime(t) => json!(epoch_ms(t)),
        other => json!(format!("{other:?}")),
    }
}

/// A command's value as a variant of the kind the node holds (`like`, its last value),
/// range-checked.
pub fn to_variant(like: &Variant, v: &Value) -> Result<Variant, String> {
    fn int<T: TryFrom<i64>>(v: &Value, what: &str) -> Result<T, String> {
        let n = v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
            .ok_or_else(|| format!("needs a whole number ({what})"))?;
        T::try_from(n).map_err(|_| format!("{n} is out of the range of {what}"))
    }
    Ok(match like {
        Variant::Boolean(_) => match v {
            Value::Bool(b) => Variant::Boolean(*b),
            Value::Number(n) if n.as_u64() == Some(0) => Variant::Boolean(false),
            Value::Number(n) if n.as_u64() == Some(1) => Variant::Boolean(true),
            _ => return Err("needs true or false (Boolean)".into()),
        },
        Variant::SByte(_) => Variant::SByte(int(v, "SByte")?),
        Variant::Byte(_) => Variant::Byte(int(v, "Byte")?),
        Variant::Int16(_) => Variant::Int16(int(v, "Int16")?),
        Variant::UInt16(_) => Variant::UInt16(int(v, "UInt16")?),
        Variant::Int32(_) => Variant::Int32(int(v, "Int32")?),
        Variant::UInt32(_) => Variant::UInt32(int(v, "UInt32")?),
        Variant::Int64(_) => Variant::Int64(int(v, "Int64")?),
        Variant::UInt64(_) => Variant::UInt64(
            v.as_u64()
                .ok_or("needs a whole number of at least 0 (UInt64)")?,
        ),
        Variant::Float(_) => Variant::Float(v.as_f64().ok_or("needs a number (Float)")? as f32),
        Variant::Double(_) => Variant::Double(v.as_f64().ok_or("needs a number (Double)")?),
        Variant::String(_) => Variant::String(v.as_str().ok_or("needs a string (String)")?.into()),
        other => return Err(format!("cannot write a node that holds {other:?}")),
    })
}

/// What the session's event loop reports.
enum State {
    Up,
    Down(String),
    Failed(String),
}

/// The source's task.
pub(crate) async fn run(mut ctx: Ctx, config: OpcuaConfig) {
    let writable = config.nodes.iter().any(|n| n.writable);
    let Some((client, mut commands)) = ctx.connect(writable).await else {
        return;
    };
    let topics = config
        .nodes
        .iter()
        .map(|n| ctx.config.topic(&ctx.publishing, &ctx.name, Some(&n.name)))
        .collect::<Result<Vec<TopicName>, _>>();
    let topics = match topics {
        Ok(t) => t,
        Err(e) => return warn!(source = %ctx.name, error = %e, "field source not started"),
    };
    let node_ids: Vec<NodeId> = config
        .nodes
        .iter()
        .map(|n| NodeId::from_str(&n.node_id).unwrap_or_default())
        .collect();
    let mut down = false;
    // The last value of each node: a write takes its type.
    let mut last: Vec<Option<Variant>> = vec![None; config.nodes.len()];
    while !ctx.stopping() {
        let why = session(
            &mut ctx,
            &config,
            &client,
            &topics,
            &node_ids,
            &mut commands,
            &mut down,
            &mut last,
        )
        .await;
        let Some(why) = why else { return };
        if !ctx
            .down_then_wait(&client, &mut down, why, config.reconnect_ms)
            .await
        {
            return;
        }
    }
}

/// One client and its session, until it gives up (why) or the source stops (`None`).
#[allow(clippy::too_many_arguments)]
async fn session(
    ctx: &mut Ctx,
    config: &OpcuaConfig,
    client: &Client,
    topics: &[TopicName],
    node_ids: &[NodeId],
    commands: &mut mpsc::Receiver<Command>,
    down: &mut bool,
    last: &mut [Option<Variant>],
) -> Option<String> {
    let mut builder = ClientBuilder::new()
        .application_name("ferry-edge")
        .application_uri(format!("urn:ferry-edge:{}", config.name))
        .product_uri("urn:ferry-edge")
        .pki_dir(&config.pki_dir)
        .trust_server_certs(config.trust_server_certs)
        .session_retry_limit(3)
        .session_retry_initial(Duration::from_millis(500))
        .session_retry_max(Duration::from_millis(config.reconnect_ms))
        .session_name(format!("ferry-edge {}", config.name));
    builder = match (&config.cert_file, &config.key_file) {
        (Some(c), Some(k)) => builder.certificate_path(c).private_key_path(k),
        _ => builder.create_sample_keypair(config.security_policy != Policy::None),
    };
    let mut opc = match builder.client() {
        Ok(c) => c,
        Err(errors) => return Some(format!("OPC UA client: {}", errors.join("; "))),
    };
    let identity = match config.identity_token() {
        Ok(i) => i,
        Err(e) => return Some(e),
    };
    let endpoint = (
        config.endpoint.as_str(),
        config.policy().to_str(),
        config.mode(),
    );
    let (session, event_loop) = match opc.connect_to_matching_endpoint(endpoint, identity).await {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot connect to {}: {e}", config.endpoint)),
    };
    let (state_tx, mut state) = mpsc::channel(16);
    let pump = tokio::spawn(async move {
        let events = event_loop.enter();
        tokio::pin!(events);
        while let Some(event) = events.next().await {
            let report = match event {
                Ok(SessionPollResult::Reconnected(_)) => State::Up,
                Ok(SessionPollResult::ConnectionLost(code)) => {
                    State::Down(format!("connection lost: {code}"))
                }
                Ok(_) => continue,
                Err(code) => {
                    let _ = state_tx
                        .send(State::Failed(format!("gave up reconnecting: {code}")))
                        .await;
                    return;
                }
            };
            if state_tx.send(report).await.is_err() {
                return;
            }
        }
        let _ = state_tx
            .send(State::Failed("the session closed".into()))
            .await;
    });
    let (changes_tx, mut changes) = mpsc::channel::<(NodeId, DataValue)>(CHANGES);
    let mut subscribed = false;
    let mut stop = ctx.stop.clone();
    let why = loop {
        tokio::select! {
            s = state.recv() => match s {
                Some(State::Up) => {
                    if !subscribed {
                        if let Err(e) = subscribe(ctx, config, &session, node_ids, changes_tx.clone()).await {
                            break format!("cannot subscribe: {e}");
                        }
                        subscribed = true;
                    }
                    info!(source = %ctx.name, endpoint = %config.endpoint, "OPC UA session up");
                    ctx.stats.up.store(true, std::sync::atomic::Ordering::Relaxed);
                    ctx.status(client, true, None).await;
                    *down = false;
                }
                Some(State::Down(why)) => {
                    warn!(source = %ctx.name, error = %why, "OPC UA session down; reconnecting");
                    ctx.stats.read_failed(why.clone(), true);
                    ctx.status(client, false, Some(&why)).await;
                    *down = true;
                }
                Some(State::Failed(why)) => break why,
                None => break "the session's event loop ended".into(),
            },
            change = changes.recv() => {
                let Some((node_id, dv)) = change else { continue };
                let Some(i) = node_ids.iter().position(|n| *n == node_id) else { continue };
                ctx.stats.read_ok(0);
                if let Some(v) = &dv.value {
                    last[i] = Some(v.clone());
                }
                publish(ctx, client, &topics[i], &dv).await;
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break "the broker connection closed".into() };
                command(ctx, config, client, &session, node_ids, last, &cmd).await;
            }
            _ = super::until_stopped(&mut stop) => {
                let _ = session.disconnect().await;
                pump.abort();
                return None;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
    pump.abort();
    Some(why)
}

/// The subscription and its monitored items; a node refused is logged and counted.
async fn subscribe(
    ctx: &Ctx,
    config: &OpcuaConfig,
    session: &opcua::client::Session,
    node_ids: &[NodeId],
    changes: mpsc::Sender<(NodeId, DataValue)>,
) -> Result<(), String> {
    let stats = ctx.stats.clone();
    let callback = DataChangeCallback::new(move |dv, item| {
        if changes
            .try_send((item.item_to_monitor().node_id.clone(), dv))
            .is_err()
        {
            stats
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let publishing = Duration::from_millis(config.publishing_ms);
    let id = session
        .create_subscription(publishing, 60, 10, 0, 0, true, callback)
        .await
        .map_err(|e| e.to_string())?;
    let items: Vec<MonitoredItemCreateRequest> = node_ids
        .iter()
        .zip(&config.nodes)
        .map(|(id, n)| {
            let mut item = MonitoredItemCreateRequest::from(id.clone());
            item.requested_parameters.sampling_interval =
                n.sampling_ms.unwrap_or(config.publishing_ms) as f64;
            item.requested_parameters.queue_size = 10;
            item
        })
        .collect();
    let created = session
        .create_monitored_items(id, TimestampsToReturn::Both, items)
        .await
        .map_err(|e| e.to_string())?;
    for (item, n) in created.iter().zip(&config.nodes) {
        let code = item.result.status_code;
        if !code.is_good() {
            let why = format!("node {:?} ({}) not monitored: {code}", n.name, n.node_id);
            warn!(source = %ctx.name, error = %why, "OPC UA node refused");
            ctx.stats.read_failed(why, false);
        }
    }
    Ok(())
}

async fn publish(ctx: &mut Ctx, client: &Client, topic: &TopicName, dv: &DataValue) {
    if !ctx.admit() {
        return;
    }
    let status = dv.status.unwrap_or_default();
    let body = json!({
        "value": dv.value.as_ref().map_or(Value::Null, variant_json),
        "status": status.to_string(),
        "source_ts": dv.source_timestamp.as_ref().map(epoch_ms),
        "server_ts": dv.server_timestamp.as_ref().map(epoch_ms),
        "ts": now_ms(),
    });
    let mut props = Properties::default();
    props.content_type = Some("application/json".into());
    let p = ctx.reading(topic.clone(), Bytes::from(body.to_string()), props);
    let _ = client.publish(p).await;
}

/// A command: write one node with the type of its last value, and answer.
async fn command(
    ctx: &mut Ctx,
    config: &OpcuaConfig,
    client: &Client,
    session: &Arc<opcua::client::Session>,
    node_ids: &[NodeId],
    last: &[Option<Variant>],
    cmd: &Publish,
) {
    let name = cmd
        .topic
        .as_str()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_owned();
    let value = super::modbus::command_value(&cmd.payload);
    let target = match config.nodes.iter().position(|n| n.name == name) {
        None => Err(format!("no node named {name:?}")),
        Some(i) if !config.nodes[i].writable => Err(format!("node {name:?} is not writable")),
        Some(i) => match &last[i] {
            None => Err(format!(
                "node {name:?}: its type is not known until it is read"
            )),
            Some(like) => to_variant(like, &value).map(|v| (i, v)),
        },
    };
    let outcome = match target {
        Err(why) => Outcome::Refused(why),
        Ok((i, variant)) => {
            let write = WriteValue {
                node_id: node_ids[i].clone(),
                attribute_id: AttributeId::Value as u32,
                index_range: NumericRange::None,
                value: DataValue::value_only(variant),
            };
            match session.write(&[write]).await {
                Ok(codes) if codes.first().is_some_and(|c| c.is_good()) => Outcome::Done,
                Ok(codes) => Outcome::Failed(format!(
                    "the server refused the write: {}",
                    codes.first().map_or("no result".into(), |c| c.to_string())
                )),
                Err(code) => Outcome::Failed(format!("the write failed: {code}")),
            }
        }
    };
    ctx.answer(client, cmd, &name, &value, outcome).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_json_and_commands_take_the_nodes_type_with_its_range() {
        assert_eq!(variant_json(&Variant::Double(21.5)), json!(21.5));
        assert_eq!(variant_json(&Variant::Int32(-7)), json!(-7));
        assert_eq!(variant_json(&Variant::String("on".into())), json!("on"));
        assert_eq!(variant_json(&Variant::Empty), Value::Null);
        assert_eq!(
            to_variant(&Variant::Int16(0), &json!(300)),
            Ok(Variant::Int16(300))
        );
        assert!(to_variant(&Variant::Int16(0), &json!(40000)).is_err());
        assert!(to_variant(&Variant::Byte(0), &json!(-1)).is_err());
        assert!(to_variant(&Variant::Int32(0), &json!(1.5)).is_err());
        assert_eq!(
            to_variant(&Variant::Int32(0), &json!(2.0)),
            Ok(Variant::Int32(2))
        );
        assert_eq!(
            to_variant(&Variant::Boolean(false), &json!(1)),
            Ok(Variant::Boolean(true))
        );
        assert!(to_variant(&Variant::Boolean(false), &json!("yes")).is_err());
        assert_eq!(
            to_variant(&Variant::Double(0.0), &json!(42.25)),
            Ok(Variant::Double(42.25))
        );
        assert!(to_variant(&Variant::String("".into()), &json!(3)).is_err());
        // 1970-01-01 is 116,444,736,000,000,000 ticks (100 ns) after OPC UA's 1601-01-01.
        assert_eq!(epoch_ms(&DateTime::from(116_444_736_000_000_000i64)), 0);
        assert_eq!(
            epoch_ms(&DateTime::from(116_444_736_000_000_000i64 + 15_000)),
            1
        );
    }
}
