//! One way to build an HTTP client, shared by every HTTPS caller in hubsend (the Entra ID
//! credential, the IoT Hub registry, the Event Hubs REST backend in [`rest`]), and the token
//! cache the REST callers share.
//!
//! The client trusts exactly what the AMQP connection trusts: the platform's roots (so
//! `SSL_CERT_FILE` works), Mozilla's as a fallback, and any extra root CA the caller gave, all
//! through the rustls configuration and crypto provider of [`crate::tls`]. It never follows
//! redirects (a redirect could carry an `Authorization` header to another host), refuses plain
//! `http://` unless the caller set `danger_allow_http`, and never goes through a proxy for a
//! loopback host.

#[cfg(feature = "https")]
pub(crate) mod rest;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::auth::{AccessToken, TokenProvider, TokenType};
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
    /// Whether the endpoint is a loopback host, which is never reached through a proxy
    /// unless the proxy was named explicitly.
    pub(crate) loopback: bool,
    /// Which proxy to use.
    pub(crate) proxy: HttpProxy,
}

/// The proxy an HTTP client uses.
#[derive(Clone, Default)]
#[cfg_attr(not(feature = "https"), allow(dead_code))]
pub(crate) enum HttpProxy {
    /// `HTTPS_PROXY`/`HTTP_PROXY` and `NO_PROXY`, as reqwest reads them (never for loopback).
    #[default]
    FromEnv,
    /// None at all.
    Off,
    /// This `http://[user:pass@]host:port` proxy, for every request (it may hold a password:
    /// `Debug` never shows it).
    Url(String),
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HttpProxy::FromEnv => "FromEnv",
            HttpProxy::Off => "Off",
            HttpProxy::Url(_) => "Url(<redacted>)",
        })
    }
}

impl Default for HttpClientOptions {
    fn default() -> Self {
        HttpClientOptions {
            extra_roots_pem: Vec::new(),
            danger_allow_http: false,
            timeout: DEFAULT_TIMEOUT,
            loopback: false,
            proxy: HttpProxy::FromEnv,
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
        match &self.proxy {
            HttpProxy::FromEnv if !self.loopback => {}
            HttpProxy::FromEnv | HttpProxy::Off => builder = builder.no_proxy(),
            HttpProxy::Url(url) => {
                // reqwest's own error could quote the URL, password and all.
                let proxy = reqwest::Proxy::all(url.as_str()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidConfig,
                        "the proxy URL is unusable (expected http://[user:pass@]host:port)",
                    )
                })?;
                builder = builder.proxy(proxy);
            }
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
#[cfg_attr(not(any(feature = "registry", feature = "entra")), allow(dead_code))]
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
#[cfg_attr(not(any(feature = "registry", feature = "https")), allow(dead_code))]
pub(crate) fn transport_error(e: reqwest::Error, what: String) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Connection
    };
    Error::new(kind, what).with_source(e.without_url())
}

/// A token is fetched anew when less than this much of its life is left, so a request in
/// flight never carries a token that expires on the way.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// One audience's token for HTTP callers: fetched from the provider when first needed, kept,
/// and fetched anew once 80 % of its life has passed (as the C SDK does) or less than
/// [`REFRESH_MARGIN`] is left, whichever comes first (but never before half of it).
#[cfg_attr(not(any(feature = "registry", feature = "https")), allow(dead_code))]
pub(crate) struct TokenCache {
    provider: Arc<dyn TokenProvider>,
    audience: String,
    cached: tokio::sync::Mutex<Option<(AccessToken, SystemTime)>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

#[cfg_attr(not(any(feature = "registry", feature = "https")), allow(dead_code))]
impl TokenCache {
    pub(crate) fn new(provider: Arc<dyn TokenProvider>, audience: String) -> TokenCache {
        TokenCache {
            provider,
            audience,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The audience tokens are asked for.
    pub(crate) fn audience(&self) -> &str {
        &self.audience
    }

    /// The current token, and whether it was fetched by this call.
    ///
    /// # Errors
    /// Whatever the provider fails with.
    pub(crate) async fn token(&self) -> Result<(AccessToken, bool)> {
        let mut cached = self.cached.lock().await;
        let now = SystemTime::now();
        if let Some((token, refresh_at)) = cached.as_ref() {
            if now < *refresh_at && token.expires_at() > now {
                return Ok((token.clone(), false));
            }
        }
        let token = self.provider.token(&self.audience).await?;
        let life = token.expires_at().duration_since(now).unwrap_or_default();
        let refresh_at =
            now + (life.mul_f64(0.8)).min(life.saturating_sub(REFRESH_MARGIN).max(life / 2));
        *cached = Some((token.clone(), refresh_at));
        Ok((token, true))
    }

    /// Forgets the cached token (the server refused it), so the next call fetches a new one.
    #[cfg_attr(not(feature = "https"), allow(dead_code))]
    pub(crate) async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}

/// The `Authorization` header value for `token`: a SAS as it is, an Entra ID token as
/// `Bearer …`.
#[cfg_attr(not(any(feature = "registry", feature = "https")), allow(dead_code))]
pub(crate) fn authorization(token: &AccessToken) -> String {
    match token.token_type() {
        TokenType::Jwt => format!("Bearer {}", token.secret()),
        _ => token.secret().to_owned(),
    }
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
