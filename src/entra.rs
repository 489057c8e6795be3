//! Microsoft Entra ID authentication: [`ClientSecretCredential`] fetches OAuth 2.0 access
//! tokens with the client-credentials grant and hands them to the CBS layer as `jwt` tokens.
//!
//! Only compiled with the `entra` cargo feature, which brings in the HTTP client.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;

use crate::auth::{max_expiry, AccessToken, Secret, TokenProvider, TokenType};
use crate::error::{Error, ErrorKind, Result};
use crate::producer::ProducerBuilder;

/// Microsoft Entra ID's public-cloud authority.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";

/// The OAuth scope that grants access to Event Hubs data planes.
pub const EVENT_HUBS_SCOPE: &str = "https://eventhubs.azure.net/.default";

/// How long one token request may take unless set with [`ClientSecretCredential::timeout`].
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// A cached token is fetched anew once less than this (or half its lifetime) remains.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// The longest part of an error description from the token endpoint kept in messages.
const MAX_DESCRIPTION: usize = 400;

/// Authenticates as a Microsoft Entra ID application (service principal) with a client
/// secret: the OAuth 2.0 client-credentials grant against
/// `{authority}{tenant}/oauth2/v2.0/token` with the scope `https://eventhubs.azure.net/.default`.
///
/// The application needs an Event Hubs data role (e.g. *Azure Event Hubs Data Sender*) on the
/// namespace or hub. Tokens are cached and fetched again before they expire (once less than
/// five minutes, or half their lifetime, remain), so one credential can serve many producers.
///
/// `Debug` never shows the secret, and no error message contains it.
///
/// ```rust,ignore
/// // needs the `entra` feature
/// use std::sync::Arc;
/// use hubsend::{ClientSecretCredential, Producer};
///
/// # async fn run() -> hubsend::Result<()> {
/// let credential = ClientSecretCredential::new("TENANT-ID", "CLIENT-ID", "CLIENT-SECRET");
/// let producer = Producer::builder()
///     .namespace("contoso.servicebus.windows.net")
///     .event_hub("telemetry")
///     .credential(Arc::new(credential))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "entra")))]
pub struct ClientSecretCredential {
    tenant_id: String,
    client_id: String,
    client_secret: Secret,
    authority: String,
    extra_roots_pem: Vec<Vec<u8>>,
    allow_http: bool,
    timeout: Duration,
    state: Mutex<State>,
}

/// The HTTP client (built on first use) and the cached token.
#[derive(Default)]
struct State {
    client: Option<reqwest::Client>,
    cached: Option<Cached>,
}

struct Cached {
    token: AccessToken,
    /// When to fetch a new one instead of handing this one out.
    refresh_at: SystemTime,
}

impl ClientSecretCredential {
    /// A credential for the application `client_id` in `tenant_id` (a directory id such as
    /// `72f988bf-…` or a domain such as `contoso.onmicrosoft.com`) with its `client_secret`.
    ///
    /// Nothing is checked or fetched until the first token is needed.
    pub fn new(
        tenant_id: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Self {
        ClientSecretCredential {
            tenant_id: tenant_id.into(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            authority: DEFAULT_AUTHORITY_HOST.to_owned(),
            extra_roots_pem: Vec::new(),
            allow_http: false,
            timeout: DEFAULT_TIMEOUT,
            state: Mutex::new(State::default()),
        }
    }

    /// Uses another authority host than `https://login.microsoftonline.com/` (a sovereign
    /// cloud such as `https://login.microsoftonline.us/`, or a local test server). A trailing
    /// `/` is added when missing. Must be `https://` unless
    /// [`danger_allow_http`](Self::danger_allow_http) is set.
    #[must_use]
    pub fn authority_host(mut self, url: impl Into<String>) -> Self {
        let mut authority = url.into();
        if !authority.ends_with('/') {
            authority.push('/');
        }
        self.authority = authority;
        self
    }

    /// Trusts an extra root CA (PEM) for the token endpoint, besides the platform's roots.
    #[must_use]
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_roots_pem.push(pem.into());
        self
    }

    /// Allows an `http://` authority, sending the client secret unencrypted. Only for local
    /// test servers.
    #[must_use]
    pub fn danger_allow_http(mut self, allow: bool) -> Self {
        self.allow_http = allow;
        self
    }

    /// How long one token request may take in all (default 20 s); past it the request fails
    /// with [`ErrorKind::Timeout`].
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The tenant (directory) id.
    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// The application (client) id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The authority host, ending with `/`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The token endpoint: `{authority}{tenant}/oauth2/v2.0/token`.
    fn token_endpoint(&self) -> Result<reqwest::Url> {
        let tenant_ok = !self.tenant_id.is_empty()
            && self
                .tenant_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !tenant_ok {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "the Entra ID tenant id `{}` is not a directory id or domain name",
                    self.tenant_id
                ),
            ));
        }
        if self.client_id.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "the Entra ID client id is empty",
            ));
        }
        let authority = reqwest::Url::parse(&self.authority).map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("the Entra ID authority `{}` is not a URL", self.authority),
            )
            .with_source(e)
        })?;
        match authority.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    format!(
                        "the Entra ID authority `{}` is not https; use `danger_allow_http` for local tests only",
                        self.authority
                    ),
                ))
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    format!(
                        "the Entra ID authority `{}` has the unsupported scheme `{other}`",
                        self.authority
                    ),
                ))
            }
        }
        authority
            .join(&format!("{}/oauth2/v2.0/token", self.tenant_id))
            .map_err(|e| {
                Error::new(
                    ErrorKind::InvalidConfig,
                    format!(
                        "the Entra ID authority `{}` is not a base URL",
                        self.authority
                    ),
                )
                .with_source(e)
            })
    }

    /// Builds the HTTP client from the shared factory ([`crate::http`]): hubsend's rustls
    /// configuration, no redirects, the request timeout.
    fn build_client(&self) -> Result<reqwest::Client> {
        crate::http::HttpClientOptions {
            extra_roots_pem: self.extra_roots_pem.clone(),
            danger_allow_http: self.allow_http,
            timeout: self.timeout,
            loopback: crate::http::is_loopback(&self.authority),
            ..Default::default()
        }
        .build()
    }

    /// "tenant `t` at authority `a`", for messages.
    fn whom(&self) -> String {
        format!(
            "tenant `{}` at authority `{}` (client id `{}`)",
            self.tenant_id, self.authority, self.client_id
        )
    }

    /// Requests a new token from the token endpoint.
    async fn fetch(&self, client: &reqwest::Client) -> Result<AccessToken> {
        let endpoint = self.token_endpoint()?;
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", self.client_secret.expose())
            .append_pair("scope", EVENT_HUBS_SCOPE)
            .finish();
        let requested_at = SystemTime::now();
        let transport = |e: reqwest::Error, what: &str| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else {
                ErrorKind::Connection
            };
            // reqwest's errors name the URL, never the body.
            Error::new(
                kind,
                format!("{what} the Entra ID token endpoint for {}", self.whom()),
            )
            .with_source(e)
        };
        let response = client
            .post(endpoint)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| transport(e, "requesting a token from"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport(e, "reading the answer of"))?;
        let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
        if !status.is_success() {
            return Err(self.refusal(status, json.as_ref()));
        }
        let json = json.ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                format!(
                    "the Entra ID token endpoint for {} answered with something other than JSON",
                    self.whom()
                ),
            )
        })?;
        let token = json
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty());
        let expires_in = json.get("expires_in").and_then(|v| {
            // v2.0 sends a number; older endpoints send a string.
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        });
        let (Some(token), Some(expires_in)) = (token, expires_in) else {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "the Entra ID token endpoint for {} answered without `access_token` and `expires_in`",
                    self.whom()
                ),
            ));
        };
        if let Some(kind) = json.get("token_type").and_then(|t| t.as_str()) {
            if !kind.eq_ignore_ascii_case("bearer") {
                tracing::debug!(token_type = kind, "unexpected OAuth token type");
            }
        }
        let expires_at = expiry_after(requested_at, expires_in);
        tracing::debug!(
            tenant = %self.tenant_id,
            expires_in,
            "fetched an Entra ID access token"
        );
        Ok(AccessToken::new(token, TokenType::Jwt, expires_at))
    }

    /// The error for a refused token request, with the OAuth error code and description.
    fn refusal(&self, status: reqwest::StatusCode, json: Option<&serde_json::Value>) -> Error {
        let field = |name: &str| {
            json.and_then(|j| j.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let code = field("error").unwrap_or_else(|| "no OAuth error code".to_owned());
        let mut description = field("error_description")
            .map(|d| d.lines().next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        if description.len() > MAX_DESCRIPTION {
            let mut cut = MAX_DESCRIPTION;
            while !description.is_char_boundary(cut) {
                cut -= 1;
            }
            description.truncate(cut);
            description.push('…');
        }
        let secret = self.client_secret.expose();
        // Entra ID does not echo secrets, but never risk it (short test secrets would
        // mangle the text, and are not worth hiding).
        if secret.len() >= 6 {
            description = description.replace(secret, "<redacted>");
        }
        let kind = match status.as_u16() {
            429 => ErrorKind::ServerBusy,
            500..=599 => ErrorKind::Connection,
            _ => ErrorKind::Unauthorized,
        };
        let mut message = format!(
            "Entra ID refused the client credentials for {} (HTTP {}, {code})",
            self.whom(),
            status.as_u16()
        );
        if !description.is_empty() {
            message.push_str(": ");
            message.push_str(&description);
        }
        Error::new(kind, message)
    }

    /// A cached token with enough time left, or a freshly fetched one.
    async fn current(&self) -> Result<AccessToken> {
        let mut state = self.state.lock().await;
        let now = SystemTime::now();
        if let Some(cached) = &state.cached {
            if now < cached.refresh_at {
                return Ok(cached.token.clone());
            }
        }
        let client = match &state.client {
            Some(client) => client.clone(),
            None => {
                let client = self.build_client()?;
                state.client = Some(client.clone());
                client
            }
        };
        let token = self.fetch(&client).await?;
        let lifetime = token
            .expires_at()
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        let refresh_at = token.expires_at() - REFRESH_MARGIN.min(lifetime / 2);
        state.cached = Some(Cached {
            token: token.clone(),
            refresh_at,
        });
        Ok(token)
    }
}

/// When a token fetched at `requested_at` with the endpoint's `expires_in` expires.
///
/// `expires_in` comes from the network: a huge value must not overflow `SystemTime` (a
/// panic), so it is capped at the latest expiry any token may carry.
fn expiry_after(requested_at: SystemTime, expires_in: u64) -> SystemTime {
    requested_at
        .checked_add(Duration::from_secs(expires_in))
        .map_or_else(max_expiry, |at| at.min(max_expiry()))
}

impl fmt::Debug for ClientSecretCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSecretCredential")
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("authority", &self.authority)
            .field("extra_roots", &self.extra_roots_pem.len())
            .field("allow_http", &self.allow_http)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenProvider for ClientSecretCredential {
    /// Entra ID tokens are valid for the whole namespace, so `audience` does not matter.
    fn token<'a>(
        &'a self,
        _audience: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<AccessToken>> + Send + 'a>> {
        Box::pin(self.current())
    }
}

impl ProducerBuilder {
    /// Authorises with a Microsoft Entra ID application's client secret (shorthand for
    /// [`credential`](Self::credential) with a [`ClientSecretCredential`] against the public
    /// cloud). Combine with [`namespace`](Self::namespace) and [`event_hub`](Self::event_hub).
    ///
    /// Requires the `entra` cargo feature.
    #[cfg_attr(docsrs, doc(cfg(feature = "entra")))]
    pub fn entra_client_secret(
        self,
        tenant_id: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Self {
        self.credential(Arc::new(ClientSecretCredential::new(
            tenant_id,
            client_id,
            client_secret,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_secret() {
        let credential = ClientSecretCredential::new("tenant-1", "client-1", "TOPSECRET-value");
        let debug = format!("{credential:?}");
        assert!(!debug.contains("TOPSECRET"), "{debug}");
        assert!(debug.contains("tenant-1") && debug.contains("client-1"));
    }

    #[test]
    fn token_endpoint_is_built_from_authority_and_tenant() {
        let credential = ClientSecretCredential::new("contoso.onmicrosoft.com", "c", "s");
        assert_eq!(
            credential.token_endpoint().unwrap().as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        let credential =
            ClientSecretCredential::new("t", "c", "s").authority_host("https://login.example/x");
        assert_eq!(credential.authority(), "https://login.example/x/");
        assert_eq!(
            credential.token_endpoint().unwrap().as_str(),
            "https://login.example/x/t/oauth2/v2.0/token"
        );
    }

    #[test]
    fn bad_configuration_is_rejected() {
        let http = ClientSecretCredential::new("t", "c", "s").authority_host("http://127.0.0.1:1");
        let err = http.token_endpoint().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("danger_allow_http"), "{err}");
        assert!(http.danger_allow_http(true).token_endpoint().is_ok());

        for tenant in ["", "a/b", "../x", "t?x=1"] {
            let err = ClientSecretCredential::new(tenant, "c", "s")
                .token_endpoint()
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{tenant}");
        }
        let err = ClientSecretCredential::new("t", "", "s")
            .token_endpoint()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    }

    /// A token endpoint answering `expires_in` = 2^64 - 1 used to overflow `SystemTime` and
    /// panic; the expiry is now capped at the latest one a token may carry.
    #[test]
    fn huge_expires_in_is_capped_not_a_panic() {
        let now = SystemTime::now();
        assert_eq!(expiry_after(now, 3600), now + Duration::from_secs(3600));
        for expires_in in [u64::MAX, i64::MAX as u64, 300_000_000_000] {
            assert_eq!(expiry_after(now, expires_in), max_expiry(), "{expires_in}");
        }
    }

    #[test]
    fn refusals_name_tenant_authority_and_code_but_not_the_secret() {
        let credential = ClientSecretCredential::new("tenant-9", "client-9", "S3CRET");
        let body = serde_json::json!({
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided (S3CRET).\r\nTrace ID: x",
        });
        let err = credential.refusal(reqwest::StatusCode::UNAUTHORIZED, Some(&body));
        assert_eq!(err.kind(), ErrorKind::Unauthorized);
        let shown = format!("{err} {err:?}");
        for part in [
            "tenant-9",
            DEFAULT_AUTHORITY_HOST,
            "invalid_client",
            "AADSTS7000215",
        ] {
            assert!(shown.contains(part), "{part}: {shown}");
        }
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(!shown.contains("Trace ID"), "{shown}");

        let err = credential.refusal(reqwest::StatusCode::SERVICE_UNAVAILABLE, None);
        assert_eq!(err.kind(), ErrorKind::Connection);
        let err = credential.refusal(reqwest::StatusCode::TOO_MANY_REQUESTS, None);
        assert_eq!(err.kind(), ErrorKind::ServerBusy);
    }
}
