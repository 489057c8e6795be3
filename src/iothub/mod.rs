//! Azure IoT Hub: connection strings and shared access signatures.
//!
//! IoT Hub differs from Event Hubs in two ways that matter here: its keys are base64 and are
//! *decoded* before signing (Event Hubs signs with the key text), and a token's resource is a
//! host-relative path without a scheme (`{host}/devices/{id}`), one token per device on a
//! shared connection. The device sender and the gateway will live in this module too.

pub mod connection_string;
pub mod sas;

pub use connection_string::{IotHubConnectionString, IotHubCredentialKind};
pub use sas::IotHubSasProvider;
