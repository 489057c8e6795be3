//! The IoT Hub identity registry and device twins over HTTPS (feature `registry`).
//!
//! [`Registry`] does what a cloud gateway such as Particle's needs before a device's first
//! message: [`ensure_device`](Registry::ensure_device) creates the identity the first time an
//! id is seen (`PUT /devices/{id}` without `If-Match`; an answer of 409 `DeviceAlreadyExists`
//! means it existed and is not an error) and, only when it was created, writes the device's
//! name once into its twin (`PATCH /twins/{id}` with `properties.desired.deviceName`).
//!
//! [`create_devices`](Registry::create_devices) creates many at once with the bulk registry
//! call (`POST /devices`, up to [`MAX_BULK_DEVICES`] per call, the name set in the same call).
//!
//! Every request carries an `Authorization: SharedAccessSignature …&skn=…` header signed with
//! the policy key for the hub host, cached and re-signed before it expires. Calls pass through
//! a client-side token bucket (IoT Hub throttles registry operations at 100 per minute per
//! S1/S2 unit, so that is the default rate); a 429 or 503 answer is retried after the
//! `Retry-After` the hub sent (or a growing back-off), up to a bounded number of attempts.
//!
//! Failures are [`Error`]s whose message names the hub's `ErrorCode` (from the
//! `IotHubErrorCode` header or the body) and whose kind says what to do:
//! 400 → [`ErrorKind::InvalidArgument`], 401/403 → [`ErrorKind::Unauthorized`] (the message
//! names the right the policy needs), 404 → [`ErrorKind::NotFound`], 412 (stale etag) →
//! [`ErrorKind::Rejected`], 429/503 after the retries → [`ErrorKind::ServerBusy`]. Messages
//! never hold a key or token.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::entity::iothub::encode_id;
use crate::error::{Error, ErrorKind, Result};
use crate::http::{authorization, is_loopback, transport_error, HttpClientOptions, TokenCache};

use super::connection_string::{IotHubConnectionString, IotHubCredentialKind};

/// The service API version hubsend speaks (the one the current Microsoft SDKs send).
pub const API_VERSION: &str = "2021-04-12";

/// IoT Hub's registry throttle on S1 and S2: 100 operations per minute per unit.
pub const DEFAULT_OPERATIONS_PER_MINUTE: u32 = 100;

/// The most devices one bulk registry call carries (IoT Hub's limit).
pub const MAX_BULK_DEVICES: usize = 100;

/// How many times one call is sent when the hub answers 429 or 503.
const DEFAULT_MAX_ATTEMPTS: u32 = 6;

/// Builds a [`Registry`].
#[derive(Clone)]
#[must_use]
pub struct RegistryBuilder {
    connection: IotHubConnectionString,
    base_url: Option<String>,
    http: HttpClientOptions,
    per_minute: u32,
    max_attempts: u32,
    token_lifetime: Duration,
}

impl fmt::Debug for RegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryBuilder")
            .field("connection", &self.connection)
            .field("base_url", &self.base_url)
            .field("per_minute", &self.per_minute)
            .finish_non_exhaustive()
    }
}

impl RegistryBuilder {
    /// Uses `url` (e.g. `https://10.0.0.4:8443` for a private endpoint, or a local test
    /// server) instead of `https://{HostName}`. Token audiences keep using `HostName`.
    pub fn registry_url(mut self, url: impl Into<String>) -> Self {
        let mut url = url.into();
        while url.ends_with('/') {
            url.pop();
        }
        self.base_url = Some(url);
        self
    }

    /// Trusts an extra root CA (PEM) besides the platform's roots.
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.http.extra_roots_pem.push(pem.into());
        self
    }

    /// Allows an `http://` registry URL, sending tokens unencrypted. Only for local tests.
    pub fn danger_allow_http(mut self, allow: bool) -> Self {
        self.http.danger_allow_http = allow;
        self
    }

    /// How long one HTTP request may take in all (default 20 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.http.timeout = timeout;
        self
    }

    /// The client-side rate limit in operations per minute (default
    /// [`DEFAULT_OPERATIONS_PER_MINUTE`]; S3 hubs allow 5,000 per unit). At least 1.
    pub fn operations_per_minute(mut self, per_minute: u32) -> Self {
        self.per_minute = per_minute.max(1);
        self
    }

    /// How many times a call is sent in all when the hub throttles it (default 6).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// How long each signed token is valid (default one hour).
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime.max(Duration::from_secs(1));
        self
    }

    /// Builds the client. Nothing is sent until the first call.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConfig`] for a bad extra CA or an `http://` URL without
    /// [`danger_allow_http`](Self::danger_allow_http).
    pub fn build(self) -> Result<Registry> {
        let base = self
            .base_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.connection.host_name()));
        if base.starts_with("http://") && !self.http.danger_allow_http {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("the registry URL `{base}` is not https; use `danger_allow_http` for local tests only"),
            ));
        }
        let mut http = self.http.clone();
        http.loopback = is_loopback(&base);
        let client = http.build()?;
        let provider = self.connection.token_provider(self.token_lifetime);
        Ok(Registry {
            inner: Arc::new(Inner {
                client,
                base,
                tokens: TokenCache::new(provider, self.connection.host_name().to_owned()),
                bucket: Mutex::new(Bucket::new(self.per_minute)),
                max_attempts: self.max_attempts,
            }),
        })
    }
}

/// An IoT Hub registry and twin client: a cheap `Clone` over one HTTP client, one cached
/// token and one rate limiter.
///
/// ```no_run
/// # async fn run() -> hubsend::Result<()> {
/// use hubsend::iothub::{EnsureOutcome, Registry};
/// let registry = Registry::builder(
///     "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=…",
/// )?
/// .build()?;
/// if registry.ensure_device("sensor-1", Some("Kitchen")).await? == EnsureOutcome::Created {
///     println!("new device");
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    base: String,
    /// The hub-host token, cached and re-signed before it expires.
    tokens: TokenCache,
    bucket: Mutex<Bucket>,
    max_attempts: u32,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.inner.base)
            .field("audience", &self.inner.tokens.audience())
            .finish_non_exhaustive()
    }
}

/// What [`Registry::create_device`] and [`Registry::ensure_device`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsureOutcome {
    /// The identity was created by this call.
    Created,
    /// The identity existed already (409 `DeviceAlreadyExists`); nothing was written.
    Existed,
}

/// A device identity as the registry returns it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Device {
    /// The device id, exact case.
    pub device_id: String,
    /// Changes when an identity is deleted and re-created with the same id.
    pub generation_id: String,
    /// The identity's etag (quoted, opaque).
    pub etag: String,
    /// `enabled` or `disabled`.
    pub status: String,
    /// The whole JSON document, for fields not named here (its keys are left out of `Debug`
    /// only through this struct's users; treat it as secret, it holds the device keys).
    json: Value,
}

impl Device {
    /// The whole JSON document the hub returned. It holds the device's keys.
    pub fn json(&self) -> &Value {
        &self.json
    }

    fn from_json(json: Value) -> Result<Device> {
        let s = |k: &str| {
            json.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        if json.get("deviceId").and_then(Value::as_str).is_none() {
            return Err(Error::new(
                ErrorKind::Protocol,
                "the registry answered without a deviceId",
            ));
        }
        Ok(Device {
            device_id: s("deviceId"),
            generation_id: s("generationId"),
            etag: s("etag"),
            status: s("status"),
            json,
        })
    }
}

impl Registry {
    /// A builder from an IoT Hub policy connection string
    /// (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`) whose policy has registry
    /// rights (and ServiceConnect for twin calls).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConnectionString`] when the string does not parse or names a
    /// device rather than a policy.
    pub fn builder(connection_string: &str) -> Result<RegistryBuilder> {
        let connection = IotHubConnectionString::parse(connection_string)?;
        if connection.credential_kind() == IotHubCredentialKind::DeviceKey
            || connection.device_id().is_some()
        {
            return Err(Error::new(
                ErrorKind::InvalidConnectionString,
                "the registry needs a shared access policy connection string \
                 (HostName;SharedAccessKeyName;SharedAccessKey), not a device's",
            ));
        }
        Ok(RegistryBuilder {
            connection,
            base_url: None,
            http: HttpClientOptions::default(),
            per_minute: DEFAULT_OPERATIONS_PER_MINUTE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            token_lifetime: Duration::from_secs(3600),
        })
    }

    /// Reads device `id`'s identity.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NotFound`] for an unknown id; see the module docs for the rest.
    pub async fn get_device(&self, id: &str) -> Result<Device> {
        let (_, body) = self
            .call(
                reqwest::Method::GET,
                &device_path(id),
                None,
                None,
                Right::Read,
            )
            .await
            .map_err(Failure::into_error)?;
        Device::from_json(body)
    }

    /// Creates device `id` with SAS keys the hub generates. An existing id is
    /// [`EnsureOutcome::Existed`], not an error.
    ///
    /// # Errors
    ///
    /// See the module docs.
    pub async fn create_device(&self, id: &str) -> Result<EnsureOutcome> {
        let body = json!({
            "deviceId": id,
            "status": "enabled",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": null, "secondaryKey": null}},
        });
        match self
            .call(
                reqwest::Method::PUT,
                &device_path(id),
                Some(body),
                None,
                Right::Write,
            )
            .await
        {
            Ok(_) => Ok(EnsureOutcome::Created),
            Err(Failure::Status { status: 409, .. }) => Ok(EnsureOutcome::Existed),
            Err(e) => Err(e.into_error()),
        }
    }

    /// Reads device `id`'s twin (`{deviceId, etag, version, tags, properties}`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NotFound`] for an unknown id; see the module docs for the rest.
    pub async fn get_twin(&self, id: &str) -> Result<Value> {
        self.call(
            reqwest::Method::GET,
            &twin_path(id),
            None,
            None,
            Right::Service,
        )
        .await
        .map(|(_, body)| body)
        .map_err(Failure::into_error)
    }

    /// Merges `desired` into device `id`'s desired properties (`null` deletes a key), with
    /// `If-Match: etag` (`None` sends `*`). Returns the updated twin.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Rejected`] for a stale etag (412); see the module docs for the rest.
    pub async fn update_twin_desired(
        &self,
        id: &str,
        desired: Value,
        etag: Option<&str>,
    ) -> Result<Value> {
        let body = json!({"properties": {"desired": desired}});
        self.call(
            reqwest::Method::PATCH,
            &twin_path(id),
            Some(body),
            Some(etag.unwrap_or("*")),
            Right::Service,
        )
        .await
        .map(|(_, body)| body)
        .map_err(Failure::into_error)
    }

    /// Writes `properties.desired.deviceName` once (`If-Match: *`).
    ///
    /// # Errors
    ///
    /// As [`update_twin_desired`](Self::update_twin_desired).
    pub async fn write_device_name(&self, id: &str, name: &str) -> Result<()> {
        self.update_twin_desired(id, json!({"deviceName": name}), None)
            .await
            .map(drop)
    }

    /// Particle's flow: creates device `id` if it does not exist and, only when this call
    /// created it and a `name` is given, writes the name into its twin. An existing device is
    /// left as it is.
    ///
    /// # Errors
    ///
    /// See the module docs; a failed name write after a successful create is returned too
    /// (the identity then exists without its name).
    pub async fn ensure_device(&self, id: &str, name: Option<&str>) -> Result<EnsureOutcome> {
        let outcome = self.create_device(id).await?;
        if outcome == EnsureOutcome::Created {
            if let Some(name) = name {
                self.write_device_name(id, name).await?;
            }
        }
        Ok(outcome)
    }

    /// Creates many devices with bulk registry calls (`POST /devices`, `importMode`
    /// `create`, at most [`MAX_BULK_DEVICES`] per call, so one rate-limited operation per
    /// hundred devices instead of one or two each), each with SAS keys the hub generates and,
    /// when a name is given, `properties.desired.deviceName` set in the same call (so the name
    /// is written exactly when the identity is created). Returns each device's outcome in
    /// input order: [`EnsureOutcome::Created`], [`EnsureOutcome::Existed`] for an id the hub
    /// reports as `DeviceAlreadyExists` (left as it is), or that device's own error
    /// ([`ErrorKind::InvalidArgument`] for a bad id, …). Duplicate ids in the input are sent
    /// once; each copy gets the outcome.
    ///
    /// # Errors
    ///
    /// A failure of a whole call (401/403 naming RegistryWrite, throttling past the retries,
    /// the hub unreachable) fails the devices of that call with that error, in their slots;
    /// the outer `Err` is for nothing else than an answer hubsend cannot read.
    pub async fn create_devices(
        &self,
        devices: &[(&str, Option<&str>)],
    ) -> Result<Vec<(String, Result<EnsureOutcome>)>> {
        let mut unique: Vec<(&str, Option<&str>)> = Vec::with_capacity(devices.len());
        let mut seen = std::collections::HashSet::new();
        for &(id, name) in devices {
            if seen.insert(id) {
                unique.push((id, name));
            }
        }
        let mut outcomes: std::collections::HashMap<&str, Result<EnsureOutcome>> =
            std::collections::HashMap::with_capacity(unique.len());
        for chunk in unique.chunks(MAX_BULK_DEVICES) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|(id, name)| {
                    let mut entry = json!({
                        "id": id,
                        "importMode": "create",
                        "status": "enabled",
                        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": null, "secondaryKey": null}},
                    });
                    if let Some(name) = name {
                        entry["properties"] = json!({"desired": {"deviceName": name}});
                    }
                    entry
                })
                .collect();
            let answer = self
                .call(
                    reqwest::Method::POST,
                    "/devices",
                    Some(Value::Array(body)),
                    None,
                    Right::Write,
                )
                .await;
            let errors = match answer {
                Ok((_, body)) => body,
                Err(Failure::Status {
                    status: 400,
                    body: Some(body),
                    ..
                }) if body.get("errors").is_some() => body,
                Err(failure) => {
                    let error = failure.into_error();
                    for (id, _) in chunk {
                        outcomes.insert(id, Err(error.clone()));
                    }
                    continue;
                }
            };
            let mut failed: std::collections::HashMap<String, (String, String)> =
                Default::default();
            for e in errors
                .get("errors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let text = |k: &str| {
                    e.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                failed.insert(text("deviceId"), (text("errorCode"), text("errorStatus")));
            }
            for (id, _) in chunk {
                let outcome = match failed.remove(*id) {
                    None => Ok(EnsureOutcome::Created),
                    Some((code, _)) if code == "DeviceAlreadyExists" => Ok(EnsureOutcome::Existed),
                    Some((code, status)) => Err(bulk_error(id, &code, &status)),
                };
                outcomes.insert(id, outcome);
            }
        }
        Ok(devices
            .iter()
            .map(|(id, _)| {
                let outcome = outcomes
                    .get(id)
                    .cloned()
                    .unwrap_or(Ok(EnsureOutcome::Existed));
                ((*id).to_owned(), outcome)
            })
            .collect())
    }

    /// A header value for the hub-host audience (see [`TokenCache`] for when it is re-signed).
    async fn authorization(&self) -> std::result::Result<String, Failure> {
        let (token, _) = self.inner.tokens.token().await.map_err(Failure::Other)?;
        Ok(authorization(&token))
    }

    /// One call with rate limiting and throttle retries.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
        right: Right,
    ) -> std::result::Result<(u16, Value), Failure> {
        let url = format!("{}{}?api-version={API_VERSION}", self.inner.base, path);
        let mut backoff = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            self.inner.bucket.lock().await.take().await;
            let auth = self.authorization().await?;
            let mut request = self
                .inner
                .client
                .request(method.clone(), &url)
                .header(reqwest::header::AUTHORIZATION, auth)
                .header(reqwest::header::ACCEPT, "application/json");
            if let Some(tag) = if_match {
                let quoted = if tag == "*" || tag.starts_with('"') {
                    tag.to_owned()
                } else {
                    format!("\"{tag}\"")
                };
                request = request.header(reqwest::header::IF_MATCH, quoted);
            }
            if let Some(body) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string());
            }
            let what = format!(
                "{method} {path} at the IoT Hub registry {}",
                self.inner.base
            );
            let response = request
                .send()
                .await
                .map_err(|e| Failure::Other(transport_error(e, what.clone())))?;
            let status = response.status().as_u16();
            let header_code = response
                .headers()
                .get("IotHubErrorCode")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = response
                .text()
                .await
                .map_err(|e| Failure::Other(transport_error(e, what.clone())))?;
            if (200..300).contains(&status) {
                let json = if text.trim().is_empty() {
                    Value::Null
                } else {
                    serde_json::from_str(&text).map_err(|e| {
                        Failure::Other(
                            Error::new(
                                ErrorKind::Protocol,
                                format!("{what}: the answer is not JSON"),
                            )
                            .with_source(e),
                        )
                    })?
                };
                return Ok((status, json));
            }
            let code = header_code.or_else(|| error_code(&text));
            if (status == 429 || status == 503) && attempt < self.inner.max_attempts {
                let wait = retry_after.unwrap_or(backoff).min(Duration::from_secs(60));
                tracing::debug!(
                    status,
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    "registry throttled; waiting"
                );
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                attempt += 1;
                continue;
            }
            return Err(Failure::Status {
                status,
                code,
                what,
                right,
                body: serde_json::from_str(&text).ok(),
            });
        }
    }
}

/// The right a call needs, named in 401/403 errors.
#[derive(Debug, Clone, Copy)]
enum Right {
    Read,
    Write,
    Service,
}

impl Right {
    fn name(self) -> &'static str {
        match self {
            Right::Read => "RegistryRead",
            Right::Write => "RegistryWrite",
            Right::Service => "ServiceConnect",
        }
    }
}

/// A failed call, kept apart from [`Error`] until the caller decides (409 is not an error
/// for a create).
#[derive(Debug)]
enum Failure {
    Status {
        status: u16,
        code: Option<String>,
        what: String,
        right: Right,
        /// The answer's JSON body, if it had one (bulk calls carry per-device errors in it).
        body: Option<Value>,
    },
    Other(Error),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Other(e) => e,
            Failure::Status {
                status,
                code,
                what,
                right,
                ..
            } => {
                let code = code.unwrap_or_else(|| "unknown".to_owned());
                let (kind, cause) = match status {
                    400 => (ErrorKind::InvalidArgument, "the hub refused an argument".to_owned()),
                    401 => (
                        ErrorKind::Unauthorized,
                        format!("the token was refused (wrong key or policy name?); the policy needs {}", right.name()),
                    ),
                    403 => (
                        ErrorKind::Unauthorized,
                        format!("forbidden (quota, suspended hub, or the policy lacks {})", right.name()),
                    ),
                    404 => (ErrorKind::NotFound, "no such device".to_owned()),
                    409 => (ErrorKind::Rejected, "conflict".to_owned()),
                    412 => (
                        ErrorKind::Rejected,
                        "the etag is stale (precondition failed)".to_owned(),
                    ),
                    429 | 503 => (ErrorKind::ServerBusy, "throttled; retries exhausted".to_owned()),
                    _ => (ErrorKind::Protocol, "unexpected answer".to_owned()),
                };
                Error::new(
                    kind,
                    format!("{what}: HTTP {status}, ErrorCode {code}: {cause}"),
                )
            }
        }
    }
}

/// A device's own error in a bulk answer (`errorCode`, `errorStatus`).
fn bulk_error(id: &str, code: &str, status: &str) -> Error {
    let kind = match code {
        "DeviceNotFound" => ErrorKind::NotFound,
        "IotHubUnauthorizedAccess" | "IotHubUnauthorized" => ErrorKind::Unauthorized,
        "ThrottlingException" | "IotHubThrottled" => ErrorKind::ServerBusy,
        "PreconditionFailed" | "DeviceAlreadyExists" => ErrorKind::Rejected,
        _ => ErrorKind::InvalidArgument,
    };
    let status = crate::error::sanitize(status);
    Error::new(
        kind,
        format!("bulk create of device `{id}` at the IoT Hub registry: ErrorCode {code}: {status}"),
    )
}

/// `ErrorCode:<Name>;…` from the body's `Message`, or an int `errorCode` from a JSON
/// `Message`.
fn error_code(body: &str) -> Option<String> {
    let json: Value = serde_json::from_str(body).ok()?;
    let message = json.get("Message").and_then(Value::as_str)?;
    if let Some(rest) = message.strip_prefix("ErrorCode:") {
        return Some(rest.split(';').next().unwrap_or(rest).trim().to_owned());
    }
    let inner: Value = serde_json::from_str(message).ok()?;
    inner.get("errorCode").map(|c| c.to_string())
}

fn device_path(id: &str) -> String {
    format!("/devices/{}", encode_id(id))
}

fn twin_path(id: &str) -> String {
    format!("/twins/{}", encode_id(id))
}

/// A token bucket: `capacity` operations per minute, refilled continuously, starting full.
struct Bucket {
    capacity: f64,
    tokens: f64,
    per_sec: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Bucket {
        let capacity = f64::from(per_minute);
        Bucket {
            capacity,
            tokens: capacity,
            per_sec: capacity / 60.0,
            last: Instant::now(),
        }
    }

    /// Waits until one operation may go and takes it.
    async fn take(&mut self) {
        loop {
            let now = Instant::now();
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = (1.0 - self.tokens) / self.per_sec;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_read_from_both_body_shapes() {
        assert_eq!(
            error_code(r#"{"Message":"ErrorCode:DeviceNotFound;Device x not found"}"#).as_deref(),
            Some("DeviceNotFound")
        );
        assert_eq!(
            error_code(r#"{"Message":"{\"errorCode\":404001}"}"#).as_deref(),
            Some("404001")
        );
        assert_eq!(error_code("not json"), None);
    }

    #[test]
    fn ids_are_one_encoded_path_segment() {
        assert_eq!(device_path("a/b#c"), "/devices/a%2Fb%23c");
        assert_eq!(twin_path("dev-1.x"), "/twins/dev-1.x");
    }

    #[test]
    fn device_strings_are_refused_and_debug_hides_the_key() {
        let err =
            Registry::builder("HostName=h.azure-devices.net;DeviceId=d;SharedAccessKey=c2VjcmV0")
                .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConnectionString);
        let b = Registry::builder(
            "HostName=h.azure-devices.net;SharedAccessKeyName=p;SharedAccessKey=c2VjcmV0",
        )
        .unwrap();
        assert!(!format!("{b:?}").contains("c2VjcmV0"));
    }

    #[tokio::test]
    async fn the_bucket_waits_once_empty() {
        // 600 a minute: the first 600 go at once, the next waits about 100 ms.
        let mut bucket = Bucket::new(600);
        let start = Instant::now();
        for _ in 0..600 {
            bucket.take().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(80),
            "{:?}",
            start.elapsed()
        );
        bucket.take().await;
        assert!(
            start.elapsed() >= Duration::from_millis(90),
            "{:?}",
            start.elapsed()
        );
    }
}
