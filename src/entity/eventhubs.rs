//! Event Hubs: a hub `HUB` is sent to at `HUB` (the service picks the partition, or routes by
//! partition key) or at `HUB/Partitions/N`; one token for the audience `sb://HOST/HUB` covers
//! the hub and its partitions. Every tier takes publications of up to 1 MB (Basic announces
//! 256 KB on the link itself).

use super::Entity;

/// The largest publication any Event Hubs tier takes.
pub(crate) const MAX_MESSAGE_SIZE: u64 = 1024 * 1024;

/// The management node (`$management` READ of hub and partition properties).
pub(crate) const MANAGEMENT_ADDRESS: &str = "$management";

/// The audience that authorises `hub` on namespace `host`.
pub(crate) fn audience(host: &str, hub: &str) -> String {
    format!("sb://{host}/{hub}")
}

/// The sender entity for `hub`, or one of its partitions.
pub(crate) fn sender(host: &str, hub: &str, partition: Option<&str>) -> Entity {
    let address = match partition {
        Some(id) => format!("{hub}/Partitions/{id}"),
        None => hub.to_owned(),
    };
    Entity {
        address,
        audience: audience(host, hub),
        max_message_size: MAX_MESSAGE_SIZE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_and_partition_share_one_audience() {
        let hub = sender("ns.servicebus.windows.net", "telemetry", None);
        let p = sender("ns.servicebus.windows.net", "telemetry", Some("3"));
        assert_eq!(hub.address, "telemetry");
        assert_eq!(p.address, "telemetry/Partitions/3");
        assert_eq!(hub.audience, "sb://ns.servicebus.windows.net/telemetry");
        assert_eq!(hub.audience, p.audience);
    }
}
