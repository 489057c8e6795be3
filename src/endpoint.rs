//! Which way a producer reaches its hub ([`Transport`]) and where it dials when that is not the
//! namespace itself (a custom endpoint: a gateway, a private link, a local test hub).
//!
//! A custom endpoint changes only the address that is dialled: token audiences, the AMQP
//! `hostname` and every entity name keep the namespace's name, as the custom endpoint address
//! of Microsoft's SDKs does. Its scheme says the transport:
//!
//! | scheme | transport | TLS |
//! |---|---|---|
//! | `amqps://host[:5671]` | [`Transport::Amqp`] | yes |
//! | `amqp://host[:5672]` | [`Transport::Amqp`] | no: loopback only |
//! | `wss://host[:443][/path]` | [`Transport::WebSockets`] | yes |
//! | `ws://host[:80][/path]` | [`Transport::WebSockets`] | no: loopback only |
//! | `https://host[:443][/prefix]` | [`Transport::Https`] | yes |
//! | `http://host[:80][/prefix]` | [`Transport::Https`] | no: loopback only |
//!
//! Plaintext to a host that is not `localhost` or a loopback address is refused with
//! [`ErrorKind::InvalidConfig`] unless the builder's `danger_plaintext(true)` was called.

use crate::error::{Error, ErrorKind, Result};

/// How a producer carries events to the hub.
///
/// | transport | port | for |
/// |---|---|---|
/// | `Amqp` | 5671 | the default: one connection, batches pipelined on link credit |
/// | `WebSockets` | 443 | networks that open only port 443 (feature `websockets`) |
/// | `Https` | 443 | the Event Hubs REST API: networks that allow only HTTPS, or only through an HTTP proxy that does not tunnel (feature `https`) |
///
/// The same `Event`, `EventBatch`, `SendOptions` and two-stage `DeliveryFuture` work over
/// each, so switching is one builder option
/// ([`ProducerBuilder::transport`](crate::ProducerBuilder::transport)).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// AMQP 1.0 over TCP and TLS (port 5671).
    #[default]
    Amqp,
    /// AMQP 1.0 in WebSocket binary messages over TLS (port 443,
    /// `/$servicebus/websocket/`).
    WebSockets,
    /// The Event Hubs HTTPS REST send API (`POST /{hub}/messages`, port 443).
    Https,
}

impl Transport {
    /// The name the `hubsend` command and its `--json` summaries use: `amqp`, `websockets`,
    /// `https`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Amqp => "amqp",
            Transport::WebSockets => "websockets",
            Transport::Https => "https",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Transport {
    type Err = Error;

    fn from_str(s: &str) -> Result<Transport> {
        match s.to_ascii_lowercase().as_str() {
            "amqp" => Ok(Transport::Amqp),
            "websockets" | "ws" => Ok(Transport::WebSockets),
            "https" | "http" | "rest" => Ok(Transport::Https),
            _ => Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("unknown transport `{s}`: use amqp, websockets or https"),
            )),
        }
    }
}

/// A parsed custom endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CustomEndpoint {
    pub(crate) transport: Transport,
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The path as given, without a trailing `/` (empty for none): the WebSocket upgrade path,
    /// or a prefix before `/{hub}/messages`.
    pub(crate) path: String,
}

impl CustomEndpoint {
    /// Parses `url`; `danger_plaintext` allows a plaintext scheme to a non-loopback host.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] for a URL that does not parse, an unknown scheme, user
    /// information in it, or plaintext to a non-loopback host without `danger_plaintext`.
    pub(crate) fn parse(url: &str, danger_plaintext: bool) -> Result<CustomEndpoint> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("the custom endpoint is unusable: {why}"),
            )
        };
        let parsed = url::Url::parse(url.trim()).map_err(|_| bad("not a URL"))?;
        let (transport, tls, default_port) = match parsed.scheme() {
            "amqps" => (Transport::Amqp, true, 5671),
            "amqp" => (Transport::Amqp, false, 5672),
            "wss" => (Transport::WebSockets, true, 443),
            "ws" => (Transport::WebSockets, false, 80),
            "https" => (Transport::Https, true, 443),
            "http" => (Transport::Https, false, 80),
            other => {
                return Err(bad(&format!(
                    "unknown scheme `{other}` (use amqps, amqp, wss, ws, https or http)"
                )))
            }
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad("credentials do not belong in the endpoint URL"));
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(bad("it names no host")),
        };
        if !tls && !danger_plaintext && !is_loopback_host(&host) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "refusing plaintext `{}://` to `{host}`, which is not a loopback host: use the TLS scheme, or `danger_plaintext(true)` for a trusted network",
                    parsed.scheme()
                ),
            ));
        }
        Ok(CustomEndpoint {
            transport,
            tls,
            port: parsed.port().unwrap_or(default_port),
            host,
            path: parsed.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// Whether `host` is `localhost` or a loopback address.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_implies_the_transport_and_the_port() {
        let e = CustomEndpoint::parse("amqps://gw.contoso.com", false).unwrap();
        assert_eq!((e.transport, e.tls, e.port), (Transport::Amqp, true, 5671));
        let e =
            CustomEndpoint::parse("wss://gw.contoso.com/$servicebus/websocket/", false).unwrap();
        assert_eq!((e.transport, e.port), (Transport::WebSockets, 443));
        assert_eq!(e.path, "/$servicebus/websocket");
        let e = CustomEndpoint::parse("https://gw.contoso.com:8443/eh", false).unwrap();
        assert_eq!(
            (e.transport, e.port, e.path.as_str()),
            (Transport::Https, 8443, "/eh")
        );
        let e = CustomEndpoint::parse("http://127.0.0.1:9000", false).unwrap();
        assert_eq!(
            (e.transport, e.tls, e.port),
            (Transport::Https, false, 9000)
        );
        assert!(CustomEndpoint::parse("ws://localhost", false).is_ok());
        assert!(CustomEndpoint::parse("amqp://[::1]:5672", false).is_ok());
    }

    #[test]
    fn plaintext_to_a_remote_host_needs_the_danger_switch() {
        for url in [
            "amqp://gw.contoso.com",
            "ws://10.0.0.5",
            "http://gw.contoso.com",
        ] {
            let err = CustomEndpoint::parse(url, false).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert!(err.to_string().contains("not a loopback host"), "{err}");
            assert!(CustomEndpoint::parse(url, true).is_ok());
        }
        assert!(CustomEndpoint::parse("ftp://x", true).is_err());
        assert!(CustomEndpoint::parse("https://u:p@x", true).is_err());
        assert!(CustomEndpoint::parse("nonsense", true).is_err());
    }

    #[test]
    fn transports_have_their_cli_names() {
        for t in [Transport::Amqp, Transport::WebSockets, Transport::Https] {
            assert_eq!(t.as_str().parse::<Transport>().unwrap(), t);
        }
        assert!("carrier-pigeon".parse::<Transport>().is_err());
    }
}
