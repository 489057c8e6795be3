//! Helpers shared by the `official` and `ceiling` peers: argument parsing, connection strings,
//! SAS signing, payload generation, timing and JSON output.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

/// `--key value` and `--flag` arguments; flags map to "true".
pub struct Args(HashMap<String, String>);

impl Args {
    pub fn parse() -> Args {
        let mut map = HashMap::new();
        let mut it = std::env::args().skip(1).peekable();
        while let Some(a) = it.next() {
            let Some(key) = a.strip_prefix("--") else {
                panic!("unexpected argument {a:?}");
            };
            match it.peek() {
                Some(v) if !v.starts_with("--") => {
                    map.insert(key.to_owned(), it.next().unwrap());
                }
                _ => {
                    map.insert(key.to_owned(), "true".to_owned());
                }
            }
        }
        Args(map)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn string(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).to_owned()
    }

    pub fn num(&self, key: &str, default: u64) -> u64 {
        self.get(key)
            .map(|v| v.replace('_', "").parse().unwrap_or_else(|_| panic!("--{key} {v}")))
            .unwrap_or(default)
    }

    pub fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v != "false")
    }
}

/// The parts of an Event Hubs connection string the peers need.
#[derive(Debug, Clone)]
pub struct ConnStr {
    pub host: String,
    pub port: Option<u16>,
    pub key_name: String,
    pub key: String,
    pub hub: String,
    pub emulator: bool,
}

impl ConnStr {
    pub fn parse(cs: &str) -> ConnStr {
        let mut c = ConnStr {
            host: String::new(),
            port: None,
            key_name: String::new(),
            key: String::new(),
            hub: String::new(),
            emulator: false,
        };
        for part in cs.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').expect("key=value");
            match k.to_ascii_lowercase().as_str() {
                "endpoint" => {
                    let rest = v.split_once("://").map(|x| x.1).unwrap_or(v);
                    let authority = rest.split('/').next().unwrap_or("");
                    match authority.rsplit_once(':') {
                        Some((h, p)) => {
                            c.host = h.to_owned();
                            c.port = p.parse().ok();
                        }
                        None => c.host = authority.to_owned(),
                    }
                }
                "sharedaccesskeyname" => c.key_name = v.to_owned(),
                "sharedaccesskey" => c.key = v.to_owned(),
                "entitypath" => c.hub = v.to_owned(),
                "usedevelopmentemulator" => c.emulator = v.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        c
    }
}

const SAS_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A SAS token for `resource` (PROTOCOL.md B.1), valid for `ttl`.
pub fn sas_token(resource: &str, key_name: &str, key: &str, ttl: Duration) -> (String, u64) {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + ttl.as_secs();
    let sr = utf8_percent_encode(resource, SAS_SET).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig = utf8_percent_encode(&sig, SAS_SET).to_string();
    (
        format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={key_name}"),
        expiry,
    )
}

// The same bodies as hubsend's bench sends (one generator for every client).
#[path = "../../examples/common/bodies.rs"]
#[allow(dead_code)] // its `closed` serves the bench's NDJSON lines only
mod common_bodies;
pub use common_bodies::bodies;

/// Peak resident set size of this process (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// (p50, p99) in milliseconds.
pub fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}

/// The one JSON line every peer prints.
pub struct Report {
    pub tool: &'static str,
    pub mode: String,
    pub events: u64,
    pub payload_bytes: u64,
    pub seconds: f64,
    pub latency_ms: Option<(f64, f64)>,
    pub extra: Vec<(&'static str, String)>,
}

impl Report {
    pub fn print(&self) {
        let eps = self.events as f64 / self.seconds;
        let mbps = eps * self.payload_bytes as f64 / 1e6;
        let mut s = format!(
            "{{\"tool\":\"{}\",\"mode\":\"{}\",\"events\":{},\"payload_bytes\":{},\"seconds\":{:.4},\"events_per_sec\":{:.1},\"mb_per_sec\":{:.2},\"peak_rss_kib\":{}",
            self.tool,
            self.mode,
            self.events,
            self.payload_bytes,
            self.seconds,
            eps,
            mbps,
            peak_rss_kib()
        );
        if let Some((p50, p99)) = self.latency_ms {
            s.push_str(&format!(",\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3}"));
        }
        for (k, v) in &self.extra {
            s.push_str(&format!(",\"{k}\":{v}"));
        }
        s.push('}');
        println!("{s}");
    }
}

/// Installs aws-lc-rs as the process-wide rustls provider (harmless if already set).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
