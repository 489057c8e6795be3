//! The Event Hubs HTTPS REST send API as a delivery backend beside the AMQP engine (feature
//! `https`): what [`Producer`](crate::Producer) uses with
//! [`Transport::Https`](crate::Transport::Https).
//!
//! # Wire
//! - A single event: `POST {base}/{hub}[/partitions/{id}]/messages?timeout=…&api-version=2014-01`
//!   with the raw body, its `Content-Type`, `BrokerProperties: {"PartitionKey":…}` and one
//!   header per property ([`crate::servicebus_json::single_headers`]).
//! - A batch: the same URL with `Content-Type: application/vnd.microsoft.servicebus.json` and
//!   the JSON array the [`EventBatch`] built, sized exactly as it is sent.
//! - `Authorization`: the token of [`TokenCache`] for the namespace's audience (a SAS as
//!   hubsend signs it for AMQP, or `Bearer` + an Entra ID token), fetched anew before it
//!   expires and once more after a 401.
//! - 201 is success. Keep-alive connections are pooled, and up to
//!   [`MAX_CONCURRENT_REQUESTS`] requests are on the wire at once; the producer's in-flight
//!   bounds (deliveries and bytes) hold everything else.
//!
//! # Failures
//! Each status maps to a row of the one condition table ([`crate::error::Condition`]), so
//! kind and retriability read the same as over AMQP:
//!
//! | status | condition | kind | retried |
//! |---|---|---|---|
//! | 400 | `com.microsoft:argument-error` | `InvalidArgument` | no |
//! | 401 | `amqp:unauthorized-access` | `Unauthorized` | once, with a fresh token |
//! | 403 | `amqp:resource-limit-exceeded` (quota), or `amqp:link:message-size-exceeded` when the hub says the message is too large | `Rejected` / `MessageTooLarge` | no |
//! | 404, 410 | `amqp:not-found` | `NotFound` | no |
//! | 413 | `amqp:link:message-size-exceeded` | `MessageTooLarge` | no |
//! | 429, 503 | `com.microsoft:server-busy` | `ServerBusy` | yes, after `Retry-After` when sent |
//! | 500, other 5xx | `amqp:internal-error` | `Rejected` | yes |
//! | 504 | `com.microsoft:timeout` | `Timeout` | yes |
//! | connection lost, timed out | none | `Connection`, `Timeout` | yes |
//!
//! Retries follow [`RetryOptions`]: `max_retries`, back-off from `base_delay` to `max_delay`
//! (a `Retry-After` replaces the back-off, up to a minute), `try_timeout` per request,
//! `deadline` in all. A request whose answer was lost is sent again, so delivery is at-least-once, as over
//! AMQP. Concurrent requests may complete in any order: over HTTPS, events keep their order
//! only when each send is awaited before the next (or `max_in_flight` is 1).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::{broadcast, oneshot, Notify, Semaphore};
use tokio::time::Instant;

use super::{authorization, transport_error, HttpClientOptions, TokenCache};
use crate::amqp::ConnectionEvent;
use crate::auth::TokenProvider;
use crate::batch::{EventBatch, Format, Route};
use crate::error::{sanitize, Condition, Error, ErrorKind, Result};
use crate::event::Event;
use crate::producer::{DeliveryFuture, Pipeline, ProducerStats};
use crate::retry::RetryOptions;
use crate::servicebus_json::{single_headers, BATCH_CONTENT_TYPE};

/// The REST API version hubsend speaks (the one the service documents for sends).
const API_VERSION: &str = "2014-01";

/// How many requests are on the wire at once (each on its own pooled HTTP/1.1 connection).
/// Sixteen keeps a 2-core client busy over loopback and a long round trip full, without
/// opening a connection per in-flight delivery (1,024 by default).
pub(crate) const MAX_CONCURRENT_REQUESTS: usize = 16;

/// The longest `Retry-After` believed: the hub's word wins over the back-off (even above
/// `max_delay`), up to a minute, and always within the delivery's deadline.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What the REST backend needs to send.
pub(crate) struct RestConfig {
    /// `https://host[:port][/prefix]` (or `http://` to loopback or with `danger_plaintext`).
    pub(crate) base: String,
    pub(crate) hub: String,
    /// The namespace's audience (`https://{namespace}/{hub}`), whatever `base` dials.
    pub(crate) audience: String,
    pub(crate) provider: Arc<dyn TokenProvider>,
    pub(crate) http: HttpClientOptions,
    pub(crate) retry: RetryOptions,
}

/// The REST backend: one pooled HTTP client and one cached token, shared by every clone of the
/// producer and every request task.
#[derive(Clone)]
pub(crate) struct Rest {
    shared: Arc<Shared>,
}

struct Shared {
    client: reqwest::Client,
    base: String,
    hub: String,
    tokens: TokenCache,
    retry: RetryOptions,
    requests: Arc<Semaphore>,
    accepted: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    /// Request tasks still running, and the signal each gives when it ends.
    active: AtomicUsize,
    ended: Notify,
    closed: AtomicBool,
    /// Set when `close_within`'s deadline passes: running tasks give up with `Closed`.
    abort: tokio::sync::watch::Sender<bool>,
    events: broadcast::Sender<ConnectionEvent>,
}

impl std::fmt::Debug for Rest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rest")
            .field("base", &self.shared.base)
            .field("hub", &self.shared.hub)
            .field("audience", &self.shared.tokens.audience())
            .finish_non_exhaustive()
    }
}

/// One prepared request, sent as often as the retry policy says.
struct Prepared {
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Rest {
    /// Builds the client and fetches the first token, so a credential that cannot produce one
    /// fails here. The hub and the key are first checked by the hub at the first send.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] for a bad CA or proxy URL; the provider's error.
    pub(crate) async fn connect(config: RestConfig) -> Result<Rest> {
        let client = config.http.build()?;
        let tokens = TokenCache::new(config.provider, config.audience);
        tokens.token().await?;
        Ok(Rest {
            shared: Arc::new(Shared {
                client,
                base: config.base.trim_end_matches('/').to_owned(),
                hub: config.hub,
                tokens,
                retry: config.retry,
                requests: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
                accepted: AtomicU64::new(0),
                retried: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                active: AtomicUsize::new(0),
                ended: Notify::new(),
                closed: AtomicBool::new(false),
                abort: tokio::sync::watch::channel(false).0,
                events: broadcast::channel(64).0,
            }),
        })
    }

    pub(crate) fn hub(&self) -> &str {
        &self.shared.hub
    }

    /// Counters in the shape of the AMQP producer's (no reconnects or links here).
    pub(crate) fn stats(&self, in_flight: usize) -> ProducerStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProducerStats {
            in_flight,
            sent: load(&self.shared.accepted),
            retried: load(&self.shared.retried),
            failed: load(&self.shared.failed),
            reconnects: 0,
            link_recoveries: 0,
            duplicates_avoided: 0,
            in_flight_window_bytes: 0,
        }
    }

    /// Token refreshes (and failures to refresh) from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.shared.events.subscribe()
    }

    /// Queues one event as a single send.
    pub(crate) async fn send(
        &self,
        pipeline: &Pipeline,
        event: Event,
        route: Route,
        limit: u64,
        wait: bool,
    ) -> Result<DeliveryFuture> {
        let mut headers = Vec::new();
        if let Some(content_type) = event.content_type() {
            headers.push((
                CONTENT_TYPE,
                header_value(content_type, "the content type")?,
            ));
        }
        let mut header_bytes = 0u64;
        for (name, value) in single_headers(&event, route.partition_key.as_deref())? {
            header_bytes += (name.len() + value.len() + 4) as u64;
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("property `{}` is not a valid header name", sanitize(&name)),
                )
            })?;
            headers.push((header, header_value(&value, "a property value")?));
        }
        let size = event.body().len() as u64 + header_bytes;
        if size > limit {
            return Err(Error::new(
                ErrorKind::MessageTooLarge,
                format!(
                    "an event with a {}-byte body ({size} bytes with its headers) does not fit the {limit}-byte limit",
                    event.body().len()
                ),
            ));
        }
        let prepared = Prepared {
            url: self.url(route.partition_id.as_deref()),
            headers,
            body: Bytes::from(event.body().to_vec()),
        };
        self.submit(pipeline, prepared, size, wait).await
    }

    /// Queues a batch (made by this backend: JSON) as one request.
    pub(crate) async fn send_batch(
        &self,
        pipeline: &Pipeline,
        batch: EventBatch,
        wait: bool,
    ) -> Result<DeliveryFuture> {
        if batch.format() != Format::Json {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the batch was made by a producer of another transport; make it with this producer's `create_batch`",
            ));
        }
        if batch.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidBatchSize,
                "the batch holds no event",
            ));
        }
        let size = batch.size_in_bytes();
        let (route, body) = batch.into_json();
        let prepared = Prepared {
            url: self.url(route.partition_id.as_deref()),
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static(BATCH_CONTENT_TYPE))],
            body: Bytes::from(body),
        };
        self.submit(pipeline, prepared, size, wait).await
    }

    fn url(&self, partition: Option<&str>) -> String {
        let segment = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let timeout = self.shared.retry.try_timeout.as_secs().max(1);
        let hub = segment(&self.shared.hub);
        match partition {
            Some(id) => format!(
                "{}/{hub}/partitions/{}/messages?timeout={timeout}&api-version={API_VERSION}",
                self.shared.base,
                segment(id)
            ),
            None => format!(
                "{}/{hub}/messages?timeout={timeout}&api-version={API_VERSION}",
                self.shared.base
            ),
        }
    }

    /// Takes the in-flight permits, then sends in a task of its own until the retry policy
    /// gives an outcome.
    async fn submit(
        &self,
        pipeline: &Pipeline,
        prepared: Prepared,
        size: u64,
        wait: bool,
    ) -> Result<DeliveryFuture> {
        self.check_open()?;
        let permits = pipeline
            .permits(size.min(u64::from(u32::MAX)) as u32, wait)
            .await?;
        self.check_open()?;
        let (reply, rx) = oneshot::channel();
        let shared = self.shared.clone();
        shared.active.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut abort = shared.abort.subscribe();
            let result = tokio::select! {
                result = shared.deliver(&prepared) => result,
                _ = abort.wait_for(|a| *a) => Err(Error::new(
                    ErrorKind::Closed,
                    "the producer closed before the hub answered; the events may or may not have been stored",
                )),
            };
            let counter = if result.is_ok() {
                &shared.accepted
            } else {
                &shared.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            drop(permits);
            let _ = reply.send(result);
            shared.active.fetch_sub(1, Ordering::SeqCst);
            shared.ended.notify_waiters();
        });
        Ok(DeliveryFuture::from_receiver(rx))
    }

    fn check_open(&self) -> Result<()> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Closed, "the producer is closed"));
        }
        Ok(())
    }

    /// Stops new sends and waits for every request task to end, or until `deadline` passes
    /// (then the rest fail with `Closed`). Returns how many were still running then.
    pub(crate) async fn close(&self, deadline: Option<Duration>) -> usize {
        self.shared.closed.store(true, Ordering::SeqCst);
        let until = deadline.map(|d| Instant::now() + d);
        let mut unresolved = 0;
        loop {
            let ended = self.shared.ended.notified();
            let active = self.shared.active.load(Ordering::SeqCst);
            if active == 0 {
                return unresolved;
            }
            match until {
                Some(until) if unresolved == 0 => {
                    if tokio::time::timeout_at(until, ended).await.is_err() {
                        unresolved = self.shared.active.load(Ordering::SeqCst);
                        self.shared.abort.send_replace(true);
                    }
                }
                _ => ended.await,
            }
        }
    }
}

fn header_value(text: &str, what: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(text).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{what} cannot be sent as an HTTP header value"),
        )
    })
}

/// Why one attempt failed, with what the hub said about waiting.
struct Failed {
    error: Error,
    retry_after: Option<Duration>,
}

impl Shared {
    /// Sends until the hub stores it, a failure is final, or the retry policy is spent.
    async fn deliver(&self, prepared: &Prepared) -> Result<()> {
        let started = Instant::now();
        let mut retries = 0;
        let mut refreshed_after_401 = false;
        loop {
            let failed = match self.attempt(prepared).await {
                Ok(()) => return Ok(()),
                Err(failed) => failed,
            };
            let unauthorized = failed.error.kind() == ErrorKind::Unauthorized;
            // A refused token may only be stale (clock skew, a revoked key rotated): one more
            // try with a fresh one, then the refusal stands.
            let retry = if unauthorized {
                !refreshed_after_401
            } else {
                failed.error.is_retriable()
            };
            if !retry || retries >= self.retry.max_retries {
                return Err(failed.error);
            }
            let wait = if unauthorized {
                refreshed_after_401 = true;
                self.tokens.invalidate().await;
                Duration::ZERO
            } else {
                failed
                    .retry_after
                    .map_or_else(|| self.retry.delay(retries + 1), |d| d.min(MAX_RETRY_AFTER))
            };
            if started.elapsed() + wait > self.retry.deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "gave up after {} tries within the {:?} delivery deadline: {}",
                        retries + 1,
                        self.retry.deadline,
                        failed.error
                    ),
                )
                .with_source(failed.error));
            }
            tracing::debug!(
                attempt = retries + 1,
                wait_ms = wait.as_millis() as u64,
                error = %failed.error,
                "rest send failed; retrying"
            );
            tokio::time::sleep(wait).await;
            retries += 1;
            self.retried.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One POST.
    async fn attempt(&self, prepared: &Prepared) -> std::result::Result<(), Failed> {
        let fail = |error: Error| Failed {
            error,
            retry_after: None,
        };
        let (token, fresh) = self.tokens.token().await.map_err(|e| {
            let _ = self
                .events
                .send(ConnectionEvent::TokenRefreshFailed(e.to_string()));
            fail(e)
        })?;
        if fresh {
            let _ = self.events.send(ConnectionEvent::TokenRefreshed);
        }
        let auth = HeaderValue::from_str(&authorization(&token)).map_err(|_| {
            fail(Error::new(
                ErrorKind::Unauthorized,
                "the token cannot be sent as an HTTP header",
            ))
        })?;
        let _permit = self
            .requests
            .acquire()
            .await
            .map_err(|_| fail(Error::new(ErrorKind::Closed, "the producer is closed")))?;
        let mut request = self
            .client
            .post(&prepared.url)
            .header(reqwest::header::AUTHORIZATION, auth)
            .timeout(self.retry.try_timeout)
            .body(prepared.body.clone());
        for (name, value) in &prepared.headers {
            request = request.header(name, value);
        }
        let what = || format!("POST to event hub `{}` at {}", self.hub, self.base);
        let response = request
            .send()
            .await
            .map_err(|e| fail(transport_error(e, what())))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Read the body in every case, so the connection goes back to the pool.
        let text = response
            .text()
            .await
            .map_err(|e| fail(transport_error(e, what())))?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        Err(Failed {
            error: status_error(status, &text, &what()),
            retry_after,
        })
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The typed error for an HTTP failure status, with the hub's detail (its XML `<Detail>`, or
/// the body) made safe to print.
fn status_error(status: u16, body: &str, what: &str) -> Error {
    let detail = match (body.find("<Detail>"), body.find("</Detail>")) {
        (Some(a), Some(b)) if a + 8 <= b => &body[a + 8..b],
        _ => body,
    };
    let detail = sanitize(detail.trim());
    let too_large = {
        let d = detail.to_ascii_lowercase();
        d.contains("too large") || d.contains("exceeds") || d.contains("size")
    };
    let (condition, cause) = match status {
        400 => (
            Condition::ArgumentError,
            "the hub refused the request as malformed",
        ),
        401 => (
            Condition::UnauthorizedAccess,
            "the hub refused the token (wrong key or key name, expired, or the policy lacks Send)",
        ),
        403 if too_large => (Condition::MessageSizeExceeded, "the message is too large"),
        403 => (
            Condition::ResourceLimitExceeded,
            "forbidden: a quota of the namespace is exceeded",
        ),
        404 | 410 => (
            Condition::NotFound,
            "the event hub or partition does not exist",
        ),
        413 => (
            Condition::MessageSizeExceeded,
            "the request is larger than the hub takes",
        ),
        429 | 503 => (Condition::ServerBusy, "the hub is busy (throttled)"),
        504 => (Condition::Timeout, "the hub timed out"),
        500..=599 => (Condition::InternalError, "the hub failed internally"),
        _ => (
            Condition::Other(format!("http:{status}")),
            "unexpected answer",
        ),
    };
    let message = if detail.is_empty() {
        format!("{what}: HTTP {status}: {cause}")
    } else {
        format!("{what}: HTTP {status}: {cause}: {detail}")
    };
    Error::new(condition.kind(), message).with_condition(condition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_onto_the_condition_table() {
        let kind = |status, body: &str| status_error(status, body, "POST").kind();
        assert_eq!(kind(400, ""), ErrorKind::InvalidArgument);
        assert_eq!(kind(401, ""), ErrorKind::Unauthorized);
        assert_eq!(
            kind(403, "<Error><Code>403</Code><Detail>quota</Detail></Error>"),
            ErrorKind::Rejected
        );
        assert_eq!(
            kind(403, "The message size exceeds the limit"),
            ErrorKind::MessageTooLarge
        );
        assert_eq!(kind(404, ""), ErrorKind::NotFound);
        assert_eq!(kind(410, ""), ErrorKind::NotFound);
        assert_eq!(kind(413, ""), ErrorKind::MessageTooLarge);
        assert_eq!(kind(503, ""), ErrorKind::ServerBusy);
        assert!(status_error(503, "", "x").is_retriable());
        assert!(status_error(429, "", "x").is_retriable());
        assert!(status_error(500, "", "x").is_retriable());
        assert!(!status_error(413, "", "x").is_retriable());
        assert!(!status_error(400, "", "x").is_retriable());
        let e = status_error(
            413,
            "<Error><Code>413</Code><Detail>The received message (delivery-id:0, size:2000000 bytes) exceeds the limit (1048576 bytes)\u{1b}[2J</Detail></Error>",
            "POST to event hub `t`",
        );
        let shown = e.to_string();
        assert!(
            shown.contains("HTTP 413") && shown.contains("1048576"),
            "{shown}"
        );
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Tue, 01 Dec 2020 23:18:05 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
