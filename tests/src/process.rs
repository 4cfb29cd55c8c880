//! Real Ferry processes for end-to-end tests: built once per test run, started with a
//! configuration, their address read from their log, killed (SIGKILL) when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

/// Builds `bin` of package `package` (a no-op when up to date) and returns its path.
///
/// Tests run from `target/<profile>/deps/`; the binaries sit one level up.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().expect("no test panicked while building");
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let path = dir.join(bin);
    if !built.iter().any(|b| b == bin) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", bin]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building {bin} failed");
        built.push(bin.to_owned());
    }
    path
}

/// A running `ferry-edge` (or `ferry-cloud`, see [`Edge::cloud_in`]).
#[derive(Debug)]
pub struct Edge {
    child: Child,
    /// The first MQTT listener's address.
    pub addr: SocketAddr,
    /// Log lines after start-up.
    pub log: mpsc::Receiver<String>,
    /// A data directory made for this process alone, removed with it.
    own_dir: Option<PathBuf>,
    ready_line: String,
}

impl Edge {
    /// Starts `ferry-edge` with `args` (add `--listen 127.0.0.1:0` for an ephemeral port) and
    /// a data directory of its own, and waits until it is ready.
    pub fn start(args: &[&str]) -> Self {
        let dir = temp_dir("edge");
        let mut edge = Self::start_in(&dir, args);
        edge.own_dir = Some(dir);
        edge
    }

    /// Like [`Edge::start`] with the data directory `dir`, which outlives the process: start
    /// again in the same directory to test what survived.
    pub fn start_in(dir: &Path, args: &[&str]) -> Self {
        Self::launch("ferry-edge", dir, args)
    }

    /// Starts `ferry-cloud` with `args` and the data directory `dir`, and waits until it is
    /// ready.
    ///
    /// With `FERRY_TEST_BACKEND=object` ([`crate::services::on_object_backend`]) the node
    /// runs on the object backend: its `--config` (or an empty one) is rewritten with the
    /// `[log]` tables of [`crate::services::on_object`], kept beside the data directory.
    /// `ferry-cloud demo` keeps its embedded defaults (the local log) either way.
    pub fn cloud_in(dir: &Path, args: &[&str]) -> Self {
        if !crate::services::on_object_backend() || args.first() == Some(&"demo") {
            return Self::launch("ferry-cloud", dir, args);
        }
        std::fs::create_dir_all(dir).expect("data dir");
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let at = args.iter().position(|a| a == "--config");
        let original = match at {
            Some(i) => std::fs::read_to_string(&args[i + 1]).expect("the config"),
            None => String::new(),
        };
        let file = crate::services::object_config_file(dir);
        std::fs::write(&file, crate::services::on_object(&original, dir)).expect("write");
        let file = file.to_str().expect("utf-8 path").to_owned();
        match at {
            Some(i) => args[i + 1] = file,
            None => args.extend(["--config".to_owned(), file]),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::launch("ferry-cloud", dir, &args)
    }

    fn launch(program: &str, dir: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(binary(program, program))
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} starts: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (addr, ready_line) = loop {
            let line = log
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{program} logs that it is ready within 30 s"));
            if line.contains(&format!("{program} ready")) {
                let addr = parse_addr(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
                break (addr, line);
            }
        };
        Self {
            child,
            addr,
            log,
            own_dir: None,
            ready_line,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The first TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        let at = self.ready_line.find("tls_addrs=")?;
        parse_addr(&self.ready_line[at..])
    }

    /// The metrics listener's address, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        let at = self.ready_line.find("metrics_addrs=")?;
        parse_addr(&self.ready_line[at..])
    }

    /// The admin listener's address (ferry-cloud), if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let at = self.ready_line.find("admin_addrs=")?;
        parse_addr(&self.ready_line[at..])
    }

    /// The first WebSocket listener's address, if there is one.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        let at = self.ready_line.find(" ws_addrs=")?;
        parse_addr(&self.ready_line[at..])
    }

    /// The Kafka listener's address (ferry-cloud with `[kafka]`), if there is one.
    pub fn kafka_addr(&self) -> Option<SocketAddr> {
        let at = self.ready_line.find("kafka_addrs=")?;
        parse_addr(&self.ready_line[at..])
    }

    /// The AMQP listener's address (ferry-cloud with `[amqp]`), if there is one.
    pub fn amqp_addr(&self) -> Option<SocketAddr> {
        let at = self.ready_line.find(" amqp_addrs=")?;
        parse_addr(&self.ready_line[at..])
    }

    /// The first AMQP-over-TLS listener's address (`[amqp.tls]`), if there is one.
    pub fn amqps_addr(&self) -> Option<SocketAddr> {
        let at = self.ready_line.find("amqps_addrs=")?;
        parse_addr(&self.ready_line[at..])
    }

    /// The first WebSocket over TLS (`wss://`) listener's address, if there is one.
    pub fn wss_addr(&self) -> Option<SocketAddr> {
        let at = self.ready_line.find("wss_addrs=")?;
        parse_addr(&self.ready_line[at..])
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGHUP and waits (up to 60 s) for a log line that contains `line`.
    pub fn reload_and_wait_for(&self, line: &str) {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -HUP");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let got = self
                .log
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {line:?} within 60 s"));
            if got.contains(line) {
                return;
            }
        }
    }

    /// GET `path` from the process's HTTP listener (ferry-edge's metrics listener, or
    /// ferry-cloud's admin listener): the whole response, headers and body.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let addr = self
            .metrics_addr()
            .or_else(|| self.admin_addr())
            .expect("a metrics or admin listener");
        let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("write the request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the response");
        response
    }

    /// A metric without labels from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let page = self.http_get("/metrics");
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {page}"))
            .parse::<f64>()
            .expect("a number") as u64
    }

    /// Sends SIGKILL and waits for the process.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().expect("wait for ferry-edge")
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.own_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs a Mosquitto command-line client to completion; scripts/test.sh installs them
/// (Debian packages mosquitto-clients and mosquitto).
pub fn mosquitto(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} must be installed (apt-get install mosquitto-clients): {e}")
    })
}

/// [`mosquitto`] against the broker on 127.0.0.1:`port`.
pub fn mosquitto_at(tool: &str, port: &str, args: &[&str]) -> std::process::Output {
    let all: Vec<&str> = ["-h", "127.0.0.1", "-p", port]
        .iter()
        .chain(args)
        .copied()
        .collect();
    mosquitto(tool, &all)
}

/// Runs `mosquitto_pub -l` against 127.0.0.1:`port` with `args`, one message per line of
/// `lines`; mosquitto_pub waits for each acknowledgement at QoS ≥ 1. Its output, for the
/// caller to check.
pub fn mosquitto_pub_lines(port: &str, args: &[&str], lines: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port, "-l"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("mosquitto_pub must be installed (apt-get install mosquitto-clients): {e}")
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(lines.as_bytes())
        .expect("write the lines");
    child.wait_with_output().expect("mosquitto_pub exits")
}

/// A new empty directory under the system's temporary directory.
pub fn temp_dir(what: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ferry-test-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// The first `host:port` inside `[...]` of a log line such as
/// `ferry-edge ready addrs=[127.0.0.1:40411]`.
fn parse_addr(line: &str) -> Option<SocketAddr> {
    let start = line.find('[')? + 1;
    let end = start + line[start..].find([']', ','])?;
    line[start..end].trim().parse().ok()
}

/// A UDP port on 127.0.0.1 for a process that the test starts later and that must be told
/// its port in advance (a cloud's link, which an edge's configuration names).
///
/// Binding `:0` and dropping the socket would hand out a port from the kernel's ephemeral
/// range, which any other socket bound to `:0` on the machine may take before the process
/// binds it. The ports here come from below that range (Linux's starts at 32768), where only
/// explicit binds go, spread by the test process's id and a counter, and each is checked
/// free before it is handed out.
pub fn free_udp_port() -> u16 {
    free_port(|port| std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// A TCP port on 127.0.0.1 for a process the test starts later (a server of its own), as
/// [`free_udp_port`] picks them.
pub fn free_tcp_port() -> u16 {
    free_port(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

fn free_port(free: impl Fn(u16) -> bool) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000; // up to 31,999: below the ephemeral range
    let base = std::process::id().wrapping_mul(131);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (FIRST + base.wrapping_add(n) % SPAN) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// Waits until `f` holds, checking every 100 ms; panics after `secs` seconds. Deadlines are
/// generous: they bound a failing test, not a working one.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A Mosquitto subscriber that cannot miss what is published after [`Subscription::open`]
/// returns: a persistent QoS 1 session, made by `mosquitto_sub -c -E` (which exits once the
/// SUBACK is in), read back later by resuming the session. No sleep stands in for "the
/// subscriber is ready".
#[derive(Debug)]
pub struct Subscription {
    port: String,
    args: Vec<String>,
}

impl Subscription {
    /// Subscribes session `client_id` to `filter` on 127.0.0.1:`port`; `extra` goes to both
    /// runs of mosquitto_sub (TLS files, `-V mqttv5`, `-v`, ...). Panics if the broker does
    /// not acknowledge the subscription within 30 s.
    pub fn open(port: &str, client_id: &str, filter: &str, extra: &[&str]) -> Self {
        let mut args: Vec<String> = ["-i", client_id, "-c", "-q", "1", "-t", filter]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        let mut first = args.clone();
        first.extend(["-E", "-W", "30"].map(String::from));
        let refs: Vec<&str> = first.iter().map(String::as_str).collect();
        let out = mosquitto_at("mosquitto_sub", port, &refs);
        assert!(out.status.success(), "subscribe {filter}: {out:?}");
        args.shrink_to_fit();
        Self {
            port: port.to_owned(),
            args,
        }
    }

    /// Resumes the session and prints (mosquitto_sub's stdout) the first `count` messages
    /// waiting or arriving, within 60 s (a bound for a failing test).
    pub fn read(&self, count: usize) -> std::process::Output {
        let count = count.to_string();
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend(["-C", &count, "-W", "60"]);
        mosquitto_at("mosquitto_sub", &self.port, &args)
    }
}

/// Runs `tests/clients/<script>` with python3 and `args`; it must exit 0 with "OK" as its
/// last line (scripts/test.sh installs the clients it imports). Its output, for more checks.
pub fn python_client(script: &str, args: &[&str]) -> String {
    let path = format!("{}/clients/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3 runs (scripts/test.sh installs its clients)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.ends_with("OK\n"),
        "{script} {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// An MQTT 5 client (paho-mqtt, `tests/clients/mqtt5_told_to_go.py`) connected to
/// 127.0.0.1:`port`, waiting for the server to send it away.
#[derive(Debug)]
pub struct ToldToGo {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl ToldToGo {
    /// Returns once the client is connected.
    pub fn connect(port: u16) -> Self {
        Self::start(&[&port.to_string()])
    }

    /// As [`ToldToGo::connect`], as `client_id` with a persistent session and a will on
    /// `will_topic`.
    pub fn connect_as(port: u16, client_id: &str, will_topic: &str) -> Self {
        Self::start(&[&port.to_string(), client_id, will_topic])
    }

    fn start(args: &[&str]) -> Self {
        let path = format!("{}/clients/mqtt5_told_to_go.py", env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new("python3")
            .arg(&path)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (scripts/test.sh installs paho-mqtt)");
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("a line");
        assert_eq!(line, "READY\n", "the client connects");
        Self { child, out }
    }

    /// True while the server has not disconnected it.
    pub fn connected(&mut self) -> bool {
        self.child.try_wait().expect("its state").is_none()
    }

    /// The reason code and the Server Reference ("-": none) of the DISCONNECT the server
    /// sent it.
    pub fn told(mut self) -> (u8, String) {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).expect("its output");
        assert!(self.child.wait().expect("it exits").success(), "{rest}");
        let line = rest
            .lines()
            .find_map(|l| l.strip_prefix("DISCONNECT "))
            .unwrap_or_else(|| panic!("no DISCONNECT: {rest}"));
        let (code, reference) = line.split_once(' ').expect("code and reference");
        (code.parse().expect("a reason code"), reference.to_owned())
    }
}
