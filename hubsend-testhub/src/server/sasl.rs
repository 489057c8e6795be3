//! SASL: the mechanisms the service offers (MSSBCBS, PLAIN, ANONYMOUS) and PLAIN's check of a
//! policy name and key.

use std::sync::{Arc, Mutex};

use fe2o3_amqp::acceptor::{sasl_acceptor::SaslServerFrame, SaslAcceptor};
use fe2o3_amqp_types::{
    primitives::{Array, Symbol},
    sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
};

use super::Shared;

#[derive(Clone)]
pub(super) struct HubSasl {
    pub(super) shared: Arc<Shared>,
    /// The policy a PLAIN client authenticated as.
    pub(super) authed: Arc<Mutex<Option<String>>>,
}

pub(super) fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("PLAIN"),
            Symbol::from("ANONYMOUS"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.0.as_str() {
            "ANONYMOUS" | "MSSBCBS" => outcome(SaslCode::Ok),
            "PLAIN" => {
                let Some(resp) = init.initial_response else {
                    return outcome(SaslCode::Auth);
                };
                let mut parts = resp.split(|b| *b == 0);
                let _authzid = parts.next();
                let user = parts.next().map(|u| String::from_utf8_lossy(u).to_string());
                let pass = parts.next().map(|p| String::from_utf8_lossy(p).to_string());
                match (user, pass) {
                    (Some(u), Some(p))
                        if self.shared.policy_key(&u).as_deref() == Some(p.as_str()) =>
                    {
                        *self.authed.lock().unwrap() = Some(u);
                        outcome(SaslCode::Ok)
                    }
                    _ => {
                        tracing::warn!("sasl plain authentication failed");
                        outcome(SaslCode::Auth)
                    }
                }
            }
            other => {
                tracing::warn!(mechanism = other, "unsupported sasl mechanism");
                outcome(SaslCode::Auth)
            }
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        outcome(SaslCode::Sys)
    }
}
