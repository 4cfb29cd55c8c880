//! Test-only tools shared by Ferry's end-to-end tests.
//!
//! - [`capture::CaptureServer`]: a minimal scripted MQTT server that records every packet a
//!   real client sends, decoded with our codec, and answers with packets we encode. It lets
//!   the codec be checked against real clients before the broker exists, and stays useful for
//!   pinning down what a given client puts on the wire.
//! - [`process::Edge`]: a real `ferry-edge` process, built once, started on an ephemeral
//!   port, killed when dropped; [`process::Edge::cloud_in`] does the same for `ferry-cloud`.
//! - [`clients`]: helpers around rumqttc.
//! - [`impair::Proxy`]: a UDP impairment proxy (seeded loss, cuts) for the link.
//! - [`log::records`]: a stopped ferry-cloud's log, read back.
//! - [`tcp_cut::TcpCut`]: a TCP forwarder that can be cut (a service going down).
//! - [`site::Site`]: a cloud and an edge joined by the link (certificates, configurations).
//! - [`services`]: where the PostgreSQL and S3 servers of `scripts/test.sh` are, and a
//!   `[log.object]` on them.

pub mod capture;
pub mod clients;
pub mod impair;
pub mod log;
pub mod process;
pub mod services;
pub mod site;
pub mod tcp_cut;
