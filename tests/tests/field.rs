//! Field sources end to end, with real peers: serial lines are pseudo-terminal pairs made by
//! `socat` with a writer on the far side; Modbus devices are pymodbus servers
//! (`tests/clients/modbus_device.py`) on TCP and, for RTU, on a pty pair. What the edge reads
//! is received by Mosquitto's clients; commands go in with `mosquitto_pub` and
//! `mosquitto_rr`, locally and from the cloud down the link.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ferry_tests::process::{free_tcp_port, mosquitto_at, temp_dir, wait_until, Edge, Subscription};
use ferry_tests::site::Site;
use serde_json::{json, Value};

/// A pseudo-terminal pair made by socat: `a` for the test's writer (or a device), `b` for
/// the edge. Dropping it (or [`Pty::unplug`]) closes both ends.
struct Pty {
    child: Child,
    a: PathBuf,
    b: PathBuf,
}

impl Pty {
    fn open(dir: &Path, name: &str) -> Self {
        let (a, b) = (dir.join(format!("{name}-a")), dir.join(format!("{name}-b")));
        let end = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
        let child = Command::new("socat")
            .args([end(&a), end(&b)])
            .stderr(Stdio::null())
            .spawn()
            .expect("socat must be installed (apt-get install socat)");
        wait_until(30, "socat makes its pty pair", || a.exists() && b.exists());
        Self { child, a, b }
    }

    /// Opens the writer's end.
    fn writer(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.a)
            .expect("open the pty")
    }

    /// Ends socat: both ends of the pair go away, as a USB adapter pulled out does.
    fn unplug(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        wait_until(30, "socat removes its links", || {
            !self.a.exists() && !self.b.exists()
        });
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device or server the test runs as a Python script of `tests/clients/`: it prints
/// "READY" once it serves, then a line for each write it took.
struct Device {
    child: Child,
    writes: mpsc::Receiver<String>,
}

impl Device {
    /// A pymodbus device ([`tests/clients/modbus_device.py`]): `at` is `["--tcp", port]` or
    /// `["--rtu", path, "--units", "1,2"]`; `points` what its registers hold.
    fn start(at: &[&str], points: &Value) -> Self {
        let points = points.to_string();
        let mut args = at.to_vec();
        args.extend(["--points", &points]);
        Self::script("modbus_device.py", &args)
    }

    fn script(script: &str, args: &[&str]) -> Self {
        let script = format!("{}/clients/{script}", env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs (scripts/test.sh installs pymodbus and asyncua)");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let ready = rx.recv_timeout(Duration::from_secs(60));
        assert_eq!(ready.as_deref(), Ok("READY"), "the device starts");
        Self { child, writes: rx }
    }

    /// The next write the device took, within 30 s.
    fn next_write(&self) -> String {
        self.writes
            .recv_timeout(Duration::from_secs(30))
            .expect("the device is written within 30 s")
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A ferry-edge with `field` (TOML tables) in its configuration.
fn edge_with(dir: &Path, field: &str) -> Edge {
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!("[server]\nlisten = [\"127.0.0.1:0\"]\nmetrics_listen = \"127.0.0.1:0\"\n{field}"),
    )
    .expect("write the configuration");
    Edge::start(&["--config", config.to_str().expect("utf-8")])
}

/// The next message on `topic` (a retained one first), within `secs`: (topic, payload).
fn next_message(port: u16, topic: &str, secs: u64) -> Option<(String, String)> {
    let secs = secs.to_string();
    let out = mosquitto_at(
        "mosquitto_sub",
        &port.to_string(),
        &["-t", topic, "-C", "1", "-W", &secs, "-v"],
    );
    let text = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    let (topic, payload) = text.split_once(' ')?;
    Some((topic.to_owned(), payload.to_owned()))
}

/// The next JSON document on `topic`.
fn next_json(port: u16, topic: &str) -> Value {
    let (_, payload) =
        next_message(port, topic, 30).unwrap_or_else(|| panic!("a message on {topic}"));
    serde_json::from_str(&payload).unwrap_or_else(|e| panic!("{payload:?} is JSON: {e}"))
}

/// Waits until the source's retained status says `state`.
fn wait_for_status(port: u16, source: &str, state: &str) {
    let topic = format!("field/{source}/status");
    wait_until(60, &format!("{source} is {state}"), || {
        next_message(port, &topic, 5)
            .and_then(|(_, p)| serde_json::from_str::<Value>(&p).ok())
            .is_some_and(|s| s["state"] == state)
    });
}

/// A source's entry in the edge's `/api/field`.
fn source_stats(edge: &Edge, name: &str) -> Value {
    let response = edge.http_get("/api/field");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let all: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("{name} in {all}"))
}

/// Lines `topic payload` of what a [`Subscription`] read.
fn messages(out: &std::process::Output) -> Vec<(String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, p)| (t.to_owned(), p.to_owned()))
        .collect()
}

/// Every framing of a serial line: lines parsed as key=value, fixed-length frames as they
/// are, length-prefixed frames (one longer than `max_frame_bytes` dropped, the stream still
/// read after it); a line that is unplugged is reported down and read again once it is back.
#[test]
fn serial_frames_of_every_framing_arrive_and_an_unplugged_line_is_read_again() {
    let dir = temp_dir("field-serial");
    let mut line = Pty::open(&dir, "line");
    let fixed = Pty::open(&dir, "fixed");
    let prefixed = Pty::open(&dir, "len");
    let edge = edge_with(
        &dir,
        &format!(
            "[[field.serial]]\nname = \"meter\"\npath = \"{}\"\nparse = \"kv\"\nreopen_ms = 100\n\
             [[field.serial]]\nname = \"scale\"\npath = \"{}\"\nframing = \"fixed\"\nframe_len = 6\n\
             [[field.serial]]\nname = \"tag\"\npath = \"{}\"\nframing = \"length_prefix\"\n\
             length_bytes = 2\nmax_frame_bytes = 16\n\
             [[field.serial]]\nname = \"csv\"\npath = \"{}\"\nparse = \"csv\"\n\
             csv_fields = [\"volts\", \"amps\"]\nterminator = \";\"\n",
            line.b.display(),
            fixed.b.display(),
            prefixed.b.display(),
            prefixed.b.display().to_string().replace("len-b", "csv-b"),
        ),
    );
    let port = edge.port();
    for source in ["meter", "scale", "tag"] {
        wait_for_status(port, source, "up");
    }
    // The fourth names a line that does not exist: down, with the reason.
    wait_for_status(port, "csv", "down");
    let status = next_json(port, "field/csv/status");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("csv-b")),
        "{status}"
    );
    let sub = Subscription::open(&port.to_string(), "serial-reader", "field/+", &["-v"]);
    let mut w = line.writer();
    w.write_all(b"t=21.5 unit=C\r\nt=22 unit=C\n")
        .expect("write");
    let mut w = fixed.writer();
    w.write_all(b"AB").expect("write");
    w.write_all(b"CDEF123").expect("write");
    w.write_all(b"456").expect("write");
    // A frame over max_frame_bytes is dropped with what was buffered beside it (nothing
    // after a wrong length can be trusted), counted; the frames after it are read.
    let mut w = prefixed.writer();
    let frame = |body: &[u8]| [&(body.len() as u16).to_be_bytes()[..], body].concat();
    w.write_all(&frame(b"hello")).expect("write");
    wait_until(30, "hello is read", || {
        source_stats(&edge, "tag")["published"] == json!(1)
    });
    w.write_all(&frame(&[b'x'; 40])).expect("write");
    wait_until(30, "the long frame is counted", || {
        source_stats(&edge, "tag")["errors"] == json!(1)
    });
    w.write_all(&frame(b"world!")).expect("write");
    let got = messages(&sub.read(6));
    let of = |topic: &str| -> Vec<String> {
        got.iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    };
    let meter: Vec<Value> = of("field/meter")
        .iter()
        .map(|p| serde_json::from_str(p).expect("json"))
        .collect();
    assert_eq!(meter.len(), 2, "{got:?}");
    assert_eq!(meter[0]["t"], json!(21.5));
    assert_eq!(meter[0]["unit"], json!("C"));
    assert_eq!(meter[1]["t"], json!(22));
    assert!(meter[0]["ts"]
        .as_u64()
        .is_some_and(|ts| ts > 1_600_000_000_000));
    assert_eq!(of("field/scale"), ["ABCDEF", "123456"]);
    assert_eq!(
        of("field/tag"),
        ["hello", "world!"],
        "the 40-byte frame is dropped"
    );

    // The status page for the technician is served, and what its script reads is there.
    let page = edge.http_get("/");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("text/html") && page.contains("<title>ferry-edge</title>"),
        "{page}"
    );
    for api in ["/api/link", "/api/field", "/metrics"] {
        assert!(
            page.contains(&format!("fetch(\"{api}\")")),
            "the page reads {api}"
        );
        assert!(
            edge.http_get(api).starts_with("HTTP/1.1 200"),
            "{api} answers"
        );
    }

    // Unplugged: down; back: read again.
    line.unplug();
    wait_for_status(port, "meter", "down");
    let line = Pty::open(&dir, "line");
    wait_for_status(port, "meter", "up");
    line.writer().write_all(b"t=23\n").expect("write");
    let got = messages(&sub.read(1));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "field/meter");
    let doc: Value = serde_json::from_str(&got[0].1).expect("json");
    assert_eq!(doc["t"], json!(23));
    let _ = std::fs::remove_dir_all(&dir);
}

/// One point of a device's map: its TOML, the value its registers hold (encoded by the
/// device script), and the value the edge must publish.
struct MapPoint {
    toml: String,
    device: Value,
    expect: Value,
}

fn map_point(
    name: &str,
    table: &str,
    address: u16,
    kind: &str,
    orders: (&str, &str),
    raw: Value,
    extra: &str,
) -> MapPoint {
    let (byte, word) = orders;
    let toml_kind = kind.split(':').next().unwrap_or(kind);
    let length = kind
        .split_once(':')
        .map(|(_, n)| format!("length = {n}\n"))
        .unwrap_or_default();
    MapPoint {
        toml: format!(
            "[[field.modbus.points]]\nname = \"{name}\"\ntable = \"{table}\"\naddress = {address}\n\
             type = \"{toml_kind}\"\n{length}byte_order = \"{byte}\"\nword_order = \"{word}\"\n{extra}"
        ),
        device: json!([table, address, kind, byte, word, raw]),
        expect: raw,
    }
}

/// The map of the Modbus tests: every type, both orders, every table, scale and offset.
fn plc_map() -> Vec<(&'static str, MapPoint)> {
    let bb = ("big", "big");
    let mut map = vec![
        (
            "pump",
            map_point(
                "pump",
                "coil",
                0,
                "bool",
                bb,
                json!(true),
                "writable = true\n",
            ),
        ),
        (
            "alarm",
            map_point("alarm", "discrete_input", 5, "bool", bb, json!(true), ""),
        ),
        (
            "idle",
            map_point("idle", "discrete_input", 6, "bool", bb, json!(false), ""),
        ),
        (
            "count",
            map_point("count", "holding_register", 0, "u16", bb, json!(65000), ""),
        ),
        (
            "delta",
            map_point("delta", "holding_register", 1, "i16", bb, json!(-1234), ""),
        ),
        (
            "energy",
            map_point(
                "energy",
                "holding_register",
                2,
                "u32",
                bb,
                json!(3_000_000_000u64),
                "",
            ),
        ),
        (
            "energy_lw",
            map_point(
                "energy_lw",
                "holding_register",
                4,
                "u32",
                ("big", "little"),
                json!(3_000_000_001u64),
                "",
            ),
        ),
        (
            "flow",
            map_point(
                "flow",
                "holding_register",
                6,
                "i32",
                ("little", "big"),
                json!(-70_000),
                "",
            ),
        ),
        (
            "hours",
            map_point(
                "hours",
                "holding_register",
                8,
                "u64",
                ("little", "little"),
                json!(u64::MAX - 5),
                "",
            ),
        ),
        (
            "balance",
            map_point(
                "balance",
                "holding_register",
                12,
                "i64",
                ("big", "little"),
                json!(-5_000_000_000i64),
                "",
            ),
        ),
        (
            "level",
            map_point("level", "holding_register", 16, "f32", bb, json!(21.5), ""),
        ),
        (
            "level_ll",
            map_point(
                "level_ll",
                "holding_register",
                18,
                "f32",
                ("little", "little"),
                json!(-0.25),
                "",
            ),
        ),
        (
            "total",
            map_point(
                "total",
                "holding_register",
                20,
                "f64",
                ("big", "little"),
                json!(1234.5678),
                "",
            ),
        ),
        (
            "serial_no",
            map_point(
                "serial_no",
                "holding_register",
                24,
                "string:3",
                bb,
                json!("AB-12"),
                "",
            ),
        ),
        (
            "setpoint",
            map_point(
                "setpoint",
                "holding_register",
                30,
                "u16",
                bb,
                json!(20),
                "writable = true\nmin = 0\nmax = 100\n",
            ),
        ),
    ];
    let mut temp = map_point(
        "temp",
        "input_register",
        0,
        "i16",
        bb,
        json!(215),
        "scale = 0.1\nunit = \"C\"\n",
    );
    temp.expect = json!(21.5);
    map.push(("temp", temp));
    let mut kelvin = map_point(
        "kelvin",
        "input_register",
        1,
        "i16",
        bb,
        json!(-40),
        "offset = 273.15\n",
    );
    kelvin.expect = json!(233.15);
    map.push(("kelvin", kelvin));
    map
}

fn device_points(map: &[(&str, MapPoint)]) -> Value {
    Value::Array(map.iter().map(|(_, p)| p.device.clone()).collect())
}

fn modbus_source(name: &str, at: &str, map: &[(&str, MapPoint)], extra: &str) -> String {
    let points: String = map.iter().map(|(_, p)| p.toml.as_str()).collect();
    format!("[[field.modbus]]\nname = \"{name}\"\n{at}\npoll_ms = 200\ntimeout_ms = 500\nbackoff_max_ms = 500\n{extra}{points}")
}

/// Whether a document has every point of the map with its value (floats to 1e-6).
fn check_document(doc: &Value, map: &[(&str, MapPoint)]) {
    for (name, p) in map {
        let got = &doc[*name];
        match (got.as_f64(), p.expect.as_f64()) {
            (Some(a), Some(b)) if p.expect.is_f64() || got.is_f64() => {
                assert!((a - b).abs() < 1e-6, "{name}: {got} is not {}", p.expect)
            }
            _ => assert_eq!(got, &p.expect, "{name} in {doc}"),
        }
    }
}

/// Modbus TCP against pymodbus: every type and order is read as the device holds it, a
/// point the device does not have is counted and the rest still read; a
/// command (MQTT 5 request/response) writes a holding register and a coil and is answered;
/// writes out of range or of a point that is not writable are refused with the reason; the
/// device stopped is reported down (and nothing is published as fresh), and read again
/// once it is back.
#[test]
fn modbus_tcp_reads_every_type_and_order_and_commands_write_back() {
    let dir = temp_dir("field-modbus");
    let map = plc_map();
    let dev_port = free_tcp_port().to_string();
    let device = Device::start(&["--tcp", &dev_port], &device_points(&map));
    // And a point the device does not have (it holds 1,000 registers): its read is refused
    // with an exception, counted, and the rest of the map is still read.
    let ghost =
        "[[field.modbus.points]]\nname = \"ghost\"\ntable = \"holding_register\"\naddress = 5000\n";
    let edge = edge_with(
        &dir,
        &(modbus_source(
            "plc",
            &format!("address = \"127.0.0.1:{dev_port}\""),
            &map,
            "",
        ) + ghost),
    );
    let port = edge.port();
    wait_for_status(port, "plc", "up");
    let doc = next_json(port, "field/plc");
    assert!(doc.get("ghost").is_none(), "{doc}");
    let plc = source_stats(&edge, "plc");
    assert!(plc["errors"].as_u64() >= Some(1), "{plc}");
    assert!(
        plc["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused a read")),
        "{plc}"
    );
    check_document(&doc, &map);
    assert_eq!(doc["temp_unit"], json!("C"));
    assert!(doc["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000));

    // A request with a response topic and correlation data: answered there, with it.
    let answers = Subscription::open(
        &port.to_string(),
        "answers",
        "answers/#",
        &["-V", "mqttv5", "-F", "%t %p"],
    );
    let out = mosquitto_at(
        "mosquitto_pub",
        &port.to_string(),
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "field/plc/set/setpoint",
            "-m",
            "42",
            "-D",
            "publish",
            "response-topic",
            "answers/1",
            "-D",
            "publish",
            "correlation-data",
            "req-1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(device.next_write(), "WRITE 1 6 30 [42]");
    let got = messages(&answers.read(1));
    assert_eq!(got[0].0, "answers/1");
    let answer: Value = serde_json::from_str(&got[0].1).expect("json");
    assert_eq!(answer["result"], json!("done"), "{answer}");
    assert_eq!(answer["point"], json!("setpoint"));
    // mosquitto_rr waits for the answer with its correlation data.
    let out = mosquitto_at(
        "mosquitto_rr",
        &port.to_string(),
        &[
            "-t",
            "field/plc/set/pump",
            "-e",
            "answers/2",
            "-m",
            "false",
            "-W",
            "30",
        ],
    );
    let answer: Value =
        serde_json::from_slice(&out.stdout).expect("mosquitto_rr prints the answer");
    assert_eq!(answer["result"], json!("done"), "{answer}");
    assert_eq!(device.next_write(), "WRITE 1 5 0 [0]");
    wait_until(30, "the new values are read", || {
        let doc = next_json(port, "field/plc");
        doc["setpoint"] == json!(42) && doc["pump"] == json!(false)
    });

    // Refused, with the reason, on the reply topic (no response topic given); nothing is
    // written.
    let replies = Subscription::open(&port.to_string(), "replies", "field/plc/reply/+", &["-v"]);
    for (point, value) in [
        ("setpoint", "500"),
        ("temp", "20"),
        ("nope", "1"),
        ("setpoint", "\"high\""),
    ] {
        let topic = format!("field/plc/set/{point}");
        let out = mosquitto_at(
            "mosquitto_pub",
            &port.to_string(),
            &["-q", "1", "-t", &topic, "-m", value],
        );
        assert!(out.status.success());
    }
    let got = messages(&replies.read(4));
    assert_eq!(got.len(), 4, "{got:?}");
    for (topic, payload) in &got {
        let answer: Value = serde_json::from_str(payload).expect("json");
        assert_eq!(answer["result"], json!("refused"), "{topic} {answer}");
        assert!(
            answer["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{answer}"
        );
    }
    assert!(
        device
            .writes
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "nothing written"
    );

    // The device goes away: down, and no document meanwhile.
    device.stop();
    wait_for_status(port, "plc", "down");
    assert!(
        next_message(port, "field/plc", 2).is_none(),
        "no reading from a device that is down"
    );
    let errors = edge.http_get("/metrics");
    assert!(
        errors.contains("ferry_edge_field_errors_total{source=\"plc\""),
        "{errors}"
    );
    // Back (with its first values): up, and read again.
    let _device = Device::start(&["--tcp", &dev_port], &device_points(&map));
    wait_for_status(port, "plc", "up");
    check_document(&next_json(port, "field/plc"), &map);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Modbus RTU over a pty pair: two units of one pymodbus device on one line, each polled
/// with its own map and unit id; one point per topic; a write goes to the right unit.
#[test]
fn modbus_rtu_polls_several_units_on_one_line() {
    let dir = temp_dir("field-rtu");
    let bus = Pty::open(&dir, "bus");
    let map: Vec<(&str, MapPoint)> = plc_map()
        .into_iter()
        .filter(|(n, _)| ["count", "flow", "level_ll", "setpoint", "pump"].contains(n))
        .collect();
    let _device = Device::start(
        &["--rtu", bus.a.to_str().expect("utf-8"), "--units", "1,2"],
        &device_points(&map),
    );
    let at = format!(
        "path = \"{}\"\nbaud = 19200\nparity = \"none\"",
        bus.b.display()
    );
    let unit_point =
        "[[field.modbus.points]]\nname = \"unit\"\ntable = \"holding_register\"\naddress = 999\n";
    let edge = edge_with(
        &dir,
        &format!(
            "{}{unit_point}{}{unit_point}",
            modbus_source("rtu1", &at, &map, "unit = 1\npublish = \"points\"\n"),
            modbus_source("rtu2", &at, &map, "unit = 2\npublish = \"both\"\n"),
        ),
    );
    let port = edge.port();
    wait_for_status(port, "rtu1", "up");
    wait_for_status(port, "rtu2", "up");
    assert_eq!(next_json(port, "field/rtu1/unit")["value"], json!(1));
    assert_eq!(next_json(port, "field/rtu2/unit")["value"], json!(2));
    assert_eq!(next_json(port, "field/rtu1/flow")["value"], json!(-70_000));
    let doc = next_json(port, "field/rtu2");
    check_document(&doc, &map);
    assert_eq!(doc["unit"], json!(2));
    let out = mosquitto_at(
        "mosquitto_rr",
        &port.to_string(),
        &[
            "-t",
            "field/rtu2/set/setpoint",
            "-e",
            "answers/rtu",
            "-m",
            "{\"value\": 7}",
            "-W",
            "30",
        ],
    );
    let answer: Value =
        serde_json::from_slice(&out.stdout).expect("mosquitto_rr prints the answer");
    assert_eq!(answer["result"], json!("done"), "{answer}");
    assert_eq!(_device.next_write(), "WRITE 2 6 30 [7]");
    let _ = std::fs::remove_dir_all(&dir);
}

/// End to end: a register read on the edge reaches the cloud's log over the link and is
/// read with kcat; a command sent on the cloud to `$edge/gw-1/field/plc/set/setpoint` goes
/// down the link, writes the register, and the reply comes back up.
#[test]
fn a_register_read_on_the_edge_is_in_the_cloud_log_and_a_cloud_command_writes_it() {
    let map: Vec<(&str, MapPoint)> = plc_map()
        .into_iter()
        .filter(|(n, _)| ["setpoint", "level"].contains(n))
        .collect();
    let dev_port = free_tcp_port().to_string();
    let device = Device::start(&["--tcp", &dev_port], &device_points(&map));
    let field = modbus_source(
        "plc",
        &format!("address = \"127.0.0.1:{dev_port}\""),
        &map,
        "poll_ms = 500\n",
    )
    .replace("poll_ms = 200\n", "");
    let site = Site::with_edge(
        "field-cloud",
        "",
        &format!("[[uplink.route]]\nfilter = \"field/#\"\n{field}"),
    );
    let cloud = site.cloud();
    let _edge = site.edge();
    let kafka = cloud.kafka_addr().expect("a Kafka listener").to_string();
    let mut record = String::new();
    wait_until(120, "a reading of the PLC in the cloud's log", || {
        let out = Command::new("kcat")
            .args([
                "-b",
                &kafka,
                "-C",
                "-t",
                "mqtt",
                "-o",
                "beginning",
                "-e",
                "-q",
                "-f",
                "%k %s\\n",
            ])
            .output()
            .expect("kcat must be installed (apt-get install kcat)");
        record = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("gw-1/field/plc "))
            .unwrap_or_default()
            .to_owned();
        !record.is_empty()
    });
    let doc: Value = serde_json::from_str(&record["gw-1/field/plc ".len()..]).expect("json");
    check_document(&doc, &map);

    let cloud_port = cloud.port().to_string();
    let replies = Subscription::open(&cloud_port, "cloud-app", "gw-1/field/plc/reply/+", &["-v"]);
    let out = mosquitto_at(
        "mosquitto_pub",
        &cloud_port,
        &[
            "-q",
            "1",
            "-t",
            "$edge/gw-1/field/plc/set/setpoint",
            "-m",
            "55",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(device.next_write(), "WRITE 1 6 30 [55]");
    let got = messages(&replies.read(1));
    assert_eq!(got[0].0, "gw-1/field/plc/reply/setpoint");
    let answer: Value = serde_json::from_str(&got[0].1).expect("json");
    assert_eq!(answer["result"], json!("done"), "{answer}");
    assert_eq!(answer["value"], json!(55));
}

/// The `[[field.opcua]]` table of a source reading the test server's nodes, retained: a
/// node that does not change is sent once, when it is subscribed to.
fn opcua_source(name: &str, port: u16, dir: &Path, security: &str) -> String {
    let node = |n: &str, id: &str, extra: &str| {
        format!("[[field.opcua.nodes]]\nname = \"{n}\"\nnode_id = \"ns=2;s={id}\"\nsampling_ms = 100\n{extra}")
    };
    format!(
        "[[field.opcua]]\nname = \"{name}\"\nendpoint = \"opc.tcp://127.0.0.1:{port}/ferry/\"\n\
         pki_dir = \"{}\"\npublishing_ms = 100\nreconnect_ms = 500\nretain = true\n{security}{}{}{}{}{}{}",
        dir.join(format!("pki-{name}")).display(),
        node("temperature", "Temperature", ""),
        node("running", "Running", ""),
        node("label", "Label", ""),
        node("setpoint", "Setpoint", "writable = true\n"),
        node("count", "Count", "writable = true\n"),
        node("missing", "NoSuchNode", ""),
    )
}

/// OPC UA against asyncua's server: with a user and password, a subscription delivers the
/// changes of a moving value in order with their source timestamps and status; every node's
/// value arrives; commands write a Double and an Int32 (answered as MQTT 5 requests), a
/// value of the wrong kind and a node that is not writable are refused; a node the server
/// does not have is counted and the rest still read; the server stopped is reported down
/// and read again once it is back. A second source talks to a server that takes only
/// Basic256Sha256 with SignAndEncrypt.
#[test]
fn opcua_subscriptions_deliver_changes_and_commands_write_nodes() {
    let dir = temp_dir("field-opcua");
    let (port, secure_port) = (free_tcp_port(), free_tcp_port());
    let user = ["--user", "op:secret"];
    let server = Device::script("opcua_server.py", &[&port.to_string(), user[0], user[1]]);
    let certs = dir.join("server-certs");
    let certs = certs.to_str().expect("utf-8");
    let _secure = Device::script(
        "opcua_server.py",
        &[&secure_port.to_string(), "--secure", certs],
    );
    let password = dir.join("opcua-password");
    std::fs::write(&password, "secret\n").expect("write");
    let edge = edge_with(
        &dir,
        &format!(
            "{}{}",
            opcua_source(
                "plant",
                port,
                &dir,
                &format!(
                    "identity = \"user\"\nusername = \"op\"\npassword_file = \"{}\"\n",
                    password.display()
                ),
            ),
            opcua_source(
                "secure",
                secure_port,
                &dir,
                "security_policy = \"basic256sha256\"\nsecurity_mode = \"sign_and_encrypt\"\n\
                 trust_server_certs = true\n",
            ),
        ),
    );
    let port_mqtt = edge.port();
    wait_for_status(port_mqtt, "plant", "up");
    let sub = Subscription::open(
        &port_mqtt.to_string(),
        "opcua-reader",
        "field/plant/temperature",
        &["-v"],
    );
    // The retained last change may come twice (it was published as the subscription began).
    let changes: Vec<Value> = messages(&sub.read(4))
        .iter()
        .map(|(_, p)| serde_json::from_str(p).expect("json"))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let values: Vec<f64> = changes.iter().filter_map(|c| c["value"].as_f64()).collect();
    assert_eq!(values.len(), 4, "{changes:?}");
    assert!(
        values.windows(2).all(|w| w[1] >= w[0]),
        "in order: {values:?}"
    );
    assert!(values[3] > values[0], "changing: {values:?}");
    for c in &changes {
        assert_eq!(c["status"], json!("Good"), "{c}");
        let source = c["source_ts"].as_i64().expect("a source timestamp");
        assert!((now - source).abs() < 60_000, "{c}");
        assert!(c["server_ts"].as_i64().is_some(), "{c}");
    }
    assert_eq!(
        next_json(port_mqtt, "field/plant/running")["value"],
        json!(true)
    );
    assert_eq!(
        next_json(port_mqtt, "field/plant/label")["value"],
        json!("line 1")
    );
    assert_eq!(
        next_json(port_mqtt, "field/plant/setpoint")["value"],
        json!(40.0)
    );
    wait_until(30, "the missing node is counted", || {
        source_stats(&edge, "plant")["errors"].as_u64() >= Some(1)
    });

    let request = |node: &str, value: &str| -> Value {
        let topic = format!("field/plant/set/{node}");
        let out = mosquitto_at(
            "mosquitto_rr",
            &port_mqtt.to_string(),
            &["-t", &topic, "-e", "answers/opcua", "-m", value, "-W", "30"],
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("an answer to {node}={value}: {e} {out:?}"))
    };
    assert_eq!(request("setpoint", "42.5")["result"], json!("done"));
    assert_eq!(server.next_write(), "WRITE Setpoint 42.5");
    assert_eq!(request("count", "99")["result"], json!("done"));
    assert_eq!(server.next_write(), "WRITE Count 99");
    for (node, value) in [
        ("count", "1.5"),
        ("count", "\"many\""),
        ("label", "\"x\""),
        ("nope", "1"),
    ] {
        let answer = request(node, value);
        assert_eq!(
            answer["result"],
            json!("refused"),
            "{node}={value}: {answer}"
        );
    }
    assert!(
        server
            .writes
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "nothing else written"
    );

    // The encrypted session reads too.
    wait_for_status(port_mqtt, "secure", "up");
    assert_eq!(
        next_json(port_mqtt, "field/secure/label")["value"],
        json!("line 1")
    );

    // The server goes away and comes back.
    server.stop();
    wait_for_status(port_mqtt, "plant", "down");
    let _server = Device::script("opcua_server.py", &[&port.to_string(), user[0], user[1]]);
    wait_for_status(port_mqtt, "plant", "up");
    assert_eq!(
        next_json(port_mqtt, "field/plant/label")["value"],
        json!("line 1")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A write needs the ACL's leave: a user who may only read the field topics publishes a
/// command and nothing is written (the broker refuses the publish); a user who may write
/// them does.
#[test]
fn a_command_the_acl_does_not_allow_is_not_written() {
    let dir = temp_dir("field-acl");
    let passwd = dir.join("passwd");
    for (i, user) in ["operator", "viewer"].iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd
            .arg("-b")
            .arg(&passwd)
            .args([user, "pw"])
            .status()
            .expect("mosquitto_passwd must be installed (apt-get install mosquitto)");
        assert!(status.success());
    }
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        "user ferry-field\ntopic write field/#\ntopic read field/+/set/+\n\
         user operator\ntopic readwrite field/#\n\
         user viewer\ntopic read field/#\n",
    )
    .expect("write the ACL");
    let map: Vec<(&str, MapPoint)> = plc_map()
        .into_iter()
        .filter(|(n, _)| *n == "setpoint")
        .collect();
    let dev_port = free_tcp_port().to_string();
    let device = Device::start(&["--tcp", &dev_port], &device_points(&map));
    let edge = edge_with(
        &dir,
        &format!(
            "[auth]\npassword_file = \"{}\"\nacl_file = \"{}\"\n{}",
            passwd.display(),
            acl.display(),
            modbus_source(
                "plc",
                &format!("address = \"127.0.0.1:{dev_port}\""),
                &map,
                ""
            ),
        ),
    );
    let port = edge.port().to_string();
    let set = |user: &str, value: &str| {
        mosquitto_at(
            "mosquitto_pub",
            &port,
            &[
                "-V",
                "mqttv5",
                "-u",
                user,
                "-P",
                "pw",
                "-q",
                "1",
                "-t",
                "field/plc/set/setpoint",
                "-m",
                value,
            ],
        )
    };
    // The viewer reads the readings (the field user may publish them)...
    let out = mosquitto_at(
        "mosquitto_sub",
        &port,
        &[
            "-u",
            "viewer",
            "-P",
            "pw",
            "-t",
            "field/plc",
            "-C",
            "1",
            "-W",
            "30",
        ],
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("a reading for the viewer");
    assert_eq!(doc["setpoint"], json!(20));
    // ...but its command is refused by the broker and never written.
    let out = set("viewer", "55");
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("authoriz"),
        "the broker refuses the viewer's command: {out:?}"
    );
    assert!(
        device.writes.recv_timeout(Duration::from_secs(2)).is_err(),
        "the viewer's command is not written"
    );
    let out = set("operator", "56");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(device.next_write(), "WRITE 1 6 30 [56]");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP reads `[field]` again: a source added starts, one removed stops, and an MQTT
/// client that was connected all along keeps its connection (one CONNACK, no disconnect)
/// and receives from the new source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_the_field_sources_and_keeps_mqtt_clients() {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let dir = temp_dir("field-reload");
    let map: Vec<(&str, MapPoint)> = plc_map()
        .into_iter()
        .filter(|(n, _)| *n == "count")
        .collect();
    let dev_port = free_tcp_port().to_string();
    let _device = Device::start(&["--tcp", &dev_port], &device_points(&map));
    let at = format!("address = \"127.0.0.1:{dev_port}\"");
    let edge = edge_with(&dir, &modbus_source("old", &at, &map, ""));
    wait_for_status(edge.port(), "old", "up");
    let (watcher, mut events) =
        AsyncClient::new(MqttOptions::new("watcher", "127.0.0.1", edge.port()), 10);
    watcher
        .subscribe("field/+", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (mut connacks, mut suback) = (0, false);
    while !suback {
        match ferry_tests::clients::next_incoming(&mut events, "the watcher's SUBACK").await {
            Incoming::ConnAck(_) => connacks += 1,
            Incoming::SubAck(_) => suback = true,
            _ => {}
        }
    }
    let config = dir.join("edge.toml");
    let text = std::fs::read_to_string(&config).expect("the configuration");
    std::fs::write(&config, text.replace("name = \"old\"", "name = \"new\"")).expect("write");
    edge.reload_and_wait_for("SIGHUP: field sources reloaded");
    let reading = loop {
        match tokio::time::timeout(Duration::from_secs(60), events.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) if p.topic == "field/new" => break p,
            Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => connacks += 1,
            Ok(Ok(Event::Incoming(Incoming::Disconnect))) | Ok(Err(_)) => {
                panic!("the watcher lost its connection in the reload")
            }
            Ok(Ok(_)) => {}
            Err(_) => panic!("no reading of the new source within 60 s"),
        }
    };
    assert_eq!(connacks, 1, "the watcher connected once");
    let doc: Value = serde_json::from_slice(&reading.payload).expect("json");
    assert_eq!(doc["count"], json!(65000));
    let response = edge.http_get("/api/field");
    assert!(
        response.contains("\"name\":\"new\"") && !response.contains("\"name\":\"old\""),
        "{response}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A line that floods is held to `max_per_sec` (the rest dropped and counted) and never
/// holds up the broker: a client's round trip goes through meanwhile.
#[test]
fn a_flooding_line_is_held_to_its_rate_and_the_broker_still_serves() {
    let dir = temp_dir("field-flood");
    let line = Pty::open(&dir, "flood");
    let edge = edge_with(
        &dir,
        &format!(
            "[[field.serial]]\nname = \"flood\"\npath = \"{}\"\nmax_per_sec = 50\nqos = 0\n",
            line.b.display()
        ),
    );
    let port = edge.port();
    wait_for_status(port, "flood", "up");
    let mut w = line.writer();
    let writer = std::thread::spawn(move || {
        let burst = "garbage garbage garbage\n".repeat(1000);
        for _ in 0..50 {
            if w.write_all(burst.as_bytes()).is_err() {
                return;
            }
        }
    });
    let out = mosquitto_at(
        "mosquitto_rr",
        &port.to_string(),
        &["-t", "ping", "-e", "ping", "-m", "pong", "-W", "30"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pong",
        "{out:?}"
    );
    writer.join().expect("the writer ends");
    wait_until(30, "most of the flood is dropped and counted", || {
        source_stats(&edge, "flood")["dropped"].as_u64() > Some(40_000)
    });
    let stats = source_stats(&edge, "flood");
    let published = stats["published"].as_u64().unwrap_or(0);
    // 50,000 lines in a few seconds at 50 a second (a second's worth at once, then 50 a second).
    assert!(published < 1_000, "{stats}");
    let _ = std::fs::remove_dir_all(&dir);
}
