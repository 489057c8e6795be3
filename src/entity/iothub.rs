//! IoT Hub: device `ID` sends device-to-cloud messages to `/devices/ID/messages/events`; the
//! token for the audience `HOST/devices/ID` (no scheme) authorises it, whether signed with the
//! device's key or with a policy key that has DeviceConnect. Messages are at most 256 KB.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::Entity;

/// IoT Hub's device-to-cloud message size limit.
pub(crate) const MAX_MESSAGE_SIZE: u64 = 256 * 1024;

/// What stays as it is in a device id inside a path: letters, digits and `-._~`; everything
/// else (IoT Hub ids may hold `: + % # * ? ! ( ) , = @ ; $ '`) is percent-encoded.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A device id as one path segment.
pub(crate) fn encode_id(device_id: &str) -> String {
    utf8_percent_encode(device_id, PATH_SEGMENT).to_string()
}

/// The audience (and SAS resource URI) that authorises device `device_id` on hub `host`.
pub(crate) fn device_audience(host: &str, device_id: &str) -> String {
    format!("{host}/devices/{}", encode_id(device_id))
}

/// The device-to-cloud sender entity of `device_id`.
pub(crate) fn device_events(host: &str, device_id: &str) -> Entity {
    Entity {
        address: format!("/devices/{}/messages/events", encode_id(device_id)),
        audience: device_audience(host, device_id),
        max_message_size: MAX_MESSAGE_SIZE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_entities() {
        let e = device_events("myhub.azure-devices.net", "compressor-7");
        assert_eq!(e.address, "/devices/compressor-7/messages/events");
        assert_eq!(e.audience, "myhub.azure-devices.net/devices/compressor-7");
        assert_eq!(e.max_message_size, 256 * 1024);
        let odd = device_events("h", "a:b/c#d");
        assert_eq!(odd.address, "/devices/a%3Ab%2Fc%23d/messages/events");
    }
}
