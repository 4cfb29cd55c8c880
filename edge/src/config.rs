//! The `ferry-edge` configuration: one TOML file, every key optional with a documented
//! default. `edge/ferry-edge.example.toml` shows them all with comments.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::{Auth, AuthError};
use crate::broker::BrokerConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// The broker core's limits (`[mqtt]`); see [`BrokerConfig`] for each default and cost.
    pub mqtt: BrokerConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    /// What goes up to the cloud (`[uplink]`, see [`crate::uplink`]; feature `edge`).
    #[cfg(feature = "edge")]
    pub uplink: crate::uplink::UplinkConfig,
    /// Devices the edge reads itself (`[field]`, `[[field.serial]]`, `[[field.modbus]]`; see
    /// [`crate::field`]; feature `field`).
    #[cfg(feature = "field")]
    pub field: crate::field::FieldConfig,
}

/// Mosquitto's password and ACL files, read as they are (see [`crate::auth`]). Both are
/// read again on SIGHUP.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// A `mosquitto_passwd` file. Default none.
    pub password_file: Option<PathBuf>,
    /// A Mosquitto ACL file. Default none: every client may publish and subscribe anywhere.
    pub acl_file: Option<PathBuf>,
}

/// How durable state is written (`<data_dir>/ferry-edge.redb`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Wait for the disk at every commit. Default true: a QoS 1/2 message to a persistent
    /// session is acknowledged only once it is on disk, and survives a power loss. False
    /// survives a crash of the process but may lose the last commits on power loss, for
    /// flash media that must be spared.
    pub fsync: bool,
    /// Memory the database may use to cache its pages (reads and not yet flushed writes).
    /// Default 4 MiB, which holds the working set of thousands of persistent sessions; the
    /// operating system's page cache serves the rest. The database library's own default
    /// (1 GiB) would let a long backlog keep that much resident on a gateway.
    pub cache_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            fsync: true,
            cache_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Listeners and connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Plain TCP MQTT listeners. Default `["127.0.0.1:1883"]`: local clients only, as
    /// Mosquitto 2 does with no configuration.
    pub listen: Vec<SocketAddr>,
    /// Let clients in without a username. Default false, with one exception that makes the
    /// quick start work: with no password file and only loopback listeners, local clients
    /// are let in. A listener reachable from the network needs a password file or this.
    pub allow_anonymous: bool,
    /// Open connections at most; further connections are closed at once. Default 1024; each
    /// costs two tasks and its buffers (about 6 KiB idle, measured with `ferry-bench idle`).
    pub max_connections: usize,
    /// Seconds a new connection has to send CONNECT. Default 10.
    pub connect_timeout_secs: u64,
    /// Where persistent state is kept. Default `./ferry-edge-data`.
    pub data_dir: PathBuf,
    /// MQTT over TLS listeners (`[server.tls]`). Default none.
    pub tls: Option<TlsConfig>,
    /// MQTT over WebSocket listeners (`[server.websocket]`). Default none.
    pub websocket: Option<WebSocketConfig>,
    /// Prometheus metrics at `http://ADDR/metrics`. Default none (off).
    pub metrics_listen: Option<SocketAddr>,
}

/// MQTT over WebSocket: `ws://` on `listen`, `wss://` on `tls_listen` (with the certificate,
/// key and client-certificate settings of `[server.tls]`, which must be present).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Addresses to listen on, usually port 8080 or 9001. Any path is accepted.
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// Addresses for `wss://`, usually port 8081 or 443. Default none.
    #[serde(default)]
    pub tls_listen: Vec<SocketAddr>,
}

/// MQTT over TLS (rustls): TLS 1.2 and 1.3, safe defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Addresses to listen on, usually port 8883.
    pub listen: Vec<SocketAddr>,
    /// The server's certificate chain, PEM.
    pub cert_file: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// If set, clients must present a certificate issued by this CA (PEM).
    pub client_ca_file: Option<PathBuf>,
    /// Take the client certificate's Common Name as the username (no password check; the
    /// ACL applies to that name). Needs `client_ca_file`. Default false.
    #[serde(default)]
    pub use_identity_as_username: bool,
}

impl ServerConfig {
    /// Applies the quick-start flags both binaries share over what the file says:
    /// `--listen` (replaces the listeners when given), `--data-dir`, `--allow-anonymous`.
    pub fn apply_flags(
        &mut self,
        listen: &[SocketAddr],
        data_dir: Option<PathBuf>,
        allow_anonymous: bool,
    ) {
        if !listen.is_empty() {
            self.listen = listen.to_vec();
        }
        if let Some(dir) = data_dir {
            self.data_dir = dir;
        }
        self.allow_anonymous |= allow_anonymous;
    }
}

/// Logs to stderr at `info`, or as `RUST_LOG` says.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            allow_anonymous: false,
            max_connections: 1024,
            connect_timeout_secs: 10,
            data_dir: PathBuf::from("ferry-edge-data"),
            tls: None,
            websocket: None,
            metrics_listen: None,
        }
    }
}

/// A configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error(
        "listener {addr} is reachable from the network, with no password file and anonymous \
         access not allowed: set auth.password_file, or server.allow_anonymous = true \
         (--allow-anonymous), or listen on 127.0.0.1"
    )]
    AnonymousOnNetwork { addr: SocketAddr },
    #[error("{field} must be {rule}, not {value}")]
    Invalid {
        field: &'static str,
        rule: &'static str,
        value: String,
    },
    #[error("no listener configured")]
    NoListener,
    #[error("[field]: {0}")]
    Field(String),
}

impl Config {
    /// Reads the password and ACL files into the rules the broker applies.
    pub fn load_auth(&self) -> Result<Auth, AuthError> {
        let local_only = self.server.listen.iter().all(|a| a.ip().is_loopback());
        let allow_anonymous =
            self.server.allow_anonymous || (self.auth.password_file.is_none() && local_only);
        Auth::load(
            self.auth.password_file.as_deref(),
            self.auth.acl_file.as_deref(),
            allow_anonymous,
        )
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks the rules no single field can: safe-by-default listeners, sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.listen.is_empty() {
            return Err(ConfigError::NoListener);
        }
        let client_certs = self
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some());
        let tls_listeners = self.server.tls.iter().flat_map(|t| t.listen.iter());
        let ws_listeners = self
            .server
            .websocket
            .iter()
            .flat_map(|w| w.listen.iter().chain(w.tls_listen.iter()));
        if self
            .server
            .websocket
            .as_ref()
            .is_some_and(|w| !w.tls_listen.is_empty())
            && self.server.tls.is_none()
        {
            return Err(ConfigError::Invalid {
                field: "server.websocket.tls_listen",
                rule: "used with [server.tls] (its certificate and key)",
                value: "set".into(),
            });
        }
        let mut all = self
            .server
            .listen
            .iter()
            .chain(tls_listeners)
            .chain(ws_listeners);
        if !self.server.allow_anonymous && self.auth.password_file.is_none() && !client_certs {
            if let Some(addr) = all.find(|a| !a.ip().is_loopback()) {
                return Err(ConfigError::AnonymousOnNetwork { addr: *addr });
            }
        }
        if let Some(tls) = &self.server.tls {
            if tls.use_identity_as_username && tls.client_ca_file.is_none() {
                return Err(ConfigError::Invalid {
                    field: "server.tls.use_identity_as_username",
                    rule: "used with server.tls.client_ca_file",
                    value: "true".into(),
                });
            }
        }
        let m = &self.mqtt;
        if m.max_packet_size_bytes < 64 {
            return Err(ConfigError::Invalid {
                field: "mqtt.max_packet_size_bytes",
                rule: "at least 64",
                value: m.max_packet_size_bytes.to_string(),
            });
        }
        if m.max_inflight_messages == 0 {
            return Err(ConfigError::Invalid {
                field: "mqtt.max_inflight_messages",
                rule: "at least 1",
                value: "0".into(),
            });
        }
        if m.max_queued_bytes_per_session > m.max_queued_bytes_total {
            return Err(ConfigError::Invalid {
                field: "mqtt.max_queued_bytes_per_session",
                rule: "at most mqtt.max_queued_bytes_total",
                value: m.max_queued_bytes_per_session.to_string(),
            });
        }
        #[cfg(feature = "field")]
        self.field.validate().map_err(ConfigError::Field)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example is the ferry-edge binary's, which has `[uplink]`.
    #[test]
    #[cfg(feature = "edge")]
    fn the_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../ferry-edge.example.toml");
        let config: Config = toml::from_str(text).expect("example parses");
        config.validate().expect("example is valid");
        let defaults = Config::default();
        assert_eq!(config.server.listen, defaults.server.listen);
        assert_eq!(
            config.server.max_connections,
            defaults.server.max_connections
        );
        assert_eq!(
            config.mqtt.max_packet_size_bytes,
            defaults.mqtt.max_packet_size_bytes
        );
        assert_eq!(
            config.mqtt.max_queued_bytes_total,
            defaults.mqtt.max_queued_bytes_total
        );
        assert_eq!(config.mqtt.refused_filters, defaults.mqtt.refused_filters);
        assert_eq!(config.storage.cache_bytes, defaults.storage.cache_bytes);
        assert_eq!(config.uplink, defaults.uplink);
    }

    /// Every key the example shows for `[field]`, commented out, is a real one: the
    /// section, uncommented (the lines that read as a table header or `key = value`),
    /// parses with unknown keys refused and is valid.
    #[test]
    #[cfg(feature = "field")]
    fn the_example_field_section_uncommented_is_a_valid_config() {
        let text = include_str!("../ferry-edge.example.toml");
        let section = &text[text.find("\n[field]\n").expect("a [field] section")..];
        let uncommented: String = section
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with("[[")
                        || rest
                            .split_once(" = ")
                            .is_some_and(|(k, _)| !k.contains(' ')) =>
                {
                    rest
                }
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let config: Config = toml::from_str(&uncommented).expect("the uncommented example parses");
        assert_eq!(config.field.serial.len(), 1);
        assert_eq!(config.field.modbus.len(), 2);
        assert_eq!(config.field.modbus[0].points.len(), 2);
        assert_eq!(config.field.gpio.len(), 1);
        assert_eq!(config.field.gpio[0].lines.len(), 2);
        #[cfg(feature = "opcua")]
        assert_eq!(config.field.opcua[0].nodes.len(), 1);
        let valid = config.validate();
        #[cfg(feature = "opcua")]
        valid.expect("the uncommented example is valid");
        // A build without OPC UA says so about the [[field.opcua]] table.
        #[cfg(not(feature = "opcua"))]
        assert!(
            valid.is_err_and(|e| e.to_string().contains("without OPC UA")),
            "no OPC UA in this build"
        );
        let defaults = crate::field::FieldConfig::default();
        assert_eq!(config.field.username, defaults.username);
        assert_eq!(config.field.prefix, defaults.prefix);
    }

    #[test]
    fn network_listeners_need_explicit_anonymous_access() {
        let mut config = Config::default();
        config.validate().expect("localhost default is fine");
        config.server.listen = vec!["0.0.0.0:1883".parse().expect("addr")];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::AnonymousOnNetwork { .. })
        ));
        config.server.allow_anonymous = true;
        config.validate().expect("explicitly allowed");
        config.server.allow_anonymous = false;
        config.auth.password_file = Some("/etc/ferry/passwd".into());
        config.validate().expect("a password file protects it");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<Config>("[mqtt]\nmax_packet_size = 5\n").expect_err("typo");
        assert!(err.to_string().contains("max_packet_size"), "{err}");
    }
}
