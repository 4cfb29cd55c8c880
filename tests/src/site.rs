//! A cloud and an edge joined by the link, for end-to-end tests: certificates made with
//! `ferry-cloud pki`, the two configurations, data directories, removed when dropped.

use std::path::PathBuf;
use std::process::Command;

use crate::process::{binary, free_udp_port, temp_dir, Edge};

/// A cloud and an edge that may run: certificates, configurations, data directories.
#[derive(Debug)]
pub struct Site {
    pub dir: PathBuf,
    pub cloud_config: PathBuf,
    pub edge_config: PathBuf,
    /// The cloud's link port (UDP).
    pub link_port: u16,
}

impl Site {
    /// Certificates from `ferry-cloud pki`, a link port chosen now (the edge must know it
    /// before the cloud runs), and the configurations. `uplink` is added to `[uplink]`.
    pub fn new(what: &str, uplink: &str) -> Self {
        Self::with_path(what, uplink, None)
    }

    /// As [`Site::new`] with `via` = (the cloud's link port, the port the edge connects to:
    /// a proxy's).
    /// As [`Site::new`] with the edge linked through an impairment proxy the test controls
    /// (`loss_permille` of datagrams dropped, from `seed`; cut with its `control`).
    pub async fn behind_proxy(
        what: &str,
        uplink: &str,
        loss_permille: u32,
        seed: u64,
    ) -> (Self, crate::impair::Proxy) {
        let link_port = free_udp_port();
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], link_port));
        let proxy = crate::impair::Proxy::start(upstream, loss_permille, seed).await;
        let site = Self::with_path(what, uplink, Some((link_port, proxy.addr.port())));
        (site, proxy)
    }

    pub fn with_path(what: &str, uplink: &str, via: Option<(u16, u16)>) -> Self {
        Self::build(what, uplink, via, "")
    }

    /// As [`Site::new`], with `edge_extra` appended to the edge's configuration (more
    /// tables: `[[uplink.route]]`s, `[field]` sources).
    pub fn with_edge(what: &str, uplink: &str, edge_extra: &str) -> Self {
        Self::build(what, uplink, None, edge_extra)
    }

    fn build(what: &str, uplink: &str, via: Option<(u16, u16)>, edge_extra: &str) -> Self {
        let dir = temp_dir(what);
        let pki = pki(&dir, &["gw-1"]);
        let (port, edge_target) = via.unwrap_or_else(|| {
            let port = free_udp_port();
            (port, port)
        });
        let p = |rel: &str| pki.join(rel).display().to_string();
        let cloud_config = dir.join("cloud.toml");
        std::fs::write(
            &cloud_config,
            format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [kafka]\nlisten = \"127.0.0.1:0\"\n[amqp]\nlisten = \"127.0.0.1:0\"\n\
                 [link]\nlisten = \"127.0.0.1:{port}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
                 deny_file = \"{}\"\n",
                p("ca.crt"),
                p("nodes/localhost.crt"),
                p("nodes/localhost.key"),
                dir.join("deny.txt").display(),
            ),
        )
        .expect("write the cloud's configuration");
        let edge_config = dir.join("edge.toml");
        std::fs::write(
            &edge_config,
            format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\nmetrics_listen = \"127.0.0.1:0\"\n\
                 [uplink]\ncloud = \"127.0.0.1:{edge_target}\"\nserver_name = \"localhost\"\n\
                 ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
                 reconnect_max_secs = 1\nidle_timeout_secs = 5\n{uplink}\n\
                 [[uplink.route]]\nfilter = \"sensors/#\"\n{edge_extra}\n",
                p("ca.crt"),
                p("edges/gw-1.crt"),
                p("edges/gw-1.key"),
            ),
        )
        .expect("write the edge's configuration");
        Self {
            dir,
            cloud_config,
            edge_config,
            link_port: port,
        }
    }

    pub fn cloud(&self) -> Edge {
        Edge::cloud_in(
            &self.dir.join("cloud"),
            &["--config", self.cloud_config.to_str().expect("utf8")],
        )
    }

    pub fn edge(&self) -> Edge {
        Edge::start_in(
            &self.dir.join("edge"),
            &["--config", self.edge_config.to_str().expect("utf8")],
        )
    }

    /// The payloads of the cloud's `mqtt` stream, in log order (the cloud must be stopped);
    /// every record's key must be `gw-1/sensors/t`.
    pub fn cloud_log(&self) -> Vec<String> {
        self.cloud_records()
            .into_iter()
            .map(|(key, value)| {
                assert_eq!(key, "gw-1/sensors/t");
                value
            })
            .collect()
    }

    /// (key, payload) of each record of the cloud's `mqtt` stream, in log order.
    pub fn cloud_records(&self) -> Vec<(String, String)> {
        crate::log::records(&self.dir.join("cloud/log"), "mqtt", 0)
            .into_iter()
            .map(|(key, value, _)| (key, value))
            .collect()
    }
}

/// Certificates made with `ferry-cloud pki` in `dir/pki` (returned): a CA, the node
/// certificate for `localhost`, and one for each of `edges`.
pub fn pki(dir: &std::path::Path, edges: &[&str]) -> PathBuf {
    let pki = dir.join("pki");
    let bin = binary("ferry-cloud", "ferry-cloud");
    let mut runs = vec![vec!["init"], vec!["issue-node", "localhost"]];
    runs.extend(edges.iter().map(|e| vec!["issue-edge", e]));
    for args in runs {
        let out = Command::new(&bin)
            .arg("pki")
            .args(&args)
            .arg("--dir")
            .arg(&pki)
            .output()
            .expect("ferry-cloud pki runs");
        assert!(out.status.success(), "pki {args:?}: {out:?}");
    }
    pki
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
