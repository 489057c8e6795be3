//! How each service names what hubsend sends to: link target addresses, the CBS audience that
//! authorises them, and the default message size limit. Pure data, no I/O: the engine asks
//! here instead of formatting addresses itself.

pub(crate) mod eventhubs;
// The IoT Hub device sender and gateway (issue #13) are its users.
#[allow(dead_code)]
pub(crate) mod iothub;

/// One entity a sender link attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Entity {
    /// The link's target address.
    pub(crate) address: String,
    /// The audience whose token authorises sending to it.
    pub(crate) audience: String,
    /// The largest message the service takes here when the link does not say (the link's
    /// announced limit is also held to it).
    pub(crate) max_message_size: u64,
}
