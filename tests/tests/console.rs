//! The cloud's admin listener as the console uses it, end to end with curl: users and
//! roles from a `mosquitto_passwd` file, sessions and their CSRF token, HTTP Basic for
//! scripts, the actions (deny and allow an edge, a command down to it) and who may take
//! them, TLS, and a listener open to the network without users refused at start.

use std::path::Path;
use std::process::Command;

use ferry_tests::process::{
    binary, mosquitto_pub_lines, python_client, temp_dir, wait_until, Subscription,
};
use ferry_tests::site::Site;

/// curl's answer: the status code and the body. `args` are curl's; the URL is last.
fn curl(args: &[&str]) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("a status line");
    let code = code.trim().parse().unwrap_or(0);
    (
        code,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A password file with `ops` (password `ops-pw`) and `noc` (`noc-pw`), by mosquitto_passwd.
fn password_file(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("admin.passwd");
    std::fs::write(&file, "").expect("write");
    for (user, pw) in [("ops", "ops-pw"), ("noc", "noc-pw")] {
        let ok = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg(&file)
            .args([user, pw])
            .status()
            .expect("mosquitto_passwd runs (apt-get install mosquitto)");
        assert!(ok.success());
    }
    file
}

/// The site's cloud `[admin]` with the users of [`password_file`], `ops` an admin and
/// `noc` a viewer, and `more` after them (a `[admin.tls]` table).
fn with_users(site: &Site, more: &str) {
    let passwd = password_file(&site.dir);
    let users = format!(
        "password_file = \"{}\"\nadmins = [\"ops\"]\nviewers = [\"noc\"]\n{more}",
        passwd.display()
    );
    let text = std::fs::read_to_string(&site.cloud_config).expect("read");
    let text = text.replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n{users}\n"),
        1,
    );
    std::fs::write(&site.cloud_config, text).expect("write");
}

fn login(base: &str, jar: &Path, user: &str, password: &str) -> (u16, serde_json::Value) {
    let body = format!("{{\"username\":\"{user}\",\"password\":\"{password}\"}}");
    curl(&[
        "-c",
        jar.to_str().expect("utf8"),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &format!("{base}/api/login"),
    ])
}

/// A POST with the session in `jar` and `csrf` (none: no header).
fn post(
    base: &str,
    jar: &Path,
    csrf: Option<&str>,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let header = format!("X-Ferry-CSRF: {}", csrf.unwrap_or_default());
    let mut args = vec!["-b", jar.to_str().expect("utf8"), "-d", body];
    if csrf.is_some() {
        args.extend(["-H", &header]);
    }
    let url = format!("{base}{path}");
    args.push(&url);
    curl(&args)
}

#[test]
fn roles_sessions_csrf_and_the_actions_on_an_edge() {
    let site = Site::new("console-auth", "status_secs = 1");
    with_users(&site, "");
    let cloud = site.cloud();
    let edge = site.edge();
    let base = format!("http://{}", cloud.admin_addr().expect("admin listener"));
    let fleet = |auth: &str| curl(&["-u", auth, &format!("{base}/api/fleet/gw-1")]);
    wait_until(60, "the edge is linked", || {
        fleet("noc:noc-pw").1["state"] == "linked"
    });

    // Nobody, a wrong password, a user without a role: nothing. The health check is open.
    assert_eq!(curl(&[&format!("{base}/api/fleet")]).0, 401);
    assert_eq!(fleet("noc:wrong").0, 401);
    assert_eq!(curl(&[&format!("{base}/api/health")]).1["status"], "ok");
    // The page is served to everyone (it asks for a login); it holds no data.
    let page = Command::new("curl")
        .args(["-s", &format!("{base}/")])
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&page.stdout).contains("<html"));

    // The viewer looks, and may not act, with its session and token or without.
    let noc = site.dir.join("noc.jar");
    let (code, who) = login(&base, &noc, "noc", "noc-pw");
    assert_eq!(
        (code, &who["role"]),
        (200, &serde_json::json!("viewer")),
        "{who}"
    );
    let jar = std::fs::read_to_string(&noc).expect("cookie jar");
    assert!(
        jar.contains("#HttpOnly_") && jar.contains("ferry_session"),
        "{jar}"
    );
    let noc_csrf = who["csrf"].as_str().expect("a token").to_owned();
    let (code, session) = curl(&[
        "-b",
        noc.to_str().expect("utf8"),
        &format!("{base}/api/session"),
    ]);
    assert_eq!((code, &session["user"]), (200, &serde_json::json!("noc")));
    assert_eq!(
        post(&base, &noc, Some(&noc_csrf), "/api/fleet/gw-1/deny", "").0,
        403
    );

    // The admin: without the CSRF token refused, with it the edge is denied and its link
    // closed; allowed again, it links again.
    let ops = site.dir.join("ops.jar");
    let (code, who) = login(&base, &ops, "ops", "ops-pw");
    assert_eq!(
        (code, &who["role"]),
        (200, &serde_json::json!("admin")),
        "{who}"
    );
    let csrf = who["csrf"].as_str().expect("a token").to_owned();
    assert_eq!(post(&base, &ops, None, "/api/fleet/gw-1/deny", "").0, 403);
    assert_eq!(
        post(&base, &ops, Some("forged"), "/api/fleet/gw-1/deny", "").0,
        403
    );
    let (code, done) = post(&base, &ops, Some(&csrf), "/api/fleet/gw-1/deny", "");
    assert_eq!(
        (code, &done["denied"]),
        (200, &serde_json::json!(true)),
        "{done}"
    );
    wait_until(30, "the denied edge's link is closed", || {
        fleet("noc:noc-pw").1["state"] == "denied"
    });
    let deny_file = std::fs::read_to_string(site.dir.join("deny.txt")).expect("the deny file");
    assert_eq!(deny_file.trim(), "gw-1");
    // A command for the denied edge waits in its downlink; a subscriber on the edge gets it
    // once the edge is allowed back.
    let sub = Command::new("mosquitto_sub")
        .args([
            "-p",
            &edge.port().to_string(),
            "-t",
            "valve/set",
            "-C",
            "1",
            "-W",
            "90",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub runs");
    let (code, sent) = post(
        &base,
        &ops,
        Some(&csrf),
        "/api/fleet/gw-1/command",
        r#"{"topic":"valve/set","payload":"open","qos":1}"#,
    );
    assert_eq!(code, 200, "{sent}");
    let e = fleet("noc:noc-pw").1;
    assert_eq!(e["downlink"]["waiting"], 1, "{e}");
    assert_eq!(e["downlink"]["complete"], true, "{e}");
    let (code, _) = post(&base, &ops, Some(&csrf), "/api/fleet/gw-1/allow", "");
    assert_eq!(code, 200);
    wait_until(60, "the allowed edge links again", || {
        fleet("noc:noc-pw").1["state"] == "linked"
    });
    assert!(std::fs::read_to_string(site.dir.join("deny.txt"))
        .expect("the deny file")
        .trim()
        .is_empty());

    let got = sub.wait_with_output().expect("mosquitto_sub ends");
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "open");
    wait_until(30, "nothing waits in its downlink", || {
        let e = fleet("noc:noc-pw").1;
        e["downlink"]["waiting"] == 0 && e["downlink"]["acked_seq"].as_i64() >= sent["seq"].as_i64()
    });
    let (code, _) = post(
        &base,
        &ops,
        Some(&csrf),
        "/api/fleet/gw-9/command",
        r#"{"topic":"x"}"#,
    );
    assert_eq!(code, 404, "an unknown edge");
    let (code, _) = post(
        &base,
        &ops,
        Some(&csrf),
        "/api/fleet/gw-1/command",
        r#"{"topic":"a/#"}"#,
    );
    assert_eq!(code, 400, "a wildcard is no topic name");

    // A script acts with HTTP Basic; from a browser (an Origin) that is refused.
    let url = format!("{base}/api/fleet/gw-1/allow");
    assert_eq!(curl(&["-u", "ops:ops-pw", "-X", "POST", &url]).0, 200);
    assert_eq!(
        curl(&[
            "-u",
            "ops:ops-pw",
            "-H",
            "Origin: http://evil.example",
            "-X",
            "POST",
            &url
        ])
        .0,
        403
    );
    assert_eq!(curl(&["-u", "noc:noc-pw", "-X", "POST", &url]).0, 403);

    // Logged out, the session is gone.
    assert_eq!(post(&base, &ops, Some(&csrf), "/api/logout", "").0, 200);
    let jar = ops.to_str().expect("utf8");
    let (code, session) = curl(&["-b", jar, &format!("{base}/api/session")]);
    assert_eq!(
        (code, &session["user"]),
        (200, &serde_json::Value::Null),
        "{session}"
    );
    assert_eq!(curl(&["-b", jar, &format!("{base}/api/fleet")]).0, 401);
    drop(edge);
    assert!(cloud.terminate().success());
}

#[test]
fn https_with_the_nodes_certificate_and_an_open_listener_on_the_network_refused() {
    let site = Site::new("console-tls", "");
    let pki = site.dir.join("pki");
    with_users(
        &site,
        &format!(
            "[admin.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"",
            pki.join("nodes/localhost.crt").display(),
            pki.join("nodes/localhost.key").display(),
        ),
    );
    let cloud = site.cloud();
    let port = cloud.admin_addr().expect("admin listener").port();
    let base = format!("https://localhost:{port}");
    let ca = pki.join("ca.crt");
    let jar = site.dir.join("tls.jar");
    let (code, who) = curl(&[
        "--cacert",
        ca.to_str().expect("utf8"),
        "-c",
        jar.to_str().expect("utf8"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"username":"noc","password":"noc-pw"}"#,
        &format!("{base}/api/login"),
    ]);
    assert_eq!(
        (code, &who["role"]),
        (200, &serde_json::json!("viewer")),
        "{who}"
    );
    // Over TLS the cookie is Secure (curl's jar marks it TRUE in its fourth field).
    let jar = std::fs::read_to_string(&jar).expect("jar");
    let line = jar
        .lines()
        .find(|l| l.contains("ferry_session"))
        .expect("the cookie");
    assert_eq!(line.split('\t').nth(3), Some("TRUE"), "{line}");
    // Plain HTTP to it is no answer.
    assert_eq!(curl(&[&format!("http://localhost:{port}/api/health")]).0, 0);
    assert!(cloud.terminate().success());

    // No users, on every address: refused at start, saying why.
    let dir = temp_dir("console-open");
    let config = dir.join("cloud.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"0.0.0.0:0\"\n",
    )
    .expect("write");
    let out = Command::new(binary("ferry-cloud", "ferry-cloud"))
        .args(["--config", config.to_str().expect("utf8"), "--data-dir"])
        .arg(dir.join("data"))
        .output()
        .expect("ferry-cloud runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no users"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Records produced with kcat.
fn produce(kafka: std::net::SocketAddr, topic: &str, n: usize) {
    let mut kcat = Command::new("kcat")
        .args(["-P", "-b", &kafka.to_string(), "-t", topic])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("kcat runs");
    let lines: String = (0..n).map(|i| format!("r{i}\n")).collect();
    std::io::Write::write_all(kcat.stdin.as_mut().expect("stdin"), lines.as_bytes())
        .expect("write");
    drop(kcat.stdin.take());
    assert!(kcat.wait().expect("kcat ends").success());
}

/// The offsets a group member of confluent-kafka read (it commits and leaves).
fn consume(kafka: std::net::SocketAddr, topic: &str, group: &str, n: usize) -> Vec<i64> {
    let bootstrap = kafka.to_string();
    let out = python_client(
        "kafka_consume.py",
        &[&bootstrap, topic, group, &n.to_string()],
    );
    out.lines()
        .filter(|l| *l != "OK")
        .map(|l| l.parse().expect("an offset"))
        .collect()
}

/// A Kafka group's lag as confluent-kafka leaves it, then moved back to the start by an
/// admin and read again from there; a viewer may not, nor a group that has members.
#[test]
fn consumers_show_a_groups_lag_and_an_admin_resets_it() {
    let site = Site::new("console-consumers", "");
    with_users(&site, "");
    let cloud = site.cloud();
    let base = format!("http://{}", cloud.admin_addr().expect("admin listener"));
    let kafka = cloud.kafka_addr().expect("kafka listener");
    produce(kafka, "meters", 10);
    assert_eq!(
        consume(kafka, "meters", "billing", 10),
        (0..10).collect::<Vec<_>>()
    );
    produce(kafka, "meters", 5);
    let group = |doc: &serde_json::Value| {
        doc["kafka_groups"]
            .as_array()
            .and_then(|g| g.iter().find(|x| x["group"] == "billing").cloned())
            .unwrap_or_default()
    };
    let (code, doc) = curl(&["-u", "noc:noc-pw", &format!("{base}/api/consumers")]);
    assert_eq!(code, 200, "{doc}");
    let billing = group(&doc);
    assert_eq!(billing["lag"], 5, "{doc}");
    assert_eq!(billing["partitions"][0]["committed"], 10, "{doc}");
    assert_eq!(billing["partitions"][0]["high_watermark"], 15, "{doc}");
    assert_eq!(billing["members"], 0, "{doc}");

    let url = format!("{base}/api/consumers/kafka/billing/reset");
    let reset =
        |auth: &str, to: &str| curl(&["-u", auth, "-d", &format!("{{\"to\":\"{to}\"}}"), &url]);
    assert_eq!(reset("noc:noc-pw", "earliest").0, 403, "a viewer may not");
    assert_eq!(reset("ops:ops-pw", "sideways").0, 400);
    let (code, done) = reset("ops:ops-pw", "earliest");
    assert_eq!(code, 200, "{done}");
    assert_eq!(done["partitions"][0]["committed"], 0, "{done}");
    let (_, doc) = curl(&["-u", "noc:noc-pw", &format!("{base}/api/consumers")]);
    assert_eq!(group(&doc)["lag"], 15, "{doc}");
    // The group reads from the start again.
    assert_eq!(
        consume(kafka, "meters", "billing", 15),
        (0..15).collect::<Vec<_>>()
    );
    let (code, done) = reset("ops:ops-pw", "latest");
    assert_eq!(
        (code, &done["partitions"][0]["committed"]),
        (200, &serde_json::json!(15))
    );
    let missing = format!("{base}/api/consumers/kafka/nobody/reset");
    let (code, _) = curl(&["-u", "ops:ops-pw", "-d", r#"{"to":"earliest"}"#, &missing]);
    assert_eq!(code, 404, "a group without offsets");

    // An MQTT persistent session away while three messages come: its lag is what the
    // broker holds for it, and falls to nothing once it is back and has read them.
    let port = cloud.port().to_string();
    let fridge = Subscription::open(&port, "fridge", "kitchen/#", &["-V", "mqttv311"]);
    let out = mosquitto_pub_lines(&port, &["-q", "1", "-t", "kitchen/temp"], "4\n5\n6\n");
    assert!(out.status.success(), "{out:?}");
    let session = |doc: &serde_json::Value| {
        doc["mqtt_sessions"]
            .as_array()
            .and_then(|s| s.iter().find(|x| x["client_id"] == "fridge").cloned())
            .unwrap_or_default()
    };
    let mut doc = serde_json::Value::Null;
    wait_until(30, "the session's three messages are held for it", || {
        doc = curl(&["-u", "noc:noc-pw", &format!("{base}/api/consumers")]).1;
        session(&doc)["lag"] == 3
    });
    let away = session(&doc);
    assert_eq!(
        (&away["connected"], &away["queued"], &away["subscriptions"]),
        (&false.into(), &3.into(), &1.into()),
        "{doc}"
    );
    assert!(away["held_bytes"].as_u64() > Some(0), "{doc}");
    assert!(away["offline_secs"].is_u64(), "{doc}");
    let read = fridge.read(3);
    assert_eq!(String::from_utf8_lossy(&read.stdout), "4\n5\n6\n");
    wait_until(30, "the session holds nothing once read", || {
        let doc = curl(&["-u", "noc:noc-pw", &format!("{base}/api/consumers")]).1;
        session(&doc)["lag"] == 0 && session(&doc)["connected"] == false
    });
    assert!(cloud.terminate().success());
}

/// A second edge, `gw-2`, of `site`, linked straight to the cloud (not through a proxy).
fn second_edge(site: &Site) -> ferry_tests::process::Edge {
    let pki = site.dir.join("pki");
    let out = Command::new(binary("ferry-cloud", "ferry-cloud"))
        .args(["pki", "issue-edge", "gw-2", "--dir"])
        .arg(&pki)
        .output()
        .expect("ferry-cloud pki runs");
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&site.edge_config).expect("read");
    let cloud = text
        .lines()
        .find(|l| l.starts_with("cloud = "))
        .expect("the cloud's address")
        .to_owned();
    let text = text
        .replace("gw-1.", "gw-2.")
        .replace(&cloud, &format!("cloud = \"127.0.0.1:{}\"", site.link_port));
    let config = site.dir.join("edge2.toml");
    std::fs::write(&config, text).expect("write");
    ferry_tests::process::Edge::start_in(
        &site.dir.join("edge2"),
        &["--config", config.to_str().expect("utf8")],
    )
}

/// The console in headless Chromium (selenium): a cloud and two edges, gw-1 cut off while
/// its sensor publishes: offline with a growing estimated backlog, then back with its
/// backlog falling to zero; a viewer may not act, an admin denies and allows gw-2; the data
/// tab; a phone-sized window; no console errors. Screenshots go to `$FERRY_SCREENSHOTS`
/// (docs/screenshots for the README) or a temporary directory. Then the page with 1,000
/// edges, timed (printed, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_through_a_cut_and_with_a_thousand_edges() {
    use std::io::{BufRead, Write};
    use std::sync::atomic::Ordering;
    let (site, proxy) = Site::behind_proxy("console-browser", "status_secs = 1", 0, 1).await;
    with_users(&site, "");
    let cloud = site.cloud();
    let edge = site.edge();
    let _edge2 = second_edge(&site);
    let sensor = ferry_tests::clients::Sensor::start(edge.port());
    let shots = std::env::var("FERRY_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| site.dir.join("shots"));
    std::fs::create_dir_all(&shots).expect("screenshots dir");
    let base = format!("http://{}", cloud.admin_addr().expect("admin listener"));
    let script = format!("{}/clients/console_browser.py", env!("CARGO_MANIFEST_DIR"));
    let mut browser = Command::new("python3")
        .args([&script, "fleet", &base, shots.to_str().expect("utf8")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test.sh installs selenium, chromium and chromium-driver)");
    let mut to_browser = browser.stdin.take().expect("stdin");
    let from_browser = std::io::BufReader::new(browser.stdout.take().expect("stdout"));
    let control = proxy.control.clone();
    let said = tokio::task::spawn_blocking(move || {
        let mut said = Vec::new();
        for line in from_browser.lines() {
            let line = line.expect("a line");
            eprintln!("browser: {line}");
            match line.as_str() {
                "STEP cut" => control.cut.store(true, Ordering::Relaxed),
                "STEP restore" => control.cut.store(false, Ordering::Relaxed),
                _ => {}
            }
            if line.starts_with("STEP ") {
                writeln!(to_browser, "go").expect("the browser reads");
            }
            said.push(line);
        }
        said
    })
    .await
    .expect("the browser's output");
    let status = browser.wait().expect("the browser script ends");
    sensor.stop().await;
    assert!(
        status.success() && said.last().map(String::as_str) == Some("OK"),
        "{}",
        said.join("\n")
    );
    for shot in [
        "console-fleet.png",
        "console-offline.png",
        "console-edge.png",
        "console-phone.png",
    ] {
        let len = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot}: {len} bytes");
    }

    // ferry-edge's status page, for the technician on site.
    let status = format!("http://{}/", edge.metrics_addr().expect("metrics listener"));
    python_client(
        "console_browser.py",
        &["edge", &status, shots.to_str().expect("utf8")],
    );

    // The page, saved from the cloud, drawing 1,000 edges.
    let page = site.dir.join("console.html");
    let ok = Command::new("curl")
        .args([
            "-s",
            "-o",
            page.to_str().expect("utf8"),
            &format!("{base}/"),
        ])
        .status()
        .expect("curl");
    assert!(ok.success());
    let out = python_client(
        "console_browser.py",
        &["thousand", page.to_str().expect("utf8")],
    );
    eprintln!("{out}");
    assert!(out.contains("1,000 edges drawn"), "{out}");
    drop(edge);
    assert!(cloud.terminate().success());
}
