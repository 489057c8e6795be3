//! Claims-based security: the Authorizer that keeps one token per audience on a connection.
//!
//! Each audience (an Event Hub, or one IoT Hub device) has its own token provider, token and
//! expiry. One refresh task re-puts each token before it expires (after 80 % of its lifetime,
//! at least five minutes early when the lifetime allows it, never before half of it). After a
//! reconnect every audience is put again on the new connection. A refused audience fails alone:
//! the links of the others keep their tokens.
//!
//! The put-token exchange is our own [`Request`]/[`Response`] pair on fe2o3's management client,
//! because the service answers 202 (Event Hubs) or 200 (IoT Hub) and fe2o3-amqp-cbs accepts only
//! 202; the request itself carries what fe2o3-amqp-cbs sends (`operation`, `type`, `name`,
//! `expiration`, the token as an AMQP string body).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Message};
use fe2o3_amqp::types::primitives::{SimpleValue, Timestamp, Value};
use fe2o3_amqp_cbs::constants::{CBS_NODE_ADDR, EXPIRATION, PUT_TOKEN};
use fe2o3_amqp_management::client::MgmtClient;
use fe2o3_amqp_management::error::Error as MgmtError;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use fe2o3_amqp_management::status::StatusCode;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

use crate::auth::{AccessToken, TokenProvider};
use crate::error::{Error, ErrorKind, Result};

/// When to put a fresh token: after 80 % of its lifetime, and at least 5 minutes before expiry
/// when the lifetime allows it, but never before half of it has passed.
pub(crate) fn refresh_delay(now: SystemTime, expires_at: SystemTime) -> Duration {
    let lifetime = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    lifetime
        .mul_f64(0.8)
        .min(lifetime.saturating_sub(Duration::from_secs(300)))
        .max(lifetime / 2)
}

/// One audience's credentials and where its token stands. Its times are on tokio's monotonic
/// clock, converted from the token's wall-clock expiry when it is put: a wall clock that jumps
/// moves no refresh, and tests can run hours of refreshes in paused time.
struct Audience {
    provider: Arc<dyn TokenProvider>,
    expires_at: Instant,
    /// When the refresh task puts the next token.
    refresh_at: Instant,
    /// The token last put (management requests carry it too).
    token: AccessToken,
}

/// The tokens of one connection, keyed by audience.
pub(crate) struct Authorizer {
    /// The `$cbs` request/response pair of the current connection.
    client: Mutex<Option<MgmtClient>>,
    audiences: std::sync::Mutex<HashMap<String, Audience>>,
    /// Wakes the refresh task when an audience is added or the connection is replaced.
    changed: Notify,
    timeout: Duration,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let audiences: Vec<String> = self
            .audiences
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Authorizer")
            .field("audiences", &audiences)
            .finish()
    }
}

impl Authorizer {
    /// An authorizer whose requests each take at most `timeout`.
    pub(crate) fn new(timeout: Duration) -> Authorizer {
        Authorizer {
            client: Mutex::new(None),
            audiences: std::sync::Mutex::new(HashMap::new()),
            changed: Notify::new(),
            timeout,
        }
    }

    /// Attaches the `$cbs` links on `session` (a new connection's).
    pub(crate) async fn attach(session: &mut SessionHandle<()>) -> Result<MgmtClient> {
        MgmtClient::builder()
            .management_node_address(CBS_NODE_ADDR)
            .client_node_addr(format!("hubsend-cbs-{}", uuid::Uuid::new_v4().simple()))
            .attach(session)
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Link, "attaching the $cbs links failed").with_source(e)
            })
    }

    /// Uses `client` from now on (after a connect or reconnect).
    pub(crate) async fn set_client(&self, client: MgmtClient) {
        *self.client.lock().await = Some(client);
        self.changed.notify_one();
    }

    /// The token last put for `audience`.
    pub(crate) fn token(&self, audience: &str) -> Option<AccessToken> {
        self.audiences
            .lock()
            .ok()
            .and_then(|a| a.get(audience).map(|e| e.token.clone()))
    }

    /// Whether `audience` has a token on this connection.
    pub(crate) fn knows(&self, audience: &str) -> bool {
        self.audiences
            .lock()
            .map(|a| a.contains_key(audience))
            .unwrap_or(false)
    }

    /// Stops refreshing `audience` (a device gone idle). The hub keeps the last token until
    /// it expires; a later [`authorize`](Self::authorize) puts a fresh one.
    pub(crate) fn forget(&self, audience: &str) {
        if let Ok(mut audiences) = self.audiences.lock() {
            audiences.remove(audience);
        }
        self.changed.notify_one();
    }

    /// Puts a token for `audience` from `provider` and keeps it fresh from now on.
    pub(crate) async fn authorize(
        &self,
        audience: &str,
        provider: Arc<dyn TokenProvider>,
    ) -> Result<SystemTime> {
        let token = provider.token(audience).await?;
        self.put(audience, &token).await?;
        let expires_at = token.expires_at();
        let (wall, now) = (SystemTime::now(), Instant::now());
        if let Ok(mut audiences) = self.audiences.lock() {
            audiences.insert(
                audience.to_owned(),
                Audience {
                    provider,
                    expires_at: now + expires_at.duration_since(wall).unwrap_or(Duration::ZERO),
                    refresh_at: now + refresh_delay(wall, expires_at),
                    token,
                },
            );
        }
        self.changed.notify_one();
        Ok(expires_at)
    }

    /// Puts a fresh token for an audience already known (a refresh, or after its link was
    /// detached for an expired token).
    pub(crate) async fn refresh(&self, audience: &str) -> Result<SystemTime> {
        let provider = self
            .audiences
            .lock()
            .ok()
            .and_then(|a| a.get(audience).map(|e| e.provider.clone()))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unauthorized,
                    format!("no credentials for audience `{audience}`"),
                )
            })?;
        self.authorize(audience, provider).await
    }

    /// Puts every known audience again (on a new connection). The first refusal is returned;
    /// the other audiences are put all the same.
    pub(crate) async fn reauthorize_all(&self) -> Result<()> {
        let known: Vec<(String, Arc<dyn TokenProvider>)> = self
            .audiences
            .lock()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.clone(), v.provider.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut first = None;
        for (audience, provider) in known {
            if let Err(e) = self.authorize(&audience, provider).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The audience whose token is due for a refresh first, and when.
    fn next_due(&self) -> Option<(String, Instant)> {
        self.audiences.lock().ok().and_then(|a| {
            a.iter()
                .min_by_key(|(_, e)| e.refresh_at)
                .map(|(k, e)| (k.clone(), e.refresh_at))
        })
    }

    /// After a failed refresh of `audience`: try again in a quarter of what remains of its
    /// token (at most 30 s, at least 200 ms).
    fn postpone(&self, audience: &str) {
        if let Ok(mut audiences) = self.audiences.lock() {
            if let Some(entry) = audiences.get_mut(audience) {
                let now = Instant::now();
                let remaining = entry.expires_at.saturating_duration_since(now);
                entry.refresh_at = now
                    + (remaining / 4)
                        .min(Duration::from_secs(30))
                        .max(Duration::from_millis(200));
            }
        }
    }

    /// Runs the refresh queue until `stop` resolves: each audience's token is put again when
    /// it is due; `on_refresh` hears of every refresh and its result.
    pub(crate) async fn run_refresh(&self, on_refresh: impl Fn(&str, &Result<SystemTime>)) {
        loop {
            let changed = self.changed.notified();
            let wait = match self.next_due() {
                Some((_, at)) => at.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = changed => continue,
            }
            let Some((audience, at)) = self.next_due() else {
                continue;
            };
            if at > Instant::now() {
                continue;
            }
            let result = self.refresh(&audience).await;
            if result.is_err() {
                self.postpone(&audience);
            }
            on_refresh(&audience, &result);
        }
    }

    /// One put-token exchange on the current `$cbs` links.
    async fn put(&self, audience: &str, token: &AccessToken) -> Result<()> {
        let expires_ms = token
            .expires_at()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let request = PutToken {
            audience: audience.to_owned(),
            token: token.secret().to_owned(),
            token_type: token.token_type().as_str(),
            expiration: Timestamp::from_milliseconds(expires_ms),
        };
        let mut slot = self.client.lock().await;
        let client = slot.as_mut().ok_or_else(|| {
            Error::new(
                ErrorKind::Connection,
                "no $cbs link: the connection is not open",
            )
        })?;
        let result = tokio::time::timeout(self.timeout, client.call(request))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("put-token for `{audience}` timed out"),
                )
            })?;
        match result {
            Ok(Accepted) => {
                tracing::debug!(audience, "token accepted");
                Ok(())
            }
            Err(MgmtError::Status(status)) => {
                let code = status.code.0.get();
                let description = status.description.unwrap_or_default();
                let kind = match code {
                    401 | 403 => ErrorKind::Unauthorized,
                    404 => ErrorKind::NotFound,
                    _ => ErrorKind::Connection,
                };
                tracing::warn!(audience, code, "token refused");
                Err(Error::new(
                    kind,
                    format!(
                        "the hub refused the token for audience `{audience}` ({code}): {}",
                        crate::error::sanitize(&description)
                    ),
                ))
            }
            Err(e) => {
                // The links are in an unknown state (replies are matched by order): drop them.
                *slot = None;
                Err(Error::new(
                    ErrorKind::Connection,
                    format!("put-token for `{audience}` failed"),
                )
                .with_source(e))
            }
        }
    }
}

/// A put-token request.
struct PutToken {
    audience: String,
    token: String,
    token_type: &'static str,
    expiration: Timestamp,
}

impl Request for PutToken {
    const OPERATION: &'static str = PUT_TOKEN;
    type Response = Accepted;
    type Body = String;

    fn manageable_entity_type(&mut self) -> Option<String> {
        Some(self.token_type.to_owned())
    }

    fn locales(&mut self) -> Option<String> {
        None
    }

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        Some(
            ApplicationProperties::builder()
                .insert("name", std::mem::take(&mut self.audience))
                .insert(EXPIRATION, SimpleValue::Timestamp(self.expiration.clone()))
                .build(),
        )
    }

    fn encode_body(self) -> Self::Body {
        self.token
    }
}

/// A put-token answered with 200 (IoT Hub) or 202 (Event Hubs).
struct Accepted;

impl Response for Accepted {
    const STATUS_CODE: u16 = 202;
    type Body = Value;
    type Error = MgmtError;

    fn verify_status_code(message: &mut Message<Self::Body>) -> Result<StatusCode, Self::Error> {
        let ok = |m: &Message<Value>| {
            m.application_properties.as_ref().and_then(|props| {
                ["status-code", "statusCode"].iter().find_map(|key| {
                    let code = match props.get(*key)? {
                        SimpleValue::Int(v) => i64::from(*v),
                        SimpleValue::Uint(v) => i64::from(*v),
                        SimpleValue::Long(v) => *v,
                        SimpleValue::Ushort(v) => i64::from(*v),
                        SimpleValue::Short(v) => i64::from(*v),
                        _ => return None,
                    };
                    Some(code == 200 || code == 202)
                })
            })
        };
        if ok(message) == Some(true) {
            // Let the default check pass the accepted code, whichever it was.
            if let Some(props) = message.application_properties.as_mut() {
                for key in ["status-code", "statusCode"] {
                    if props.get(key).is_some() {
                        props.insert(key.to_owned(), SimpleValue::Int(202));
                    }
                }
            }
        }
        default_verify(message)
    }

    fn decode_message(_message: Message<Self::Body>) -> Result<Self, Self::Error> {
        Ok(Accepted)
    }
}

/// The management crate's own status check (with 202 expected).
fn default_verify(message: &mut Message<Value>) -> std::result::Result<StatusCode, MgmtError> {
    struct Default202;
    impl Response for Default202 {
        const STATUS_CODE: u16 = 202;
        type Body = Value;
        type Error = MgmtError;
        fn decode_message(_message: Message<Self::Body>) -> std::result::Result<Self, Self::Error> {
            Ok(Default202)
        }
    }
    Default202::verify_status_code(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_happens_well_before_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = refresh_delay(now, now + Duration::from_secs(3600));
        assert_eq!(hour, Duration::from_secs(2880));
        let short = refresh_delay(now, now + Duration::from_secs(4));
        assert_eq!(short, Duration::from_secs(2));
        assert_eq!(refresh_delay(now, now), Duration::ZERO);
    }

    fn reply(code: SimpleValue) -> Message<Value> {
        Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert("status-code", code)
                    .build(),
            )
            .body(Value::Null)
            .build()
    }

    #[test]
    fn put_token_accepts_200_and_202_only() {
        for ok in [
            SimpleValue::Int(200),
            SimpleValue::Int(202),
            SimpleValue::Long(200),
        ] {
            assert!(Accepted::from_message(reply(ok.clone())).is_ok(), "{ok:?}");
        }
        for refused in [
            SimpleValue::Int(401),
            SimpleValue::Int(404),
            SimpleValue::Int(201),
        ] {
            assert!(
                matches!(
                    Accepted::from_message(reply(refused.clone())),
                    Err(MgmtError::Status(_))
                ),
                "{refused:?}"
            );
        }
    }
}
