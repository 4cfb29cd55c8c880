//! The TLS acceptor: certificate chain and key from PEM files, optionally client
//! certificates verified against a CA (rustls, with the `ring` provider).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::StartError;
use crate::config::TlsConfig;

/// The Common Name of the client certificate the handshake verified, if any.
pub(super) fn peer_common_name<S>(stream: &tokio_rustls::server::TlsStream<S>) -> Option<String> {
    use x509_cert::der::Decode;
    let der = stream.get_ref().1.peer_certificates()?.first()?;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let cn = cert.tbs_certificate().subject().common_name().ok()??;
    Some(cn.value().into_owned())
}

/// A TLS acceptor for `config`'s certificate and key (and client CA, if set), with
/// rustls's safe defaults on ring. ferry-cloud's AMQP listener uses it too.
pub fn acceptor(config: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let err = |what: &str, e: &dyn std::fmt::Display| StartError::Tls(format!("{what}: {e}"));
    let certs = CertificateDer::pem_file_iter(&config.cert_file)
        .map_err(|e| err(&format!("{}", config.cert_file.display()), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&format!("{}", config.cert_file.display()), &e))?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| err(&format!("{}", config.key_file.display()), &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("protocol versions", &e))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| err(&format!("{}", ca.display()), &e))?
            {
                let cert = cert.map_err(|e| err(&format!("{}", ca.display()), &e))?;
                roots
                    .add(cert)
                    .map_err(|e| err(&format!("{}", ca.display()), &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| err("client certificate verifier", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder
        .with_single_cert(certs, key)
        .map_err(|e| err("certificate and key", &e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}
