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
