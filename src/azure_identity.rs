//! [`AzureIdentityCredential`] (feature `azure-identity`): any credential of Microsoft's
//! official `azure_identity` crate — managed identity, workload identity, the Azure CLI, a
//! client secret or certificate, a chain of them — as a hubsend [`TokenProvider`].
//!
//! Every `azure_identity` credential implements `azure_core`'s `TokenCredential`; this adapter
//! asks it for a token with the Event Hubs scope and puts it on the connection as a `jwt`
//! token. The credential does its own caching and refreshing; hubsend asks again before each
//! token it put expires.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use azure_core::credentials::TokenCredential;

use crate::auth::{AccessToken, TokenProvider, TokenType};
use crate::error::{Error, ErrorKind, Result};

/// The OAuth scope that grants access to Event Hubs data planes (IoT Hub:
/// `https://iothubs.azure.net/.default`, with [`with_scope`](AzureIdentityCredential::with_scope)).
pub const EVENT_HUBS_SCOPE: &str = "https://eventhubs.azure.net/.default";

/// An `azure_core` [`TokenCredential`] (every credential of the `azure_identity` crate) as a
/// [`TokenProvider`].
///
/// ```ignore
/// // Cargo.toml: hubsend = { version = "0.1", features = ["azure-identity"] }, azure_identity = "1"
/// use std::sync::Arc;
/// use hubsend::{AzureIdentityCredential, Producer};
///
/// let credential = azure_identity::ManagedIdentityCredential::new(None)?;
/// let producer = Producer::builder()
///     .namespace("contoso.servicebus.windows.net")
///     .event_hub("telemetry")
///     .credential(Arc::new(AzureIdentityCredential::new(credential)))
///     .connect()
///     .await?;
/// ```
///
/// The identity needs a data-plane role on the hub or namespace, e.g. *Azure Event Hubs Data
/// Sender*.
#[derive(Debug, Clone)]
pub struct AzureIdentityCredential {
    credential: Arc<dyn TokenCredential>,
    scope: String,
}

impl AzureIdentityCredential {
    /// Wraps `credential`, asking it for tokens with the Event Hubs scope.
    pub fn new(credential: Arc<dyn TokenCredential>) -> AzureIdentityCredential {
        AzureIdentityCredential {
            credential,
            scope: EVENT_HUBS_SCOPE.to_owned(),
        }
    }

    /// Asks for tokens with `scope` instead (e.g. a sovereign cloud's, or IoT Hub's).
    pub fn with_scope(mut self, scope: impl Into<String>) -> AzureIdentityCredential {
        self.scope = scope.into();
        self
    }

    /// The scope tokens are requested with.
    pub fn scope(&self) -> &str {
        &self.scope
    }
}

impl TokenProvider for AzureIdentityCredential {
    fn token<'a>(
        &'a self,
        _audience: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<AccessToken>> + Send + 'a>> {
        Box::pin(async move {
            let token = self
                .credential
                .get_token(&[self.scope.as_str()], None)
                .await
                .map_err(refusal)?;
            let seconds = u64::try_from(token.expires_on.unix_timestamp()).unwrap_or(0);
            let expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
            Ok(AccessToken::new(
                token.token.secret().to_owned(),
                TokenType::Jwt,
                expires_at,
            ))
        })
    }
}

/// The error for a credential that gave no token: unauthorized (the attempt to connect ends)
/// unless it could not reach its identity endpoint, which may come back.
fn refusal(error: azure_core::Error) -> Error {
    let kind = match error.kind() {
        azure_core::error::ErrorKind::Io => ErrorKind::Connection,
        _ => ErrorKind::Unauthorized,
    };
    Error::new(
        kind,
        format!("the azure_identity credential gave no token: {error}"),
    )
}
