//! One way to build an HTTP client, shared by every HTTPS caller in hubsend (the Entra ID
//! credential and the IoT Hub registry).
//!
//! The client trusts exactly what the AMQP connection trusts: the platform's roots (so
//! `SSL_CERT_FILE` works), Mozilla's as a fallback, and any extra root CA the caller gave, all
//! through the rustls configuration and crypto provider of [`crate::tls`]. It never follows
//! redirects (a redirect could carry an `Authorization` header to another host), refuses plain
//! `http://` unless the caller set `danger_allow_http`, and never goes through a proxy for a
//! loopback host.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// How long one request may take in all when the caller sets nothing: long enough for a slow
/// hub under load, short enough that a dead endpoint is noticed within a batch or two.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// The settings every hubsend HTTP client is built from.
#[derive(Debug, Clone)]
pub(crate) struct HttpClientOptions {
    /// Extra root CAs (PEM), trusted besides the platform's.
    pub(crate) extra_roots_pem: Vec<Vec<u8>>,
    /// Whether `http://` URLs may be used (local test servers only).
    pub(crate) danger_allow_http: bool,
    /// The whole-request timeout; the connect timeout is the same value.
    pub(crate) timeout: Duration,
    /// Whether the endpoint is a loopback host, which is never reached through a proxy.
    pub(crate) loopback: bool,
}

impl Default for HttpClientOptions {
    fn default() -> Self {
        HttpClientOptions {
            extra_roots_pem: Vec::new(),
            danger_allow_http: false,
            timeout: DEFAULT_TIMEOUT,
            loopback: false,
        }
    }
}

impl HttpClientOptions {
    /// Builds the client.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConfig`] for an unreadable extra CA or when reqwest refuses the
    /// configuration.
    pub(crate) fn build(&self) -> Result<reqwest::Client> {
        let mut tls = (*crate::tls::client_config_with_pems(&self.extra_roots_pem)?).clone();
        // reqwest is built without its http2 feature; offering h2 would break the handshake.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut builder = reqwest::Client::builder();
        if self.loopback {
            builder = builder.no_proxy();
        }
        builder
            .use_preconfigured_tls(tls)
            .https_only(!self.danger_allow_http)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::InvalidConfig, "building the HTTP client failed")
                    .with_source(e)
            })
    }
}

/// Whether `url`'s host is `localhost` or a loopback address.
pub(crate) fn is_loopback(url: &str) -> bool {
    match reqwest::Url::parse(url)
        .ok()
        .as_ref()
        .and_then(|u| u.host())
    {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A transport failure as a hubsend error: a timeout is [`ErrorKind::Timeout`], anything
/// else [`ErrorKind::Connection`]. reqwest's errors name the URL, never a header or body.
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub(crate) fn transport_error(e: reqwest::Error, what: String) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connection
    };
    Error::new(kind, what).with_source(e.without_url())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        assert!(is_loopback("http://127.0.0.1:8080/"));
        assert!(is_loopback("https://localhost/x"));
        assert!(is_loopback("http://[::1]:1/"));
        assert!(!is_loopback("https://myhub.azure-devices.net/"));
        assert!(!is_loopback("not a url"));
    }

    #[test]
    fn a_bad_extra_root_is_a_config_error() {
        let options = HttpClientOptions {
            extra_roots_pem: vec![
                b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n".to_vec(),
            ],
            ..HttpClientOptions::default()
        };
        let err = options.build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    }
}
