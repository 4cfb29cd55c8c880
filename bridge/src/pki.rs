//! The link's certificates: a CA of the operator's own, one certificate per edge (its
//! identity: the edge id is the certificate's common name), one per cloud node.
//!
//! ```text
//! DIR/ca.crt  DIR/ca.key                      ferry-cloud pki init --dir DIR
//! DIR/edges/<edge-id>.crt  .key               ferry-cloud pki issue-edge --dir DIR <edge-id>
//! DIR/nodes/<dns-name>.crt .key               ferry-cloud pki issue-node --dir DIR <dns-name>
//! ```
//!
//! Keys are ECDSA P-256, written with mode 0600 and never overwritten; certificates are PEM.
//! The CA is valid for 20 years, edge and node certificates for 10 (a lost or retired edge
//! is revoked by the cloud's deny list, not by expiry). Serial numbers are 16 bytes derived
//! from the key and the time of issue.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};

/// The CA's common name. Issuing rebuilds the CA's name from it, so it never changes.
const CA_NAME: &str = "Ferry link CA";
const DAY_SECS: u64 = 86_400;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists; remove it first to make a new one")]
    Exists { path: PathBuf },
    #[error("no CA in {0} (run `ferry-cloud pki init --dir` first)")]
    NoCa(PathBuf),
    #[error("invalid {what} {name:?}: 1-64 of a-z A-Z 0-9 . _ -")]
    BadName { what: &'static str, name: String },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What was written: the certificate and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a new CA in `dir` (created if missing). Refuses to replace an existing one: every
/// certificate it issued would stop working.
pub fn init(dir: &Path) -> Result<Issued, PkiError> {
    let out = Issued {
        cert: dir.join("ca.crt"),
        key: dir.join("ca.key"),
    };
    for path in [&out.cert, &out.key] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    params.serial_number = Some(serial(&key));
    (params.not_before, params.not_after) = validity(20 * 365);
    let cert = params.self_signed(&key)?;
    write_new(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(out)
}

/// Issues the certificate of edge `edge_id` (its common name), for TLS client
/// authentication, into `dir/edges/`.
pub fn issue_edge(dir: &Path, edge_id: &str) -> Result<Issued, PkiError> {
    check_name("edge id", edge_id)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, "edges", edge_id, params)
}

/// Issues a cloud node's server certificate for `dns_name` (common name and subject
/// alternative name) into `dir/nodes/`.
pub fn issue_node(dir: &Path, dns_name: &str) -> Result<Issued, PkiError> {
    check_name("DNS name", dns_name)?;
    let mut params = CertificateParams::new(vec![dns_name.to_owned()])?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(dir, "nodes", dns_name, params)
}

fn issue(
    dir: &Path,
    sub: &str,
    name: &str,
    mut params: CertificateParams,
) -> Result<Issued, PkiError> {
    let ca_key_path = dir.join("ca.key");
    let ca_pem =
        std::fs::read_to_string(&ca_key_path).map_err(|_| PkiError::NoCa(dir.to_owned()))?;
    let ca_key = KeyPair::from_pem(&ca_pem)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let out_dir = dir.join(sub);
    let out = Issued {
        cert: out_dir.join(format!("{name}.crt")),
        key: out_dir.join(format!("{name}.key")),
    };
    for path in [&out.cert, &out.key] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(&out_dir).map_err(|source| PkiError::Io {
        path: out_dir.clone(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(serial(&key));
    (params.not_before, params.not_after) = validity(10 * 365);
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(out)
}

/// The CA's parameters, the same at creation and at every issue (the issuer's name must
/// match the CA certificate's subject byte for byte).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// The edge id (common name) of a certificate in DER, as the cloud reads it from the TLS
/// handshake: the edge's identity, whatever the edge says about itself.
pub fn common_name(der: &[u8]) -> Option<String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let cn = cert.tbs_certificate().subject().common_name().ok()??;
    Some(cn.value().into_owned())
}

/// The serial number of a certificate in DER, lowercase hex without separators (as a deny
/// list names it).
pub fn serial_hex(der: &[u8]) -> Option<String> {
    use std::fmt::Write;
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let mut out = String::new();
    for b in cert.tbs_certificate().serial_number().as_bytes() {
        let _ = write!(out, "{b:02x}");
    }
    Some(out)
}

/// When a certificate in DER stops being valid (its notAfter), in seconds since the Unix
/// epoch.
pub fn not_after_unix_secs(der: &[u8]) -> Option<u64> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    Some(
        cert.tbs_certificate()
            .validity()
            .not_after
            .to_unix_duration()
            .as_secs(),
    )
}

fn check_name(what: &'static str, name: &str) -> Result<(), PkiError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName {
            what,
            name: name.to_owned(),
        })
    }
}

/// From a day ago (clocks on gateways drift) to `days` from now.
fn validity(days: u64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let at = |secs: u64| {
        time::OffsetDateTime::from_unix_timestamp(secs as i64)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    (at(now.saturating_sub(DAY_SECS)), at(now + days * DAY_SECS))
}

/// 16 bytes from the public key and the time: unique per certificate, positive.
fn serial(key: &KeyPair) -> SerialNumber {
    use rcgen::PublicKeyData;
    let mut h = Sha256::new();
    h.update(key.der_bytes());
    h.update(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            .to_be_bytes(),
    );
    let mut bytes = h.finalize()[..16].to_vec();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Writes a file that must not exist yet, with `mode` from the start (a key is never
/// readable by others, not even for a moment).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConnection, RootCertStore, ServerConnection};

    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(path)
            .expect("pem")
            .collect::<Result<_, _>>()
            .expect("certs")
    }

    fn roots(ca: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for c in certs(ca) {
            roots.add(c).expect("a CA certificate");
        }
        Arc::new(roots)
    }

    /// A TLS 1.3 handshake in memory: a node that requires client certificates from `ca`,
    /// an edge that trusts `ca` for the node. The edge id the node sees, or the error.
    fn handshake(ca: &Path, node: &Issued, edge: &Issued) -> Result<String, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(ca),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certs(&node.cert),
                PrivateKeyDer::from_pem_file(&node.key).expect("key"),
            )
            .expect("server config");
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(ca))
            .with_client_auth_cert(
                certs(&edge.cert),
                PrivateKeyDer::from_pem_file(&edge.key).expect("key"),
            )
            .expect("client config");
        let name = ServerName::try_from("cloud.example").expect("name");
        let mut client = ClientConnection::new(Arc::new(client_config), name).expect("client");
        let mut server = ServerConnection::new(Arc::new(server_config)).expect("server");
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).expect("write");
            }
            if !buf.is_empty() {
                server.read_tls(&mut &buf[..]).expect("read");
                server.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).expect("write");
            }
            if !buf.is_empty() {
                client.read_tls(&mut &buf[..]).expect("read");
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                let der = server
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .expect("a client certificate");
                return Ok(common_name(der).expect("a common name"));
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn an_edge_certificate_from_the_ca_is_its_identity_and_one_from_elsewhere_is_refused() {
        let dir = temp("ok");
        let ca = init(&dir).expect("init");
        let node = issue_node(&dir, "cloud.example").expect("node");
        let edge = issue_edge(&dir, "gw-7").expect("edge");
        assert_eq!(edge.cert, dir.join("edges/gw-7.crt"));
        assert_eq!(
            handshake(&ca.cert, &node, &edge).expect("handshake"),
            "gw-7"
        );
        // Issued for ten years: the console warns ahead of the expiry it reads.
        let der = CertificateDer::from_pem_file(&edge.cert).expect("pem");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let left = not_after_unix_secs(&der).expect("not after") - now;
        assert!(left.abs_diff(10 * 365 * DAY_SECS) < 2 * DAY_SECS, "{left}");

        let other = temp("other");
        init(&other).expect("init");
        let stranger = issue_edge(&other, "gw-7").expect("edge");
        assert!(
            handshake(&ca.cert, &node, &stranger).is_err(),
            "a certificate of another CA"
        );
    }

    #[test]
    fn keys_are_private_and_nothing_is_overwritten() {
        let dir = temp("modes");
        assert!(matches!(issue_edge(&dir, "gw-1"), Err(PkiError::NoCa(_))));
        let ca = init(&dir).expect("init");
        let edge = issue_edge(&dir, "gw-1").expect("edge");
        for key in [&ca.key, &edge.key] {
            let mode = std::fs::metadata(key).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(matches!(init(&dir), Err(PkiError::Exists { .. })));
        assert!(matches!(
            issue_edge(&dir, "gw-1"),
            Err(PkiError::Exists { .. })
        ));
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(
                matches!(issue_edge(&dir, bad), Err(PkiError::BadName { .. })),
                "{bad:?}"
            );
        }
    }
}
