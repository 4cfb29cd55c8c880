//! `ferry-edge`: the MQTT broker for gateways. See `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferry_edge::config::Config;
use ferry_edge::server::Server;
use tracing::info;

/// mimalloc (its v2 line) rather than the C library's allocator: it gives the memory a burst
/// took back to the system about 10 ms after it is freed, where glibc keeps fragmented arenas
/// resident for good, and it is fast where musl's allocator (the static ARM builds) is slow.
#[global_allocator]
#[cfg(feature = "mimalloc")]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ferry's MQTT 3.1.1/5.0 broker for gateways.
///
/// With no options it listens on 127.0.0.1:1883 for local clients only. Every setting lives
/// in a TOML file (--config; see ferry-edge.example.toml, where each key is explained with
/// its default); the flags below override the file for a quick start.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen on ADDR (host:port) instead of the configured listeners; repeatable.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<std::net::SocketAddr>,
    /// Keep persistent state in DIR.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Allow clients without credentials on listeners reachable from the network.
    #[arg(long)]
    allow_anonymous: bool,
}

/// One thread for every socket, one for the broker (the router): a gateway's broker is
/// bound by the router, not by socket I/O, and one I/O thread serves packets from different
/// connections in the order they arrived. (A multi-threaded runtime runs the most recently
/// woken task first, so a PUBLISH from one client could overtake a SUBSCRIBE another client
/// sent just before it; Paho's interoperability tests publish right after subscribing.)
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    ferry_edge::config::init_tracing();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config
        .server
        .apply_flags(&args.listen, args.data_dir.clone(), args.allow_anonymous);
    config.validate()?;
    let config_for_reload = config.clone();

    // Installed before anything is announced, so that a SIGTERM right after "ready" is
    // handled, not fatal.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::start(config, async {
        let _ = stop_rx.await;
    })
    .await
    .context("cannot start listeners")?;
    let metrics_addr = match config_for_reload.server.metrics_listen {
        Some(addr) => Some(
            ferry_edge::metrics::serve(addr, server.clone())
                .await
                .context("cannot start the metrics listener")?,
        ),
        None => None,
    };
    info!(
        addrs = ?server.local_addrs(),
        tls_addrs = ?server.tls_addrs(),
        ws_addrs = ?server.ws_addrs(),
        wss_addrs = ?server.wss_addrs(),
        metrics_addrs = ?metrics_addr.into_iter().collect::<Vec<_>>(),
        "ferry-edge ready"
    );
    ferry_edge::systemd::ready("serving");
    let watched = server.clone();
    ferry_edge::systemd::watchdog(move || {
        let server = watched.clone();
        async move { server.stats().await.is_some() }
    });
    let reloader = server.clone();
    let reload_config = config_for_reload;
    #[cfg(feature = "field")]
    let config_path = args.config.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match reload_config.load_auth() {
                Ok(auth) => {
                    reloader.reload_auth(auth).await;
                    info!("SIGHUP: password and ACL files reloaded");
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the old rules"),
            }
            // The field sources come from the file as it is now; other sections keep what
            // the process started with.
            #[cfg(feature = "field")]
            if let Some(path) = &config_path {
                match Config::load(path).and_then(|c| c.validate().map(|()| c)) {
                    Ok(fresh) => {
                        reloader.reload_field(&fresh.field);
                        info!(
                            serial = fresh.field.serial.len(),
                            modbus = fresh.field.modbus.len(),
                            "SIGHUP: field sources reloaded"
                        );
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: keeping the old field sources")
                    }
                }
            }
        }
    });
    tokio::select! {
        _ = shutdown => {}
        e = server.failed() => anyhow::bail!("stopped: {e}"),
    }
    info!("shutting down");
    ferry_edge::systemd::stopping();
    // MQTT 5 clients hear why (DISCONNECT 0x8B) after what they are owed.
    server.drain(Vec::new()).await;
    let _ = stop_tx.send(());
    // Connections close after what they are owed went out; the router commits what it
    // holds and closes the store.
    if !server.stopped(SHUTDOWN_DEADLINE).await {
        anyhow::bail!("not everything stopped within {SHUTDOWN_DEADLINE:?}");
    }
    info!("stopped");
    Ok(())
}

/// How long a SIGTERM waits for connections to flush and the router to finish before the
/// process gives up: well inside systemd's default stop timeout (90 s), and far longer
/// than a batch's commit takes.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
