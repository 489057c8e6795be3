//! TLS for hub connections: rustls with the platform's roots (so `SSL_CERT_FILE` works as
//! everywhere else), Mozilla's roots as a fallback, and any extra roots the caller adds.
//!
//! The crypto provider comes from a cargo feature: `aws-lc-rs` (default) or `ring`; with both,
//! aws-lc-rs; with neither, the provider the application installed as rustls' process default.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, ErrorKind, Result};

/// Parses every certificate in a PEM document (other sections, such as keys, are skipped).
pub(crate) fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
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

/// The rustls crypto provider chosen by cargo feature: aws-lc-rs (the default, and the one
/// used when both are enabled), else ring, else whatever the application installed as the
/// process default.
///
/// Named explicitly rather than left to `ClientConfig::builder()`, which panics when several
/// providers are compiled into the application and none was installed.
pub(crate) fn crypto_provider() -> Result<Arc<CryptoProvider>> {
    #[cfg(feature = "aws-lc-rs")]
    return Ok(Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    return Ok(Arc::new(rustls::crypto::ring::default_provider()));
    #[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
    CryptoProvider::get_default().cloned().ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidConfig,
            "no TLS crypto provider: enable hubsend's `aws-lc-rs` or `ring` feature, or \
             install one with `rustls::crypto::CryptoProvider::install_default`",
        )
    })
}

/// The client configuration with these extra root CAs (PEM texts) trusted as well.
pub(crate) fn client_config_with_pems(pems: &[Vec<u8>]) -> Result<Arc<ClientConfig>> {
    let mut roots = Vec::new();
    for pem in pems {
        roots.extend(parse_pem_certificates(pem)?);
    }
    client_config(&roots)
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
    let config = ClientConfig::builder_with_provider(crypto_provider()?)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// PEM parsing only decodes the blocks, so a few bytes stand in for real certificates.
    #[test]
    fn pem_certificates_are_read_and_other_blocks_skipped() {
        let pem = b"junk before\n\
            -----BEGIN PRIVATE KEY-----\nBAUG\n-----END PRIVATE KEY-----\n\
            -----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n\
            -----BEGIN CERTIFICATE-----\nCgsM\n-----END CERTIFICATE-----\n";
        let certs = parse_pem_certificates(pem).unwrap();
        let bytes: Vec<&[u8]> = certs.iter().map(|c| c.as_ref()).collect();
        assert_eq!(bytes, [&[1u8, 2, 3][..], &[10, 11, 12][..]]);

        for (pem, why) in [
            (
                &b"-----BEGIN PRIVATE KEY-----\nBAUG\n-----END PRIVATE KEY-----\n"[..],
                "no CERTIFICATE",
            ),
            (b"", "no CERTIFICATE"),
            (
                b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                "unreadable",
            ),
            (b"-----BEGIN CERTIFICATE-----\nAQID\n", "unreadable"),
        ] {
            let err = parse_pem_certificates(pem).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn the_feature_chosen_provider_builds_a_client_config() {
        let config = client_config(&[]).unwrap();
        assert!(!config.crypto_provider().cipher_suites.is_empty());
    }
}
