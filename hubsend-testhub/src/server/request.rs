//! Request nodes (`$cbs`, `$management`): the client's request link and reply link pair, the
//! routing of each response to its reply link, and the response message shape.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use fe2o3_amqp::{Receiver, Sender};
use fe2o3_amqp_types::{
    messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties},
    primitives::{OrderedMap, SimpleValue, Symbol, Value},
};
use tokio::{sync::mpsc, time::Instant};

use crate::wire::is_request_node;

use super::{cbs::handle_put_token, connection::ConnCtx, management::handle_management};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Node {
    Cbs,
    Management,
}

pub(super) struct ReplyLink {
    pub(super) node: Node,
    pub(super) name: String,
    pub(super) target: Option<String>,
    pub(super) tx: mpsc::UnboundedSender<Message<Body<Value>>>,
}

pub(super) type Replies = Arc<Mutex<Vec<ReplyLink>>>;

/// The request node a target address names. Everything else a client sends to is a producer
/// target, whose payloads the wire captures (the two must agree: see [`is_request_node`]).
pub(super) fn node_of(addr: &str) -> Option<Node> {
    if !is_request_node(addr) {
        return None;
    }
    if addr.trim_start_matches('/').eq_ignore_ascii_case("$cbs") {
        Some(Node::Cbs)
    } else {
        Some(Node::Management)
    }
}

pub(super) async fn reply_loop(
    mut sender: Sender,
    mut rx: mpsc::UnboundedReceiver<Message<Body<Value>>>,
    name: String,
    replies: Replies,
) {
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                match sender.send_batchable(msg).await {
                    Ok(fut) => drop(fut),
                    Err(e) => {
                        tracing::debug!(error = ?e, "reply send failed");
                        break;
                    }
                }
            }
            _ = sender.on_detach() => break,
        }
    }
    replies.lock().unwrap().retain(|r| r.name != name);
    let _ = tokio::time::timeout(Duration::from_secs(2), sender.close()).await;
}

pub(super) fn app_prop_string(msg: &Message<Body<Value>>, key: &str) -> Option<String> {
    let ap = msg.application_properties.as_ref()?;
    match ap.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

pub(super) fn response(
    request: &Message<Body<Value>>,
    status: i32,
    description: &str,
    error_condition: Option<&str>,
    body: Value,
) -> Message<Body<Value>> {
    let mut ap = OrderedMap::new();
    ap.insert("status-code".to_string(), SimpleValue::Int(status));
    ap.insert(
        "status-description".to_string(),
        SimpleValue::String(description.to_string()),
    );
    if let Some(c) = error_condition {
        ap.insert(
            "error-condition".to_string(),
            SimpleValue::Symbol(Symbol::from(c)),
        );
    }
    let correlation_id = request
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id,
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(ap)),
        body: Body::Value(AmqpValue(body)),
        footer: None,
    }
}

pub(super) async fn request_loop(
    mut receiver: Receiver,
    node: Node,
    ctx: Arc<ConnCtx>,
    replies: Replies,
) {
    loop {
        let delivery = match receiver.recv::<Body<Value>>().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = ?e, ?node, "request link ended");
                break;
            }
        };
        let _ = receiver.accept(&delivery).await;
        let msg = delivery.into_message();
        let reply = match node {
            Node::Cbs => handle_put_token(&msg, &ctx),
            Node::Management => handle_management(&msg, &ctx),
        };
        let reply_to = msg.properties.as_ref().and_then(|p| p.reply_to.clone());
        route_reply(&replies, node, reply_to, reply).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), receiver.close()).await;
}

pub(super) async fn route_reply(
    replies: &Replies,
    node: Node,
    reply_to: Option<String>,
    reply: Message<Body<Value>>,
) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let tx = {
            let list = replies.lock().unwrap();
            let candidates: Vec<&ReplyLink> = list.iter().filter(|r| r.node == node).collect();
            let by_target = reply_to.as_ref().and_then(|rt| {
                candidates
                    .iter()
                    .find(|r| r.target.as_deref() == Some(rt.as_str()))
            });
            let by_name = reply_to
                .as_ref()
                .and_then(|rt| candidates.iter().find(|r| &r.name == rt));
            by_target
                .or(by_name)
                .or(candidates.last())
                .map(|r| r.tx.clone())
        };
        if let Some(tx) = tx {
            let _ = tx.send(reply);
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(?node, "no reply link for response; dropped");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
