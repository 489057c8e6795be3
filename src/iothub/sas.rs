//! IoT Hub shared access signatures: resource URIs, signing with the base64-decoded key, and
//! [`IotHubSasProvider`], the [`TokenProvider`] that signs one token per audience.
//!
//! A token reads `SharedAccessSignature sr=<resource>&sig=<signature>&se=<expiry>[&skn=<policy>]`:
//! `sr` is the resource URI percent-encoded with upper-case hex, `sig` the base64 HMAC-SHA256
//! of `sr + "\n" + se` under the decoded key, and `skn` the policy name, left out entirely for
//! a device (or module) key.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::auth::{AccessToken, KeySigner, SigningKey, TokenProvider};
/// The resource one device's token covers: `{host}/devices/{id}`, the id percent-encoded (so
/// it is encoded once there and once more as part of `sr`, as Microsoft's SDKs do).
pub(crate) use crate::entity::iothub::device_audience as device_resource;
use crate::entity::iothub::encode_id;
use crate::error::{Error, ErrorKind, Result};

/// The longest device or module id IoT Hub allows.
const MAX_ID_LEN: usize = 128;

/// The characters besides ASCII letters and digits that device and module ids may hold.
const ID_PUNCTUATION: &str = "-:.+%_#*?!(),=@;$'";

/// Checks a device or module id: 1 to 128 characters of `A-Z a-z 0-9` and
/// `- : . + % _ # * ? ! ( ) , = @ ; $ '`. The error names `what` and the position of the
/// first bad character, never the id.
pub(crate) fn check_id(what: &str, id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        return Err(format!("`{what}` is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "`{what}` is {} characters long; IoT Hub allows at most {MAX_ID_LEN}",
            id.chars().count()
        ));
    }
    match id
        .chars()
        .position(|c| !(c.is_ascii_alphanumeric() || ID_PUNCTUATION.contains(c)))
    {
        Some(at) => Err(format!(
            "`{what}` has a character IoT Hub does not allow at position {}; ids are \
             A-Z a-z 0-9 and {}",
            at + 1,
            ID_PUNCTUATION
                .chars()
                .map(String::from)
                .collect::<Vec<_>>()
                .join(" ")
        )),
        None => Ok(()),
    }
}

/// The resource one module's token covers: `{host}/devices/{device}/modules/{module}`, each
/// id percent-encoded as one path segment (and encoded once more as part of `sr`).
pub(crate) fn module_resource(host: &str, device_id: &str, module_id: &str) -> String {
    format!(
        "{}/modules/{}",
        device_resource(host, device_id),
        encode_id(module_id)
    )
}

/// Signs a fresh IoT Hub shared access signature for each audience it is asked for.
///
/// Made from a device (or module) key, tokens carry no `skn` and are only accepted for that
/// device; made from a shared access policy key (`device`, `iothubowner`, …), tokens carry the
/// policy name in `skn` and cover any device the policy's rights allow, which is how a gateway
/// authorises many devices on one connection. Keys are base64 and are decoded before signing.
///
/// The audience is the resource without a scheme, e.g. `myhub.azure-devices.net/devices/dev-1`
/// (a device id already percent-encoded), or `myhub.azure-devices.net` for the whole hub.
/// Tokens are valid for one hour unless set with [`with_lifetime`](Self::with_lifetime).
/// `Debug` never shows the key.
///
/// ```
/// use hubsend::iothub::IotHubSasProvider;
///
/// let provider = IotHubSasProvider::device_key("c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA==")?;
/// assert_eq!(provider.key_name(), None);
/// let gateway = IotHubSasProvider::policy_key("device", "c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA==")?;
/// assert_eq!(gateway.key_name(), Some("device"));
/// # Ok::<(), hubsend::Error>(())
/// ```
#[derive(Clone)]
pub struct IotHubSasProvider {
    signer: KeySigner,
}

impl IotHubSasProvider {
    /// A provider for a device's (or module's) own key: the connection string's
    /// `SharedAccessKey` when it has a `DeviceId` and no `SharedAccessKeyName`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConfig`] when the key is not base64. The message never shows it.
    pub fn device_key(key_base64: &str) -> Result<IotHubSasProvider> {
        Ok(IotHubSasProvider::from_key(
            None,
            decode(key_base64, "device key")?,
        ))
    }

    /// A provider for the shared access policy `key_name` (e.g. `device` or `iothubowner`)
    /// and its base64 `key`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConfig`] when the policy name is empty or the key is not base64.
    /// The message never shows the key.
    pub fn policy_key(key_name: impl Into<String>, key_base64: &str) -> Result<IotHubSasProvider> {
        let key_name = key_name.into();
        if key_name.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "the IoT Hub shared access policy name is empty",
            ));
        }
        let key = decode(key_base64, "shared access policy key")?;
        Ok(IotHubSasProvider::from_key(Some(key_name), key))
    }

    pub(crate) fn from_key(key_name: Option<String>, key: SigningKey) -> IotHubSasProvider {
        IotHubSasProvider {
            signer: KeySigner::new(key_name, key),
        }
    }

    /// Sets how long each signed token is valid (default one hour). Values below one second
    /// are treated as one second.
    #[must_use]
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.signer.set_lifetime(lifetime);
        self
    }

    /// How long each signed token is valid.
    pub fn lifetime(&self) -> Duration {
        self.signer.lifetime()
    }

    /// The policy name that goes into `skn`; `None` for a device key.
    pub fn key_name(&self) -> Option<&str> {
        self.signer.key_name()
    }
}

/// Decodes a base64 key for a provider, naming `what` on failure.
fn decode(key_base64: &str, what: &str) -> Result<SigningKey> {
    SigningKey::from_base64(key_base64).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!("the IoT Hub {what} is not base64 (IoT Hub keys are base64-encoded)"),
        )
    })
}

impl fmt::Debug for IotHubSasProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.signer.debug_as("IotHubSasProvider", f)
    }
}

impl TokenProvider for IotHubSasProvider {
    fn token<'a>(
        &'a self,
        audience: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<AccessToken>> + Send + 'a>> {
        self.signer.token(audience)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::auth::{parse_sas_expiry, sas_signature, sign_sas, TokenType};

    /// PROTOCOL-2 B: the vectors' key and expiry.
    const KEY: &str = "c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA==";
    const SE: u64 = 1_700_000_000;
    const HOST: &str = "myhub.azure-devices.net";

    fn key() -> SigningKey {
        SigningKey::from_base64(KEY).unwrap()
    }

    /// Every PROTOCOL-2 B vector: the signature (before URL-encoding) of a literal `sr`,
    /// including the lower-hex and raw forms other SDKs send.
    #[test]
    fn protocol_2_b_vectors() {
        for (sr, sig) in [
            (
                "myhub.azure-devices.net",
                "SaT01fEu08CIPBbCNdQXFlaKwep2p9xJ0tiayZmQJb4=",
            ),
            (
                "myhub.azure-devices.net%2Fdevices",
                "FD4gEhcQhatitHdvWZXWgI+uM9Sa7IPqCouoURyBG80=",
            ),
            (
                "myhub.azure-devices.net%2Fdevices%2Fdevice1",
                "n5cC5oxf9NxIJYuwyHe2zfilb2bDGI4pQYBDqkR47oE=",
            ),
            (
                "myhub.azure-devices.net%2fdevices%2fdevice1",
                "I6KorOr8+uq2IiDleHb0kI7CAQAALp5gOy+nrIdmQr0=",
            ),
            (
                "myhub.azure-devices.net/devices/device1",
                "Pdw1YMLC36OfTAfUaIrqm7eXGUBg4gGXtDlZVaIdWrs=",
            ),
        ] {
            assert_eq!(sas_signature(sr, SE, key().bytes()), sig, "{sr}");
        }
    }

    /// The tokens hubsend sends: upper-hex `sr`, URL-encoded `sig`, `skn` only for policies.
    #[test]
    fn device_and_policy_tokens_match_the_vectors() {
        let device = IotHubSasProvider::device_key(KEY).unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(SE - 3600);
        let token = device.signer.sign_at(&device_resource(HOST, "device1"), at);
        assert_eq!(
            token.secret(),
            "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdevice1\
             &sig=n5cC5oxf9NxIJYuwyHe2zfilb2bDGI4pQYBDqkR47oE%3D&se=1700000000"
        );
        assert_eq!(token.expires_at(), UNIX_EPOCH + Duration::from_secs(SE));
        assert_eq!(token.token_type(), &TokenType::SharedAccessSignature);
        assert!(!token.secret().contains("skn="));

        let policy = IotHubSasProvider::policy_key("device", KEY).unwrap();
        let token = policy.signer.sign_at(&format!("{HOST}/devices"), at);
        assert_eq!(
            token.secret(),
            "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices\
             &sig=FD4gEhcQhatitHdvWZXWgI%2BuM9Sa7IPqCouoURyBG80%3D&se=1700000000&skn=device"
        );
        let token = policy.signer.sign_at(HOST, at);
        assert_eq!(
            token.secret(),
            "SharedAccessSignature sr=myhub.azure-devices.net\
             &sig=SaT01fEu08CIPBbCNdQXFlaKwep2p9xJ0tiayZmQJb4%3D&se=1700000000&skn=device"
        );
        assert_eq!(parse_sas_expiry(token.secret()), Ok(token.expires_at()));
    }

    /// The device id is percent-encoded into the resource, and the resource again into `sr`.
    #[test]
    fn resources_encode_the_id_first() {
        assert_eq!(
            device_resource(HOST, "device1"),
            "myhub.azure-devices.net/devices/device1"
        );
        assert_eq!(
            device_resource(HOST, "dev#1 (a)"),
            "myhub.azure-devices.net/devices/dev%231%20%28a%29"
        );
        assert_eq!(
            module_resource(HOST, "d:1", "m@2"),
            "myhub.azure-devices.net/devices/d%3A1/modules/m%402"
        );
        let token = IotHubSasProvider::device_key(KEY)
            .unwrap()
            .signer
            .sign_at(&device_resource(HOST, "dev#1"), UNIX_EPOCH);
        assert!(
            token.secret().starts_with(
                "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev%25231&"
            ),
            "{}",
            token.secret()
        );
    }

    #[tokio::test]
    async fn provider_signs_each_audience_for_its_lifetime() {
        let provider = IotHubSasProvider::policy_key("device", KEY)
            .unwrap()
            .with_lifetime(Duration::from_secs(120));
        assert_eq!(provider.lifetime(), Duration::from_secs(120));
        let before = SystemTime::now();
        let one = provider.token(&device_resource(HOST, "a")).await.unwrap();
        let two = provider.token(&device_resource(HOST, "b")).await.unwrap();
        assert!(one
            .secret()
            .contains("sr=myhub.azure-devices.net%2Fdevices%2Fa&"));
        assert!(two
            .secret()
            .contains("sr=myhub.azure-devices.net%2Fdevices%2Fb&"));
        let left = one.expires_at().duration_since(before).unwrap();
        assert!(left >= Duration::from_secs(119) && left <= Duration::from_secs(122));
        let se = one
            .expires_at()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(
            one.secret(),
            sign_sas(
                &device_resource(HOST, "a"),
                Some("device"),
                key().bytes(),
                se
            )
        );

        let default = IotHubSasProvider::device_key(KEY).unwrap();
        assert_eq!(default.lifetime(), Duration::from_secs(3600));
    }

    #[test]
    fn bad_keys_are_refused_without_echo() {
        for bad in [
            "not base64!",
            "",
            "====",
            "c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA",
        ] {
            let err = IotHubSasProvider::device_key(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert!(
                err.to_string().contains("device key is not base64"),
                "{err}"
            );
            if !bad.is_empty() {
                assert!(!format!("{err} {err:?}").contains(bad), "{err:?}");
            }
        }
        let err = IotHubSasProvider::policy_key("p", "***").unwrap_err();
        assert!(
            err.to_string().contains("policy key is not base64"),
            "{err}"
        );
        let err = IotHubSasProvider::policy_key(" ", KEY).unwrap_err();
        assert!(err.to_string().contains("policy name is empty"), "{err}");

        let provider = IotHubSasProvider::policy_key("device", KEY).unwrap();
        let debug = format!("{provider:?}");
        assert!(
            !debug.contains(KEY) && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn ids_are_checked_per_the_charset() {
        for ok in ["device1", "a", "A-Z.0:9+%_#*?!(),=@;$'", &"x".repeat(128)] {
            assert_eq!(check_id("DeviceId", ok), Ok(()), "{ok}");
        }
        let long = "y".repeat(129);
        for (bad, why) in [
            ("", "is empty"),
            (long.as_str(), "at most 128"),
            ("dev ice", "position 4"),
            ("dev/1", "position 4"),
            ("caf\u{e9}", "position 4"),
            ("a&b", "position 2"),
        ] {
            let err = check_id("DeviceId", bad).unwrap_err();
            assert!(err.starts_with("`DeviceId`"), "{err}");
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
