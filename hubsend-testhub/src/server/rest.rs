//! The Event Hubs HTTPS REST send API, storing into the same partitions as the AMQP side, so
//! an AMQP consumer (hubsend's, Microsoft's) reads back what was POSTed.
//!
//! - `POST /{hub}/messages` and `POST /{hub}/partitions/{id}/messages` (any query; the service
//!   takes `?timeout=60&api-version=2014-01`).
//! - `Authorization`: an Event Hubs SAS (`SharedAccessSignature sr=…`, verified as the CBS side
//!   does: signature, expiry, audience covering the hub, the Send right) or `Bearer <jwt>` from
//!   a trusted issuer ([`HubConfig::trust_jwt_issuer`](crate::HubConfig)). Anything else: 401.
//! - A single event: the body is the event's data section; `Content-Type` its content type;
//!   `BrokerProperties: {"PartitionKey":…,"MessageId":…,"CorrelationId":…}`; every other
//!   non-standard header one application property (a JSON literal value keeps its type:
//!   `"Red"` a string, `12` a long, `1.5` a double, `true` a boolean; anything else the raw
//!   text as a string).
//! - A batch: `Content-Type: application/vnd.microsoft.servicebus.json`, a JSON array of
//!   `{"Body":"…","IsBodyBase64":bool,"UserProperties":{…},"BrokerProperties":{…}}`; each
//!   element is one event. Elements are routed by their own `PartitionKey` (the service's
//!   behaviour for differing keys is undocumented; hubsend never sends them).
//! - Answers as the service does: 201 with an empty body; errors as its XML
//!   `<Error><Code>N</Code><Detail>…</Detail></Error>`: 400 malformed, 401 token, 404 unknown
//!   hub or partition, 413 over the hub's max-message-size (counted on the request body, as
//!   the HTTP entity is the publication), and the armed fault
//!   ([`Faults::rest_fail_next`](crate::Faults::rest_fail_next)) before anything is stored.
//!
//! What it stores is an AMQP message per event, as an AMQP producer would have sent it:
//! properties (content-type, message-id, correlation-id), application properties, the
//! `x-opt-partition-key` annotation, one data section.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use fe2o3_amqp_types::messaging::{
    message::__private::Serializable, ApplicationProperties, Message, MessageAnnotations,
    MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::Value;

use super::Shared;
use crate::store::DeliveryMeta;
use crate::Right;

/// The batch content type.
const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";

/// Headers that are HTTP's or the API's own, never application properties.
const STANDARD_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "content-type",
    "content-length",
    "content-encoding",
    "brokerproperties",
    "user-agent",
    "accept",
    "accept-encoding",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "expect",
    "te",
    "proxy-authorization",
    "proxy-connection",
];

/// Counters of the REST endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestStats {
    /// Requests received.
    pub requests: u64,
    /// Requests answered 201.
    pub created: u64,
    /// Events stored from them.
    pub events_stored: u64,
    /// 400 answers.
    pub bad_requests: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// 413 answers.
    pub too_large: u64,
    /// Answers from the armed fault (503, 429, ...).
    pub injected_failures: u64,
    /// Distinct `Authorization` values that were accepted (a refreshed token is a new one).
    pub distinct_tokens: u64,
}

#[derive(Debug, Default)]
struct Counters {
    stats: RestStats,
    tokens: HashSet<String>,
}

/// The running REST listener; stops when dropped.
#[derive(Debug)]
pub(crate) struct RestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: bool,
    counters: Arc<Mutex<Counters>>,
    task: tokio::task::JoinHandle<()>,
}

impl RestServer {
    /// Binds `addr` and serves the hub's REST API, over TLS when `acceptor` is set.
    pub(crate) async fn start(
        shared: Arc<Shared>,
        addr: (String, u16),
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<RestServer> {
        let listener = tokio::net::TcpListener::bind((addr.0.as_str(), addr.1)).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Mutex::new(Counters::default()));
        let tls = acceptor.is_some();
        let served = counters.clone();
        let task = crate::http_server::spawn(listener, acceptor, move |req| {
            serve(shared.clone(), served.clone(), req)
        });
        Ok(RestServer {
            addr,
            tls,
            counters,
            task,
        })
    }

    /// The base URL (`https://localhost:PORT` with TLS, `http://127.0.0.1:PORT` without).
    pub(crate) fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub(crate) fn stats(&self) -> RestStats {
        self.counters.lock().unwrap().stats.clone()
    }
}

impl Drop for RestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer: status, extra headers, body.
type Answer = (StatusCode, Vec<(&'static str, String)>, String);

fn error(status: StatusCode, detail: impl AsRef<str>) -> Answer {
    let detail = detail
        .as_ref()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    (
        status,
        vec![("content-type", "application/xml; charset=utf-8".to_owned())],
        format!(
            "<Error><Code>{}</Code><Detail>{detail} TrackingId:{}, SystemTracker:testhub, Timestamp:{}</Detail></Error>",
            status.as_u16(),
            uuid_like(),
            super::now_ms()
        ),
    )
}

fn uuid_like() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn serve(
    shared: Arc<Shared>,
    counters: Arc<Mutex<Counters>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (head, body) = crate::http_server::read(req).await;
    let path = head.uri.path();
    let (status, extra, text) =
        handle(&shared, &counters, &head.method, path, &head.headers, &body);
    {
        let mut c = counters.lock().unwrap();
        match status {
            StatusCode::CREATED => c.stats.created += 1,
            StatusCode::BAD_REQUEST => c.stats.bad_requests += 1,
            StatusCode::UNAUTHORIZED => c.stats.unauthorized += 1,
            StatusCode::PAYLOAD_TOO_LARGE => c.stats.too_large += 1,
            _ => {}
        }
    }
    let mut response = Response::builder().status(status);
    for (k, v) in extra {
        response = response.header(k, v);
    }
    Ok(response
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_default())
}

/// Where a request goes: the hub and, for a partition path, the partition.
fn parse_path(path: &str) -> Option<(String, Option<String>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        [hub, "messages"] => Some((decode(hub), None)),
        [hub, p, id, "messages"] if p.eq_ignore_ascii_case("partitions") => {
            Some((decode(hub), Some(decode(id))))
        }
        _ => None,
    }
}

fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

fn handle(
    shared: &Shared,
    counters: &Mutex<Counters>,
    method: &hyper::Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Answer {
    counters.lock().unwrap().stats.requests += 1;
    if method != hyper::Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "Only POST is supported.");
    }
    let Some((hub, partition)) = parse_path(path) else {
        return error(StatusCode::NOT_FOUND, format!("No endpoint at '{path}'."));
    };
    let Some((hub, partitions)) = shared.find_hub(&hub) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("The messaging entity '{hub}' could not be found."),
        );
    };
    // The entity the token must cover, as a path (no host: the request's Host is the
    // endpoint's, not necessarily the namespace's).
    let entity = match &partition {
        Some(id) => format!("/{hub}/partitions/{id}"),
        None => format!("/{hub}"),
    };
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Err(why) = authorise(shared, authorization, &entity) {
        return error(StatusCode::UNAUTHORIZED, why);
    }
    let partition = match partition {
        None => None,
        Some(id) => match id.parse::<u32>() {
            Ok(p) if p < partitions => Some(p),
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("The partition '{id}' of '{hub}' does not exist."),
                )
            }
        },
    };
    if let Some((status, retry_after)) = shared.faults.take_rest_failure() {
        counters.lock().unwrap().stats.injected_failures += 1;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut answer = error(
            status,
            "The request was rejected by fault injection (server busy).",
        );
        if let Some(secs) = retry_after {
            answer.1.push(("retry-after", secs.to_string()));
        }
        return answer;
    }
    let limit = shared.config.max_message_size;
    if body.len() as u64 > limit {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The received message (delivery-id:0, size:{} bytes) exceeds the limit ({limit} bytes) currently allowed on the link.",
                body.len()
            ),
        );
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let batched = content_type.as_deref().is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE))
    });
    let events = if batched {
        parse_batch(body)
    } else {
        parse_single(headers, content_type, body)
    };
    let events = match events {
        Ok(events) => events,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let stored = events.len() as u64;
    store(shared, &hub, partition, path, batched, events);
    {
        let mut c = counters.lock().unwrap();
        c.stats.events_stored += stored;
        if c.tokens.insert(authorization.to_owned()) {
            c.stats.distinct_tokens += 1;
        }
    }
    (StatusCode::CREATED, vec![], String::new())
}

/// Checks the `Authorization` header for the Send right on `entity`.
fn authorise(shared: &Shared, authorization: &str, entity: &str) -> Result<(), String> {
    let rights = if let Some(jwt) = authorization.strip_prefix("Bearer ") {
        shared
            .verify_jwt(jwt.trim(), entity)
            .map(|v| v.rights)
            .map_err(|e| e.description())?
    } else if authorization
        .get(..22)
        .is_some_and(|p| p.eq_ignore_ascii_case("SharedAccessSignature "))
    {
        let v = shared
            .verify_token(authorization, entity)
            .map_err(|e| e.description())?;
        shared.policy_rights(&v.policy)
    } else {
        return Err(
            "MissingToken: The authorization header was not found or is not a SharedAccessSignature or Bearer token."
                .to_owned(),
        );
    };
    if rights.contains(&Right::Send) {
        Ok(())
    } else {
        Err("Unauthorized access. 'Send' claim(s) are required to perform this operation.".into())
    }
}

/// One event as the REST API carries it.
#[derive(Debug, Default)]
struct RestEvent {
    body: Vec<u8>,
    content_type: Option<String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    partition_key: Option<String>,
    properties: Vec<(String, SimpleValue)>,
}

fn parse_single(
    headers: &HeaderMap,
    content_type: Option<String>,
    body: &[u8],
) -> Result<Vec<RestEvent>, String> {
    let mut event = RestEvent {
        body: body.to_vec(),
        content_type,
        ..RestEvent::default()
    };
    if let Some(broker) = headers.get("brokerproperties") {
        let text = broker
            .to_str()
            .map_err(|_| "The BrokerProperties header is not ASCII.".to_owned())?;
        let json: Value = serde_json::from_str(text)
            .map_err(|e| format!("The BrokerProperties header is not JSON: {e}."))?;
        broker_properties(&json, &mut event)?;
    }
    for (name, value) in headers {
        if STANDARD_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let value = match serde_json::from_str::<Value>(&text) {
            Ok(json) => simple_value(&json).unwrap_or(SimpleValue::String(text)),
            Err(_) => SimpleValue::String(text),
        };
        event.properties.push((name.as_str().to_owned(), value));
    }
    Ok(vec![event])
}

fn broker_properties(json: &Value, event: &mut RestEvent) -> Result<(), String> {
    let Value::Object(map) = json else {
        return Err("BrokerProperties must be a JSON object.".into());
    };
    let text = |key: &str| -> Result<Option<String>, String> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("BrokerProperties.{key} must be a string.")),
        }
    };
    event.partition_key = text("PartitionKey")?;
    event.message_id = text("MessageId")?;
    event.correlation_id = text("CorrelationId")?;
    Ok(())
}

fn simple_value(json: &Value) -> Option<SimpleValue> {
    Some(match json {
        Value::Bool(b) => SimpleValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SimpleValue::Long(i),
            None => SimpleValue::Double(n.as_f64()?.into()),
        },
        Value::String(s) => SimpleValue::String(s.clone()),
        _ => return None,
    })
}

fn parse_batch(body: &[u8]) -> Result<Vec<RestEvent>, String> {
    let json: Value =
        serde_json::from_slice(body).map_err(|e| format!("The batch is not JSON: {e}."))?;
    let Value::Array(items) = json else {
        return Err("A batch must be a JSON array.".into());
    };
    if items.is_empty() {
        return Err("A batch must hold at least one message.".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(map) = item else {
                return Err(format!("Batch message {i} is not an object."));
            };
            let Some(Value::String(text)) = map.get("Body") else {
                return Err(format!("Batch message {i} has no string Body."));
            };
            let base64 = match map.get("IsBodyBase64") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(format!("Batch message {i}: IsBodyBase64 is not a bool.")),
            };
            let body = if base64 {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| format!("Batch message {i}: Body is not base64."))?
            } else {
                text.as_bytes().to_vec()
            };
            let mut event = RestEvent {
                body,
                ..RestEvent::default()
            };
            if let Some(broker) = map.get("BrokerProperties") {
                broker_properties(broker, &mut event)
                    .map_err(|e| format!("Batch message {i}: {e}"))?;
            }
            match map.get("UserProperties") {
                None | Some(Value::Null) => {}
                Some(Value::Object(props)) => {
                    for (k, v) in props {
                        let v = simple_value(v).ok_or_else(|| {
                            format!("Batch message {i}: UserProperties.{k} is not a simple value.")
                        })?;
                        event.properties.push((k.clone(), v));
                    }
                }
                Some(_) => {
                    return Err(format!(
                        "Batch message {i}: UserProperties is not an object."
                    ))
                }
            }
            Ok(event)
        })
        .collect()
}

/// Encodes each event as the AMQP message a producer would have sent and stores runs of events
/// with the same partition key as one delivery.
fn store(
    shared: &Shared,
    hub: &str,
    partition: Option<u32>,
    path: &str,
    batched: bool,
    events: Vec<RestEvent>,
) {
    let target: Arc<str> = Arc::from(path.trim_start_matches('/'));
    let mut run: Vec<RestEvent> = Vec::new();
    let flush = |run: &mut Vec<RestEvent>| {
        if run.is_empty() {
            return;
        }
        let key = run[0].partition_key.clone();
        let mut buf = Vec::new();
        let mut spans = Vec::with_capacity(run.len());
        for event in run.drain(..) {
            let start = buf.len();
            let encoded = serde_amqp::to_vec(&Serializable(&to_message(event))).unwrap_or_default();
            buf.extend_from_slice(&encoded);
            spans.push((start as u32, (buf.len() - start) as u32));
        }
        shared.store_events(
            hub,
            partition,
            buf,
            spans.into_boxed_slice(),
            DeliveryMeta {
                batched,
                link_target: target.clone(),
                route_key: key.map(Arc::from),
                enqueued_time_ms: 0,
                iot: None,
            },
        );
    };
    for event in events {
        if run
            .first()
            .is_some_and(|first| first.partition_key != event.partition_key)
        {
            flush(&mut run);
        }
        run.push(event);
    }
    flush(&mut run);
}

fn to_message(event: RestEvent) -> Message<fe2o3_amqp_types::messaging::Data> {
    let mut builder = Message::builder();
    if let Some(key) = &event.partition_key {
        builder = builder.message_annotations(
            MessageAnnotations::builder()
                .insert("x-opt-partition-key", key.clone())
                .build(),
        );
    }
    if event.content_type.is_some() || event.message_id.is_some() || event.correlation_id.is_some()
    {
        builder = builder.properties(Properties {
            message_id: event.message_id.map(MessageId::String),
            correlation_id: event.correlation_id.map(MessageId::String),
            content_type: event.content_type.map(Symbol::from),
            ..Properties::default()
        });
    }
    if !event.properties.is_empty() {
        let mut app = ApplicationProperties::builder();
        for (k, v) in event.properties {
            app = app.insert(k, v);
        }
        builder = builder.application_properties(app.build());
    }
    builder.data(Binary::from(event.body)).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_hub_and_partition() {
        assert_eq!(
            parse_path("/telemetry/messages"),
            Some(("telemetry".into(), None))
        );
        assert_eq!(
            parse_path("/telemetry/partitions/2/messages"),
            Some(("telemetry".into(), Some("2".into())))
        );
        assert_eq!(parse_path("/telemetry"), None);
    }

    #[test]
    fn batches_decode_base64_and_properties() {
        let body = br#"[{"Body":"aGk=","IsBodyBase64":true,"UserProperties":{"n":3,"s":"x"},"BrokerProperties":{"PartitionKey":"k"}},{"Body":"plain"}]"#;
        let events = parse_batch(body).unwrap();
        assert_eq!(events[0].body, b"hi");
        assert_eq!(events[0].partition_key.as_deref(), Some("k"));
        assert_eq!(events[0].properties.len(), 2);
        assert_eq!(events[1].body, b"plain");
        assert!(parse_batch(b"[]").is_err());
        assert!(parse_batch(b"{").is_err());
        assert!(parse_batch(br#"[{"Body":1}]"#).is_err());
    }
}
