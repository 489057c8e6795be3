//! Parsing of IoT Hub connection strings
//! (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`, `HostName=…;DeviceId=…;SharedAccessKey=…`
//! and the other forms below).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::auth::{parse_sas_expiry, SasTokenProvider, Secret, SigningKey, TokenProvider};
use crate::connection_string::{invalid, known_pairs, Key};
use crate::error::{Error, Result};
use crate::iothub::sas::{check_id, device_resource, module_resource, IotHubSasProvider};

/// The keys an IoT Hub connection string may hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    HostName,
    DeviceId,
    ModuleId,
    SharedAccessKeyName,
    SharedAccessKey,
    SharedAccessSignature,
    GatewayHostName,
}

impl Field {
    const ALL: [Field; 7] = [
        Field::HostName,
        Field::DeviceId,
        Field::ModuleId,
        Field::SharedAccessKeyName,
        Field::SharedAccessKey,
        Field::SharedAccessSignature,
        Field::GatewayHostName,
    ];
}

impl Key for Field {
    fn lookup(text: &str) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(text))
    }

    fn name(self) -> &'static str {
        match self {
            Field::HostName => "HostName",
            Field::DeviceId => "DeviceId",
            Field::ModuleId => "ModuleId",
            Field::SharedAccessKeyName => "SharedAccessKeyName",
            Field::SharedAccessKey => "SharedAccessKey",
            Field::SharedAccessSignature => "SharedAccessSignature",
            Field::GatewayHostName => "GatewayHostName",
        }
    }
}

/// What signs (or is) the token an IoT Hub connection string carries.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotHubCredentialKind {
    /// `SharedAccessKeyName` + `SharedAccessKey`: a shared access policy (`iothubowner`,
    /// `device`, …). With a `DeviceId` too it is the "device via policy" form.
    PolicyKey,
    /// `DeviceId` + `SharedAccessKey` without a policy name: the device's (or, with
    /// `ModuleId`, the module's) own key.
    DeviceKey,
    /// `SharedAccessSignature`: one pre-made token, which cannot be renewed.
    SharedAccessSignature,
}

/// The credential, as parsed.
#[derive(Clone, Debug)]
enum Credential {
    Policy {
        name: String,
        key: SigningKey,
    },
    Device {
        key: SigningKey,
    },
    Signature {
        token: Secret,
        expires_at: SystemTime,
    },
}

/// A parsed IoT Hub connection string.
///
/// Pairs are separated by `;` and split at their first `=`; keys are matched
/// case-insensitively and trimmed, and unknown keys are ignored. `HostName` is required, with
/// one credential:
///
/// | form | keys |
/// |---|---|
/// | policy | `HostName;SharedAccessKeyName;SharedAccessKey` |
/// | device | `HostName;DeviceId;SharedAccessKey` |
/// | device via policy | `HostName;DeviceId;SharedAccessKeyName;SharedAccessKey` |
/// | module | a device form plus `ModuleId` |
/// | pre-made token | `HostName;[DeviceId;[ModuleId;]]SharedAccessSignature=SharedAccessSignature sr=…` |
///
/// `GatewayHostName`, when given, is the host to connect to; token audiences keep using
/// `HostName`. Device and module ids are 1–128 characters of `A-Z a-z 0-9` and
/// `- : . + % _ # * ? ! ( ) , = @ ; $ '`; keys must be base64.
///
/// Neither `Debug` nor any parse error ever shows a key or signature.
///
/// ```
/// use hubsend::iothub::{IotHubConnectionString, IotHubCredentialKind};
///
/// let cs: IotHubConnectionString = "HostName=myhub.azure-devices.net;DeviceId=device1;\
///     SharedAccessKey=c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA=="
///     .parse()?;
/// assert_eq!(cs.hub_name(), "myhub");
/// assert_eq!(cs.device_id(), Some("device1"));
/// assert_eq!(cs.credential_kind(), IotHubCredentialKind::DeviceKey);
/// assert_eq!(cs.audience(), "myhub.azure-devices.net/devices/device1");
/// # Ok::<(), hubsend::Error>(())
/// ```
#[derive(Clone)]
pub struct IotHubConnectionString {
    host_name: String,
    gateway_host_name: Option<String>,
    device_id: Option<String>,
    module_id: Option<String>,
    credential: Credential,
}

impl IotHubConnectionString {
    /// Parses a connection string.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConnectionString`](crate::ErrorKind::InvalidConnectionString)
    /// naming the offending key: a part without `=`, a duplicate or empty value, a malformed
    /// `HostName` or `GatewayHostName`, an id outside IoT Hub's rules, a key that is not
    /// base64, a malformed `SharedAccessSignature`, a `ModuleId` without `DeviceId`, or
    /// missing or conflicting credentials.
    pub fn parse(s: &str) -> Result<IotHubConnectionString> {
        let mut values: [Option<&str>; Field::ALL.len()] = [None; Field::ALL.len()];
        for (key, value) in known_pairs::<Field>(s)? {
            values[key as usize] = Some(value);
        }
        let get = |key: Field| values[key as usize];

        let host_name = get(Field::HostName).ok_or_else(|| invalid("missing `HostName`"))?;
        check_host("HostName", host_name)?;
        if let Some(gateway) = get(Field::GatewayHostName) {
            check_host("GatewayHostName", gateway)?;
        }
        for field in [Field::DeviceId, Field::ModuleId] {
            if let Some(id) = get(field) {
                check_id(field.name(), id).map_err(invalid)?;
            }
        }
        let device_id = get(Field::DeviceId);
        if get(Field::ModuleId).is_some() && device_id.is_none() {
            return Err(invalid("`ModuleId` is set without `DeviceId`"));
        }

        let key = || {
            let text = get(Field::SharedAccessKey).unwrap_or_default();
            SigningKey::from_base64(text).ok_or_else(|| {
                invalid("`SharedAccessKey` is not base64 (IoT Hub keys are base64-encoded)")
            })
        };
        let credential = match (
            get(Field::SharedAccessKeyName),
            get(Field::SharedAccessKey),
            get(Field::SharedAccessSignature),
        ) {
            (Some(name), Some(_), None) => Credential::Policy {
                name: name.to_owned(),
                key: key()?,
            },
            (None, Some(_), None) if device_id.is_some() => Credential::Device { key: key()? },
            (None, Some(_), None) => {
                return Err(invalid(
                    "`SharedAccessKey` needs `DeviceId` (a device key) or \
                     `SharedAccessKeyName` (a shared access policy key)",
                ))
            }
            (None, None, Some(signature)) => {
                let expires_at = parse_sas_expiry(signature).map_err(|why| {
                    invalid(format!(
                        "`SharedAccessSignature` {why}; expected \
                         `SharedAccessSignature sr=<resource>&sig=<signature>&se=<expiry>[&skn=<policy>]`"
                    ))
                })?;
                Credential::Signature {
                    token: Secret::new(signature),
                    expires_at,
                }
            }
            (name, key, Some(_)) => {
                let other = if key.is_some() {
                    "SharedAccessKey"
                } else {
                    debug_assert!(name.is_some());
                    "SharedAccessKeyName"
                };
                return Err(invalid(format!(
                    "both `SharedAccessSignature` and `{other}` are set; use either a key \
                     or `SharedAccessSignature`"
                )));
            }
            (Some(_), None, None) => {
                return Err(invalid(
                    "missing `SharedAccessKey` (SharedAccessKeyName is set)",
                ))
            }
            (None, None, None) => {
                return Err(invalid(
                    "missing credentials: set `SharedAccessKey` (with `DeviceId` or \
                     `SharedAccessKeyName`) or `SharedAccessSignature`",
                ))
            }
        };

        Ok(IotHubConnectionString {
            host_name: host_name.to_owned(),
            gateway_host_name: get(Field::GatewayHostName).map(str::to_owned),
            device_id: device_id.map(str::to_owned),
            module_id: get(Field::ModuleId).map(str::to_owned),
            credential,
        })
    }

    /// The hub's host name, e.g. `myhub.azure-devices.net`; token audiences use it.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// The hub's name: the first label of [`host_name`](Self::host_name).
    pub fn hub_name(&self) -> &str {
        self.host_name.split('.').next().unwrap_or(&self.host_name)
    }

    /// `GatewayHostName`, if given (an IoT Edge gateway or a private endpoint).
    pub fn gateway_host_name(&self) -> Option<&str> {
        self.gateway_host_name.as_deref()
    }

    /// The host to connect to: `GatewayHostName` when given, else `HostName`.
    pub fn connect_host(&self) -> &str {
        self.gateway_host_name.as_deref().unwrap_or(&self.host_name)
    }

    /// `DeviceId`, for the device, device-via-policy and module forms.
    pub fn device_id(&self) -> Option<&str> {
        self.device_id.as_deref()
    }

    /// `ModuleId`, for the module forms.
    pub fn module_id(&self) -> Option<&str> {
        self.module_id.as_deref()
    }

    /// `SharedAccessKeyName`, for the policy forms.
    pub fn shared_access_key_name(&self) -> Option<&str> {
        match &self.credential {
            Credential::Policy { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Which credential the string carries.
    pub fn credential_kind(&self) -> IotHubCredentialKind {
        match self.credential {
            Credential::Policy { .. } => IotHubCredentialKind::PolicyKey,
            Credential::Device { .. } => IotHubCredentialKind::DeviceKey,
            Credential::Signature { .. } => IotHubCredentialKind::SharedAccessSignature,
        }
    }

    /// The resource this string's identity covers, without a scheme:
    /// `{host}/devices/{id}` (and `/modules/{module}`) when it names a device, else the hub
    /// host itself. The id is percent-encoded.
    pub fn audience(&self) -> String {
        match (&self.device_id, &self.module_id) {
            (Some(device), Some(module)) => module_resource(&self.host_name, device, module),
            (Some(device), None) => device_resource(&self.host_name, device),
            _ => self.host_name.clone(),
        }
    }

    /// A [`TokenProvider`] for this credential: an [`IotHubSasProvider`] signing tokens of
    /// `lifetime` for a key, or a [`SasTokenProvider`] handing out the pre-made signature.
    pub fn token_provider(&self, lifetime: Duration) -> Arc<dyn TokenProvider> {
        match &self.credential {
            Credential::Policy { name, key } => Arc::new(
                IotHubSasProvider::from_key(Some(name.clone()), key.clone())
                    .with_lifetime(lifetime),
            ),
            Credential::Device { key } => {
                Arc::new(IotHubSasProvider::from_key(None, key.clone()).with_lifetime(lifetime))
            }
            Credential::Signature { token, expires_at } => {
                Arc::new(SasTokenProvider::from_parts(token.clone(), *expires_at))
            }
        }
    }
}

/// Checks a host name: dot-separated labels of ASCII letters, digits and `-` (which covers
/// IPv4 addresses), at most 253 characters, with no scheme, port or path.
fn check_host(what: &str, host: &str) -> Result<()> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.len() <= 253 && host.split('.').all(label_ok) {
        return Ok(());
    }
    Err(invalid(format!(
        "`{what}` must be a host name such as <hub>.azure-devices.net, without a scheme, \
         port or path"
    )))
}

impl FromStr for IotHubConnectionString {
    type Err = Error;

    fn from_str(s: &str) -> Result<IotHubConnectionString> {
        IotHubConnectionString::parse(s)
    }
}

impl fmt::Debug for IotHubConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("IotHubConnectionString");
        d.field("host_name", &self.host_name)
            .field("gateway_host_name", &self.gateway_host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id);
        match &self.credential {
            Credential::Policy { name, .. } => {
                d.field("shared_access_key_name", name)
                    .field("shared_access_key", &"<redacted>");
            }
            Credential::Device { .. } => {
                d.field("shared_access_key", &"<redacted>");
            }
            Credential::Signature { .. } => {
                d.field("shared_access_signature", &"<redacted>");
            }
        }
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::sign_sas;
    use crate::error::ErrorKind;

    const KEY: &str = "c2VjcmV0LWRldmljZS1rZXktMTIzNDU2Nzg5MA==";
    const HOST: &str = "myhub.azure-devices.net";

    fn parse(s: &str) -> IotHubConnectionString {
        IotHubConnectionString::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> Error {
        match IotHubConnectionString::parse(s) {
            Ok(cs) => panic!("expected an error for {s}, got {cs:?}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidConnectionString, "{s}");
                e
            }
        }
    }

    fn assert_message(s: &str, expected: &str) {
        let e = err(s);
        assert!(
            e.message().contains(expected),
            "{s}: {:?} !~ {expected:?}",
            e.message()
        );
    }

    /// The token the string's provider signs for `audience`, with its `se`.
    async fn token_for(cs: &IotHubConnectionString, audience: &str) -> (String, u64) {
        let token = cs
            .token_provider(Duration::from_secs(600))
            .token(audience)
            .await
            .unwrap();
        let se = token
            .expires_at()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (token.secret().to_owned(), se)
    }

    fn decoded_key() -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(KEY)
            .unwrap()
    }

    #[tokio::test]
    async fn policy_form() {
        let cs = parse(&format!(
            "HostName={HOST};SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"
        ));
        assert_eq!(cs.host_name(), HOST);
        assert_eq!(cs.hub_name(), "myhub");
        assert_eq!(cs.connect_host(), HOST);
        assert_eq!(cs.device_id(), None);
        assert_eq!(cs.shared_access_key_name(), Some("iothubowner"));
        assert_eq!(cs.credential_kind(), IotHubCredentialKind::PolicyKey);
        assert_eq!(cs.audience(), HOST);
        // A policy signs any device's audience, with `skn` and the decoded key.
        let audience = device_resource(HOST, "device1");
        let (token, se) = token_for(&cs, &audience).await;
        assert_eq!(
            token,
            sign_sas(&audience, Some("iothubowner"), &decoded_key(), se)
        );
    }

    #[tokio::test]
    async fn device_form() {
        let cs = parse(&format!(
            "HostName={HOST};DeviceId=device1;SharedAccessKey={KEY}"
        ));
        assert_eq!(cs.device_id(), Some("device1"));
        assert_eq!(cs.module_id(), None);
        assert_eq!(cs.shared_access_key_name(), None);
        assert_eq!(cs.credential_kind(), IotHubCredentialKind::DeviceKey);
        assert_eq!(cs.audience(), "myhub.azure-devices.net/devices/device1");
        let (token, se) = token_for(&cs, &cs.audience()).await;
        assert_eq!(token, sign_sas(&cs.audience(), None, &decoded_key(), se));
        assert!(!token.contains("skn="));
    }

    #[tokio::test]
    async fn device_via_policy_form() {
        let cs = parse(&format!(
            "HostName={HOST};DeviceId=device1;SharedAccessKeyName=device;SharedAccessKey={KEY}"
        ));
        assert_eq!(cs.device_id(), Some("device1"));
        assert_eq!(cs.shared_access_key_name(), Some("device"));
        assert_eq!(cs.credential_kind(), IotHubCredentialKind::PolicyKey);
        assert_eq!(cs.audience(), "myhub.azure-devices.net/devices/device1");
        let (token, _) = token_for(&cs, &cs.audience()).await;
        assert!(token.ends_with("&skn=device"), "{token}");
    }

    #[test]
    fn module_forms() {
        let cs = parse(&format!(
            "HostName={HOST};DeviceId=edge-1;ModuleId=temp:sensor;SharedAccessKey={KEY}"
        ));
        assert_eq!(cs.module_id(), Some("temp:sensor"));
        assert_eq!(cs.credential_kind(), IotHubCredentialKind::DeviceKey);
        assert_eq!(
            cs.audience(),
            "myhub.azure-devices.net/devices/edge-1/modules/temp%3Asensor"
        );
        let cs = parse(&format!(
            "HostName={HOST};DeviceId=edge-1;ModuleId=m1;SharedAccessKeyName=p;SharedAccessKey={KEY}"
        ));
        assert_eq!(cs.credential_kind(), IotHubCredentialKind::PolicyKey);
        assert_eq!(
            cs.audience(),
            "myhub.azure-devices.net/devices/edge-1/modules/m1"
        );
    }

    #[tokio::test]
    async fn shared_access_signature_form() {
        let signature = sign_sas(
            &device_resource(HOST, "device1"),
            None,
            &decoded_key(),
            4_102_444_800,
        );
        let cs = parse(&format!(
            "HostName={HOST};DeviceId=device1;SharedAccessSignature={signature}"
        ));
        assert_eq!(
            cs.credential_kind(),
            IotHubCredentialKind::SharedAccessSignature
        );
        assert_eq!(cs.shared_access_key_name(), None);
        let (token, se) = token_for(&cs, &cs.audience()).await;
        assert_eq!(token, signature);
        assert_eq!(se, 4_102_444_800);
        // A hub-wide signature without DeviceId is fine too.
        let cs = parse(&format!(
            "HostName={HOST};SharedAccessSignature={signature}"
        ));
        assert_eq!(cs.audience(), HOST);
    }

    #[test]
    fn gateway_host_name_is_where_to_connect() {
        let cs = parse(&format!(
            "HostName={HOST};DeviceId=d;SharedAccessKey={KEY};GatewayHostName=edge.local"
        ));
        assert_eq!(cs.gateway_host_name(), Some("edge.local"));
        assert_eq!(cs.connect_host(), "edge.local");
        assert_eq!(cs.host_name(), HOST);
        assert_eq!(cs.audience(), "myhub.azure-devices.net/devices/d");
        let cs = parse(&format!(
            "hostname = 127.0.0.1 ; deviceid=d;sharedaccesskey={KEY};TransportType=Amqp;"
        ));
        assert_eq!(cs.host_name(), "127.0.0.1");
        assert_eq!(cs.connect_host(), "127.0.0.1");
    }

    #[test]
    fn ids_follow_iot_hub_rules() {
        let with_id = |id: &str| format!("HostName={HOST};DeviceId={id};SharedAccessKey={KEY}");
        // `=` may appear in an id: values split at their first `=`.
        let cs = parse(&with_id("a-Z.0:9+%_#*?!(),=@$'"));
        assert_eq!(cs.device_id(), Some("a-Z.0:9+%_#*?!(),=@$'"));
        parse(&with_id(&"d".repeat(128)));
        assert_message(
            &with_id(&"d".repeat(129)),
            "`DeviceId` is 129 characters long",
        );
        assert_message(&with_id("dev/1"), "`DeviceId` has a character");
        assert_message(
            &format!("HostName={HOST};DeviceId=d;ModuleId=m&1;SharedAccessKey={KEY}"),
            "`ModuleId` has a character",
        );
    }

    #[test]
    fn error_messages_name_the_key() {
        let device = format!("HostName={HOST};DeviceId=d;SharedAccessKey={KEY}");
        assert_message(
            &format!("DeviceId=d;SharedAccessKey={KEY}"),
            "missing `HostName`",
        );
        for host in [
            "https://myhub.azure-devices.net",
            "myhub:5671",
            "a..b",
            "h/x",
            "-a.b",
        ] {
            assert_message(
                &format!("HostName={host};DeviceId=d;SharedAccessKey={KEY}"),
                "`HostName` must be a host name",
            );
        }
        assert_message(
            &format!("{device};GatewayHostName=amqps://edge"),
            "`GatewayHostName` must be a host name",
        );
        assert_message(&format!("{device};deviceid=e"), "duplicate key `DeviceId`");
        assert_message(&format!("{device};ModuleId="), "empty value for `ModuleId`");
        assert_message(&format!("{device};ModuleId"), "`ModuleId` has no `=`");
        assert_message(
            &format!("HostName={HOST};ModuleId=m;SharedAccessKeyName=p;SharedAccessKey={KEY}"),
            "`ModuleId` is set without `DeviceId`",
        );
        assert_message(
            &format!("HostName={HOST};DeviceId=d;SharedAccessKey=not-base64!"),
            "`SharedAccessKey` is not base64",
        );
        assert_message(
            &format!("HostName={HOST};SharedAccessKey={KEY}"),
            "`SharedAccessKey` needs `DeviceId`",
        );
        assert_message(
            &format!("HostName={HOST};SharedAccessKeyName=p"),
            "missing `SharedAccessKey`",
        );
        assert_message(
            &format!("HostName={HOST};DeviceId=d"),
            "missing credentials",
        );
        let sig = sign_sas(HOST, Some("p"), b"k", 4_102_444_800);
        assert_message(
            &format!("{device};SharedAccessSignature={sig}"),
            "both `SharedAccessSignature` and `SharedAccessKey`",
        );
        assert_message(
            &format!("HostName={HOST};SharedAccessKeyName=p;SharedAccessSignature={sig}"),
            "both `SharedAccessSignature` and `SharedAccessKeyName`",
        );
        assert_message(
            &format!("HostName={HOST};SharedAccessSignature=sr=a&sig=b&se=1"),
            "`SharedAccessSignature` must start with",
        );
        assert_message(
            &format!(
                "HostName={HOST};SharedAccessSignature=SharedAccessSignature sr=a&sig=b&se=8210298412800"
            ),
            "`SharedAccessSignature` has an `se` field past the year 9999",
        );
    }

    /// Defective and valid strings carrying distinctive secrets: no error, no `Debug` and no
    /// TRACE log line ever shows them.
    #[test]
    fn secrets_never_leak() {
        const SECRET: &str = "U0VDUkVUS0VZc2VjcmV0a2V5VkFMVUU9PQ==";
        const SIG: &str = "SiGnAtUrEsEcReT";
        let sig = format!("SharedAccessSignature sr=a&sig={SIG}&se=4102444800");
        let cases = [
            format!("HostName={HOST};SharedAccessKeyName=p;SharedAccessKey={SECRET}"),
            format!("HostName={HOST};DeviceId=d;SharedAccessKey={SECRET}"),
            format!("HostName={HOST};DeviceId=d;SharedAccessSignature={sig}"),
            format!("HostName={HOST};DeviceId=d;{SECRET}"),
            format!("HostName={HOST};DeviceId=d;SharedAccessKey {SECRET}"),
            format!("HostName={HOST};DeviceId=d;SharedAccessKey={SECRET}x!"),
            format!("HostName={HOST};SharedAccessKey={SECRET}"),
            format!("HostName={HOST};DeviceId=d;SharedAccessKey={SECRET};SharedAccessKey={SECRET}"),
            format!(
                "HostName={HOST};DeviceId=d;SharedAccessKey={SECRET};SharedAccessSignature={sig}"
            ),
            format!("HostName={HOST};SharedAccessSignature=SharedAccessSignature sig={SIG}"),
            format!("HostName={SECRET};DeviceId=d;SharedAccessKey={SECRET}"),
            format!("HostName={HOST};DeviceId={SECRET}/;SharedAccessKey={SECRET}"),
            SECRET.to_owned(),
        ];
        let mut shown = String::new();
        let logs = crate::connection_string::tests::logs_of(|| {
            for case in &cases {
                match IotHubConnectionString::parse(case) {
                    Ok(cs) => shown.push_str(&format!("{cs:?}\n")),
                    Err(e) => shown.push_str(&format!("{e} {e:?}\n")),
                }
            }
        });
        for text in [&logs, &shown] {
            for secret in [SECRET, SIG, "U0VDUkVU"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
        }
        assert!(
            shown.contains("shared_access_key: \"<redacted>\""),
            "{shown}"
        );
        assert!(
            shown.contains("shared_access_signature: \"<redacted>\""),
            "{shown}"
        );
    }
}
