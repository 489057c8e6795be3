//! Consumer links: a client receiver on `HUB/ConsumerGroups/CG/Partitions/N` reads the
//! partition's stored events back, from the position its selector filter names, then follows
//! new events as they arrive.
//!
//! Each event goes out as the message its producer sent (all sections) with the service's
//! annotations added: `x-opt-sequence-number` (long), `x-opt-offset` (string),
//! `x-opt-enqueued-time` (timestamp) and `x-opt-partition-key` (string, when set).
//!
//! The filter the official SDKs send is a described string under
//! `apache.org:selector-filter:string`, e.g. `amqp.annotation.x-opt-offset > '-1'` (Python
//! quotes every value; .NET quotes offsets only), `amqp.annotation.x-opt-sequence-number >= '5'`,
//! `amqp.annotation.x-opt-enqueued-time > '1690000000000'`, or `… x-opt-offset > '@latest'`.

use std::{sync::Arc, time::Duration};

use fe2o3_amqp::{
    acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle},
    Sender,
};
use fe2o3_amqp_types::{
    definitions,
    messaging::{
        annotations::OwnedKey, AmqpValue, Body, DeliveryAnnotations, Message, MessageAnnotations,
        Source,
    },
    performatives::Attach,
    primitives::{Symbol, Timestamp, Value},
};
use serde_amqp::descriptor::Descriptor;
use tokio::time::Instant;

use super::{
    connection::{refuse, Auth, ConnCtx},
    end_link, link_properties, now_ms,
};
use crate::{
    raw,
    sas::normalise,
    store::{EventRef, PartitionLog},
    Right,
};

/// Name (and key) of the selector filter in a source's filter set.
const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// Numeric descriptor of the selector filter.
const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;
/// Desired capability asking for last-enqueued-event delivery annotations.
const RUNTIME_METRIC: &str = "com.microsoft:enable-receiver-runtime-metric";
/// Events fetched from the store per round.
const FETCH: usize = 64;

/// Where a consumer starts reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Position {
    /// The beginning of the partition (`x-opt-offset > '-1'`, or no filter).
    Start,
    /// Only events enqueued after the link attached (`@latest`).
    Latest,
    /// Events whose offset is greater (or equal when inclusive).
    Offset {
        /// The offset compared against.
        value: i64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
    /// Events whose sequence number is greater (or equal when inclusive).
    Sequence {
        /// The sequence number compared against.
        value: i64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
    /// Events enqueued after (or at, when inclusive) a time in Unix milliseconds.
    EnqueuedTime {
        /// The time compared against, Unix milliseconds.
        ms: i64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
}

impl Position {
    /// Whether `ev` is at or after this position (positions are monotonic in a partition).
    fn admits(&self, ev: &EventRef) -> bool {
        let cmp = |have: i64, want: i64, inclusive: bool| {
            if inclusive {
                have >= want
            } else {
                have > want
            }
        };
        match self {
            Position::Start | Position::Latest => true,
            Position::Offset { value, inclusive } => cmp(ev.offset, *value, *inclusive),
            Position::Sequence { value, inclusive } => cmp(ev.sequence_number, *value, *inclusive),
            Position::EnqueuedTime { ms, inclusive } => cmp(ev.enqueued_time_ms(), *ms, *inclusive),
        }
    }
}

/// Parses a selector expression such as `amqp.annotation.x-opt-offset > '123'`.
pub(crate) fn parse_selector(text: &str) -> Result<Position, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("amqp.annotation.")
        .ok_or_else(|| format!("unsupported selector '{t}'"))?;
    let op_at = rest
        .find(['>', '=', '<'])
        .ok_or_else(|| format!("no comparison in selector '{t}'"))?;
    let field = rest[..op_at].trim();
    let after = &rest[op_at..];
    let (inclusive, value) = if let Some(v) = after.strip_prefix(">=") {
        (true, v)
    } else if let Some(v) = after.strip_prefix('>') {
        (false, v)
    } else if let Some(v) = after.strip_prefix('=') {
        (true, v)
    } else {
        return Err(format!("unsupported comparison in selector '{t}'"));
    };
    let value = value.trim();
    let value = value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(value)
        .trim();
    let number = |v: &str| {
        v.parse::<i64>()
            .map_err(|_| format!("'{v}' is not a valid value in selector '{t}'"))
    };
    match field {
        "x-opt-offset" => match value {
            "@latest" => Ok(Position::Latest),
            "-1" => Ok(Position::Start),
            v => Ok(Position::Offset {
                value: number(v)?,
                inclusive,
            }),
        },
        "x-opt-sequence-number" => Ok(Position::Sequence {
            value: number(value)?,
            inclusive,
        }),
        "x-opt-enqueued-time" => Ok(Position::EnqueuedTime {
            ms: number(value)?,
            inclusive,
        }),
        other => Err(format!(
            "unsupported annotation '{other}' in selector '{t}'"
        )),
    }
}

/// The selector text of a source's filter set, if any.
fn selector_of(source: &Source) -> Option<String> {
    let filters = source.filter.as_ref()?;
    filters.iter().find_map(|(key, value)| {
        let (described_as_selector, inner) = match value {
            Value::Described(d) => (
                match &d.descriptor {
                    Descriptor::Name(n) => n.0 == SELECTOR_FILTER,
                    Descriptor::Code(c) => *c == SELECTOR_FILTER_CODE,
                },
                &d.value,
            ),
            other => (false, other),
        };
        if !(described_as_selector || key.0 == SELECTOR_FILTER) {
            return None;
        }
        match inner {
            Value::String(s) => Some(s.clone()),
            Value::Symbol(s) => Some(s.0.clone()),
            Value::Binary(b) => Some(String::from_utf8_lossy(b).to_string()),
            _ => None,
        }
    })
}

/// Path segments of a consumer address: `HUB/ConsumerGroups/CG/Partitions/N`.
fn consumer_segments(address: &str) -> Option<Vec<String>> {
    let path = normalise(address, false).path;
    let segs: Vec<String> = path.split('/').map(str::to_string).collect();
    (segs.len() >= 2 && segs[1] == "consumergroups").then_some(segs)
}

/// Whether `address` names a consumer-group entity (so a receiver on it is a consumer).
pub(super) fn is_consumer_address(address: &str) -> bool {
    consumer_segments(address).is_some()
}

struct ConsumerLink {
    ctx: Arc<ConnCtx>,
    hub: String,
    partition: u32,
    entity: String,
    name: String,
    runtime_metric: bool,
}

/// Answers a client receiver's attach on a consumer address.
pub(super) async fn consumer_attach(
    attach: Attach,
    address: String,
    session: &mut ListenerSessionHandle,
    ctx: &Arc<ConnCtx>,
) {
    let shared = &ctx.shared;
    let segs = consumer_segments(&address).unwrap_or_default();
    let path = segs.join("/");
    let not_found = ctx.not_found(&path);
    let Some((hub, count)) = segs.first().and_then(|h| shared.find_hub(h)) else {
        return refuse_consumer(attach, session, ctx, "amqp:not-found", not_found).await;
    };
    let partition = match segs.as_slice() {
        [_, _, cg, p, n] if !cg.is_empty() && p == "partitions" => match n.parse::<u32>() {
            Ok(n) if n < count => n,
            _ => return refuse_consumer(attach, session, ctx, "amqp:not-found", not_found).await,
        },
        _ => return refuse_consumer(attach, session, ctx, "amqp:not-found", not_found).await,
    };
    if matches!(ctx.authorised(&path, Some(Right::Listen)), Auth::No) {
        let desc = ctx.unauthorised(Right::Listen, &path);
        return refuse_consumer(attach, session, ctx, "amqp:unauthorized-access", desc).await;
    }
    let selector = attach.source.as_deref().and_then(selector_of);
    let position = match selector.as_deref().map(parse_selector) {
        None => Position::Start,
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            return refuse_consumer(attach, session, ctx, "com.microsoft:argument-error", e).await;
        }
    };
    tracing::info!(link = %attach.name, hub = %hub, partition, ?selector, ?position, "consumer attach");
    let runtime_metric = attach
        .desired_capabilities
        .as_ref()
        .is_some_and(|caps| caps.iter().any(|c| c.0 == RUNTIME_METRIC));
    let name = attach.name.clone();
    let acceptor = LinkAcceptor::builder()
        .properties(link_properties())
        .build();
    match acceptor.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Sender(s)) => {
            shared.stat(|st| st.links_attached += 1);
            let link = ConsumerLink {
                ctx: ctx.clone(),
                hub,
                partition,
                entity: path,
                name,
                runtime_metric,
            };
            // `@latest` means what is stored now is skipped.
            let start = if position == Position::Latest {
                link.next_sequence()
            } else {
                0
            };
            tokio::spawn(consumer_loop(s, link, start, position));
        }
        Ok(LinkEndpoint::Receiver(_)) => {}
        Err(e) => tracing::warn!(error = ?e, "consumer attach failed"),
    }
}

/// Refuses like the service: the reply carries a null source, then a detach with the error
/// (a client receiver reports "refused" instead of seeing a live link detach).
async fn refuse_consumer(
    mut attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    condition: &str,
    description: String,
) {
    attach.source = None;
    refuse(attach, session, ctx, condition, description).await
}

impl ConsumerLink {
    fn with_partition<T>(&self, f: impl FnOnce(&PartitionLog) -> T) -> Option<T> {
        self.ctx
            .shared
            .with_hub(&self.hub, |hs| {
                hs.partitions.get(self.partition as usize).map(f)
            })
            .flatten()
    }

    fn next_sequence(&self) -> i64 {
        self.with_partition(PartitionLog::next_sequence)
            .unwrap_or(0)
    }

    /// Up to [`FETCH`] events from sequence number `from` (or the oldest retained one), and the
    /// partition's last event.
    fn fetch(&self, from: i64) -> (Vec<EventRef>, Option<EventRef>) {
        self.with_partition(|p| (p.range(from, FETCH), p.last()))
            .unwrap_or_default()
    }

    /// The delivered form of a stored event, decoded (for fe2o3 to encode).
    fn message(&self, ev: &EventRef, last: Option<&EventRef>) -> Message<Body<Value>> {
        let mut msg = ev.message().unwrap_or_else(|| {
            Message::builder()
                .body(Body::Value(AmqpValue(Value::Binary(
                    ev.raw().to_vec().into(),
                ))))
                .build()
        });
        let mut ann = msg.message_annotations.take().unwrap_or_default();
        self.annotate(&mut ann, ev);
        msg.message_annotations = Some(ann);
        msg.delivery_annotations = self.delivery_annotations(last);
        msg
    }

    /// The delivered form of a stored event, encoded: the producer's sections as they were
    /// stored, with the message annotations (the only section decoded) completed and the
    /// delivery annotations replaced. `None` when the stored event does not walk as a
    /// message; [`message`](Self::message) handles those.
    fn encoded(&self, ev: &EventRef, last: Option<&EventRef>) -> Option<Vec<u8>> {
        let raw = ev.raw();
        let (mut header, mut annotations, mut rest) = (None, None, None);
        let mut start = 0;
        for section in raw::Sections::new(raw) {
            let s = section?;
            match s.code {
                raw::HEADER => header = Some(start..s.end),
                // The producer's delivery annotations are not passed on.
                raw::DELIVERY_ANNOTATIONS => {}
                raw::MESSAGE_ANNOTATIONS => annotations = Some(start..s.end),
                _ => {
                    rest = Some(start);
                    break;
                }
            }
            start = s.end;
        }
        let mut ann: MessageAnnotations = match annotations {
            Some(r) => serde_amqp::from_slice(&raw[r]).ok()?,
            None => MessageAnnotations::default(),
        };
        self.annotate(&mut ann, ev);
        let mut out = Vec::with_capacity(raw.len() + 256);
        if let Some(h) = header {
            out.extend_from_slice(&raw[h]);
        }
        if let Some(da) = self.delivery_annotations(last) {
            out.extend(serde_amqp::to_vec(&da).ok()?);
        }
        out.extend(serde_amqp::to_vec(&ann).ok()?);
        out.extend_from_slice(&raw[rest.unwrap_or(start)..]);
        Some(out)
    }

    /// Adds the service's annotations of `ev` to its message annotations.
    fn annotate(&self, ann: &mut MessageAnnotations, ev: &EventRef) {
        let key = |k: &str| OwnedKey::Symbol(Symbol::from(k));
        let partition_key = match ann.0.get(&key("x-opt-partition-key")) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Symbol(s)) => Some(s.0.clone()),
            _ => ev.meta.route_key.as_deref().map(str::to_string),
        };
        ann.0.insert(
            key("x-opt-sequence-number"),
            Value::Long(ev.sequence_number),
        );
        ann.0
            .insert(key("x-opt-offset"), Value::String(ev.offset.to_string()));
        ann.0.insert(
            key("x-opt-enqueued-time"),
            Value::Timestamp(Timestamp::from_milliseconds(ev.enqueued_time_ms())),
        );
        if let Some(pk) = partition_key {
            ann.0.insert(key("x-opt-partition-key"), Value::String(pk));
        }
        // IoT Hub's built-in endpoint: the system properties the hub stamps (a device's own
        // annotations of these names are overwritten, so they cannot be spoofed).
        if let Some(origin) = &ev.meta.iot {
            let text = |s: &str| Value::String(s.to_string());
            ann.0
                .insert(key("iothub-connection-device-id"), text(&origin.device_id));
            ann.0.insert(
                key("iothub-connection-auth-method"),
                text(&origin.auth_method),
            );
            ann.0.insert(
                key("iothub-connection-auth-generation-id"),
                text(&origin.generation_id),
            );
            ann.0.insert(
                key("iothub-enqueuedtime"),
                Value::Timestamp(Timestamp::from_milliseconds(ev.enqueued_time_ms())),
            );
            ann.0
                .insert(key("iothub-message-source"), text("Telemetry"));
        }
    }

    /// The last-enqueued-event delivery annotations, when the consumer asked for them.
    fn delivery_annotations(&self, last: Option<&EventRef>) -> Option<DeliveryAnnotations> {
        let last = last.filter(|_| self.runtime_metric)?;
        let key = |k: &str| OwnedKey::Symbol(Symbol::from(k));
        let mut da = DeliveryAnnotations::default();
        da.0.insert(
            key("last_enqueued_sequence_number"),
            Value::Long(last.sequence_number),
        );
        da.0.insert(
            key("last_enqueued_offset"),
            Value::String(last.offset.to_string()),
        );
        da.0.insert(
            key("last_enqueued_time_utc"),
            Value::Timestamp(Timestamp::from_milliseconds(last.enqueued_time_ms())),
        );
        da.0.insert(
            key("runtime_info_retrieval_time_utc"),
            Value::Timestamp(Timestamp::from_milliseconds(now_ms())),
        );
        Some(da)
    }
}

async fn consumer_loop(mut sender: Sender, link: ConsumerLink, start: i64, position: Position) {
    let shared = link.ctx.shared.clone();
    let mut next = start;
    // Skips events before the filter's position; dropped once the first event qualifies.
    let mut skip_until = Some(position);
    let _far = || Instant::now() + Duration::from_secs(3600 * 24);
    let close_error: Option<definitions::Error> = 'serve: loop {
        let auth_deadline = match link.ctx.auth_deadline(&link.entity, Right::Listen) {
            Ok(deadline) => deadline,
            Err(expired) => break Some(expired),
        };
        let notified = shared.stored.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (batch, last) = link.fetch(next);
        if batch.is_empty() {
            tokio::select! {
                _ = &mut notified => {}
                _ = sender.on_detach() => break None,
                _ = tokio::time::sleep_until(auth_deadline) => {}
            }
            continue;
        }
        for ev in batch {
            next = ev.sequence_number + 1;
            if let Some(pos) = &skip_until {
                if !pos.admits(&ev) {
                    continue;
                }
                skip_until = None;
            }
            // Encoded here and put in place on the wire when it fits one frame; else fe2o3
            // encodes the decoded form.
            let msg = link
                .encoded(&ev, last.as_ref())
                .and_then(|payload| link.ctx.control.stage(payload))
                .unwrap_or_else(|| link.message(&ev, last.as_ref()));
            // Batchable: the TRANSFER's last field is set, so fe2o3 writes all of them
            // (PROTOCOL J); the outcome is not awaited.
            match sender.send_batchable(msg).await {
                Ok(fut) => drop(fut),
                Err(e) => {
                    tracing::debug!(link = %link.name, error = ?e, "consumer link ended");
                    break 'serve None;
                }
            }
        }
    };
    end_link(sender, "consumer", &link.name, close_error).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_the_sdks_send() {
        let p = |s: &str| parse_selector(s).unwrap();
        assert_eq!(p("amqp.annotation.x-opt-offset > '-1'"), Position::Start);
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '@latest'"),
            Position::Latest
        );
        assert_eq!(
            p("amqp.annotation.x-opt-offset >= '123'"),
            Position::Offset {
                value: 123,
                inclusive: true
            }
        );
        assert_eq!(
            p("amqp.annotation.x-opt-sequence-number > 5"),
            Position::Sequence {
                value: 5,
                inclusive: false
            }
        );
        assert_eq!(
            p("amqp.annotation.x-opt-sequence-number >= '7'"),
            Position::Sequence {
                value: 7,
                inclusive: true
            }
        );
        assert_eq!(
            p("amqp.annotation.x-opt-enqueued-time > '1690000000000'"),
            Position::EnqueuedTime {
                ms: 1_690_000_000_000,
                inclusive: false
            }
        );
        assert_eq!(
            p("AMQP.ANNOTATION.X-OPT-OFFSET>'42'"),
            Position::Offset {
                value: 42,
                inclusive: false
            }
        );
        assert!(parse_selector("amqp.annotation.x-opt-offset > 'abc'").is_err());
        assert!(parse_selector("sys.label = 'x'").is_err());
        assert!(parse_selector("amqp.annotation.x-opt-offset < '5'").is_err());
    }

    #[test]
    fn consumer_addresses() {
        assert!(is_consumer_address(
            "telemetry/ConsumerGroups/$Default/Partitions/0"
        ));
        assert!(is_consumer_address(
            "amqps://127.0.0.1:5672/telemetry/ConsumerGroups/$Default/Partitions/3"
        ));
        assert!(!is_consumer_address("telemetry/Partitions/0"));
        assert!(!is_consumer_address("$cbs"));
    }
}
