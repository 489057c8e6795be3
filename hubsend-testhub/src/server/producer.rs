//! Producer links: attach checks (entity, Send right, max-message-size), each delivery's
//! verdict and storage, credit, settlement, and the producer-side faults.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use fe2o3_amqp::{
    acceptor::SupportedReceiverSettleModes,
    acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle},
    link::{delivery::DeliveryInfo, receiver::CreditMode},
    Receiver,
};
use fe2o3_amqp_types::{
    definitions::{self, ReceiverSettleMode},
    messaging::{message::__private::Serializable, Body},
    performatives::Attach,
    primitives::Value,
};
use tokio::time::Instant;

use crate::{faults::ConnCommand, hash, raw, sas::normalise, store::DeliveryMeta, wire::Captured};

use super::{
    amqp_error,
    connection::{refuse, Auth, ConnCtx},
    end_link, idempotent, link_properties, Shared,
};

const BATCH_FORMAT: u32 = 0x8001_3700;

pub(super) async fn producer_attach(
    attach: Attach,
    address: String,
    session: &mut ListenerSessionHandle,
    ctx: &Arc<ConnCtx>,
) {
    let shared = &ctx.shared;
    let path = normalise(&address, false).path;
    let segs: Vec<&str> = path.split('/').collect();
    let not_found = ctx.not_found(&path);
    if shared.iot.is_some() {
        // IoT Hub: `devices/{id}/messages/events`, checked in `iothub`.
        let device = super::iothub::d2c_device(&address).unwrap_or_default();
        return match super::iothub::d2c_target(shared, ctx, &device) {
            Ok((store, origin)) => {
                // Case-preserving, so the device's token (exact-case id) covers it.
                let entity = format!("devices/{device}/messages/events");
                let target = Target {
                    hub: store,
                    partition: None,
                    path: entity,
                    iot: Some(origin),
                };
                accept_producer(attach, address, session, ctx, target).await
            }
            Err((condition, desc)) => refuse(attach, session, ctx, condition, desc).await,
        };
    }
    let Some((hub, count)) = segs.first().and_then(|h| shared.find_hub(h)) else {
        return refuse(attach, session, ctx, "amqp:not-found", not_found).await;
    };
    let partition = match segs.as_slice() {
        [_] => None,
        [_, p, n] if *p == "partitions" => match n.parse::<u32>() {
            Ok(n) if n < count => Some(n),
            _ => return refuse(attach, session, ctx, "amqp:not-found", not_found).await,
        },
        _ => return refuse(attach, session, ctx, "amqp:not-found", not_found).await,
    };
    let target = Target {
        hub,
        partition,
        path,
        iot: None,
    };
    accept_producer(attach, address, session, ctx, target).await
}

/// Where a producer link's deliveries go.
struct Target {
    /// The store (an event hub, or an IoT Hub device's store).
    hub: String,
    partition: Option<u32>,
    /// The entity path tokens must cover.
    path: String,
    /// IoT Hub: the D2C sender, stamped on the built-in endpoint's copies.
    iot: Option<Arc<crate::store::IotOrigin>>,
}

/// Authorises and accepts a producer link to `target`, then runs its loop.
async fn accept_producer(
    mut attach: Attach,
    address: String,
    session: &mut ListenerSessionHandle,
    ctx: &Arc<ConnCtx>,
    target: Target,
) {
    let Target {
        hub,
        partition,
        path,
        iot,
    } = target;
    let shared = &ctx.shared;
    let entity = path.clone();
    let right = shared.send_right();
    if shared.iot.is_none() && matches!(ctx.authorised(&entity, Some(right)), Auth::No) {
        let desc = ctx.unauthorised(right, &path);
        return refuse(attach, session, ctx, "amqp:unauthorized-access", desc).await;
    }
    let max = shared.config.max_message_size;
    let mms = attach
        .max_message_size
        .filter(|v| *v > 0)
        .map_or(max, |c| c.min(max));
    let name = attach.name.clone();
    let wants_idempotent = attach
        .desired_capabilities
        .as_ref()
        .is_some_and(|caps| caps.0.iter().any(|c| c.as_str() == idempotent::CAPABILITY));
    let mut properties = link_properties();
    let identity = if wants_idempotent {
        let Some(partition) = partition else {
            let desc = "Idempotent publishing needs a partition link.".to_string();
            return refuse(attach, session, ctx, "amqp:not-allowed", desc).await;
        };
        let requested = match idempotent::Requested::from_properties(attach.properties.as_ref()) {
            Ok(requested) => requested,
            Err(desc) => return refuse(attach, session, ctx, "amqp:not-allowed", desc).await,
        };
        // fe2o3's acceptor merges the client's attach properties into its reply, which
        // would echo the client's numbers back; they have been read.
        attach.properties = None;
        let answer = shared.idempotent.lock().unwrap().attach(
            &hub,
            partition,
            requested,
            shared.config.idempotent_resume,
        );
        match answer {
            Ok((identity, sequence)) => {
                for (k, v) in idempotent::reply_properties(identity, sequence) {
                    properties.insert(k, v);
                }
                tracing::info!(link = %name, ?identity, sequence, "idempotent producer attached");
                Some(identity)
            }
            Err((condition, desc)) => {
                return refuse(attach, session, ctx, condition, desc).await;
            }
        }
    } else {
        None
    };
    let advertised = shared.config.advertised_max_message_size.unwrap_or(mms);
    ctx.control
        .advertise
        .lock()
        .unwrap()
        .insert(name.clone(), advertised);
    // fe2o3 would detach the link on an oversize delivery; the service rejects only the delivery.
    attach.max_message_size = None;
    let mut acceptor = LinkAcceptor::builder()
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .properties(properties);
    if identity.is_some() {
        acceptor = acceptor.add_offered_capabilities(idempotent::CAPABILITY);
    }
    let acceptor = acceptor.build();
    match acceptor.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Receiver(r)) => {
            shared.stat(|s| {
                s.links_attached += 1;
                s.producer_links_attached += 1;
            });
            tracing::info!(link = %name, hub = %hub, ?partition, "producer link attached");
            tokio::spawn(producer_loop(
                r,
                ProducerLink {
                    ctx: ctx.clone(),
                    hub,
                    partition,
                    target: address.into(),
                    entity,
                    max_message_size: mms,
                    name,
                    identity,
                    iot,
                },
            ));
        }
        Ok(LinkEndpoint::Sender(_)) => {}
        Err(e) => tracing::warn!(error = ?e, "producer attach failed"),
    }
}

pub(super) struct ProducerLink {
    ctx: Arc<ConnCtx>,
    hub: String,
    partition: Option<u32>,
    target: Arc<str>,
    entity: String,
    max_message_size: u64,
    name: String,
    /// The producer id and epoch of an idempotent link.
    identity: Option<idempotent::Identity>,
    /// IoT Hub: the device sending on this link.
    iot: Option<Arc<crate::store::IotOrigin>>,
}

pub(super) enum Verdict {
    Accept,
    Reject(definitions::Error),
}

pub(super) fn decode_error(description: &str) -> Verdict {
    Verdict::Reject(amqp_error("amqp:decode-error", description))
}

impl ProducerLink {
    /// Checks one delivery and stores its events. `payload` is the encoded message as the
    /// client sent it; nothing is decoded here, only walked (see [`raw`]).
    fn process(&self, format: u32, delivery_id: u32, payload: Captured) -> Verdict {
        let shared = &self.ctx.shared;
        let size = payload.size;
        if size > self.max_message_size {
            return Verdict::Reject(amqp_error(
                "amqp:link:message-size-exceeded",
                format!(
                    "The received message (delivery-id:{delivery_id}, size:{size} bytes) exceeds the limit ({} bytes) currently allowed on the link.",
                    self.max_message_size
                ),
            ));
        }
        if let Some(cond) = shared.faults.on_transfer() {
            return Verdict::Reject(amqp_error(
                &cond,
                "The request was rejected by fault injection.",
            ));
        }
        if let Some(gone) = super::iothub::device_gone(shared, &self.hub) {
            return Verdict::Reject(gone);
        }
        let buf = payload.bytes;
        if buf.len() > u32::MAX as usize {
            return decode_error("The message is too large to store.");
        }
        let batched = format == BATCH_FORMAT;
        if !batched && format != 0 {
            return Verdict::Reject(amqp_error(
                "amqp:not-implemented",
                format!("The message format {format} is not supported."),
            ));
        }
        // 100-byte events take ~110 bytes each in a batch.
        let mut spans: Vec<(u32, u32)> =
            Vec::with_capacity(if batched { buf.len() / 96 } else { 1 });
        let mut annotations = None;
        let mut first_key = None;
        let mut bodies = 0usize;
        let mut stamps: Vec<idempotent::Stamp> = Vec::new();
        // With the test check on: the partition count keys are verified against.
        let verify = self
            .partition
            .filter(|_| shared.config.verify_partition_keys)
            .and_then(|p| Some((p, shared.partition_count(&self.hub)?)));
        let misplaced = |key: Option<String>| match (verify, key) {
            (Some((p, count)), Some(key)) => {
                let home = hash::partition_for_key(&key, count);
                (home != p).then(|| misplaced_key(&key, home, p))
            }
            _ => None,
        };
        for section in raw::Sections::new(&buf) {
            let Some(s) = section else {
                tracing::warn!("undecodable message");
                return decode_error("The message is not an encoded AMQP message.");
            };
            if s.code == raw::MESSAGE_ANNOTATIONS {
                annotations = Some(s);
            }
            if !batched || !raw::is_body(s.code) {
                continue;
            }
            bodies += 1;
            let range = (s.code == raw::DATA).then(|| raw::data_range(&buf, &s));
            let Some((start, end)) = range.flatten() else {
                return decode_error("A batch must carry data sections.");
            };
            let event = &buf[start..end];
            let Some(event_annotations) = raw::check_message(event) else {
                tracing::warn!("undecodable event in batch");
                return decode_error("A batch section is not an encoded AMQP message.");
            };
            if spans.is_empty() || verify.is_some() {
                let key = event_annotations
                    .as_ref()
                    .and_then(|a| raw::partition_key(event, a));
                if let Some(refusal) = misplaced(key.clone()) {
                    return refusal;
                }
                if spans.is_empty() {
                    first_key = key;
                }
            }
            if self.identity.is_some() {
                stamps.push(stamp(event, event_annotations.as_ref()));
            }
            spans.push((start as u32, event.len() as u32));
        }
        if buf.is_empty() {
            return decode_error("The message is not an encoded AMQP message.");
        }
        let key = annotations
            .and_then(|a| raw::partition_key(&buf, &a))
            .or(first_key);
        if batched && bodies == 0 {
            return decode_error("A batch must carry data sections.");
        }
        if !batched {
            if let Some(refusal) = misplaced(key.clone()) {
                return refusal;
            }
            spans.push((0, buf.len() as u32));
            if self.identity.is_some() {
                stamps.push(stamp(&buf, annotations.as_ref()));
            }
        }
        if let (Some(identity), Some(partition)) = (self.identity, self.partition) {
            let verdict = shared.idempotent.lock().unwrap().check(
                &self.hub,
                partition,
                identity,
                &stamps,
                shared.config.idempotent_gaps,
            );
            match verdict {
                idempotent::Verdict::Store => {}
                idempotent::Verdict::Duplicate => return Verdict::Accept,
                idempotent::Verdict::Refuse(condition, description) => {
                    return Verdict::Reject(amqp_error(condition, description));
                }
            }
        }
        let meta = DeliveryMeta {
            batched,
            link_target: self.target.clone(),
            route_key: key.map(Arc::from),
            enqueued_time_ms: 0,
            iot: self.iot.clone(),
        };
        let spans = spans.into_boxed_slice();
        if self.iot.is_some() {
            shared.store_d2c(&self.hub, buf, spans, meta);
        } else {
            shared.store_events(&self.hub, self.partition, buf, spans, meta);
        }
        Verdict::Accept
    }
}

/// The test hub's refusal of an event whose key hashes to partition `home`, sent to `link`'s.
fn misplaced_key(key: &str, home: u32, link: u32) -> Verdict {
    Verdict::Reject(amqp_error(
        "amqp:precondition-failed",
        format!(
            "An event with partition key '{key}' (partition {home}) was sent to partition {link} \
             (the test hub's --verify-partition-keys check)."
        ),
    ))
}

/// The producer id, epoch and sequence number an event's annotations carry.
fn stamp(buf: &[u8], annotations: Option<&raw::Section>) -> idempotent::Stamp {
    let get = |key| annotations.and_then(|a| raw::integer_annotation(buf, a, key));
    (
        get(idempotent::PRODUCER_ID),
        get(idempotent::EPOCH),
        get(idempotent::SEQUENCE),
    )
}

pub(super) async fn producer_loop(mut receiver: Receiver, link: ProducerLink) {
    let shared = link.ctx.shared.clone();
    let credit = shared.config.link_credit;
    receiver.set_credit_mode(CreditMode::Manual);
    let mut withheld = shared.faults.withheld_until();
    let _ = receiver
        .set_credit(if withheld.is_some() { 0 } else { credit })
        .await;
    let mut detach_rx = shared.faults.detach_tx.subscribe();
    // IoT Hub: the registry, so that the device's deletion or disabling detaches the link.
    let mut registry_rx = shared
        .iot
        .as_ref()
        .filter(|_| link.iot.is_some())
        .map(|state| {
            let mut rx = state.watch_changes();
            // A change between the attach's check and here is looked at on the first turn.
            rx.mark_changed();
            rx
        });
    let mut credit_rx = shared.faults.credit_tx.subscribe();
    let mut pending: std::collections::VecDeque<(Instant, DeliveryInfo, Verdict)> =
        Default::default();
    // A coalesced rejection waiting for the next settlement (and when to give up waiting).
    let mut held: Option<(Instant, DeliveryInfo, Verdict)> = None;
    let mut link_transfers = 0u64;
    let far = || Instant::now() + Duration::from_secs(3600 * 24);
    let close_error: Option<definitions::Error> = loop {
        let auth_deadline = match link.ctx.auth_deadline(&link.entity, shared.send_right()) {
            Ok(deadline) => deadline,
            Err(expired) => break Some(expired),
        };
        let next_disposition = pending.front().map(|p| p.0).unwrap_or_else(far);
        let held_until = held.as_ref().map(|h| h.0).unwrap_or_else(far);
        let credit_back = withheld.map(Instant::from_std).unwrap_or_else(far);
        tokio::select! {
            d = receiver.recv::<Body<Value>>() => {
                let delivery = match d {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::debug!(link = %link.name, error = ?e, "producer link ended");
                        break None;
                    }
                };
                shared.stat(|s| s.transfers_received += 1);
                if withheld.is_none() && receiver.credit() < credit / 2 + 1 {
                    let _ = receiver.set_credit(credit).await;
                }
                link_transfers += 1;
                let info = DeliveryInfo::from(&delivery);
                let format = delivery.message_format().unwrap_or(0);
                let id = *delivery.delivery_id();
                let msg = delivery.into_message();
                // The wire captured the payload; a message that is not its marker (a link
                // the wire did not see as a producer) is taken as sent.
                let payload = link.ctx.control.take(&msg).unwrap_or_else(|| {
                    let bytes = serde_amqp::to_vec(&Serializable(msg)).unwrap_or_default();
                    Captured { size: bytes.len() as u64, bytes }
                });
                match first_transfer_fault(&link.ctx, link_transfers) {
                    Some(FirstTransfer::Detach(err)) => break Some(err),
                    Some(FirstTransfer::Closing | FirstTransfer::Unsettled) => continue,
                    None => {}
                }
                let verdict = link.process(format, id, payload);
                if matches!(verdict, Verdict::Accept) && shared.faults.on_stored() {
                    // Stored, and never acknowledged: the close fault's CLOSE is on its way.
                    continue;
                }
                let delay = shared.faults.disposition_delay();
                if !delay.is_zero() || !pending.is_empty() {
                    pending.push_back((Instant::now() + delay, info, verdict));
                } else if let Some((_, held_info, held_verdict)) = held.take() {
                    // The held rejection and this settlement leave in one write.
                    link.ctx.control.hold_next_rejection();
                    dispose(&receiver, &shared, held_info, held_verdict).await;
                    dispose(&receiver, &shared, info, verdict).await;
                } else if matches!(verdict, Verdict::Reject(_))
                    && shared.faults.read(|f| f.coalesce_rejections)
                {
                    held = Some((Instant::now() + COALESCE_WAIT, info, verdict));
                } else {
                    dispose(&receiver, &shared, info, verdict).await;
                }
            }
            _ = tokio::time::sleep_until(held_until), if held.is_some() => {
                if let Some((_, info, verdict)) = held.take() {
                    dispose(&receiver, &shared, info, verdict).await;
                }
            }
            _ = tokio::time::sleep_until(next_disposition), if !pending.is_empty() => {
                if let Some((_, info, verdict)) = pending.pop_front() {
                    dispose(&receiver, &shared, info, verdict).await;
                }
            }
            r = detach_rx.changed() => {
                if r.is_err() { continue; }
                let v = detach_rx.borrow_and_update().clone();
                if let Some((_, cond, desc)) = v {
                    while let Some((_, info, verdict)) = held.take().or_else(|| pending.pop_front()) {
                        dispose(&receiver, &shared, info, verdict).await;
                    }
                    break Some(amqp_error(&cond, desc));
                }
            }
            () = super::iothub::registry_changed(&mut registry_rx) => {
                if let Some(gone) = super::iothub::device_gone(&shared, &link.hub) {
                    while let Some((_, info, verdict)) = held.take().or_else(|| pending.pop_front()) {
                        dispose(&receiver, &shared, info, verdict).await;
                    }
                    tracing::info!(link = %link.name, "device deleted or disabled: detaching its D2C link");
                    shared.stat(|s| s.device_links_detached += 1);
                    break Some(gone);
                }
            }
            r = credit_rx.changed() => {
                if r.is_err() { continue; }
                let _ = credit_rx.borrow_and_update();
                withheld = shared.faults.withheld_until();
                let _ = receiver.set_credit(if withheld.is_some() { 0 } else { credit }).await;
            }
            _ = tokio::time::sleep_until(credit_back), if withheld.is_some() => {
                withheld = shared.faults.withheld_until();
                if withheld.is_none() {
                    let _ = receiver.set_credit(credit).await;
                }
            }
            _ = tokio::time::sleep_until(auth_deadline) => {
                // Re-evaluated at the top of the loop: a refreshed token extends the link.
            }
        }
    };
    if let Some((_, info, verdict)) = held.take() {
        dispose(&receiver, &shared, info, verdict).await;
    }
    link.ctx
        .control
        .advertise
        .lock()
        .unwrap()
        .remove(&link.name);
    end_link(receiver, "producer", &link.name, close_error).await;
}

/// How long a coalesced rejection waits for the next settlement before it is sent alone.
pub(super) const COALESCE_WAIT: Duration = Duration::from_millis(100);

/// What a first-transfer or never-settle fault does with a delivery that just arrived.
pub(super) enum FirstTransfer {
    /// The connection was told to close; leave the delivery unsettled.
    Closing,
    /// Detach the link with this error; leave the delivery unsettled.
    Detach(definitions::Error),
    /// Never settle it (and do not store it).
    Unsettled,
}

/// Applies the faults that act on a delivery before it is looked at: closing the connection
/// on its first transfer, detaching a link on its first (`link_transfers` counts the link's),
/// never settling.
pub(super) fn first_transfer_fault(ctx: &ConnCtx, link_transfers: u64) -> Option<FirstTransfer> {
    let first_on_connection = ctx.transfers.fetch_add(1, Ordering::SeqCst) == 0;
    let (close, detach, never_settle) = ctx.shared.faults.read(|f| {
        (
            f.close_after_first_transfer.clone(),
            f.detach_after_first_transfer.clone(),
            f.never_settle,
        )
    });
    let description = "Closed by fault injection after the first transfer.";
    if let Some(condition) = close.filter(|_| first_on_connection) {
        let _ = ctx.commands.send(ConnCommand::Close {
            condition,
            description: description.to_string(),
        });
        return Some(FirstTransfer::Closing);
    }
    if let Some(condition) = detach.filter(|_| link_transfers == 1) {
        return Some(FirstTransfer::Detach(amqp_error(&condition, description)));
    }
    never_settle.then_some(FirstTransfer::Unsettled)
}

pub(super) async fn dispose(
    receiver: &Receiver,
    shared: &Shared,
    info: DeliveryInfo,
    verdict: Verdict,
) {
    match verdict {
        Verdict::Accept => {
            let _ = receiver.accept(info).await;
            shared.stat(|s| s.deliveries_accepted += 1);
            shared.faults.on_accepted();
        }
        Verdict::Reject(err) => {
            let _ = receiver.reject(info, err).await;
            shared.stat(|s| s.deliveries_rejected += 1);
        }
    }
}
