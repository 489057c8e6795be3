//! Parsing of Event Hubs connection strings
//! (`Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=…`).

use std::fmt;
use std::str::FromStr;

use crate::auth::{parse_sas_expiry, Credential, Secret};
use crate::error::{Error, ErrorKind, Result};

/// The AMQP-over-TLS port the hub listens on.
const AMQPS_PORT: u16 = 5671;
/// The plain AMQP port the local emulator listens on.
const AMQP_PORT: u16 = 5672;

/// The connection string keys hubsend understands; anything else is ignored.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Endpoint,
    SharedAccessKeyName,
    SharedAccessKey,
    SharedAccessSignature,
    EntityPath,
    UseDevelopmentEmulator,
}

impl Field {
    const ALL: [Field; 6] = [
        Field::Endpoint,
        Field::SharedAccessKeyName,
        Field::SharedAccessKey,
        Field::SharedAccessSignature,
        Field::EntityPath,
        Field::UseDevelopmentEmulator,
    ];

    /// The canonical spelling, used in error messages.
    fn name(self) -> &'static str {
        match self {
            Field::Endpoint => "Endpoint",
            Field::SharedAccessKeyName => "SharedAccessKeyName",
            Field::SharedAccessKey => "SharedAccessKey",
            Field::SharedAccessSignature => "SharedAccessSignature",
            Field::EntityPath => "EntityPath",
            Field::UseDevelopmentEmulator => "UseDevelopmentEmulator",
        }
    }

    /// Matches a key case-insensitively; `HostName` is an alias of `Endpoint`.
    fn lookup(text: &str) -> Option<Field> {
        if text.eq_ignore_ascii_case("HostName") {
            return Some(Field::Endpoint);
        }
        Field::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(text))
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl Key for Field {
    fn lookup(text: &str) -> Option<Field> {
        Field::lookup(text)
    }

    fn name(self) -> &'static str {
        Field::name(self)
    }

    fn duplicate_note(self) -> &'static str {
        match self {
            Field::Endpoint => " (`HostName` is an alias of it)",
            _ => "",
        }
    }
}

/// A key some kind of connection string understands.
pub(crate) trait Key: Copy + PartialEq {
    /// The key for `text` (already trimmed), if it is one.
    fn lookup(text: &str) -> Option<Self>;
    /// The canonical spelling, for messages.
    fn name(self) -> &'static str;
    /// Appended to the duplicate-key message (e.g. to mention an alias).
    fn duplicate_note(self) -> &'static str {
        ""
    }
}

/// Splits a connection string into its known `Key=Value` pairs, in order.
///
/// Parts are separated by `;` and split at their first `=` (values may hold `=`); keys and
/// values are trimmed and empty parts skipped. Unknown keys are ignored and logged at TRACE by
/// position only (or by name when it is in [`IGNORED_KEYS`]), because a secret pasted without
/// its key lands there. Errors ([`ErrorKind::InvalidConnectionString`]) name a known key or a
/// part's position, never a value: a part without `=`, an empty key, an empty value for a
/// known key, a known key given twice.
pub(crate) fn known_pairs<K: Key>(s: &str) -> Result<Vec<(K, &str)>> {
    let parts: Vec<&str> = s.split(';').collect();
    let mut pairs: Vec<(K, &str)> = Vec::new();
    for (position, part) in parts.iter().enumerate() {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((key_text, value)) = part.split_once('=') else {
            // The part may be a stray secret, so only a known key name is ever echoed.
            return Err(match K::lookup(part) {
                Some(key) => invalid(format!("`{}` has no `=` and no value", key.name())),
                None => invalid(format!(
                    "part {} of {} (separated by `;`) has no `=`; expected Key=Value",
                    position + 1,
                    parts.len()
                )),
            });
        };
        let key_text = key_text.trim();
        let value = value.trim();
        if key_text.is_empty() {
            return Err(invalid(format!(
                "part {} of {} (separated by `;`) has an empty key",
                position + 1,
                parts.len()
            )));
        }
        let Some(key) = K::lookup(key_text) else {
            // A key pasted without `SharedAccessKey=` lands here with its base64 padding
            // as the `=`, so an unknown key's text is never shown: only a name known to
            // be harmless, or else the part's position.
            match IGNORED_KEYS
                .iter()
                .find(|k| k.eq_ignore_ascii_case(key_text))
            {
                Some(known) => {
                    tracing::trace!(key = known, "ignoring a connection string key");
                }
                None => tracing::trace!(
                    part = position + 1,
                    parts = parts.len(),
                    "ignoring an unrecognised connection string key (not shown: it may be a secret)"
                ),
            }
            continue;
        };
        if value.is_empty() {
            return Err(invalid(format!("empty value for `{}`", key.name())));
        }
        if pairs.iter().any(|(seen, _)| *seen == key) {
            return Err(invalid(format!(
                "duplicate key `{}`{}",
                key.name(),
                key.duplicate_note()
            )));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Keys other clients write into connection strings that hubsend has no use for. Only these
/// are ever named in logs; any other unknown key may be a secret pasted in the wrong place.
const IGNORED_KEYS: &[&str] = &[
    "TransportType",
    "EnableAmqpLinkRedirect",
    "OperationTimeout",
    "Authentication",
    "DeviceId",
    "ModuleId",
    "GatewayHostName",
    "Endpoint",
    "EntityPath",
    "UseDevelopmentEmulator",
    "x509",
];

pub(crate) fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConnectionString, message)
}

/// A parsed Event Hubs connection string.
///
/// Keys are matched case-insensitively and trimmed, pairs are separated by `;` and split on
/// their first `=`, and unknown keys are ignored. Required: `Endpoint`
/// (`sb://<namespace>.servicebus.windows.net/`, `HostName` is accepted as an alias) and
/// either `SharedAccessKeyName` + `SharedAccessKey` or `SharedAccessSignature`. Optional:
/// `EntityPath` (the event hub) and `UseDevelopmentEmulator=true`.
///
/// Neither `Debug` nor any parse error ever shows the key or signature.
///
/// ```
/// use hubsend::connection_string::ConnectionString;
///
/// let cs: ConnectionString = "Endpoint=sb://contoso.servicebus.windows.net/;\
///     SharedAccessKeyName=send;SharedAccessKey=c2VjcmV0;EntityPath=telemetry"
///     .parse()?;
/// assert_eq!(cs.host(), "contoso.servicebus.windows.net");
/// assert_eq!(cs.port(), 5671);
/// assert_eq!(cs.entity_path(), Some("telemetry"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ConnectionString {
    host: String,
    explicit_port: Option<u16>,
    entity_path: Option<String>,
    use_development_emulator: bool,
    credential: Credential,
}

impl ConnectionString {
    /// Parses a connection string.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConnectionString`] naming the offending key: a part without `=`,
    /// a duplicate or empty value, a malformed `Endpoint`, `UseDevelopmentEmulator` or
    /// `SharedAccessSignature`, or missing or conflicting credentials.
    pub fn parse(s: &str) -> Result<ConnectionString> {
        let mut values: [Option<&str>; Field::ALL.len()] = [None; Field::ALL.len()];
        for (key, value) in known_pairs::<Field>(s)? {
            values[key.index()] = Some(value);
        }
        let get = |key: Field| values[key.index()];

        let endpoint = get(Field::Endpoint).ok_or_else(|| invalid("missing `Endpoint`"))?;
        let (host, explicit_port) = parse_endpoint(endpoint)?;

        let use_development_emulator = match get(Field::UseDevelopmentEmulator) {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => {
                return Err(invalid(
                    "`UseDevelopmentEmulator` must be `true` or `false`",
                ))
            }
        };

        let credential = match (
            get(Field::SharedAccessKeyName),
            get(Field::SharedAccessKey),
            get(Field::SharedAccessSignature),
        ) {
            (Some(name), Some(key), None) => Credential::Key {
                name: name.to_owned(),
                key: Secret::new(key),
            },
            (None, None, Some(signature)) => {
                let expires_at = parse_sas_expiry(signature).map_err(|why| {
                    invalid(format!(
                        "`SharedAccessSignature` {why}; expected \
                         `SharedAccessSignature sr=<resource>&sig=<signature>&se=<expiry>&skn=<policy>`"
                    ))
                })?;
                Credential::Signature {
                    token: Secret::new(signature),
                    expires_at,
                }
            }
            (name, key, Some(_)) if name.is_some() || key.is_some() => {
                let other = if key.is_some() {
                    "SharedAccessKey"
                } else {
                    "SharedAccessKeyName"
                };
                return Err(invalid(format!(
                    "both `SharedAccessSignature` and `{other}` are set; use either \
                     `SharedAccessKeyName` + `SharedAccessKey` or `SharedAccessSignature`"
                )));
            }
            (Some(_), None, None) => {
                return Err(invalid(
                    "missing `SharedAccessKey` (SharedAccessKeyName is set)",
                ))
            }
            (None, Some(_), None) => {
                return Err(invalid(
                    "missing `SharedAccessKeyName` (SharedAccessKey is set)",
                ))
            }
            _ => {
                return Err(invalid(
                    "missing credentials: set `SharedAccessKeyName` and `SharedAccessKey`, \
                     or `SharedAccessSignature`",
                ))
            }
        };

        Ok(ConnectionString {
            host,
            explicit_port,
            entity_path: get(Field::EntityPath).map(str::to_owned),
            use_development_emulator,
            credential,
        })
    }

    /// The namespace host name from `Endpoint`, e.g. `contoso.servicebus.windows.net`
    /// (ASCII lower-cased; an IPv6 address keeps its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port to connect to: the `Endpoint` port if given, else 5672 for the development
    /// emulator and 5671 (AMQP over TLS) otherwise.
    pub fn port(&self) -> u16 {
        match self.explicit_port {
            Some(port) => port,
            None if self.use_development_emulator => AMQP_PORT,
            None => AMQPS_PORT,
        }
    }

    /// The port written in `Endpoint`, if any.
    pub fn explicit_port(&self) -> Option<u16> {
        self.explicit_port
    }

    /// The event hub name from `EntityPath`, if any.
    pub fn entity_path(&self) -> Option<&str> {
        self.entity_path.as_deref()
    }

    /// Whether `UseDevelopmentEmulator=true` was given: connect without TLS, by default to
    /// port 5672.
    pub fn use_development_emulator(&self) -> bool {
        self.use_development_emulator
    }

    /// The `SharedAccessKeyName` (policy name), when the string carries a key rather than a
    /// signature.
    pub fn shared_access_key_name(&self) -> Option<&str> {
        match &self.credential {
            Credential::Key { name, .. } => Some(name),
            Credential::Signature { .. } => None,
        }
    }

    /// The credential, to build a token provider from.
    pub(crate) fn credential(&self) -> Credential {
        self.credential.clone()
    }
}

/// Splits `Endpoint` into host and optional port. `sb`, `amqps` and `amqp` schemes are
/// accepted; the path may only be `/`. A bare `host[:port]` without a scheme is accepted
/// too (IoT Hub's `HostName=` form).
fn parse_endpoint(endpoint: &str) -> Result<(String, Option<u16>)> {
    let shape = || {
        invalid(
            "`Endpoint` must look like sb://<namespace>.servicebus.windows.net/ \
             (optionally with a :port)",
        )
    };
    let with_scheme;
    let endpoint = if endpoint.contains("://") {
        endpoint
    } else {
        with_scheme = format!("sb://{endpoint}");
        &with_scheme
    };
    let url = url::Url::parse(endpoint).map_err(|_| shape())?;
    if !matches!(url.scheme(), "sb" | "amqps" | "amqp") {
        return Err(invalid(
            "`Endpoint` must use the sb:// scheme (amqps:// and amqp:// are also accepted), \
             e.g. sb://<namespace>.servicebus.windows.net/",
        ));
    }
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host.to_ascii_lowercase(),
        _ => return Err(shape()),
    };
    if !url.username().is_empty()
        || url.password().is_some()
        || !matches!(url.path(), "" | "/")
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(shape());
    }
    if url.port() == Some(0) {
        return Err(invalid("`Endpoint` has port 0"));
    }
    Ok((host, url.port()))
}

impl FromStr for ConnectionString {
    type Err = Error;

    fn from_str(s: &str) -> Result<ConnectionString> {
        ConnectionString::parse(s)
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ConnectionString");
        d.field("host", &self.host)
            .field("explicit_port", &self.explicit_port)
            .field("entity_path", &self.entity_path)
            .field("use_development_emulator", &self.use_development_emulator);
        match &self.credential {
            Credential::Key { name, .. } => {
                d.field("shared_access_key_name", name)
                    .field("shared_access_key", &"<redacted>");
            }
            Credential::Signature { .. } => {
                d.field("shared_access_signature", &"<redacted>");
            }
        }
        d.finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SECRET: &str = "Zm9vYmFyU0VDUkVUc2VjcmV0VmFsdWU9PQ==";
    const SAS_SECRET: &str = "SiGnAtUrEsEcReT";

    fn sas(se: &str) -> String {
        format!("SharedAccessSignature sr=sb%3A%2F%2Fns%2Fhub&sig={SAS_SECRET}&se={se}&skn=p")
    }

    fn err(s: &str) -> Error {
        match ConnectionString::parse(s) {
            Ok(cs) => panic!("expected an error, got {cs:?}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidConnectionString);
                e
            }
        }
    }

    fn assert_message(s: &str, expected: &str) {
        let e = err(s);
        assert!(
            e.message().contains(expected),
            "{:?} !~ {expected:?}",
            e.message()
        );
    }

    #[test]
    fn parses_a_portal_string() {
        let cs = ConnectionString::parse(&format!(
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;\
             SharedAccessKey={SECRET};EntityPath=telemetry"
        ))
        .unwrap();
        assert_eq!(cs.host(), "contoso.servicebus.windows.net");
        assert_eq!(cs.port(), 5671);
        assert_eq!(cs.explicit_port(), None);
        assert_eq!(cs.entity_path(), Some("telemetry"));
        assert!(!cs.use_development_emulator());
        assert_eq!(
            cs.shared_access_key_name(),
            Some("RootManageSharedAccessKey")
        );
        match cs.credential() {
            Credential::Key { name, key } => {
                assert_eq!(name, "RootManageSharedAccessKey");
                assert_eq!(key.expose(), SECRET);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn parses_the_emulator_string() {
        let cs: ConnectionString =
            "Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;\
             SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
                .parse()
                .unwrap();
        assert_eq!(cs.host(), "localhost");
        assert!(cs.use_development_emulator());
        assert_eq!(cs.port(), 5672);
        assert_eq!(cs.entity_path(), None);

        let cs = ConnectionString::parse(
            "Endpoint=sb://localhost:5673;SharedAccessKeyName=a;SharedAccessKey=b;\
             UseDevelopmentEmulator=TRUE",
        )
        .unwrap();
        assert_eq!(cs.port(), 5673);
        assert_eq!(cs.explicit_port(), Some(5673));

        let cs = ConnectionString::parse(
            "Endpoint=sb://localhost;SharedAccessKeyName=a;SharedAccessKey=b;\
             UseDevelopmentEmulator=False",
        )
        .unwrap();
        assert!(!cs.use_development_emulator());
        assert_eq!(cs.port(), 5671);
    }

    #[test]
    fn keys_are_case_insensitive_trimmed_and_unknown_ones_ignored() {
        let cs = ConnectionString::parse(&format!(
            " endpoint = sb://NS.servicebus.windows.net:9999/ ;; sharedaccesskeyname= p ;\
             SHAREDACCESSKEY={SECRET}; entitypath =hub ; EnableAmqpLinkRedirect=false;TransportType=Amqp;"
        ))
        .unwrap();
        assert_eq!(cs.host(), "ns.servicebus.windows.net");
        assert_eq!(cs.port(), 9999);
        assert_eq!(cs.shared_access_key_name(), Some("p"));
        assert_eq!(cs.entity_path(), Some("hub"));
    }

    #[test]
    fn values_split_on_the_first_equals_sign() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey=abc==;EntityPath=a=b",
        )
        .unwrap();
        assert_eq!(cs.entity_path(), Some("a=b"));
        match cs.credential() {
            Credential::Key { key, .. } => assert_eq!(key.expose(), "abc=="),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn endpoint_forms() {
        let ok = |endpoint: &str| {
            ConnectionString::parse(&format!(
                "Endpoint={endpoint};SharedAccessKeyName=p;SharedAccessKey=k"
            ))
        };
        for e in [
            "sb://ns.servicebus.windows.net",
            "sb://ns.servicebus.windows.net/",
            "SB://ns.servicebus.windows.net/",
            "amqps://ns.servicebus.windows.net/",
            "amqp://ns.servicebus.windows.net:5672",
            "ns.servicebus.windows.net",
        ] {
            let cs = ok(e).unwrap_or_else(|err| panic!("{e}: {err}"));
            assert_eq!(cs.host(), "ns.servicebus.windows.net", "{e}");
        }
        assert_eq!(ok("sb://127.0.0.1:5672").unwrap().port(), 5672);
        assert_eq!(ok("sb://[::1]:5672/").unwrap().host(), "[::1]");

        for e in [
            "https://ns.servicebus.windows.net/",
            "http://ns.servicebus.windows.net/",
            "sb://",
            "sb:///",
            "sb://:5672",
            "sb://ns.servicebus.windows.net/hub",
            "sb://ns.servicebus.windows.net:70000/",
            "sb://ns.servicebus.windows.net:0/",
            "sb://ns.servicebus.windows.net:port/",
            "sb://user:pw@ns.servicebus.windows.net/",
            "sb://ns.servicebus.windows.net/?x=1",
            "sb://ns servicebus/",
        ] {
            let e = ok(e).map(|cs| cs.host().to_owned()).expect_err(e);
            assert_eq!(e.kind(), ErrorKind::InvalidConnectionString);
            assert!(e.message().contains("`Endpoint`"), "{}", e.message());
        }
        // HostName is an alias.
        let cs = ConnectionString::parse(
            "HostName=ns.example.net;SharedAccessKeyName=p;SharedAccessKey=k",
        )
        .unwrap();
        assert_eq!(cs.host(), "ns.example.net");
    }

    #[test]
    fn shared_access_signature_strings() {
        let cs = ConnectionString::parse(&format!(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature={};EntityPath=hub",
            sas("4102444800")
        ))
        .unwrap();
        assert_eq!(cs.shared_access_key_name(), None);
        match cs.credential() {
            Credential::Signature { token, expires_at } => {
                assert_eq!(token.expose(), sas("4102444800"));
                assert_eq!(
                    expires_at,
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(4_102_444_800)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn error_messages_name_the_key() {
        let base = "Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey=k";
        assert_message(
            &format!("{base};EntityPath=a;entitypath=b"),
            "duplicate key `EntityPath`",
        );
        assert_message(&format!("{base};HostName=ns"), "duplicate key `Endpoint`");
        assert_message(
            &format!("{base};EntityPath="),
            "empty value for `EntityPath`",
        );
        assert_message(
            &format!("{base};EntityPath=  "),
            "empty value for `EntityPath`",
        );
        assert_message(&format!("{base};EntityPath"), "`EntityPath` has no `=`");
        assert_message(&format!("{base};garbage"), "part 4 of 4");
        assert_message(&format!("{base};=x"), "empty key");
        assert_message(
            &format!("{base};UseDevelopmentEmulator=yes"),
            "`UseDevelopmentEmulator` must be `true` or `false`",
        );
        assert_message(
            "SharedAccessKeyName=p;SharedAccessKey=k",
            "missing `Endpoint`",
        );
        assert_message(
            "Endpoint=ns.example;SharedAccessKeyName=p",
            "missing `SharedAccessKey` (SharedAccessKeyName is set)",
        );
        assert_message(
            "Endpoint=sb://ns/;SharedAccessKey=k",
            "missing `SharedAccessKeyName` (SharedAccessKey is set)",
        );
        assert_message("Endpoint=sb://ns/;EntityPath=x", "missing credentials");
        assert_message(
            &format!("{base};SharedAccessSignature={}", sas("1")),
            "both `SharedAccessSignature` and `SharedAccessKey`",
        );
        assert_message(
            &format!(
                "Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessSignature={}",
                sas("1")
            ),
            "both `SharedAccessSignature` and `SharedAccessKeyName`",
        );
        assert_message(
            "Endpoint=sb://ns/;SharedAccessSignature=sr=a&sig=b&se=1",
            "`SharedAccessSignature` must start with",
        );
        assert_message(
            &format!(
                "Endpoint=sb://ns/;SharedAccessSignature={}",
                sas("tomorrow")
            ),
            "`SharedAccessSignature` has a non-numeric `se`",
        );
        assert_message(
            "Endpoint=sb://ns/;SharedAccessSignature=SharedAccessSignature sig=x&se=1",
            "`SharedAccessSignature` has no `sr`",
        );
        assert_message(
            "Endpoint=sb://ns/;SharedAccessSignature=SharedAccessSignature sr=x&sig=y",
            "`SharedAccessSignature` has no `se`",
        );
    }

    /// Runs `f` with a TRACE-level subscriber and returns everything it logged.
    pub(crate) fn logs_of(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// Issue #11 defect 6: a key pasted without `SharedAccessKey=` splits at its base64
    /// padding into an "unknown key" that was logged in full at TRACE.
    #[test]
    fn trace_logs_never_show_unknown_keys_or_values() {
        let cases = [
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;{SECRET}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey=k;{SECRET}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey=k;X={SECRET}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey=k;{SECRET}=x"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey=k;{SAS_SECRET}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey {SECRET}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey:{SECRET}"),
            format!(
                "Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey=k;TransportType={SECRET}"
            ),
        ];
        let mut shown = String::new();
        let logs = logs_of(|| {
            for case in &cases {
                match ConnectionString::parse(case) {
                    Ok(cs) => shown.push_str(&format!("{cs:?}\n")),
                    Err(e) => shown.push_str(&format!("{e} {e:?}\n")),
                }
            }
        });
        assert!(logs.contains("ignoring"), "nothing was logged: {logs}");
        for text in [&logs, &shown] {
            for secret in [SECRET, SAS_SECRET, "Zm9vYmFy", "U0VDUkVU"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
        }
        // A harmless key other clients write is still named; the rest by position only.
        assert!(logs.contains("TransportType"), "{logs}");
        assert!(logs.contains("part=4"), "{logs}");
    }

    /// Parses many defective strings carrying a distinctive secret and checks that the
    /// secret never reaches an error's `Display`/`Debug` or a parsed value's `Debug`.
    #[test]
    fn secrets_never_leak() {
        let key = format!("SharedAccessKey={SECRET}");
        let sig = format!("SharedAccessSignature={}", sas("4102444800"));
        let bad_sig = format!("SharedAccessSignature={}", sas("later"));
        let cases = [
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;{key}"),
            format!("Endpoint=sb://ns/;{sig}"),
            format!("Endpoint=sb://ns/;{key}"),
            key.clone(),
            format!("Endpoint=sb://ns/;{key};{key}"),
            format!("Endpoint=sb://ns/;{sig};{sig}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;{key};{sig}"),
            format!("Endpoint=sb://ns/;{bad_sig}"),
            format!("Endpoint=sb://ns/;SharedAccessSignature=sr=a&sig={SAS_SECRET}&se=1"),
            format!(
                "Endpoint=sb://ns/;SharedAccessSignature=SharedAccessSignature sig={SAS_SECRET}"
            ),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;{SECRET}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;SharedAccessKey {SECRET}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;{key};EntityPath"),
            format!(
                "Endpoint=sb://ns/;SharedAccessKeyName=p;{key};UseDevelopmentEmulator={SECRET}"
            ),
            format!("Endpoint=https://{SECRET}/;SharedAccessKeyName=p;{key}"),
            format!("Endpoint=sb://ns/{SECRET};SharedAccessKeyName=p;{key}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;{key};{SECRET}={SECRET}"),
            format!("Endpoint=sb://ns/;SharedAccessKeyName=p;{key};EntityPath=;{SAS_SECRET}"),
            format!("SharedAccessKeyName=p;{key};{sig}"),
        ];
        let mut errors = 0;
        for case in &cases {
            let shown = match ConnectionString::parse(case) {
                Ok(cs) => format!("{cs:?}"),
                Err(e) => {
                    errors += 1;
                    format!("{e} {e:?}")
                }
            };
            assert!(!shown.contains(SECRET), "{case} -> {shown}");
            assert!(!shown.contains(SAS_SECRET), "{case} -> {shown}");
            assert!(!shown.contains("Zm9vYmFy"), "{case} -> {shown}");
        }
        assert!(errors >= cases.len() - 3, "most cases should fail");

        let cs = ConnectionString::parse(&cases[0]).unwrap();
        let debug = format!("{cs:?}");
        assert!(
            debug.contains("shared_access_key: \"<redacted>\""),
            "{debug}"
        );
        assert!(format!("{:?}", cs.credential()).contains("Secret(<redacted>)"));
        let cs = ConnectionString::parse(&cases[1]).unwrap();
        assert!(format!("{cs:?}").contains("shared_access_signature: \"<redacted>\""));
    }
}
