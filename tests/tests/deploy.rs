//! `deploy/kubernetes/`, checked offline (no Kubernetes cluster here): the manifests' structure
//! and the names that tie them together (`tests/clients/k8s_manifests.py`, PyYAML), then what
//! only ferry-cloud can say: the configuration in the Secret parses, its listeners are the
//! pod's ports, its files are where the volumes are mounted, the container's arguments are
//! flags ferry-cloud takes, and the probes' paths answer 200 on a running node.

use std::path::PathBuf;
use std::process::Command;

use ferry_cloud::config::CloudConfig;
use ferry_cloud::config::LogBackend;
use ferry_tests::process::{binary, python_client, temp_dir, Edge};

#[test]
fn the_kubernetes_manifests_hold_together_and_ferry_cloud_takes_their_configuration() {
    let manifest =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/ferry-cloud.yaml");
    let out = temp_dir("k8s");
    python_client(
        "k8s_manifests.py",
        &[
            manifest.to_str().expect("utf8"),
            out.to_str().expect("utf8"),
        ],
    );
    let text = std::fs::read_to_string(out.join("cloud.toml")).expect("the Secret's config");
    let config: CloudConfig =
        toml::from_str(&text).expect("ferry-cloud parses the Secret's cloud.toml");
    let pod: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pod.json")).expect("pod.json"))
            .expect("json");
    let port = |name: &str| {
        let p = &pod["ports"][name];
        (
            p[0].as_u64().expect("a port") as u16,
            p[1].as_str().expect("a protocol").to_owned(),
        )
    };
    let tcp = |n: u16| (n, "TCP".to_owned());
    assert_eq!(
        config.log.backend,
        LogBackend::Object,
        "a cluster is on the object backend"
    );
    assert_eq!(tcp(config.server.listen[0].port()), port("mqtt"));
    assert_eq!(
        tcp(config.admin.listen.expect("admin").port()),
        port("admin")
    );
    assert_eq!(
        tcp(config.kafka.as_ref().expect("kafka").listen.port()),
        port("kafka")
    );
    assert_eq!(
        tcp(config.amqp.as_ref().expect("amqp").listen.port()),
        port("amqp")
    );
    let link = config.link.as_ref().expect("link");
    assert_eq!((link.listen.port(), "UDP".to_owned()), port("link"));
    // Its files are in the mounted volumes.
    let mount = |name: &str| PathBuf::from(pod["mounts"][name].as_str().expect("a mount"));
    assert!(config.server.data_dir.starts_with(mount("data")));
    for file in [&link.ca_file, &link.cert_file, &link.key_file] {
        assert!(file.starts_with(mount("pki")), "{}", file.display());
    }
    let users = config.auth.password_file.as_ref().expect("users");
    assert!(users.starts_with(mount("users")));
    let args: Vec<String> = pod["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("an arg").to_owned())
        .collect();
    let config_at = args.iter().position(|a| a == "--config").expect("--config");
    assert_eq!(
        PathBuf::from(&args[config_at + 1]),
        mount("config").join("cloud.toml")
    );

    // The arguments, as Kubernetes expands them, are flags ferry-cloud takes.
    let expanded: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("$(POD_IP)", "10.1.2.3")
                .replace("$(POD_NAME)", "ferry-cloud-0")
        })
        .collect();
    let help = Command::new(binary("ferry-cloud", "ferry-cloud"))
        .args(&expanded)
        .arg("--help")
        .output()
        .expect("ferry-cloud runs");
    assert!(help.status.success(), "{help:?}");

    // The probes answer on a running node (here on the local log, alone: ready at once).
    let dir = temp_dir("k8s-probes");
    let local = dir.join("cloud.toml");
    std::fs::write(
        &local,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("write");
    let node = Edge::cloud_in(&dir, &["--config", local.to_str().expect("utf8")]);
    for path in pod["probes"].as_array().expect("probes") {
        let answer = node.http_get(path.as_str().expect("a path"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    assert!(node.terminate().success());
}
