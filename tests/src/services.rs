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
