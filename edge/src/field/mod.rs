//! Field sources (feature `field`): devices the edge reads itself, serial lines, Modbus
//! TCP/RTU and GPIO lines, each published as MQTT messages; and commands written back to them.
//!
//! Each source is an MQTT client of the edge's own broker ([`client`], over
//! [`Server::connect_internal`]): what it reads takes the same path as any device's publish
//! (the ACL for its username, local subscribers, retained messages, the outbox and the link),
//! and the commands it takes are messages on `<prefix>/<source>/set/<point>` that the broker
//! let through: published locally by a client the ACL allows to write there, or sent down the
//! link from the cloud. Its answer goes to the command's MQTT 5 response topic (with its
//! correlation data), or to `<prefix>/<source>/reply/<point>`.
//!
//! A source never stalls the broker or another source: each runs in its own task, reads
//! into bounded buffers (`max_frame_bytes`), is held to `max_per_sec` messages, and waits
//! for the broker only as a client does (the broker's receive maximum, then flow control).
//! A device that fails is retried with a backoff, counted and reported
//! ([`stats::SourceStats`], the status topic `<prefix>/<source>/status`, retained).
//!
//! - [`framing`]: a serial line's bytes into frames, frames into payloads (sans-IO).
//! - [`serial`]: the serial source.
//! - [`modbus`]: the Modbus map, its decoding and request plan (sans-IO), and the poller.
//! - [`gpio`]: GPIO inputs (debounced edges) and outputs, behind a chip trait.
//! - `opcua` (feature `opcua`): an OPC UA client's subscription, and writes.

pub(crate) mod client;
pub mod framing;
pub mod gpio;
pub mod modbus;
#[cfg(feature = "opcua")]
pub mod opcua;
pub mod serial;
pub mod stats;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_protocol::mqtt::{Properties, Publish, QoS};
use ferry_protocol::topic::{TopicFilter, TopicName};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::info;

use crate::server::Server;
use client::Client;
use stats::{now_ms, SourceStats};

/// `[field]`: the sources, and what they share.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldConfig {
    /// The username every source connects to the broker as: the ACL file's rules for this
    /// user say where sources may publish and which commands they may take. Taken as
    /// verified (no password). Default `ferry-field`.
    pub username: String,
    /// The first level of every source's topics. Default `field`.
    pub prefix: String,
    /// `[[field.serial]]`: serial lines.
    pub serial: Vec<serial::SerialConfig>,
    /// `[[field.modbus]]`: Modbus TCP and RTU devices.
    pub modbus: Vec<modbus::ModbusConfig>,
    /// `[[field.gpio]]`: lines of GPIO chips.
    pub gpio: Vec<gpio::GpioConfig>,
    /// `[[field.opcua]]`: OPC UA servers (feature `opcua`).
    #[cfg(feature = "opcua")]
    pub opcua: Vec<opcua::OpcuaConfig>,
    /// Without the `opcua` feature, `[[field.opcua]]` tables are read only to be refused
    /// by [`FieldConfig::validate`] with a message that says why.
    #[cfg(not(feature = "opcua"))]
    pub opcua: Vec<serde::de::IgnoredAny>,
}

impl Default for FieldConfig {
    fn default() -> Self {
        Self {
            username: "ferry-field".into(),
            prefix: "field".into(),
            serial: Vec::new(),
            modbus: Vec::new(),
            gpio: Vec::new(),
            opcua: Vec::new(),
        }
    }
}

/// What every source table has besides its name (`topic`, `qos`, `retain`, `max_per_sec`;
/// see [`serial::SerialConfig`]): where and how its readings are published. A topic
/// template has `{prefix}` and `{name}`; the default is `{prefix}/{name}` (for a Modbus
/// point of its own: the source's topic, then `/<point>`).
#[derive(Debug, Clone)]
pub struct Publishing {
    pub topic: Option<String>,
    pub qos: u8,
    pub retain: bool,
    pub max_per_sec: u32,
}

/// `publishing()` for each source table, whose four publishing keys sit beside its own
/// (serde's `flatten` cannot be used with `deny_unknown_fields`, so they are repeated in
/// each table and gathered here).
macro_rules! publishing_of {
    ($($table:ty),+) => {$(
        impl $table {
            pub(crate) fn publishing(&self) -> Publishing {
                Publishing {
                    topic: self.topic.clone(),
                    qos: self.qos,
                    retain: self.retain,
                    max_per_sec: self.max_per_sec,
                }
            }
        }
    )+};
}
publishing_of!(serial::SerialConfig, modbus::ModbusConfig, gpio::GpioConfig);
#[cfg(feature = "opcua")]
publishing_of!(opcua::OpcuaConfig);

impl Default for Publishing {
    fn default() -> Self {
        Self {
            topic: None,
            qos: 1,
            retain: false,
            max_per_sec: default_rate(),
        }
    }
}

pub(crate) fn one() -> u8 {
    1
}

pub(crate) fn default_rate() -> u32 {
    20_000
}

impl FieldConfig {
    /// Whether there is any source.
    pub fn is_empty(&self) -> bool {
        self.sources().is_empty()
    }

    /// Every source's name and publishing settings.
    fn sources(&self) -> Vec<(&String, Publishing)> {
        #[allow(unused_mut)]
        let mut all: Vec<(&String, Publishing)> = self
            .serial
            .iter()
            .map(|s| (&s.name, s.publishing()))
            .chain(self.modbus.iter().map(|m| (&m.name, m.publishing())))
            .chain(self.gpio.iter().map(|g| (&g.name, g.publishing())))
            .collect();
        #[cfg(feature = "opcua")]
        all.extend(self.opcua.iter().map(|o| (&o.name, o.publishing())));
        all
    }

    /// Checks names (unique, one topic level), topics and each source's own settings.
    pub fn validate(&self) -> Result<(), String> {
        #[cfg(not(feature = "opcua"))]
        if !self.opcua.is_empty() {
            return Err(
                "[[field.opcua]]: this ferry-edge is built without OPC UA (the `opcua` \
                        feature, which the boards' builds leave out)"
                    .into(),
            );
        }
        check_level("field.prefix", &self.prefix)?;
        let mut names = HashSet::new();
        for (name, publishing) in self.sources() {
            check_level("a source's name", name)?;
            if !names.insert(name.as_str()) {
                return Err(format!("two field sources are named {name:?}"));
            }
            if publishing.qos > 1 {
                return Err(format!("field source {name:?}: qos must be 0 or 1"));
            }
            if publishing.max_per_sec == 0 {
                return Err(format!(
                    "field source {name:?}: max_per_sec must be at least 1"
                ));
            }
            self.topic(&publishing, name, None)?;
        }
        for s in &self.serial {
            s.validate()
                .map_err(|e| format!("field.serial {:?}: {e}", s.name))?;
        }
        for m in &self.modbus {
            m.validate()
                .map_err(|e| format!("field.modbus {:?}: {e}", m.name))?;
        }
        for g in &self.gpio {
            g.validate()
                .map_err(|e| format!("field.gpio {:?}: {e}", g.name))?;
        }
        #[cfg(feature = "opcua")]
        for o in &self.opcua {
            o.validate()
                .map_err(|e| format!("field.opcua {:?}: {e}", o.name))?;
        }
        Ok(())
    }

    /// A source's topic: its template filled in (`point` for a Modbus point's own topic).
    pub fn topic(
        &self,
        publishing: &Publishing,
        name: &str,
        point: Option<&str>,
    ) -> Result<TopicName, String> {
        let template = match (&publishing.topic, point) {
            (Some(t), None) => t.clone(),
            (Some(t), Some(_)) => format!("{t}/{{point}}"),
            (None, None) => "{prefix}/{name}".to_owned(),
            (None, Some(_)) => "{prefix}/{name}/{point}".to_owned(),
        };
        let topic = template
            .replace("{prefix}", &self.prefix)
            .replace("{name}", name)
            .replace("{point}", point.unwrap_or(""));
        if topic.contains(['+', '#']) || topic.starts_with('$') {
            return Err(format!("topic {topic:?} has a wildcard or starts with $"));
        }
        TopicName::new(topic.clone()).map_err(|e| format!("topic {topic:?}: {e}"))
    }
}

/// One topic level: not empty, no `/`, no wildcard.
fn check_level(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.contains(['/', '+', '#']) || s.starts_with('$') {
        return Err(format!(
            "{what} must be one topic level without wildcards, not {s:?}"
        ));
    }
    Ok(())
}

/// The running sources, with what they report; cheap to clone (the metrics listener keeps
/// one), and [`Field::reload`] replaces the sources in every clone.
#[derive(Clone, Debug, Default)]
pub struct Field {
    inner: Arc<std::sync::Mutex<Running>>,
}

#[derive(Debug, Default)]
struct Running {
    sources: Vec<Arc<SourceStats>>,
    stop: Option<watch::Sender<bool>>,
}

impl Field {
    /// Starts every source of `config` against `server`. Sources whose device cannot be
    /// reached yet keep trying; nothing here fails.
    pub fn start(server: &Server, config: &FieldConfig) -> Self {
        let field = Self::default();
        field.reload(server, config);
        field
    }

    /// Stops the running sources (their connections to the broker close; MQTT clients are
    /// not touched) and starts those of `config`.
    pub fn reload(&self, server: &Server, config: &FieldConfig) {
        let (stop, stopped) = watch::channel(false);
        let config = Arc::new(config.clone());
        let mut sources = Vec::new();
        for s in &config.serial {
            let stats = SourceStats::new(&s.name, "serial");
            sources.push(stats.clone());
            let ctx = Ctx::new(server, &config, &s.name, &s.publishing(), stats, &stopped);
            tokio::spawn(serial::run(ctx, s.clone()));
        }
        for bus in modbus::buses(&config.modbus) {
            let mut ctxs = Vec::new();
            for m in &bus {
                let stats = SourceStats::new(&m.name, "modbus");
                sources.push(stats.clone());
                ctxs.push(Ctx::new(
                    server,
                    &config,
                    &m.name,
                    &m.publishing(),
                    stats,
                    &stopped,
                ));
            }
            tokio::spawn(modbus::run_bus(ctxs, bus));
        }
        for g in &config.gpio {
            let stats = SourceStats::new(&g.name, "gpio");
            sources.push(stats.clone());
            let ctx = Ctx::new(server, &config, &g.name, &g.publishing(), stats, &stopped);
            tokio::spawn(gpio::run(ctx, g.clone(), Arc::new(gpio::Cdev)));
        }
        #[cfg(feature = "opcua")]
        for o in &config.opcua {
            let stats = SourceStats::new(&o.name, "opcua");
            sources.push(stats.clone());
            let ctx = Ctx::new(server, &config, &o.name, &o.publishing(), stats, &stopped);
            tokio::spawn(opcua::run(ctx, o.clone()));
        }
        if !sources.is_empty() {
            info!(sources = sources.len(), "field sources started");
        }
        let old = std::mem::replace(
            &mut *self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            Running {
                sources,
                stop: Some(stop),
            },
        );
        if let Some(stop) = old.stop {
            let _ = stop.send(true);
        }
    }

    /// Stops every source.
    pub fn stop(&self) {
        let mut running = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stop) = running.stop.take() {
            let _ = stop.send(true);
        }
    }

    /// Every source's figures, for `/api/field` and the metrics.
    pub fn snapshot(&self) -> Vec<stats::SourceSnapshot> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sources
            .iter()
            .map(|s| s.snapshot())
            .collect()
    }
}

/// What a source's task needs: its broker connection (made by [`Ctx::connect`]), names and
/// topics, its figures, and the stop signal.
pub(crate) struct Ctx {
    pub(crate) server: Server,
    pub(crate) config: Arc<FieldConfig>,
    pub(crate) name: String,
    pub(crate) publishing: Publishing,
    pub(crate) stats: Arc<SourceStats>,
    pub(crate) stop: watch::Receiver<bool>,
    limiter: RateLimit,
}

impl Ctx {
    fn new(
        server: &Server,
        config: &Arc<FieldConfig>,
        name: &str,
        publishing: &Publishing,
        stats: Arc<SourceStats>,
        stop: &watch::Receiver<bool>,
    ) -> Self {
        Self {
            server: server.clone(),
            config: config.clone(),
            name: name.to_owned(),
            publishing: publishing.clone(),
            stats,
            stop: stop.clone(),
            limiter: RateLimit::new(publishing.max_per_sec),
        }
    }

    /// Connects this source to the broker (client id `ferry-field-<name>`), subscribed to
    /// its commands when it takes any. Tries again every second while the broker has no room.
    pub(crate) async fn connect(
        &self,
        commands: bool,
    ) -> Option<(Client, tokio::sync::mpsc::Receiver<client::Command>)> {
        let mut stop = self.stop.clone();
        loop {
            let attempt = async {
                let (c, rx) = Client::connect(
                    &self.server,
                    &format!("ferry-field-{}", self.name),
                    &self.config.username,
                    self.stats.clone(),
                )
                .await?;
                if commands {
                    let filter = format!("{}/{}/set/+", self.config.prefix, self.name);
                    c.subscribe(vec![TopicFilter::new(filter).expect("checked names")])
                        .await?;
                }
                Ok::<_, client::ClientError>((c, rx))
            };
            match attempt.await {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, "field source cannot connect to the broker; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = until_stopped(&mut stop) => return None,
            }
        }
    }

    /// Whether the rate limit lets one more message through now; counts it dropped if not.
    pub(crate) fn admit(&mut self) -> bool {
        if self.limiter.take() {
            return true;
        }
        self.stats
            .dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        false
    }

    /// A reading as this source publishes it.
    pub(crate) fn reading(&self, topic: TopicName, payload: Bytes, props: Properties) -> Publish {
        let mut p = Publish::new(topic, payload);
        p.qos = if self.publishing.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        p.retain = self.publishing.retain;
        p.properties = props;
        p
    }

    /// Publishes the source's state (`up`, or `down` with why) on `<prefix>/<name>/status`,
    /// retained, so that a subscriber sees at once whether the readings are fresh.
    pub(crate) async fn status(&self, client: &Client, up: bool, why: Option<&str>) {
        let topic = format!("{}/{}/status", self.config.prefix, self.name);
        let doc = serde_json::json!({
            "state": if up { "up" } else { "down" },
            "error": why,
            "ts": now_ms(),
        });
        let mut p = Publish::new(
            TopicName::new(topic).expect("checked names"),
            Bytes::from(doc.to_string()),
        );
        p.qos = QoS::AtLeastOnce;
        p.retain = true;
        let _ = client.publish(p).await;
    }

    /// The end of command `cmd` for `point` (its `value`): counted in the source's writes or
    /// failed writes, logged, and answered `{"point", "value", "result": "done" | "refused" |
    /// "error", "reason", "ts"}` to its MQTT 5 response topic with its correlation data, or
    /// to `<prefix>/<name>/reply/<point>`.
    pub(crate) async fn answer(
        &self,
        client: &Client,
        cmd: &Publish,
        point: &str,
        value: &serde_json::Value,
        outcome: Outcome,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let (result, reason) = match outcome {
            Outcome::Done => ("done", None),
            Outcome::Refused(why) => ("refused", Some(why)),
            Outcome::Failed(why) => ("error", Some(why)),
        };
        if reason.is_none() {
            self.stats.writes.fetch_add(1, Relaxed);
            info!(source = %self.name, %point, %value, "field command written");
        } else {
            self.stats.writes_failed.fetch_add(1, Relaxed);
            tracing::warn!(source = %self.name, %point, %value, reason = reason.as_deref().unwrap_or(""), "field command {result}");
        }
        let answer = serde_json::json!({
            "point": point,
            "value": value,
            "result": result,
            "reason": reason,
            "ts": now_ms(),
        });
        let topic = match &cmd.properties.response_topic {
            Some(t) => t.clone(),
            None => match TopicName::new(format!(
                "{}/{}/reply/{point}",
                self.config.prefix, self.name
            )) {
                Ok(t) => t,
                Err(_) => return,
            },
        };
        let mut p = Publish::new(topic, Bytes::from(answer.to_string()));
        p.qos = QoS::AtLeastOnce;
        p.properties.content_type = Some("application/json".into());
        p.properties.correlation_data = cmd.properties.correlation_data.clone();
        let _ = client.publish(p).await;
    }

    /// A source that cannot read: counted, and reported down (a warning, the status topic)
    /// unless `reported` says it is already; then a wait of `retry_ms`. False if the source
    /// was told to stop meanwhile.
    pub(crate) async fn down_then_wait(
        &mut self,
        client: &Client,
        reported: &mut bool,
        why: String,
        retry_ms: u64,
    ) -> bool {
        if !*reported {
            tracing::warn!(source = %self.name, error = %why, retry_ms, "field source down");
            self.status(client, false, Some(&why)).await;
            *reported = true;
        }
        self.stats.read_failed(why, true);
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(retry_ms)) => true,
            _ = until_stopped(&mut stop) => false,
        }
    }

    /// Whether the source was told to stop.
    pub(crate) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

/// How a command ended (see [`Ctx::answer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Written.
    Done,
    /// Not sent to the device: why (no such point, not writable, a bad value).
    Refused(String),
    /// The device did not take it: why.
    Failed(String),
}

/// The last topic level of a command: the point it is for.
pub(crate) fn command_point(cmd: &Publish) -> String {
    cmd.topic
        .as_str()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Waits until `stop` says so (or its sender is gone).
pub(crate) async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A token bucket: `per_sec` tokens a second, as many at once.
struct RateLimit {
    per_sec: f64,
    tokens: f64,
    at: std::time::Instant,
}

impl RateLimit {
    fn new(per_sec: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec.max(1)),
            tokens: f64::from(per_sec.max(1)),
            at: std::time::Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + refill).min(self.per_sec);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The time a reading was taken, as the MQTT 5 user property `ts` (ms since the epoch).
pub(crate) fn ts_property(ts_ms: u64) -> Properties {
    let mut p = Properties::default();
    p.user_properties.push(("ts".into(), ts_ms.to_string()));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_come_from_templates_and_bad_names_are_refused() {
        let mut c = FieldConfig::default();
        let p = Publishing::default();
        assert_eq!(
            c.topic(&p, "meter", None).expect("topic").as_str(),
            "field/meter"
        );
        assert_eq!(
            c.topic(&p, "plc", Some("temp")).expect("topic").as_str(),
            "field/plc/temp"
        );
        let custom = Publishing {
            topic: Some("site/{name}/data".into()),
            ..Publishing::default()
        };
        assert_eq!(
            c.topic(&custom, "plc", Some("t")).expect("topic").as_str(),
            "site/plc/data/t"
        );
        let wild = Publishing {
            topic: Some("x/+".into()),
            ..Publishing::default()
        };
        assert!(c.topic(&wild, "a", None).is_err());
        c.prefix = "a/b".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_rate_limit_lets_a_second_s_worth_through_at_once_and_no_more() {
        let mut r = RateLimit::new(5);
        let passed = (0..20).filter(|_| r.take()).count();
        // Five at once, and at most one more refilled while the loop ran.
        assert!((5..=6).contains(&passed), "{passed}");
    }
}
