//! systemd's service protocol, for `Type=notify` units (`systemd/`): `READY=1` once the
//! listeners are bound, `WATCHDOG=1` every half watchdog period while a health check passes,
//! `STOPPING=1` on the way out. Where systemd is absent (`$NOTIFY_SOCKET` unset) every call
//! does nothing.
//!
//! The health check is the caller's: the binaries ask their broker for its statistics, a
//! round trip through the router, so a wedged router or a stalled runtime stops feeding the
//! watchdog and systemd restarts the service (`WatchdogSec=`, `Restart=on-failure`).

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

/// Tells systemd the service is ready, with a one-line status.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// With the watchdog on (`$WATCHDOG_USEC` set for this process), spawns a task that runs
/// `healthy` every half period and feeds the watchdog when it answers true within that time.
/// Without it, does nothing.
pub fn watchdog<F, Fut>(healthy: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match tokio::time::timeout(every, healthy()).await {
                Ok(true) => send(&[NotifyState::Watchdog]),
                Ok(false) => warn!("health check failed: the watchdog is not fed"),
                Err(_) => warn!(?every, "health check timed out: the watchdog is not fed"),
            }
        }
    });
}

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "cannot notify systemd");
    }
}
