//! `$cbs`: put-token requests, verified as SAS or JWT tokens and kept per connection.

use fe2o3_amqp_types::{
    messaging::{AmqpValue, Body, Message},
    primitives::Value,
};

use super::{
    connection::{ConnCtx, Token},
    request::{app_prop_string, response},
};

pub(super) fn handle_put_token(msg: &Message<Body<Value>>, ctx: &ConnCtx) -> Message<Body<Value>> {
    let shared = &ctx.shared;
    let reject = |status: i32, desc: &str| {
        shared.stat(|s| s.put_tokens_rejected += 1);
        response(msg, status, desc, None, Value::Null)
    };
    if app_prop_string(msg, "operation").is_none_or(|o| o != "put-token") {
        return reject(400, "The operation is not supported.");
    }
    let Some(name) = app_prop_string(msg, "name") else {
        return reject(400, "The 'name' application property is missing.");
    };
    let token = match &msg.body {
        Body::Value(AmqpValue(Value::String(s))) => s.clone(),
        Body::Value(AmqpValue(Value::Binary(b))) => String::from_utf8_lossy(b).to_string(),
        _ => return reject(400, "The token is missing."),
    };
    if let Some(status) = shared.faults.take_put_failure() {
        return reject(
            status,
            "InjectedFault: put-token failure requested by the test.",
        );
    }
    if let Some(state) = &shared.iot {
        let (status, description) = super::iothub::put_token(ctx, state, &token, &name);
        shared.stat(|s| match status {
            200 => s.put_tokens_accepted += 1,
            _ => s.put_tokens_rejected += 1,
        });
        return response(msg, status, &description, None, Value::Null);
    }
    let jwt = app_prop_string(msg, "type").is_some_and(|t| t == "jwt");
    let verified = if jwt {
        let v = shared.verify_jwt(&token, &name);
        v.map(|v| (v.audience, v.expires_at, v.rights))
    } else {
        let v = shared.verify_token(&token, &name);
        v.map(|v| (v.audience, v.expires_at, shared.policy_rights(&v.policy)))
    };
    match verified {
        Ok((audience, expires_at, rights)) => {
            ctx.tokens.lock().unwrap().push(Token {
                audience,
                expires_at_ms: (expires_at as i64).saturating_mul(1000),
                rights,
                device_key: false,
            });
            shared.stat(|s| s.put_tokens_accepted += 1);
            shared.stat(|s| s.jwt_put_tokens_accepted += u64::from(jwt));
            response(msg, 202, "Accepted", None, Value::Null)
        }
        Err(e) => {
            tracing::warn!(status = e.status(), "put-token refused");
            reject(e.status(), &e.description())
        }
    }
}
