//! HTTP CONNECT proxies: ask the proxy for a tunnel to `host:port`, then carry on over the
//! same `TcpStream`, so TLS and WebSockets above it are unchanged.
//!
//! The answer's head is read one byte at a time up to its blank line, so not a byte of the
//! tunnel (the TLS server hello) is consumed here.

use std::fmt;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{dial, within, Endpoint};
use crate::error::{Error, ErrorKind, Result};

/// A proxy to tunnel through: `http://[user:pass@]host[:port]` (port 8080 when not given).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Proxy {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `Basic <base64(user:pass)>`, never shown.
    authorization: Option<String>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "credentials",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Proxy {
    /// Parses a proxy URL. Only `http://` proxies are spoken to (the tunnel itself carries
    /// TLS end to end); a bare `host:port` is taken as `http://host:port`.
    pub(crate) fn parse(text: &str) -> Result<Proxy> {
        let text = text.trim();
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        // The error never repeats the URL: it may hold a password.
        let invalid = |why: &str| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("invalid proxy URL: {why} (expected http://[user:pass@]host:port)"),
            )
        };
        let url = url::Url::parse(&with_scheme).map_err(|_| invalid("cannot parse it"))?;
        if url.scheme() != "http" {
            return Err(invalid("only http:// proxies are supported"));
        }
        let host = url
            .host_str()
            .ok_or_else(|| invalid("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port().unwrap_or(8080);
        let authorization = if url.username().is_empty() {
            None
        } else {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|s| s.into_owned())
                    .map_err(|_| invalid("credentials are not UTF-8"))
            };
            let user = decode(url.username())?;
            let pass = decode(url.password().unwrap_or(""))?;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            Some(format!("Basic {token}"))
        };
        Ok(Proxy {
            host,
            port,
            authorization,
        })
    }

    /// The proxy `HTTPS_PROXY` (or `https_proxy`) names for `host`, unless `NO_PROXY` (or
    /// `no_proxy`) exempts it. `Ok(None)` when no proxy applies.
    pub(crate) fn from_env(host: &str) -> Result<Option<Proxy>> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .or_else(|| std::env::var(name.to_lowercase()).ok())
                .filter(|v| !v.trim().is_empty())
        };
        let Some(url) = var("HTTPS_PROXY") else {
            return Ok(None);
        };
        if var("NO_PROXY").is_some_and(|list| exempt(&list, host)) {
            return Ok(None);
        }
        Proxy::parse(&url).map(Some)
    }
}

/// Whether `NO_PROXY`'s comma-separated `list` exempts `host`: `*`, the host itself, or a
/// domain suffix (`example.com` and `.example.com` both cover `a.example.com`). Ports in
/// entries are ignored.
pub(crate) fn exempt(list: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    list.split(',').map(str::trim).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = match entry.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => entry,
        };
        let entry = entry.trim_start_matches('.').to_ascii_lowercase();
        !entry.is_empty()
            && (host == entry
                || host
                    .strip_suffix(entry.as_str())
                    .is_some_and(|rest| rest.ends_with('.')))
    })
}

/// Dials the proxy and opens a tunnel to `endpoint.host:endpoint.port`.
pub(super) async fn tunnel(
    endpoint: &Endpoint,
    proxy: &Proxy,
    deadline: Instant,
) -> Result<TcpStream> {
    let mut tcp = dial(endpoint, &proxy.host, proxy.port, deadline)
        .await
        .map_err(|e| {
            let kind = e.kind();
            Error::new(
                kind,
                format!(
                    "cannot connect to the proxy {}:{}: {e}",
                    proxy.host, proxy.port
                ),
            )
            .with_source(e)
        })?;
    let target = endpoint.authority();
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str("Proxy-Authorization: ");
        request.push_str(auth);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let failed = |detail: String| {
        Error::new(
            ErrorKind::Connection,
            format!(
                "the proxy {}:{} did not open a tunnel to {target}: {detail}",
                proxy.host, proxy.port
            ),
        )
    };
    let handshake = async {
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| failed("it closed the connection".into()).with_source(e))?;
        let head = read_head(&mut tcp).await.map_err(|e| {
            failed("it closed the connection before answering".into()).with_source(e)
        })?;
        let status_line = head.lines().next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let reason = parts.next().unwrap_or_default().trim();
        if !version.starts_with("HTTP/1.") || status == 0 {
            return Err(failed("its answer is not HTTP".into()));
        }
        match status {
            200..=299 => Ok(()),
            407 => Err(failed(format!(
                "407 {reason}: proxy authentication required{}",
                if proxy.authorization.is_some() {
                    " (the credentials given were refused)"
                } else {
                    " (no credentials were given)"
                }
            ))),
            _ => Err(failed(format!("{status} {reason}"))),
        }
    };
    within(
        endpoint,
        deadline,
        "in the proxy's CONNECT handshake",
        handshake,
    )
    .await?;
    Ok(tcp)
}

/// Reads an HTTP response head up to and including its blank line, and not a byte more.
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<String> {
    const LIMIT: usize = 16 * 1024;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= LIMIT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the proxy's answer head is too long",
            ));
        }
        head.push(tcp.read_u8().await?);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_credentials_and_never_shows_them() {
        let proxy = Proxy::parse("http://alice:s%40cret@proxy.local:3128").unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.local", 3128));
        let expected = base64::engine::general_purpose::STANDARD.encode("alice:s@cret");
        assert_eq!(proxy.authorization, Some(format!("Basic {expected}")));
        let shown = format!("{proxy:?}");
        assert!(
            !shown.contains("cret") && !shown.contains(&expected),
            "{shown}"
        );
        assert_eq!(Proxy::parse("proxy.local").unwrap().port, 8080);
    }

    #[test]
    fn refuses_other_schemes_without_echoing_the_url() {
        let error = Proxy::parse("socks5://bob:hunter2@proxy:1080").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidConfig);
        assert!(!error.to_string().contains("hunter2"));
    }

    #[test]
    fn ipv6_targets_are_bracketed() {
        assert_eq!(Endpoint::new("::1", 443).authority(), "[::1]:443");
        assert_eq!(
            Endpoint::new("hub.example", 443).authority(),
            "hub.example:443"
        );
    }

    #[test]
    fn no_proxy_matches_hosts_and_suffixes() {
        assert!(exempt("*", "a.example.com"));
        assert!(exempt("localhost, .example.com", "a.example.com"));
        assert!(exempt("example.com:443", "a.EXAMPLE.com"));
        assert!(exempt("127.0.0.1", "127.0.0.1"));
        assert!(!exempt("example.com", "badexample.com"));
        assert!(!exempt("", "example.com"));
    }

    /// A listener that answers every CONNECT with `answer` and hangs up.
    async fn refusing(answer: &'static str) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = read_head(&mut tcp).await;
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        });
        port
    }

    fn through(port: u16, url: &str) -> Endpoint {
        Endpoint::new("hub.example", 443).route(super::super::Route::Proxy(
            Proxy::parse(&format!("{url}127.0.0.1:{port}")).unwrap(),
        ))
    }

    #[tokio::test]
    async fn a_refusal_names_the_proxy_and_its_status() {
        for (answer, status) in [
            ("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", "407"),
            ("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "403"),
        ] {
            let port = refusing(answer).await;
            let error = super::super::connect(&through(port, "http://u:topsecret@"))
                .await
                .unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Connection);
            let text = error.to_string();
            assert!(text.contains("proxy") && text.contains(status), "{text}");
            assert!(!text.contains("topsecret"), "{text}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_proxy_is_named() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let error = super::super::connect(&through(port, "http://"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Connection);
        assert!(error.to_string().contains("proxy"), "{error}");
    }
}
