//! `ferry-cloud`: the cloud node. See `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_cloud::node::{CloudConfig, Node};
use tracing::info;

/// Ferry's cloud node: a durable, partitioned log of everything MQTT clients and edges send,
/// served to MQTT subscribers.
///
/// With no options it listens on 127.0.0.1:1883 for local MQTT clients only and keeps its
/// data in ./ferry-cloud-data. Every setting lives in a TOML file (--config; see
/// ferry-cloud.example.toml, where each key is explained with its default); the flags below
/// override the file for a quick start.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen for MQTT on ADDR (host:port) instead of the configured listeners; repeatable.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<std::net::SocketAddr>,
    /// Keep the log, the metadata and MQTT sessions in DIR.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Allow MQTT clients without credentials on listeners reachable from the network.
    #[arg(long)]
    allow_anonymous: bool,
    /// The `host:port` Kafka clients are told to connect to (`[kafka] advertised`), for a
    /// node whose address is known only when it starts (a pod's IP).
    #[arg(long, value_name = "HOST:PORT")]
    kafka_advertised: Option<String>,
    /// This node's name in its cluster (`[log.object] node`), for a name given by the
    /// platform (a pod's name).
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificates for the link: a CA, edge certificates (the edge's identity), node
    /// certificates. Keys are written with mode 0600; nothing is overwritten.
    Pki {
        #[command(subcommand)]
        action: Pki,
    },
    /// The whole path in one process: a cloud node, an edge linked to it over QUIC
    /// (certificates made on first run) and a simulated sensor publishing to the edge.
    /// Prints how to watch the data arrive.
    #[cfg(feature = "demo")]
    Demo(ferry_cloud::demo::DemoOptions),
}

#[derive(Debug, Subcommand)]
enum Pki {
    /// Makes a new CA: DIR/ca.crt and DIR/ca.key.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issues an edge's certificate, its id as common name: DIR/edges/EDGE_ID.crt and .key.
    IssueEdge {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        edge_id: String,
    },
    /// Issues a cloud node's server certificate: DIR/nodes/DNS_NAME.crt and .key.
    IssueNode {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        dns_name: String,
    },
}

fn pki(action: Pki) -> anyhow::Result<()> {
    use ferry_bridge::pki;
    let issued = match action {
        Pki::Init { dir } => pki::init(&dir)?,
        Pki::IssueEdge { dir, edge_id } => pki::issue_edge(&dir, &edge_id)?,
        Pki::IssueNode { dir, dns_name } => pki::issue_node(&dir, &dns_name)?,
    };
    println!("{}\n{}", issued.cert.display(), issued.key.display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ferry_edge::config::init_tracing();
    match args.command {
        Some(Command::Pki { action }) => return pki(action),
        #[cfg(feature = "demo")]
        Some(Command::Demo(opts)) => {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
            return ferry_cloud::demo::run(opts, async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            })
            .await;
        }
        None => {}
    }
    let mut config = match &args.config {
        Some(path) => CloudConfig::load(path)?,
        None => CloudConfig::default(),
    };
    config
        .server
        .apply_flags(&args.listen, args.data_dir.clone(), args.allow_anonymous);
    if let (Some(kafka), Some(advertised)) = (config.kafka.as_mut(), &args.kafka_advertised) {
        kafka.advertised = Some(advertised.clone());
    }
    if let (Some(object), Some(name)) = (config.log.object.as_mut(), &args.node_name) {
        object.node = Some(name.clone());
    }
    config.edge().validate()?;
    let edge_config = config.edge();
    let admin_config = config.admin.clone();
    let auth_passwords = config.auth.password_file.clone();
    let args_config = args.config.clone();

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let node = Node::start(config, async {
        let _ = stop_rx.await;
    })
    .await
    .context("cannot start the node")?;
    let admin_addr = match admin_config.listen {
        Some(_) => Some(
            ferry_cloud::admin::serve(&admin_config, auth_passwords.as_deref(), node.clone())
                .await
                .context("cannot start the admin listener")?,
        ),
        None => None,
    };
    info!(
        addrs = ?node.mqtt_addrs(),
        admin_addrs = ?admin_addr.into_iter().collect::<Vec<_>>(),
        link_addrs = ?node.link.as_ref().map(|l| l.local_addr()).into_iter().collect::<Vec<_>>(),
        kafka_addrs = ?node.kafka_addr.into_iter().collect::<Vec<_>>(),
        amqp_addrs = ?node.amqp_addr.into_iter().collect::<Vec<_>>(),
        amqps_addrs = ?node.amqp.as_ref().map(|a| a.tls_addrs.clone()).unwrap_or_default(),
        "ferry-cloud ready"
    );
    ferry_edge::systemd::ready("serving");
    let watched = node.clone();
    ferry_edge::systemd::watchdog(move || {
        let node = watched.clone();
        async move { node.mqtt.stats().await.is_some() }
    });
    let reloader = node.clone();
    let config_path = args_config;
    tokio::spawn(async move {
        let mut edge_config = edge_config;
        while hup.recv().await.is_some() {
            // The file's routes and auth files are read again; listeners stay as they are.
            if let Some(path) = &config_path {
                match CloudConfig::load(path) {
                    Ok(new) => {
                        edge_config.auth = new.auth.clone();
                        match reloader.reload_routes(&new.routes) {
                            Ok(()) => info!(routes = new.routes.len(), "SIGHUP: routes reloaded"),
                            Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the old routes"),
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: cannot read the configuration"),
                }
            }
            match edge_config.load_auth() {
                Ok(auth) => {
                    reloader.mqtt.reload_auth(auth).await;
                    info!("SIGHUP: password and ACL files reloaded");
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the old rules"),
            }
            if let Some(link) = &reloader.link {
                match link.reload_deny() {
                    Ok(n) => info!(entries = n, "SIGHUP: deny list reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the old deny list"),
                }
            }
        }
    });
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        e = node.mqtt.failed() => anyhow::bail!("stopped: {e}"),
    }
    info!("shutting down");
    ferry_edge::systemd::stopping();
    if let Some(link) = &node.link {
        // Edges reconnect and resume from what is committed.
        link.close();
    }
    // MQTT 5 clients are sent to the other live nodes (DISCONNECT 0x9C with a Server
    // Reference, spread over them), or told the server is shutting down (0x8B).
    let others = node.other_nodes_mqtt().await;
    info!(elsewhere = ?others, "draining the MQTT clients");
    node.mqtt.drain(others).await;
    if let Some(object) = node.object.clone() {
        // Gone for the other nodes at once, not when the lease runs out; its leases (Kafka
        // group coordinators) are free for them now.
        match tokio::task::spawn_blocking(move || object.leave()).await {
            Ok(Ok(())) => info!("left the nodes on the object store"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not leave the nodes"),
            Err(_) => {}
        }
    }
    let _ = stop_tx.send(());
    // The MQTT front's connections close after what they are owed went out (acknowledgements
    // wait for their appends); its router ends and closes the sessions' store.
    if !node.mqtt.stopped(SHUTDOWN_DEADLINE).await {
        anyhow::bail!("the MQTT front did not stop within {SHUTDOWN_DEADLINE:?}");
    }
    info!("stopped");
    Ok(())
}

/// How long a SIGTERM waits for the MQTT front to flush and stop: well inside systemd's
/// default stop timeout (90 s), and far longer than a batch's append and commit take.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
