//! Send events to **Azure Event Hubs** and **IoT Hub** over AMQP 1.0, fast and without losing
//! track of a single delivery.
//!
//! hubsend is a producer only (it does not consume). It keeps one persistent connection per
//! [`Producer`], authorises it with claims-based security (`$cbs` put-token) using SAS keys,
//! SAS tokens, Microsoft Entra ID or any [`TokenProvider`], refreshes tokens on the same
//! connection before they expire, and pipelines deliveries on link credit: many batches in
//! flight, each filled to the hub's size limit to the byte.
//!
//! ```no_run
//! use hubsend::{Event, Producer, SendOptions};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let producer = Producer::from_connection_string(
//!     "Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=KEY;EntityPath=telemetry",
//! ).await?;
//! let delivery = producer.send(Event::new("hello"), SendOptions::new()).await?; // queued
//! delivery.await?; // stored by the hub
//! producer.close().await?; // waits for every outcome, then closes the connection
//! # Ok(())
//! # }
//! ```
//!
//! The repository's README has a complete program (`examples/quick_start.rs`), the command-line
//! tool (`hubsend-cli`) and the local test hub (`hubsend-testhub`).
//!
//! # The delivery model
//!
//! - **Two stages.** [`Producer::send`] and [`Producer::send_batch`] return as soon as the
//!   delivery is queued (waiting only when the in-flight bounds of [`ProducerOptions`] are
//!   reached: backpressure, never unbounded memory); the [`DeliveryFuture`] they return
//!   resolves with the hub's outcome. [`Producer::send_and_wait`] does both.
//! - **At least once.** Throttling is retried with back-off, lost links are re-attached, lost
//!   connections re-opened and re-authorised, and unsettled deliveries resent in order
//!   ([`RetryOptions`]). A delivery whose outcome was lost may be stored twice, unless
//!   [`ProducerOptions::idempotent`] is on: the hub then drops what a retry sends again
//!   (exactly once per partition).
//! - **Typed outcomes.** Every failure is an [`Error`] with an [`ErrorKind`], the hub's AMQP
//!   [`Condition`] when it sent one, and [`Error::is_retriable`].
//! - **Closing.** [`Producer::close`] waits for every outcome and closes the connection;
//!   dropping the last handle does not wait.
//!
//! # Main types
//!
//! | type | what it is for |
//! |---|---|
//! | [`Producer`], [`ProducerBuilder`], [`ProducerOptions`] | one connection to one event hub; cheap to clone |
//! | [`Event`], [`PropertyValue`] | an event: body, content type, ids, application properties |
//! | [`Telemetry`] | a sensor reading as a JSON event |
//! | [`SendOptions`], [`BatchOptions`] | routing: partition key or partition id |
//! | [`EventBatch`], [`TryAddError`] | events sent as one message, sized exactly to the hub's limit |
//! | [`DeliveryFuture`] | the hub's outcome of one send |
//! | [`BufferedProducer`], [`BufferedOptions`] | enqueue events one by one; batching, linger and callbacks done for you |
//! | [`iothub::DeviceSender`], [`iothub::Gateway`] | IoT Hub device-to-cloud, for one device or many on one connection |
//! | [`TokenProvider`], [`SasKeyProvider`], [`SasTokenProvider`] | credentials |
//! | [`Transport`] | AMQP over TLS, AMQP over WebSockets, HTTPS REST |
//! | [`Error`], [`ErrorKind`], [`Condition`] | failures |
//!
//! # Feature flags
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `aws-lc-rs` | yes | rustls with the aws-lc-rs crypto provider (needs cmake and a C compiler to build) |
//! | `ring` | no | rustls with the ring crypto provider instead (`default-features = false, features = ["ring"]`): smaller, no cmake, for ARM gateways |
//! | `entra` | no | `ClientSecretCredential`: Microsoft Entra ID client secrets (pulls in reqwest) |
//! | `azure-identity` | no | `AzureIdentityCredential`: any credential of the official `azure_identity` crate (managed identity, workload identity, Azure CLI, client secret) as a [`TokenProvider`] |
//! | `websockets` | no | AMQP over WebSockets on port 443 |
//! | `proxy` | no | HTTP CONNECT proxies, explicit or from `HTTPS_PROXY`/`NO_PROXY` |
//! | `https` | no | the Event Hubs HTTPS REST API as a [`Transport`] |
//! | `registry` | no | the IoT Hub identity registry and device twins over HTTPS |
//!
//! # Networks
//!
//! The default transport is AMQP over TLS on port 5671. Where only port 443 is open, use
//! [`Transport::WebSockets`] (feature `websockets`); where only HTTPS leaves the network, or
//! only through a proxy that does not tunnel, [`Transport::Https`] (feature `https`). HTTP
//! CONNECT proxies (feature `proxy`) carry AMQP and WebSockets;
//! [`ProducerBuilder::endpoint`] dials a gateway or private endpoint while tokens keep naming
//! the namespace. TLS verification is always on: platform roots (honouring `SSL_CERT_FILE`)
//! with Mozilla's as a fallback, plus [`ProducerBuilder::add_root_certificate_pem`].
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]
// docs.rs builds with `--cfg docsrs` (see `[package.metadata.docs.rs]`) and marks the items
// that need a cargo feature.
#![cfg_attr(docsrs, feature(doc_cfg))]
//!
//! # Layout
//!
//! - [`producer`]: the [`Producer`] handle, its builder and options, [`DeliveryFuture`].
//! - [`buffered`]: [`BufferedProducer`], batching and linger done for you.
//! - [`batch`]: [`EventBatch`], exact size accounting for batch messages.
//! - [`event`]: [`Event`], [`PropertyValue`], and the [`Telemetry`] record.
//! - [`connection_string`]: parsing Event Hubs connection strings.
//! - [`endpoint`]: [`Transport`] (AMQP, WebSockets, HTTPS REST) and custom endpoints.
//! - `http` (private; features `entra`, `registry`, `https`): the HTTP client factory, the
//!   token cache, and `rest`, the HTTPS REST delivery backend.
//! - [`auth`]: SAS signing and [`TokenProvider`]s for CBS.
//! - `entra` (feature `entra`): `ClientSecretCredential`, Microsoft Entra ID client secrets.
//! - `azure_identity` (feature `azure-identity`): `AzureIdentityCredential`, any credential
//!   of Microsoft's `azure_identity` crate.
//! - [`iothub`]: IoT Hub connection strings and SAS tokens (device and policy keys).
//! - [`retry`]: [`RetryOptions`] and the failure classifier.
//! - [`error`]: [`Error`], [`ErrorKind`], [`Condition`].
//! - `amqp` (private): the engine task that owns the fe2o3 connection, session and links.

mod amqp;
pub mod auth;
#[cfg(feature = "azure-identity")]
#[cfg_attr(docsrs, doc(cfg(feature = "azure-identity")))]
pub mod azure_identity;
pub mod batch;
pub mod buffered;
pub mod connection_string;
pub mod endpoint;
mod entity;
#[cfg(feature = "entra")]
#[cfg_attr(docsrs, doc(cfg(feature = "entra")))]
pub mod entra;
pub mod error;
pub mod event;
#[cfg(feature = "http")]
mod http;
pub mod idempotent;
pub mod iothub;
pub mod producer;
pub mod retry;
mod servicebus_json;
mod tls;
mod transport;

pub use amqp::ConnectionEvent;
pub use auth::{AccessToken, SasKeyProvider, SasTokenProvider, TokenProvider, TokenType};
#[cfg(feature = "azure-identity")]
#[cfg_attr(docsrs, doc(cfg(feature = "azure-identity")))]
pub use azure_identity::AzureIdentityCredential;
pub use batch::{BatchOptions, EventBatch, TryAddError};
pub use buffered::{BufferedOptions, BufferedProducer, BufferedReport, FailedBatch, SettledBatch};
pub use connection_string::ConnectionString;
pub use endpoint::Transport;
#[cfg(feature = "entra")]
#[cfg_attr(docsrs, doc(cfg(feature = "entra")))]
pub use entra::ClientSecretCredential;
pub use error::{Condition, Error, ErrorKind, Result};
pub use event::{Event, PropertyValue, Telemetry, TelemetryValue};
pub use idempotent::PartitionPublishingState;
pub use producer::{
    DeliveryFuture, HubProperties, PartitionProperties, Producer, ProducerBuilder, ProducerOptions,
    ProducerStats, SendOptions, DEFAULT_MAX_MESSAGE_SIZE,
};
pub use retry::RetryOptions;

// The README's Rust snippets compile as doc tests (its quick start is an example, run by
// tests/readme.rs).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
