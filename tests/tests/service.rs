//! ferry-edge and ferry-cloud under a service manager: systemd's notify protocol spoken to a
//! socket of the test's own, as systemd would receive it from a `Type=notify` unit with
//! `WatchdogSec=` (READY=1 once listening, WATCHDOG=1 every half period, STOPPING=1 on
//! SIGTERM).

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::process::{binary, temp_dir};

/// Runs `package`'s binary with a notify socket and a 200 ms watchdog; returns every
/// message it sent, in order, from start to exit after SIGTERM.
fn notifications(package: &str) -> Vec<String> {
    let dir = temp_dir(&format!("notify-{package}"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let data = dir.join("data");
    let mut child = Command::new(binary(package, package))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    // Reads until `done` holds for what came so far; a deadline bounds a failing run only.
    let mut read_until = |got: &mut Vec<String>, what: &str, done: &dyn Fn(&[String]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(got) {
            assert!(
                Instant::now() < deadline,
                "{package}: {what} within 60 s: {got:?}"
            );
            if let Ok(n) = socket.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    read_until(&mut got, "READY=1 and five watchdog feeds", &|got| {
        got.iter()
            .position(|m| m.lines().any(|l| l == "READY=1"))
            .is_some_and(|ready| got[ready..].iter().filter(|m| *m == "WATCHDOG=1\n").count() >= 5)
    });
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(term.success());
    read_until(&mut got, "STOPPING=1", &|got| {
        got.iter().any(|m| m == "STOPPING=1\n")
    });
    let status = child.wait().expect("exits");
    assert!(
        status.success(),
        "{package} exits cleanly on SIGTERM: {status}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    got
}

fn check(package: &str) {
    let got = notifications(package);
    let ready = got.iter().position(|m| m.lines().any(|l| l == "READY=1"));
    let ready = ready.unwrap_or_else(|| panic!("{package} said READY=1: {got:?}"));
    let fed = got[ready..].iter().filter(|m| *m == "WATCHDOG=1\n").count();
    // Fed every 100 ms (half the 200 ms period); read until five feeds had come.
    assert!(fed >= 5, "{package} fed the watchdog {fed} times: {got:?}");
    assert!(
        got[ready..].iter().any(|m| m == "STOPPING=1\n"),
        "{package} said STOPPING=1 on SIGTERM: {got:?}"
    );
}

#[test]
fn ferry_edge_tells_systemd_it_is_ready_feeds_the_watchdog_and_says_when_it_stops() {
    check("ferry-edge");
}

#[test]
fn ferry_cloud_tells_systemd_it_is_ready_feeds_the_watchdog_and_says_when_it_stops() {
    check("ferry-cloud");
}
