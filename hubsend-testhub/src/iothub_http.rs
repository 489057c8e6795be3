//! The IoT Hub registry and twin REST API (the part of IoT Hub mode that speaks HTTP).
//!
//! Endpoints, with IoT Hub's shapes and status codes (api-version is accepted as sent):
//! - `GET /devices/{id}`: 200 with the identity, 404 `DeviceNotFound`.
//! - `PUT /devices/{id}` without `If-Match`: creates (200) with generated base64 keys;
//!   an existing id is 409 `DeviceAlreadyExists`.
//! - `PUT /devices/{id}` with `If-Match` (`*` or the identity's etag, else 412): updates
//!   the status (`enabled`/`disabled`); an unknown id is 404.
//! - `DELETE /devices/{id}` with `If-Match` (`*` or the etag; none is taken as `*`): 204,
//!   or 404 for an unknown id.
//! - `POST /devices`: the bulk registry call (at most 100 entries; `importMode` `create`,
//!   `createOrUpdate`, `update`, `delete`; 200, or 400 with per-device `errors`), needing
//!   RegistryWrite. A `create` entry's `properties.desired` and `tags` are the new twin's.
//! - `GET /twins/{id}`, `PATCH /twins/{id}` (a JSON merge of `tags` and
//!   `properties.desired`; `If-Match` `*` or the twin's etag, else 412 `PreconditionFailed`).
//!
//! Every request needs `Authorization: SharedAccessSignature sr=…&sig=…&se=…&skn=…`, checked
//! as IoT Hub does: the HMAC-SHA256 of the literal `sr` and `se`, keyed with the policy's
//! base64-*decoded* key; `sr` decoded case-insensitively must cover the hub host; the policy
//! needs RegistryRead (GET device), RegistryWrite (PUT device) or ServiceConnect (twins).
//! A per-minute limit (off by default) answers 429 with `Retry-After` once exceeded.
//!
//! The registry lives in [`IotHubState`], the one device store of IoT Hub mode: the AMQP side
//! ([`TestHub`](crate::TestHub) with [`HubConfig::iothub`](crate::HubConfig::iothub)) reads
//! the same devices, keys, status and policies, so a device created here can send D2C at once,
//! a disabled one is refused and a deleted one is gone. Ids are case-sensitive everywhere.
//! Every change to the registry (over REST or through [`IotHubState`]'s methods) wakes the
//! AMQP side, which detaches the live D2C links of a device just deleted or disabled (see
//! the `server::iothub` module docs for the condition).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;

/// A shared access policy and what it may do.
#[derive(Debug, Clone)]
pub struct IotHubPolicy {
    /// The policy name (`skn`).
    pub name: String,
    /// Its base64 key.
    pub key: String,
    /// RegistryRead.
    pub registry_read: bool,
    /// RegistryWrite.
    pub registry_write: bool,
    /// ServiceConnect.
    pub service_connect: bool,
    /// DeviceConnect.
    pub device_connect: bool,
}

/// One device identity and its twin.
#[derive(Debug, Clone)]
pub struct IotHubDevice {
    /// Exact-case id.
    pub device_id: String,
    /// Changes on re-creation.
    pub generation_id: String,
    /// The identity etag (quoted).
    pub etag: String,
    /// `enabled` or `disabled`.
    pub status: String,
    /// Generated base64 primary key.
    pub primary_key: String,
    /// Generated base64 secondary key.
    pub secondary_key: String,
    /// The twin's tags.
    pub tags: Value,
    /// The twin's desired properties (without `$version`/`$metadata`).
    pub desired: Value,
    /// The twin's version.
    pub twin_version: u64,
    /// The twin's etag (quoted).
    pub twin_etag: String,
}

/// Request counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IotHubRequestCounts {
    /// All requests received.
    pub total: u64,
    /// Successful creates.
    pub created: u64,
    /// 409 answers.
    pub conflicts: u64,
    /// Twin PATCHes that succeeded.
    pub twin_updates: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// 429 answers.
    pub throttled: u64,
    /// Successful deletes.
    pub deleted: u64,
    /// Bulk registry calls (`POST /devices`) with an accepted token.
    pub bulk_calls: u64,
}

#[derive(Debug, Default)]
struct Inner {
    devices: HashMap<String, IotHubDevice>,
    counts: IotHubRequestCounts,
    window: Vec<Instant>,
    next_etag: u64,
}

/// The IoT Hub's registry, policies and limits, shared by its REST and AMQP sides.
#[derive(Debug, Clone)]
pub struct IotHubState {
    host: String,
    policies: Arc<Vec<IotHubPolicy>>,
    per_minute: Option<u32>,
    /// The limit's window: a minute, as IoT Hub counts, unless a test shortens it.
    window: Duration,
    /// Live CBS tokens one AMQP connection may hold (IoT Hub: about 999).
    token_cap: usize,
    /// How long the registry REST side waits before answering each request (zero unless a test
    /// slows it down, as a distant or busy hub answers).
    delay: Duration,
    inner: Arc<Mutex<Inner>>,
    /// Bumped on every change to the registry; the AMQP side's D2C links watch it.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

/// IoT Hub's limit of CBS tokens per AMQP connection (PROTOCOL-2 D: "up to 999 tokens per
/// connection"); the next put-token is answered 403005 `IotHubMaxCbsTokenExceeded`.
pub const DEFAULT_TOKEN_CAP: usize = 999;

impl IotHubState {
    /// A hub named by `host` with IoT Hub's default policies (`iothubowner` with every right,
    /// `service`, `device`, `registryRead`, `registryReadWrite`), each with a random key.
    pub fn new(host: impl Into<String>) -> IotHubState {
        let policy = |name: &str, rr, rw, sc, dc| IotHubPolicy {
            name: name.to_owned(),
            key: random_key(),
            registry_read: rr,
            registry_write: rw,
            service_connect: sc,
            device_connect: dc,
        };
        IotHubState {
            host: host.into(),
            policies: Arc::new(vec![
                policy("iothubowner", true, true, true, true),
                policy("service", false, false, true, false),
                policy("device", false, false, false, true),
                policy("registryRead", true, false, false, false),
                policy("registryReadWrite", true, true, false, false),
            ]),
            per_minute: None,
            window: Duration::from_secs(60),
            token_cap: DEFAULT_TOKEN_CAP,
            delay: Duration::ZERO,
            inner: Arc::default(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Adds policy `name` with `key` and these rights, or replaces the one of that name.
    pub fn with_policy(mut self, policy: IotHubPolicy) -> IotHubState {
        let policies = Arc::make_mut(&mut self.policies);
        policies.retain(|p| p.name != policy.name);
        policies.push(policy);
        self
    }

    /// Sets the key of policy `name`, if it exists.
    pub fn with_policy_key(mut self, name: &str, key: impl Into<String>) -> IotHubState {
        let key = key.into();
        if let Some(p) = Arc::make_mut(&mut self.policies)
            .iter_mut()
            .find(|p| p.name == name)
        {
            p.key = key;
        }
        self
    }

    /// How many live CBS tokens one AMQP connection may hold (default [`DEFAULT_TOKEN_CAP`]).
    pub fn with_token_cap(mut self, cap: usize) -> IotHubState {
        self.token_cap = cap.max(1);
        self
    }

    /// The CBS token cap per AMQP connection.
    pub fn token_cap(&self) -> usize {
        self.token_cap
    }

    /// Every policy.
    pub fn policies(&self) -> &[IotHubPolicy] {
        &self.policies
    }

    /// Registers device `id` (exact case) with base64 `primary_key`, enabled, as a create
    /// over REST would (an existing id is replaced, with a new generation).
    pub fn add_device(&self, id: impl Into<String>, primary_key: impl Into<String>) {
        let id = id.into();
        let mut inner = self.lock();
        inner.next_etag += 1;
        let mut device = new_device(&id, inner.next_etag, "enabled");
        device.primary_key = primary_key.into();
        inner.devices.insert(id, device);
        drop(inner);
        self.changed();
    }

    /// Enables or disables device `id`; false when it does not exist.
    /// A disabled device's live D2C links are detached (as over REST).
    pub fn set_device_enabled(&self, id: &str, enabled: bool) -> bool {
        let found = {
            let mut inner = self.lock();
            inner.next_etag += 1;
            let seq = inner.next_etag;
            match inner.devices.get_mut(id) {
                Some(d) => {
                    d.status = if enabled { "enabled" } else { "disabled" }.to_owned();
                    d.etag = identity_etag(seq);
                    true
                }
                None => false,
            }
        };
        self.changed();
        found
    }

    /// Removes device `id`; false when it did not exist. Its live D2C links are detached (as
    /// over REST).
    pub fn remove_device(&self, id: &str) -> bool {
        let removed = self.lock().devices.remove(id).is_some();
        self.changed();
        removed
    }

    /// Wakes whoever watches the registry ([`watch_changes`](Self::watch_changes)).
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees a change whenever a device is added, changed or removed; the
    /// AMQP side's D2C links watch it to detach devices deleted or disabled meanwhile.
    pub(crate) fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether device `id` exists and is enabled.
    pub fn device_enabled(&self, id: &str) -> bool {
        self.lock()
            .devices
            .get(id)
            .is_some_and(|d| d.status == "enabled")
    }

    /// The same hub (host, policies, limits) with an empty registry of its own.
    pub(crate) fn fresh(&self) -> IotHubState {
        IotHubState {
            inner: Arc::default(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            ..self.clone()
        }
    }

    /// Answers 429 once more than `limit` requests arrive within a minute.
    pub fn with_rate_limit(mut self, limit: Option<u32>) -> IotHubState {
        self.per_minute = limit;
        self
    }

    /// Counts the rate limit over `window` instead of a minute, so tests need not wait one.
    pub fn with_rate_window(mut self, window: Duration) -> IotHubState {
        self.window = window.max(Duration::from_secs(1));
        self
    }

    /// Waits `delay` before answering each registry request, the way a distant or busy hub
    /// answers late; requests that arrive meanwhile queue up in the client.
    pub fn with_response_delay(mut self, delay: Duration) -> IotHubState {
        self.delay = delay;
        self
    }

    /// The hub host name used in token audiences.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The policy named `name`.
    pub fn policy(&self, name: &str) -> Option<&IotHubPolicy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// A connection string for policy `name` (`iothubowner` has registry, service and device
    /// rights).
    pub fn connection_string(&self, name: &str) -> Option<String> {
        self.policy(name).map(|p| {
            format!(
                "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
                self.host, p.name, p.key
            )
        })
    }

    /// Every device, sorted by id.
    pub fn devices(&self) -> Vec<IotHubDevice> {
        let mut all: Vec<_> = self.lock().devices.values().cloned().collect();
        all.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        all
    }

    /// Device `id`, twin included.
    pub fn device(&self, id: &str) -> Option<IotHubDevice> {
        self.lock().devices.get(id).cloned()
    }

    /// Device `id`'s primary key, for checking device-key tokens on the AMQP side.
    pub fn device_key(&self, id: &str) -> Option<String> {
        self.device(id).map(|d| d.primary_key)
    }

    /// The request counters.
    pub fn counts(&self) -> IotHubRequestCounts {
        self.lock().counts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one request; a request that may have changed the registry (any but `GET`)
    /// wakes the AMQP side's D2C links afterwards.
    fn handle(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        if_match: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, Vec<(&'static str, String)>, Value) {
        let answer = self.handle_locked(method, path, auth, if_match, body);
        // Also a bulk call answered 400: its other entries were applied.
        if method != "GET" {
            self.changed();
        }
        answer
    }

    /// [`handle`](Self::handle) under the registry's lock.
    fn handle_locked(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        if_match: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, Vec<(&'static str, String)>, Value) {
        let mut inner = self.lock();
        inner.counts.total += 1;
        if let Some(limit) = self.per_minute {
            let now = Instant::now();
            let window = self.window;
            inner.window.retain(|t| now.duration_since(*t) < window);
            if inner.window.len() >= limit as usize {
                inner.counts.throttled += 1;
                let oldest = inner.window[0];
                let wait = window
                    .saturating_sub(now.duration_since(oldest))
                    .as_secs_f64()
                    .ceil()
                    .max(1.0) as u64;
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "ThrottlingException",
                    "too many requests",
                    vec![("retry-after", wait.to_string())],
                );
            }
            inner.window.push(now);
        }
        if path.trim_end_matches('/') == "/devices" && method == "POST" {
            return match self.check_token(auth) {
                Ok(policy) if policy.registry_write => {
                    inner.counts.bulk_calls += 1;
                    bulk(&mut inner, body)
                }
                Ok(_) => {
                    inner.counts.unauthorized += 1;
                    error(
                        StatusCode::UNAUTHORIZED,
                        "IotHubUnauthorizedAccess",
                        "the policy lacks RegistryWrite",
                        vec![],
                    )
                }
                Err(why) => {
                    inner.counts.unauthorized += 1;
                    error(
                        StatusCode::UNAUTHORIZED,
                        "IotHubUnauthorizedAccess",
                        why,
                        vec![],
                    )
                }
            };
        }
        let (kind, raw_id) = match path.strip_prefix("/devices/") {
            Some(id) => ("device", id),
            None => match path.strip_prefix("/twins/") {
                Some(id) => ("twin", id),
                None => {
                    return error(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        "no such endpoint",
                        vec![],
                    )
                }
            },
        };
        let id = percent_encoding::percent_decode_str(raw_id)
            .decode_utf8_lossy()
            .into_owned();
        let right_ok = |p: &IotHubPolicy| match (kind, method) {
            ("device", "GET") => p.registry_read,
            ("device", _) => p.registry_write,
            _ => p.service_connect,
        };
        match self.check_token(auth) {
            Ok(policy) if right_ok(policy) => {}
            Ok(_) => {
                inner.counts.unauthorized += 1;
                return error(
                    StatusCode::UNAUTHORIZED,
                    "IotHubUnauthorizedAccess",
                    "the policy lacks the right for this call",
                    vec![],
                );
            }
            Err(why) => {
                inner.counts.unauthorized += 1;
                return error(
                    StatusCode::UNAUTHORIZED,
                    "IotHubUnauthorizedAccess",
                    why,
                    vec![],
                );
            }
        }
        inner.next_etag += 1;
        let etag_seq = inner.next_etag;
        match (kind, method) {
            ("device", "GET") => match inner.devices.get(&id) {
                Some(d) => (StatusCode::OK, vec![], device_json(d)),
                None => error(
                    StatusCode::NOT_FOUND,
                    "DeviceNotFound",
                    "device not found",
                    vec![],
                ),
            },
            ("device", "PUT") if if_match.is_some() => {
                let Some(device) = inner.devices.get_mut(&id) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "DeviceNotFound",
                        "device not found",
                        vec![],
                    );
                };
                if !etag_matches(if_match, &device.etag) {
                    return error(
                        StatusCode::PRECONDITION_FAILED,
                        "PreconditionFailed",
                        "the etag is stale",
                        vec![],
                    );
                }
                let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                match parsed.get("status").and_then(Value::as_str) {
                    Some(status @ ("enabled" | "disabled")) => device.status = status.to_owned(),
                    None => {}
                    Some(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "ArgumentInvalid",
                            "status must be enabled or disabled",
                            vec![],
                        )
                    }
                }
                let key = |k: &str| {
                    parsed
                        .pointer(&format!("/authentication/symmetricKey/{k}"))
                        .and_then(Value::as_str)
                        .filter(|k| STANDARD.decode(k).is_ok())
                        .map(str::to_owned)
                };
                if let Some(k) = key("primaryKey") {
                    device.primary_key = k;
                }
                if let Some(k) = key("secondaryKey") {
                    device.secondary_key = k;
                }
                device.etag = identity_etag(etag_seq);
                (StatusCode::OK, vec![], device_json(device))
            }
            ("device", "PUT") => {
                if inner.devices.contains_key(&id) {
                    inner.counts.conflicts += 1;
                    return error(
                        StatusCode::CONFLICT,
                        "DeviceAlreadyExists",
                        "a device with this id exists",
                        vec![],
                    );
                }
                let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                if parsed.get("deviceId").and_then(Value::as_str) != Some(id.as_str()) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "ArgumentInvalid",
                        "deviceId in the body must match the path",
                        vec![],
                    );
                }
                let status = parsed
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("enabled");
                let device = new_device(&id, etag_seq, status);
                let answer = device_json(&device);
                inner.devices.insert(id, device);
                inner.counts.created += 1;
                (StatusCode::OK, vec![], answer)
            }
            ("device", "DELETE") => {
                let Some(device) = inner.devices.get(&id) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "DeviceNotFound",
                        "device not found",
                        vec![],
                    );
                };
                if !etag_matches(if_match.or(Some("*")), &device.etag) {
                    return error(
                        StatusCode::PRECONDITION_FAILED,
                        "PreconditionFailed",
                        "the etag is stale",
                        vec![],
                    );
                }
                inner.devices.remove(&id);
                inner.counts.deleted += 1;
                (StatusCode::NO_CONTENT, vec![], Value::Null)
            }
            ("twin", "GET") => match inner.devices.get(&id) {
                Some(d) => (StatusCode::OK, vec![], twin_json(d)),
                None => error(
                    StatusCode::NOT_FOUND,
                    "DeviceNotFound",
                    "device not found",
                    vec![],
                ),
            },
            ("twin", "PATCH") => {
                let Some(device) = inner.devices.get_mut(&id) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "DeviceNotFound",
                        "device not found",
                        vec![],
                    );
                };
                match if_match {
                    None | Some("*") => {}
                    Some(tag)
                        if tag == device.twin_etag || format!("\"{tag}\"") == device.twin_etag => {}
                    Some(_) => {
                        return error(
                            StatusCode::PRECONDITION_FAILED,
                            "PreconditionFailed",
                            "the etag is stale",
                            vec![],
                        )
                    }
                }
                let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "ArgumentInvalid",
                        "the body is not JSON",
                        vec![],
                    );
                };
                if let Some(tags) = patch.get("tags") {
                    merge(&mut device.tags, tags);
                }
                if let Some(desired) = patch.pointer("/properties/desired") {
                    merge(&mut device.desired, desired);
                }
                device.twin_version += 1;
                device.twin_etag = format!("\"t{etag_seq}\"");
                let answer = twin_json(device);
                inner.counts.twin_updates += 1;
                (StatusCode::OK, vec![], answer)
            }
            _ => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported",
                vec![],
            ),
        }
    }

    /// Checks a policy token for the hub host; returns the policy.
    fn check_token(&self, auth: Option<&str>) -> Result<&IotHubPolicy, &'static str> {
        let token = auth
            .and_then(|a| a.strip_prefix("SharedAccessSignature "))
            .ok_or("no SharedAccessSignature")?;
        let mut sr = None;
        let mut sig = None;
        let mut se = None;
        let mut skn = None;
        // Split by hand, not form-decoded: the signature covers `sr` and `se` as sent.
        for pair in token.split('&') {
            let (k, v) = pair.split_once('=').ok_or("malformed token")?;
            match k {
                "sr" => sr = Some(v),
                "sig" => sig = Some(v),
                "se" => se = Some(v),
                "skn" => skn = Some(v),
                _ => {}
            }
        }
        let (sr, sig, se, skn) = match (sr, sig, se, skn) {
            (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
            _ => return Err("the token needs sr, sig, se and skn"),
        };
        let policy = self.policy(skn).ok_or("unknown policy")?;
        let expiry: u64 = se.parse().map_err(|_| "bad se")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if expiry <= now {
            return Err("the token has expired");
        }
        let key = STANDARD.decode(&policy.key).map_err(|_| "bad policy key")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| "bad key")?;
        mac.update(format!("{sr}\n{se}").as_bytes());
        let expected = STANDARD.encode(mac.finalize().into_bytes());
        let given = percent_encoding::percent_decode_str(sig).decode_utf8_lossy();
        if given != expected {
            return Err("the signature does not match");
        }
        let audience = percent_encoding::percent_decode_str(sr)
            .decode_utf8_lossy()
            .to_ascii_lowercase();
        let audience = audience
            .trim_start_matches("https://")
            .trim_end_matches('/');
        if audience != self.host.to_ascii_lowercase() {
            return Err("the token's audience is not this hub");
        }
        Ok(policy)
    }
}

/// A fresh identity `id` with generated keys (sequence `seq` makes its etags unique).
fn new_device(id: &str, seq: u64, status: &str) -> IotHubDevice {
    IotHubDevice {
        device_id: id.to_owned(),
        generation_id: format!("{}", 638_000_000_000_000_000u64 + seq),
        etag: identity_etag(seq),
        status: status.to_owned(),
        primary_key: random_key(),
        secondary_key: random_key(),
        tags: json!({}),
        desired: json!({}),
        twin_version: 1,
        twin_etag: format!("\"t{seq}\""),
    }
}

/// The bulk registry call (`POST /devices`): an array of at most 100 entries with unique ids,
/// each applied on its own (a failed entry does not undo the others; inferred). Modes:
/// `create` (an existing id is `DeviceAlreadyExists`), `createOrUpdate`, `update` (an unknown
/// id is `DeviceNotFound`), `delete` (likewise); `status`, `authentication.symmetricKey`,
/// `tags` and `properties.desired` are taken from the entry. Answers 200
/// `{isSuccessful:true, errors:[], warnings:[]}`, or 400 with `isSuccessful:false` and one
/// `{deviceId, errorCode, errorStatus}` per failed entry; a malformed body is a plain 400.
fn bulk(inner: &mut Inner, body: &[u8]) -> (StatusCode, Vec<(&'static str, String)>, Value) {
    let bad = |why: &str| error(StatusCode::BAD_REQUEST, "ArgumentInvalid", why, vec![]);
    let Ok(Value::Array(entries)) = serde_json::from_slice::<Value>(body) else {
        return bad("the body must be a JSON array of devices");
    };
    if entries.len() > 100 {
        return error(
            StatusCode::BAD_REQUEST,
            "TooManyDevices",
            "a bulk call takes at most 100 devices",
            vec![],
        );
    }
    let mut ids = std::collections::HashSet::new();
    for e in &entries {
        match e.get("id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() && ids.insert(id.to_owned()) => {}
            Some(_) => return bad("device ids must be unique and non-empty"),
            None => return bad("every entry needs an id"),
        }
    }
    let mut errors = Vec::new();
    for e in &entries {
        let id = e
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mode = e
            .get("importMode")
            .and_then(Value::as_str)
            .unwrap_or("createOrUpdate");
        let fail = |code: &str, status: &str| json!({"deviceId": id, "moduleId": null, "errorCode": code, "errorStatus": status, "operation": mode});
        if !valid_id(&id) {
            errors.push(fail(
                "ArgumentInvalid",
                "the device id has characters IoT Hub does not allow",
            ));
            continue;
        }
        inner.next_etag += 1;
        let seq = inner.next_etag;
        let exists = inner.devices.contains_key(&id);
        match (mode.to_ascii_lowercase().as_str(), exists) {
            ("create", true) => {
                inner.counts.conflicts += 1;
                errors.push(fail("DeviceAlreadyExists", "a device with this id exists"));
                continue;
            }
            ("update" | "delete", false) => {
                errors.push(fail("DeviceNotFound", "device not found"));
                continue;
            }
            ("delete", true) => {
                inner.devices.remove(&id);
                inner.counts.deleted += 1;
                continue;
            }
            ("create" | "createorupdate", false) => {
                let device = new_device(&id, seq, "enabled");
                inner.devices.insert(id.clone(), device);
                inner.counts.created += 1;
            }
            ("update" | "createorupdate", true) => {}
            _ => {
                errors.push(fail(
                    "InvalidOperation",
                    "the test hub supports create, createOrUpdate, update and delete",
                ));
                continue;
            }
        }
        let Some(device) = inner.devices.get_mut(&id) else {
            continue;
        };
        match e.get("status").and_then(Value::as_str) {
            Some(status @ ("enabled" | "disabled")) => device.status = status.to_owned(),
            None => {}
            Some(_) => errors.push(fail(
                "ArgumentInvalid",
                "status must be enabled or disabled",
            )),
        }
        for (field, slot) in [
            ("primaryKey", &mut device.primary_key),
            ("secondaryKey", &mut device.secondary_key),
        ] {
            let key = e
                .pointer(&format!("/authentication/symmetricKey/{field}"))
                .and_then(Value::as_str)
                .filter(|k| STANDARD.decode(k).is_ok());
            if let Some(k) = key {
                *slot = k.to_owned();
            }
        }
        let mut twin_changed = false;
        if let Some(tags) = e.get("tags").filter(|t| t.is_object()) {
            merge(&mut device.tags, tags);
            twin_changed = true;
        }
        if let Some(desired) = e.pointer("/properties/desired").filter(|d| d.is_object()) {
            merge(&mut device.desired, desired);
            twin_changed = true;
        }
        if twin_changed {
            device.twin_version += 1;
            device.twin_etag = format!("\"t{seq}\"");
            inner.counts.twin_updates += 1;
        }
        device.etag = identity_etag(seq);
    }
    let ok = errors.is_empty();
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        },
        vec![],
        json!({"isSuccessful": ok, "errors": errors, "warnings": []}),
    )
}

/// IoT Hub's device id rule: 1 to 128 of `A-Za-z0-9` and `-:.+%_#*?!(),=@;$'`.
fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-:.+%_#*?!(),=@;$'".contains(c))
}

fn identity_etag(seq: u64) -> String {
    format!("\"{}\"", STANDARD.encode(format!("e{seq}")))
}

/// `If-Match` `*`, or the etag with or without its quotes.
fn etag_matches(if_match: Option<&str>, etag: &str) -> bool {
    match if_match.map(|t| t.trim()) {
        None => false,
        // Microsoft's Python SDK quotes the wildcard too.
        Some("*" | "\"*\"") => true,
        Some(tag) => tag == etag || format!("\"{tag}\"") == etag,
    }
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    target.remove(k);
                } else if v.is_object() {
                    let slot = target.entry(k.clone()).or_insert_with(|| json!({}));
                    if !slot.is_object() {
                        *slot = json!({});
                    }
                    merge(slot, v);
                } else {
                    target.insert(k.clone(), v.clone());
                }
            }
        }
        (into, patch) => *into = patch.clone(),
    }
}

fn device_json(d: &IotHubDevice) -> Value {
    json!({
        "deviceId": d.device_id,
        "moduleId": null,
        "generationId": d.generation_id,
        "etag": d.etag,
        "connectionState": "Disconnected",
        "status": d.status,
        "statusReason": null,
        "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
        "statusUpdatedTime": "0001-01-01T00:00:00Z",
        "lastActivityTime": "0001-01-01T00:00:00Z",
        "cloudToDeviceMessageCount": 0,
        "authentication": {
            "symmetricKey": {"primaryKey": d.primary_key, "secondaryKey": d.secondary_key},
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "type": "sas"
        },
        "capabilities": {"iotEdge": false},
    })
}

fn twin_json(d: &IotHubDevice) -> Value {
    let mut desired = d.desired.clone();
    if let Value::Object(map) = &mut desired {
        map.insert(
            "$metadata".into(),
            json!({"$lastUpdated": "0001-01-01T00:00:00Z"}),
        );
        map.insert("$version".into(), json!(d.twin_version));
    }
    json!({
        "deviceId": d.device_id,
        "etag": d.twin_etag,
        "deviceEtag": d.etag,
        "status": d.status,
        "version": d.twin_version,
        "tags": d.tags,
        "properties": {
            "desired": desired,
            "reported": {"$metadata": {"$lastUpdated": "0001-01-01T00:00:00Z"}, "$version": 1}
        },
        "capabilities": {"iotEdge": false},
        "connectionState": "Disconnected",
    })
}

fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    mut headers: Vec<(&'static str, String)>,
) -> (StatusCode, Vec<(&'static str, String)>, Value) {
    headers.push(("iothuberrorcode", code.to_owned()));
    (
        status,
        headers,
        json!({"Message": format!("ErrorCode:{code};{message}"), "ExceptionMessage": ""}),
    )
}

fn random_key() -> String {
    let bytes: [u8; 32] = rand::random();
    STANDARD.encode(bytes)
}

/// The running REST server.
#[derive(Debug)]
pub struct IotHubRest {
    addr: SocketAddr,
    state: IotHubState,
    task: tokio::task::JoinHandle<()>,
    ca_pem: Option<String>,
}

impl IotHubRest {
    /// Serves plain HTTP for `state` on `addr` (port 0 picks one).
    pub async fn start(state: IotHubState, addr: SocketAddr) -> std::io::Result<IotHubRest> {
        IotHubRest::serve_on(state, addr, None).await
    }

    /// Serves HTTPS for `state` on `addr`, with a certificate for `localhost`, `127.0.0.1`
    /// and the hub host from a fresh CA; [`ca_pem`](Self::ca_pem) is that CA.
    pub async fn start_tls(state: IotHubState, addr: SocketAddr) -> std::io::Result<IotHubRest> {
        let (acceptor, ca) =
            crate::tls::make_acceptor(state.host()).map_err(std::io::Error::other)?;
        IotHubRest::serve_on(state, addr, Some((acceptor, ca))).await
    }

    async fn serve_on(
        state: IotHubState,
        addr: SocketAddr,
        tls: Option<(tokio_rustls::TlsAcceptor, String)>,
    ) -> std::io::Result<IotHubRest> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let served = state.clone();
        let (acceptor, ca_pem) = match tls {
            Some((a, ca)) => (Some(a), Some(ca)),
            None => (None, None),
        };
        let task =
            crate::http_server::spawn(listener, acceptor, move |req| serve(served.clone(), req));
        Ok(IotHubRest {
            addr,
            state,
            task,
            ca_pem,
        })
    }

    /// The CA that signed the HTTPS certificate (`None` for plain HTTP).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (or `https://localhost:PORT` with TLS), the registry URL for clients.
    pub fn url(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// The shared state.
    pub fn state(&self) -> &IotHubState {
        &self.state
    }
}

impl Drop for IotHubRest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    state: IotHubState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = crate::http_server::read(req).await;
    let method = head.method.as_str();
    let path = head.uri.path();
    let header = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok());
    let auth = header("authorization");
    let if_match = header("if-match");
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let (status, headers, json) = state.handle(method, path, auth, if_match, &body);
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8");
    for (k, v) in headers {
        response = response.header(k, v);
    }
    let body = if status == StatusCode::NO_CONTENT {
        Bytes::new()
    } else {
        Bytes::from(json.to_string())
    };
    Ok(response.body(Full::new(body)).unwrap_or_default())
}
