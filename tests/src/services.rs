//! The real services `scripts/test.sh` starts for the object backend (`scripts/services.sh`):
//! where they are, and a `[log.object]` on them.

use ferry_cloud::log::{object_testing, ObjectConfig, S3Config};

/// The environment variable `name`, which `scripts/test.sh` sets; panics with what to do when
/// it is not set (the object backend's tests fail rather than skip without their services).
pub fn need(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/test.sh (it starts PostgreSQL and SeaweedFS)")
    })
}

/// `[log.object]` on the S3 server (SeaweedFS) and PostgreSQL of `scripts/test.sh`, under a
/// key prefix and in a database of `test`'s own; flushes every 10 ms.
pub fn object_config(test: &str) -> ObjectConfig {
    let prefix = format!(
        "{test}-{}-{}",
        std::process::id(),
        ferry_cloud::log::now_ms()
    );
    ObjectConfig {
        object_url: format!("s3://{}/{prefix}", need("FERRY_TEST_S3_BUCKET")),
        postgres_url: object_testing::database(test),
        flush_ms: 10,
        s3: S3Config {
            endpoint: Some(need("FERRY_TEST_S3_ENDPOINT")),
            region: Some("us-east-1".into()),
            access_key_id: Some(need("FERRY_TEST_S3_KEY")),
            secret_access_key: Some(need("FERRY_TEST_S3_SECRET")),
            allow_http: true,
        },
        ..ObjectConfig::default()
    }
}

/// True when the end-to-end suites are to run on the object backend: `FERRY_TEST_BACKEND`
/// is `object` (`scripts/test.sh` runs the link and Kafka suites once more so). Then every
/// ferry-cloud started by [`crate::process::Edge::cloud_in`] gets `[log] backend = "object"`
/// on the services of `scripts/test.sh`, and [`crate::log::records`] reads it back there.
pub fn on_object_backend() -> bool {
    std::env::var("FERRY_TEST_BACKEND").is_ok_and(|b| b == "object")
}

/// Where a node's object backend settings are kept beside its data directory, for the
/// node's restarts and for [`crate::log::records`].
pub fn object_config_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("object-backend.toml")
}

/// The `[log]` tables of the object backend for the node in `data_dir`: a database and a key
/// prefix named after the directory, the same on every start of the node (kept, not made
/// again), so a restarted node finds its log.
pub fn object_log_toml(data_dir: &std::path::Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    let name = format!("n{:016x}", h.finish());
    format!(
        "[log.object]\nobject_url = \"s3://{}/{name}\"\npostgres_url = {:?}\nflush_ms = 10\n\
         [log.object.s3]\nendpoint = {:?}\nregion = \"us-east-1\"\naccess_key_id = {:?}\n\
         secret_access_key = {:?}\nallow_http = true\n",
        need("FERRY_TEST_S3_BUCKET"),
        object_testing::database_kept(&name),
        need("FERRY_TEST_S3_ENDPOINT"),
        need("FERRY_TEST_S3_KEY"),
        need("FERRY_TEST_S3_SECRET"),
    )
}

/// `config` (a ferry-cloud config's text) on the object backend: `backend = "object"` in its
/// `[log]` table (added if it has none) and the tables of [`object_log_toml`]. A config that
/// already names a backend is left as it is.
pub fn on_object(config: &str, data_dir: &std::path::Path) -> String {
    if config
        .lines()
        .any(|l| l.trim_start().starts_with("backend"))
    {
        return config.to_owned();
    }
    let mut out = String::new();
    let mut has_log = false;
    for line in config.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim() == "[log]" {
            out.push_str("backend = \"object\"\n");
            has_log = true;
        }
    }
    if !has_log {
        out.push_str("[log]\nbackend = \"object\"\n");
    }
    out.push_str(&object_log_toml(data_dir));
    out
}

/// Writes `text` as the config at `path` of the ferry-cloud started with it in `data_dir`
/// (by [`crate::process::Edge::cloud_in`]), for a SIGHUP to read: on the object backend
/// also the rewritten copy the node really reads ([`object_config_file`]).
pub fn write_cloud_config(path: &std::path::Path, data_dir: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write the config");
    if on_object_backend() {
        std::fs::write(object_config_file(data_dir), on_object(text, data_dir))
            .expect("write the object backend's config");
    }
}

/// A node about to start in the test's process (`config`, its data directory set) on the
/// object backend when [`on_object_backend`], as [`crate::process::Edge::cloud_in`] does for
/// a process: the `[log]` tables of [`object_log_toml`], also written beside the data
/// directory for [`crate::log::records`]. Otherwise `config` is left as it is.
pub fn in_process(config: &mut ferry_cloud::config::CloudConfig) {
    if !on_object_backend() {
        return;
    }
    let dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&dir).expect("data dir");
    let text = on_object("", &dir);
    std::fs::write(object_config_file(&dir), &text).expect("write");
    let parsed: ferry_cloud::config::CloudConfig =
        toml::from_str(&text).expect("the object backend's config");
    config.log.backend = parsed.log.backend;
    config.log.object = parsed.log.object;
}

/// A PostgreSQL server of the test's own (Debian's `postgresql` 15, as `scripts/services.sh`
/// starts it), which the test can stop as a crash does and start again. Removed on drop.
#[derive(Debug)]
pub struct OwnPostgres {
    dir: std::path::PathBuf,
    port: u16,
}

/// Where Debian's `postgresql` package puts the server's programs.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Runs `program` (under [`PG_BIN`]) with `args`, as the `postgres` user when the test runs
/// as root (PostgreSQL refuses to run as root); panics with its output when it fails.
fn pg_tool(program: &str, args: &[&str]) {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let path = format!("{PG_BIN}/{program}");
    let mut cmd = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        std::process::Command::new(&path)
    };
    let out = cmd
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{path}: {e} (scripts/services.sh installs postgresql)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OwnPostgres {
    /// `initdb` into a new directory and the server started on a free port.
    pub fn start() -> Self {
        let dir = crate::process::temp_dir("postgres");
        let data = dir.join("data");
        // The data directory belongs to the user the server runs as.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "chmod 755 {0} && if [ \"$(id -u)\" -eq 0 ]; then install -d -o postgres -g \
                 postgres -m 700 {1}; else install -d -m 700 {1}; fi",
                dir.display(),
                data.display()
            ))
            .status()
            .expect("sh");
        assert!(status.success(), "make PostgreSQL's data directory");
        pg_tool(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "ferry",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        );
        let pg = Self {
            dir,
            port: crate::process::free_tcp_port(),
        };
        pg.start_again();
        pg
    }

    /// A libpq connection string to its `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=ferry dbname=postgres",
            self.port
        )
    }

    /// Stops the server the way a crash does (`pg_ctl -m immediate`: no checkpoint, every
    /// connection cut); [`OwnPostgres::start_again`] recovers it from its WAL.
    pub fn stop_immediate(&self) {
        let data = self.dir.join("data");
        pg_tool(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// Starts the server (again) on its port; returns once it takes connections.
    pub fn start_again(&self) {
        let data = self.dir.join("data");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            data.display()
        );
        pg_tool(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &data.join("server.log").to_string_lossy(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "p={PG_BIN}/pg_ctl; if [ \"$(id -u)\" -eq 0 ]; then runuser -u postgres -- $p \
                 -D {0} -m immediate -w stop; else $p -D {0} -m immediate -w stop; fi",
                data.display()
            ))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A SeaweedFS S3 server of the test's own (`weed mini`, as `scripts/services.sh` starts
/// it), with bucket `ferry-test`, which the test can kill and start again on the same
/// directory and ports. Killed and removed on drop.
#[derive(Debug)]
pub struct OwnSeaweedFs {
    dir: std::path::PathBuf,
    /// master, volume, filer, S3 (each with its gRPC port), admin (and its gRPC port).
    ports: [u16; 10],
    child: std::sync::Mutex<Option<std::process::Child>>,
}

impl OwnSeaweedFs {
    /// A new directory, free ports, and the server started.
    pub fn start() -> Self {
        let s3 = Self {
            dir: crate::process::temp_dir("seaweedfs"),
            ports: std::array::from_fn(|_| crate::process::free_tcp_port()),
            child: std::sync::Mutex::new(None),
        };
        s3.start_again();
        s3
    }

    /// `http://127.0.0.1:<port>` of its S3 API (path-style, keys `ferrytestkey` /
    /// `ferrytestsecret`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[6])
    }

    /// `[log.object]` under `prefix` of its bucket, with PostgreSQL at `postgres_url`;
    /// flushes every 10 ms.
    pub fn object_config(&self, prefix: &str, postgres_url: String) -> ObjectConfig {
        ObjectConfig {
            object_url: format!("s3://ferry-test/{prefix}"),
            postgres_url,
            flush_ms: 10,
            s3: S3Config {
                endpoint: Some(self.endpoint()),
                region: Some("us-east-1".into()),
                access_key_id: Some("ferrytestkey".into()),
                secret_access_key: Some("ferrytestsecret".into()),
                allow_http: true,
            },
            ..ObjectConfig::default()
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server (again) on its directory and ports; returns once its S3 API answers
    /// `/healthz`.
    pub fn start_again(&self) {
        let weed = std::env::var("FERRY_TEST_WEED").unwrap_or_else(|_| {
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('scripts'))",
                ])
                .output()
                .expect("python3");
            format!("{}/weed", String::from_utf8_lossy(&out.stdout).trim())
        });
        let p = self.ports;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("weed.log"))
            .expect("weed.log");
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).expect("SeaweedFS's directory");
        let child = std::process::Command::new(&weed)
            .args([
                "mini".to_owned(),
                format!("-dir={}", data.display()),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                "-master.telemetry=false".into(),
                format!("-master.port={}", p[0]),
                format!("-master.port.grpc={}", p[1]),
                format!("-volume.port={}", p[2]),
                format!("-volume.port.grpc={}", p[3]),
                format!("-filer.port={}", p[4]),
                format!("-filer.port.grpc={}", p[5]),
                format!("-s3.port={}", p[6]),
                format!("-s3.port.grpc={}", p[7]),
                "-admin.ui=false".into(),
                format!("-admin.port={}", p[8]),
                format!("-admin.port.grpc={}", p[9]),
                "-webdav=false".into(),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
                "-master.volumeSizeLimitMB=64".into(),
                "-bucket=ferry-test".into(),
            ])
            .env("AWS_ACCESS_KEY_ID", "ferrytestkey")
            .env("AWS_SECRET_ACCESS_KEY", "ferrytestsecret")
            .stdout(log.try_clone().expect("weed.log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{weed}: {e} (scripts/services.sh installs it)"));
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let healthy = || {
            use std::io::{Read, Write};
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", p[6])) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
            let mut answer = Vec::new();
            s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_ok()
                && s.read_to_end(&mut answer).is_ok()
                && answer.split(|&b| b == b'\n').next().is_some_and(|status| {
                    status.starts_with(b"HTTP/1.") && status[8..].starts_with(b" 200")
                })
        };
        crate::process::wait_until(60, "SeaweedFS answers /healthz", healthy);
    }
}

impl Drop for OwnSeaweedFs {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
