#![doc = include_str!("../README.md")]
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
//! - [`auth`]: SAS signing and [`TokenProvider`]s for CBS.
//! - `entra` (feature `entra`): `ClientSecretCredential`, Microsoft Entra ID client secrets.
//! - [`iothub`]: IoT Hub connection strings and SAS tokens (device and policy keys).
//! - [`retry`]: [`RetryOptions`] and the failure classifier.
//! - [`error`]: [`Error`], [`ErrorKind`], [`Condition`].
//! - `amqp` (private): the engine task that owns the fe2o3 connection, session and links.

mod amqp;
pub mod auth;
pub mod batch;
pub mod buffered;
pub mod connection_string;
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
mod tls;
mod transport;

pub use amqp::ConnectionEvent;
pub use auth::{AccessToken, SasKeyProvider, SasTokenProvider, TokenProvider, TokenType};
pub use batch::{BatchOptions, EventBatch, TryAddError};
pub use buffered::{BufferedOptions, BufferedProducer, BufferedReport, FailedBatch, SettledBatch};
pub use connection_string::ConnectionString;
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
