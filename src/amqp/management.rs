//! The `$management` node: READ requests for hub and partition properties, answered on a
//! reply-to receiver and matched by order (one request at a time).

use std::time::Duration;

use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{Message, Outcome};
use fe2o3_amqp::{Receiver, Sender};

use super::error::{attach_error, send_error};
use crate::entity::eventhubs::MANAGEMENT_ADDRESS;
use crate::error::{Condition, Error, ErrorKind, Result};

/// The `$management` request/response link pair.
pub(crate) struct Management {
    sender: Sender,
    receiver: Receiver,
    reply_to: String,
    next_id: u64,
}

impl Management {
    pub(crate) async fn attach(
        session: &mut SessionHandle<()>,
        timeout: Duration,
    ) -> Result<Management> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let reply_to = format!("hubsend-mgmt-{id}");
        let attach = async {
            let sender = Sender::builder()
                .name(format!("{reply_to}-sender"))
                .target(MANAGEMENT_ADDRESS)
                .attach(session)
                .await
                .map_err(|e| attach_error(e, "attaching to $management failed"))?;
            let receiver = Receiver::builder()
                .name(format!("{reply_to}-receiver"))
                .source(MANAGEMENT_ADDRESS)
                .target(reply_to.clone())
                .attach(session)
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Management, "attaching to $management failed")
                        .with_source(e)
                })?;
            Ok::<_, Error>((sender, receiver))
        };
        let (sender, receiver) = tokio::time::timeout(timeout, attach)
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, "attaching to $management timed out"))??;
        Ok(Management {
            sender,
            receiver,
            reply_to,
            next_id: 0,
        })
    }

    pub(crate) async fn read(
        &mut self,
        entity_type: &str,
        hub: &str,
        partition: Option<&str>,
        token: &str,
    ) -> Result<fe2o3_amqp_types::primitives::Value> {
        use fe2o3_amqp_types::messaging::{ApplicationProperties, Body, MessageId, Properties};
        use fe2o3_amqp_types::primitives::{SimpleValue, Value};
        self.next_id += 1;
        let id = self.next_id;
        let mut props = ApplicationProperties::builder()
            .insert("operation", "READ")
            .insert("type", entity_type)
            .insert("name", hub)
            .insert("security_token", token);
        if let Some(p) = partition {
            props = props.insert("partition", p);
        }
        let message = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::Ulong(id)),
                reply_to: Some(self.reply_to.clone()),
                ..Properties::default()
            })
            .application_properties(props.build())
            .value(Value::Null)
            .build();
        let outcome = self
            .sender
            .send(message)
            .await
            .map_err(|e| send_error(e, "the $management request failed"))?;
        if !matches!(outcome, Outcome::Accepted(_)) {
            return Err(Error::new(
                ErrorKind::Management,
                "the $management node did not accept the request",
            ));
        }
        let delivery = self.receiver.recv::<Body<Value>>().await.map_err(|e| {
            Error::new(
                ErrorKind::Management,
                "reading the $management reply failed",
            )
            .with_source(e)
        })?;
        let _ = self.receiver.accept(&delivery).await;
        let message = delivery.into_message();
        let app = message
            .application_properties
            .map(|a| a.0)
            .unwrap_or_default();
        let status = ["status-code", "statusCode"]
            .iter()
            .find_map(|k| app.get(*k))
            .and_then(|v| match v {
                SimpleValue::Int(v) => Some(*v as i64),
                SimpleValue::Uint(v) => Some(*v as i64),
                SimpleValue::Long(v) => Some(*v),
                SimpleValue::Ushort(v) => Some(*v as i64),
                SimpleValue::Short(v) => Some(*v as i64),
                _ => None,
            })
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Management,
                    "the $management reply has no status code",
                )
            })?;
        let description = ["status-description", "statusDescription"]
            .iter()
            .find_map(|k| app.get(*k))
            .and_then(|v| match v {
                SimpleValue::String(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        match status {
            200 => match message.body {
                Body::Value(v) => Ok(v.0),
                _ => Err(Error::new(
                    ErrorKind::Management,
                    "the $management reply has no value body",
                )),
            },
            404 => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "$management READ {entity_type}: {}",
                    crate::error::sanitize(&description)
                ),
            )
            .with_condition(Condition::NotFound)),
            401 | 403 => Err(Error::new(
                ErrorKind::Unauthorized,
                format!(
                    "$management READ {entity_type}: {}",
                    crate::error::sanitize(&description)
                ),
            )
            .with_condition(Condition::UnauthorizedAccess)),
            other => Err(Error::new(
                ErrorKind::Management,
                format!(
                    "$management READ {entity_type} answered {other}: {}",
                    crate::error::sanitize(&description)
                ),
            )),
        }
    }

    pub(crate) async fn close(self) {
        let _ = self.sender.close().await;
        let _ = self.receiver.close().await;
    }
}
