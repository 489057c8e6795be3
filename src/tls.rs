//! TLS for hub connections: rustls with the platform's roots (so `SSL_CERT_FILE` works as
//! everywhere else), Mozilla's roots as a fallback, and any extra roots the caller adds.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, ErrorKind, Result};

/// Parses every certificate in a PEM document.
pub(crate) fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let mut reader = std::io::BufReader::new(pem);
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                "root certificate PEM is unreadable",
            )
            .with_source(e)
        })?;
    if certs.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            "root certificate PEM holds no CERTIFICATE block",
        ));
    }
    Ok(certs)
}

/// Builds the client configuration: platform roots + webpki roots + `extra_roots`.
pub(crate) fn client_config(extra_roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(error = %error, "skipping an unreadable platform root certificate");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                "a custom root certificate is invalid",
            )
            .with_source(e)
        })?;
    }
    // Name the provider explicitly: if several rustls providers are compiled into the
    // application, `ClientConfig::builder()` would panic.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::InvalidConfig, "TLS setup failed").with_source(e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Performs the TLS handshake first, as Azure expects (no AMQP TLS protocol header).
pub(crate) async fn connect(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!("`{host}` is not a valid TLS server name"),
        )
        .with_source(e)
    })?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("TLS handshake with {host} failed"),
            )
            .with_source(e)
        })
}
