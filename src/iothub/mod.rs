//! Azure IoT Hub: connection strings, shared access signatures, and device-to-cloud sending
//! as one device ([`DeviceSender`]) or as many ([`Gateway`]).
//!
//! IoT Hub differs from Event Hubs in two ways that matter here: its keys are base64 and are
//! *decoded* before signing (Event Hubs signs with the key text), and a token's resource is a
//! host-relative path without a scheme (`{host}/devices/{id}`), one token per device on a
//! shared connection.

pub mod connection_string;
pub mod device;
pub mod gateway;
#[cfg(feature = "registry")]
#[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
pub mod registry;
pub mod sas;

pub use connection_string::{IotHubConnectionString, IotHubCredentialKind};
pub use device::{
    with_creation_time, DeviceSender, IotHubBuilder, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_DEVICES_PER_CONNECTION, DEFAULT_REFUSED_RETRY_AFTER, DEFAULT_REGISTRY_CONCURRENCY,
    MAX_MESSAGE_SIZE,
};
pub use gateway::{AutoCreate, DeviceState, Gateway, GatewayStats};
#[cfg(feature = "registry")]
pub use registry::{Device, EnsureOutcome, Registry, RegistryBuilder, MAX_BULK_DEVICES};
pub use sas::IotHubSasProvider;
