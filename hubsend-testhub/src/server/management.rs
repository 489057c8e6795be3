//! `$management`: READ of the event hub's and its partitions' runtime properties.

use fe2o3_amqp_types::{
    messaging::{Body, Message},
    primitives::{Array, OrderedMap, Timestamp, Value},
};

use super::{
    connection::{Auth, ConnCtx},
    request::{app_prop_string, response},
};

pub(super) fn handle_management(msg: &Message<Body<Value>>, ctx: &ConnCtx) -> Message<Body<Value>> {
    let shared = &ctx.shared;
    shared.stat(|s| s.management_requests += 1);
    let fail = |status: i32, cond: &str, desc: String| {
        response(msg, status, &desc, Some(cond), Value::Null)
    };
    if app_prop_string(msg, "operation").is_none_or(|o| !o.eq_ignore_ascii_case("READ")) {
        return fail(
            501,
            "amqp:not-implemented",
            "The operation is not supported.".into(),
        );
    }
    let hub_name = app_prop_string(msg, "name").unwrap_or_default();
    let Some((hub, count)) = shared.find_hub(&hub_name) else {
        return fail(404, "amqp:not-found", ctx.not_found(&hub_name));
    };
    let entity = format!("{}/$management", hub.to_ascii_lowercase());
    let authorised = match app_prop_string(msg, "security_token") {
        Some(token) => {
            shared.verify_token(&token, &format!("/{entity}")).is_ok()
                || shared.jwt_security_token_ok(&token, &entity)
        }
        None => !matches!(ctx.authorised(&entity, None), Auth::No),
    };
    if !authorised {
        return fail(
            401,
            "amqp:unauthorized-access",
            "Unauthorized access. A valid security token is required.".into(),
        );
    }
    let kind = app_prop_string(msg, "type").unwrap_or_default();
    let s = |v: &str| Value::String(v.to_string());
    let mut map: OrderedMap<Value, Value> = OrderedMap::new();
    if kind == "com.microsoft:eventhub" {
        let created = shared
            .store
            .lock()
            .unwrap()
            .get(&hub.to_ascii_lowercase())
            .map(|h| h.created_at_ms)
            .unwrap_or(0);
        map.insert(s("name"), s(&hub));
        map.insert(
            s("created_at"),
            Value::Timestamp(Timestamp::from_milliseconds(created)),
        );
        map.insert(s("partition_count"), Value::Int(count as i32));
        map.insert(
            s("partition_ids"),
            Value::Array(Array::from(
                (0..count)
                    .map(|i| Value::String(i.to_string()))
                    .collect::<Vec<_>>(),
            )),
        );
        map.insert(s("type"), s("com.microsoft:eventhub"));
    } else if kind == "com.microsoft:partition" {
        let pid = app_prop_string(msg, "partition").unwrap_or_default();
        let Some(p) = pid.parse::<u32>().ok().filter(|p| *p < count) else {
            return fail(
                404,
                "amqp:not-found",
                format!(
                    "The messaging entity 'sb://{}/{}/Partitions/{}' could not be found.",
                    ctx.host, hub, pid
                ),
            );
        };
        let (begin, empty, last) = shared
            .with_hub(&hub, |hs| {
                let log = &hs.partitions[p as usize];
                (log.begin_sequence(), log.is_empty(), log.last())
            })
            .unwrap_or((0, true, None));
        map.insert(s("name"), s(&hub));
        map.insert(s("partition"), s(&p.to_string()));
        map.insert(s("type"), s("com.microsoft:partition"));
        map.insert(
            s("begin_sequence_number"),
            Value::Long(if empty { -1 } else { begin }),
        );
        map.insert(
            s("last_enqueued_sequence_number"),
            Value::Long(last.as_ref().map(|e| e.sequence_number).unwrap_or(-1)),
        );
        map.insert(
            s("last_enqueued_offset"),
            s(&last.as_ref().map(|e| e.offset).unwrap_or(-1).to_string()),
        );
        map.insert(
            s("last_enqueued_time_utc"),
            Value::Timestamp(Timestamp::from_milliseconds(
                last.as_ref().map(|e| e.enqueued_time_ms()).unwrap_or(0),
            )),
        );
        map.insert(s("is_partition_empty"), Value::Bool(empty));
        map.insert(s("last_enqueued_sequence_number_epoch"), Value::Long(0));
    } else {
        return fail(
            400,
            "com.microsoft:argument-error",
            format!("The entity type '{kind}' is not supported."),
        );
    }
    response(msg, 200, "OK", None, Value::Map(map))
}
