//! `ferry-cloud`'s configuration file (`--config`, see `cloud/ferry-cloud.example.toml`):
//! every key has a default.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use ferry_edge::broker::BrokerConfig;
use ferry_edge::config::{AuthConfig, Config as EdgeConfig, ServerConfig, StorageConfig};
use serde::Deserialize;

use crate::log::{ObjectConfig, StreamConfig};
use crate::routes::RouteConfig;

/// `ferry-cloud`'s configuration file. Every key has a default; see
/// `cloud/ferry-cloud.example.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// MQTT listeners, limits and the data directory, as for `ferry-edge` (default data
    /// directory `ferry-cloud-data`).
    pub server: ServerConfig,
    pub mqtt: BrokerConfig,
    /// The MQTT sessions' database (`<data_dir>/ferry-edge.redb`).
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    /// `[[route]]`: MQTT topic filters to streams (see `docs/routes.md`).
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    pub admin: AdminConfig,
    /// `[link]`: where edges connect (QUIC). Default none: no link listener.
    pub link: Option<crate::link_sink::LinkConfig>,
    /// `[kafka]`: the Kafka listener (see [`crate::kafka`]). Default none: off.
    pub kafka: Option<crate::kafka::KafkaConfig>,
    /// `[amqp]`: the AMQP 0-9-1 listener (see `docs/amqp.md`). Default none: off.
    pub amqp: Option<crate::amqp::AmqpConfig>,
}

/// `[admin]`: the admin HTTP listener (the console, its JSON API and actions, `/metrics`;
/// see [`crate::admin`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens. Default none: off. Without users (`admins`, `viewers`) it must be
    /// a loopback address: everyone who reaches it may look (no one may act).
    pub listen: Option<SocketAddr>,
    /// A `mosquitto_passwd` file of the console's users. Default: `[auth] password_file`.
    pub password_file: Option<PathBuf>,
    /// Users of that file who may look and act (deny an edge, reset a consumer group, send a
    /// command down).
    pub admins: Vec<String>,
    /// Users of that file who may only look.
    pub viewers: Vec<String>,
    /// How long a login lasts. Default 43,200 (12 hours).
    pub session_secs: u64,
    /// HTTPS with this certificate and key (PEM); the session cookie is then `Secure`.
    pub tls: Option<AdminTls>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: None,
            password_file: None,
            admins: Vec::new(),
            viewers: Vec::new(),
            session_secs: 43_200,
            tls: None,
        }
    }
}

/// `[admin.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                data_dir: PathBuf::from("ferry-cloud-data"),
                ..ServerConfig::default()
            },
            mqtt: BrokerConfig::default(),
            storage: StorageConfig::default(),
            auth: AuthConfig::default(),
            log: LogConfig::default(),
            routes: Vec::new(),
            admin: AdminConfig::default(),
            link: None,
            kafka: None,
            amqp: None,
        }
    }
}

impl CloudConfig {
    /// Reads a TOML configuration file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}", path.display()))
    }

    /// The MQTT front's part, in `ferry-edge`'s terms.
    // Without `demo`, ferry-edge has no `[uplink]` and every field is given here.
    #[cfg_attr(not(feature = "demo"), allow(clippy::needless_update))]
    pub fn edge(&self) -> EdgeConfig {
        EdgeConfig {
            server: self.server.clone(),
            mqtt: self.mqtt.clone(),
            storage: self.storage.clone(),
            auth: self.auth.clone(),
            // The cloud sends nothing further up (no `[uplink]`).
            ..EdgeConfig::default()
        }
    }
}

/// `[log] backend`: which storage holds the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// Segment files on local disk (`docs/log-format.md`).
    #[default]
    Local,
    /// An object store, its index in PostgreSQL (`docs/object-log.md`).
    Object,
}

/// `[log]`: the durable log (`<data_dir>/log/`, format in `docs/log-format.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Where the log lives: `local` (default), segment files under `<data_dir>/log`, or
    /// `object`, an object store with its index in PostgreSQL (`[log.object]`, see
    /// `docs/object-log.md`).
    pub backend: LogBackend,
    /// `[log.object]`: the object store and the database, for `backend = "object"`.
    pub object: Option<ObjectConfig>,
    /// Answer producers only once their records are on disk. Default true; false answers
    /// once written (a process crash loses nothing, a power loss may lose the last appends).
    pub fsync: bool,
    /// Appends waiting for the appender before producers wait too. Default 8192 (each holds
    /// its records: ~1 MB at 100-byte records).
    pub queue_requests: usize,
    /// Settings of streams that routes create (partition counts come from the routes).
    pub streams: StreamConfig,
    /// Seconds between retention passes. Default 60.
    pub retention_check_secs: u64,
    /// Backpressure for MQTT publishers: while the cloud's MQTT subscribers are more than
    /// this many records behind the log, clients that only publish are paused (they are
    /// read again once the lag is down to half); a client that also subscribes is not.
    /// Default 20,000 (2 MB of 100-byte records; the records wait in the log, not in
    /// memory). 0: never paused, subscribers catch up from the log after a flood.
    pub mqtt_max_lag_records: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            backend: LogBackend::Local,
            object: None,
            fsync: true,
            queue_requests: 8192,
            streams: StreamConfig::default(),
            retention_check_secs: 60,
            mqtt_max_lag_records: 20_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commented-out table of the example: from its `header` line to the next blank line,
    /// its settings uncommented, trailing comments cut.
    fn commented_table(text: &str, header: &str) -> String {
        text.lines()
            .skip_while(|l| !l.starts_with(header))
            .take_while(|l| !l.trim().is_empty())
            .filter(|l| l.starts_with(header) || l.contains(" = "))
            .map(|l| {
                l.trim_start_matches("# ")
                    .split(" #")
                    .next()
                    .unwrap_or_default()
                    .to_owned()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../ferry-cloud.example.toml");
        let config: CloudConfig = toml::from_str(text).expect("example parses");
        config.edge().validate().expect("example is valid");
        let d = CloudConfig::default();
        assert_eq!(config.server.listen, d.server.listen);
        assert_eq!(config.server.data_dir, d.server.data_dir);
        assert_eq!(config.log.fsync, d.log.fsync);
        assert_eq!(config.log.queue_requests, d.log.queue_requests);
        assert_eq!(config.log.retention_check_secs, d.log.retention_check_secs);
        assert_eq!(config.log.mqtt_max_lag_records, d.log.mqtt_max_lag_records);
        assert_eq!(config.log.streams, d.log.streams);
        assert_eq!(config.storage.cache_bytes, d.storage.cache_bytes);
        assert!(config.routes.is_empty() && config.admin.listen.is_none());
        // The [admin] keys, uncommented, parse (TLS too), and the session's is the default.
        let admin: String = text
            .lines()
            .skip_while(|l| *l != "[admin]")
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.trim_start_matches("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let with_admin: CloudConfig = toml::from_str(&admin).expect("admin example parses");
        let got = with_admin.admin;
        assert_eq!(got.session_secs, AdminConfig::default().session_secs);
        assert!(got.listen.is_some() && got.password_file.is_some() && got.tls.is_some());
        assert_eq!((got.admins.len(), got.viewers.len()), (1, 1));
        // The commented route example is a valid route.
        let route = commented_table(text, "# [[route]]");
        let with_route: CloudConfig = toml::from_str(&route).expect("route example parses");
        crate::routes::Routes::new(&with_route.routes).expect("route example is valid");
        assert_eq!(config.log.backend, LogBackend::Local);
        // The commented [log.object] example parses, and its numbers are the defaults.
        let object = commented_table(text, "# [log.object]");
        let with_object: CloudConfig = toml::from_str(&object).expect("object example parses");
        let (got, d) = (
            with_object.log.object.expect("[log.object]"),
            ObjectConfig::default(),
        );
        assert!(got.object_url.starts_with("s3://") && got.postgres_url.starts_with("postgres://"));
        assert_eq!(
            (
                got.flush_ms,
                got.flush_bytes,
                got.buffer_bytes,
                got.append_timeout_ms
            ),
            (
                d.flush_ms,
                d.flush_bytes,
                d.buffer_bytes,
                d.append_timeout_ms
            )
        );
        assert_eq!(
            (got.cache_bytes, got.postgres_pool),
            (d.cache_bytes, d.postgres_pool)
        );
        assert_eq!(
            (got.orphan_grace_secs, got.compact_bytes, got.lease_ms),
            (d.orphan_grace_secs, d.compact_bytes, d.lease_ms)
        );
        assert_eq!(got.node.as_deref(), Some("cloud-1"));
        let s3 = commented_table(text, "# [log.object.s3]");
        let with_s3: CloudConfig = toml::from_str(&s3).expect("s3 example parses");
        let s3 = with_s3.log.object.expect("[log.object]").s3;
        assert!(s3.endpoint.is_some() && !s3.allow_http);
        // The commented [link] example parses, and its numbers are the defaults.
        let link = commented_table(text, "# [link]");
        let with_link: CloudConfig = toml::from_str(&link).expect("link example parses");
        let (got, d) = (
            with_link.link.expect("[link]"),
            crate::link_sink::LinkConfig::default(),
        );
        assert_eq!(got.listen, d.listen);
        assert_eq!(got.credit_bytes, d.credit_bytes);
        assert_eq!(got.max_frame_bytes, d.max_frame_bytes);
        assert_eq!(
            (got.keepalive_secs, got.idle_timeout_secs),
            (d.keepalive_secs, d.idle_timeout_secs)
        );
        assert!(got.deny_file.is_some());
        // And the [kafka] example, with its defaults.
        let kafka = commented_table(text, "# [kafka]");
        let with_kafka: CloudConfig = toml::from_str(&kafka).expect("kafka example parses");
        let (got, d) = (
            with_kafka.kafka.expect("[kafka]"),
            crate::kafka::KafkaConfig::default(),
        );
        assert_eq!(got.listen, d.listen);
        assert_eq!(got.max_request_bytes, d.max_request_bytes);
        assert_eq!(got.auto_create_topics, d.auto_create_topics);
        // And the [amqp] example, with its defaults.
        let amqp = commented_table(text, "# [amqp]");
        let with_amqp: CloudConfig = toml::from_str(&amqp).expect("amqp example parses");
        let (got, d) = (
            with_amqp.amqp.expect("[amqp]"),
            crate::amqp::AmqpConfig::default(),
        );
        assert_eq!(
            (got.listen, got.vhosts.clone()),
            (d.listen, d.vhosts.clone())
        );
        assert_eq!(
            (got.frame_max, got.channel_max),
            (d.frame_max, d.channel_max)
        );
        assert_eq!(
            (got.heartbeat_secs, got.ack_timeout_secs),
            (d.heartbeat_secs, d.ack_timeout_secs)
        );
        assert!(got.password_file.is_some() && got.acl_file.is_some());
        assert_eq!(got.max_appending_bytes, d.max_appending_bytes);
        assert!(got.tls.is_none(), "[amqp.tls] is its own table");
        let tls = commented_table(text, "# [amqp.tls]");
        let with_tls: CloudConfig = toml::from_str(&tls).expect("amqp.tls example parses");
        let tls = with_tls.amqp.and_then(|a| a.tls).expect("[amqp.tls]");
        assert_eq!(tls.listen.len(), 1);
        assert!(tls.cert_file.ends_with("cloud.example.com.crt"));
    }
}
