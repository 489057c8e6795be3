//! SAS token parsing and verification (PROTOCOL B.1) and audience normalisation (C.4).

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;

/// Why a token was refused; maps to a CBS status code and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenError {
    /// 401: malformed, bad signature, unknown policy.
    Unauthorized(String),
    /// 401: `se` is in the past.
    Expired,
    /// 404: the audience names an entity that does not exist.
    NotFound(String),
}

impl TokenError {
    pub(crate) fn status(&self) -> i32 {
        match self {
            TokenError::Unauthorized(_) | TokenError::Expired => 401,
            TokenError::NotFound(_) => 404,
        }
    }

    pub(crate) fn description(&self) -> String {
        match self {
            TokenError::Unauthorized(d) => d.clone(),
            TokenError::Expired => "ExpiredToken: The token is expired.".to_string(),
            TokenError::NotFound(entity) => {
                format!("The messaging entity '{entity}' could not be found.")
            }
        }
    }
}

/// Fields of a parsed `SharedAccessSignature …` token, literal (still percent-encoded).
#[derive(Debug, Default)]
pub(crate) struct ParsedToken<'a> {
    pub sr: Option<&'a str>,
    pub sig: Option<&'a str>,
    pub se: Option<&'a str>,
    pub skn: Option<&'a str>,
}

/// Splits a token into its fields; order-independent, first `=` splits.
///
/// Not `form_urlencoded::parse`: the signature covers `sr` and `se` as sent (still encoded),
/// and form decoding would turn a `+` left in `sig` into a space; each field is decoded below.
pub(crate) fn parse_token(token: &str) -> Option<ParsedToken<'_>> {
    let (scheme, rest) = token.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("SharedAccessSignature") {
        return None;
    }
    let mut parsed = ParsedToken::default();
    for pair in rest.trim().split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        match k {
            "sr" => parsed.sr = Some(v),
            "sig" => parsed.sig = Some(v),
            "se" => parsed.se = Some(v),
            "skn" => parsed.skn = Some(v),
            _ => {}
        }
    }
    Some(parsed)
}

/// A normalised resource: lower-case host without port, and lower-case path without
/// leading/trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resource {
    pub host: Option<String>,
    pub path: String,
}

/// Normalises an audience / resource URI / link address scheme- and port-agnostically.
///
/// Forms with a scheme (`sb://host:port/path`) give a host; forms without (`/hub`, `hub/…`)
/// give only a path. `host_first` treats a scheme-less string as `host/path` (SAS `sr`).
pub(crate) fn normalise(raw: &str, host_first: bool) -> Resource {
    let s = raw.trim();
    let (host, path) = if let Some(idx) = s.find("://") {
        let after = &s[idx + 3..];
        let (authority, path) = after.split_once('/').unwrap_or((after, ""));
        (Some(authority), path)
    } else if host_first && !s.starts_with('/') {
        let (authority, path) = s.split_once('/').unwrap_or((s, ""));
        (Some(authority), path)
    } else {
        (None, s)
    };
    let host = host.map(|a| {
        let a = a.rsplit_once('@').map(|(_, h)| h).unwrap_or(a);
        let h = match a.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => a,
        };
        h.to_ascii_lowercase()
    });
    let path = path.trim_matches('/').to_ascii_lowercase();
    Resource { host, path }
}

/// True when `audience` covers `entity` on a `/` segment boundary ("" covers everything).
pub(crate) fn covers(audience: &str, entity: &str) -> bool {
    audience.is_empty()
        || audience == entity
        || (entity.len() > audience.len()
            && entity.starts_with(audience)
            && entity.as_bytes()[audience.len()] == b'/')
}

/// Whether `sig` (URL-encoded base64, as sent) is the HMAC-SHA256 under `key` of the literal
/// `sr` and `se`: `"{sr}\n{se}"`.
pub(crate) fn signature_matches(key: &[u8], sr: &str, se: &str, sig: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(sr.as_bytes());
    mac.update(b"\n");
    mac.update(se.as_bytes());
    let expected = mac.finalize().into_bytes();
    let sig = percent_decode_str(sig).decode_utf8_lossy();
    base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .is_ok_and(|given| given.as_slice() == expected.as_slice())
}

/// What a verified token grants.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedToken {
    /// Policy name (`skn`).
    pub policy: String,
    /// Normalised audience path (the CBS `name`).
    pub audience: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Verifies `token` for the CBS `name` per B.1.
///
/// `lookup_key` maps a policy name to its key; `hosts` are the accepted namespace host names;
/// `entity_exists` says whether the first path segment names a known hub.
pub(crate) fn verify(
    token: &str,
    name: &str,
    now_secs: u64,
    lookup_key: impl Fn(&str) -> Option<String>,
    hosts: &[String],
    entity_exists: impl Fn(&str) -> bool,
) -> Result<VerifiedToken, TokenError> {
    let malformed = || {
        TokenError::Unauthorized(
            "InvalidSignature: The token has an invalid signature.".to_string(),
        )
    };
    let parsed = parse_token(token).ok_or_else(malformed)?;
    let (Some(sr), Some(sig), Some(se), Some(skn)) = (parsed.sr, parsed.sig, parsed.se, parsed.skn)
    else {
        return Err(malformed());
    };
    let skn_decoded = percent_decode_str(skn).decode_utf8_lossy().to_string();
    let key = lookup_key(&skn_decoded).ok_or_else(|| {
        TokenError::Unauthorized(format!(
            "InvalidSignature: The token has an invalid signature. The SAS key name '{skn_decoded}' is not recognised."
        ))
    })?;
    if !signature_matches(key.as_bytes(), sr, se, sig) {
        return Err(malformed());
    }
    let expires_at: u64 = se.trim().parse().map_err(|_| malformed())?;
    if expires_at <= now_secs {
        return Err(TokenError::Expired);
    }
    let sr_decoded = percent_decode_str(sr).decode_utf8_lossy().to_string();
    let sr_res = normalise(&sr_decoded, true);
    let host_ok = sr_res
        .host
        .as_deref()
        .is_some_and(|h| hosts.iter().any(|a| a.eq_ignore_ascii_case(h)));
    if !host_ok {
        return Err(TokenError::Unauthorized(format!(
            "InvalidAudience: The token audience '{sr_decoded}' does not match this namespace."
        )));
    }
    let name_res = normalise(name, true);
    if let Some(h) = &name_res.host {
        if !hosts.iter().any(|a| a.eq_ignore_ascii_case(h)) {
            return Err(TokenError::Unauthorized(format!(
                "InvalidAudience: The audience '{name}' does not match this namespace."
            )));
        }
    }
    if !covers(&sr_res.path, &name_res.path) {
        return Err(TokenError::Unauthorized(format!(
            "InvalidAudience: The token audience '{sr_decoded}' does not cover '{name}'."
        )));
    }
    let first = name_res.path.split('/').next().unwrap_or("");
    if !first.is_empty() && !entity_exists(first) {
        let host = name_res.host.clone().unwrap_or_default();
        return Err(TokenError::NotFound(format!("sb://{host}/{first}")));
    }
    Ok(VerifiedToken {
        policy: skn_decoded,
        audience: name_res.path,
        expires_at,
    })
}

/// Builds a SAS token (used by tests and by the binary's self-checks).
pub fn sign(resource: &str, key_name: &str, key: &str, expires_at: u64) -> String {
    let sr: String = percent_encoding::utf8_percent_encode(resource, ENCODE).to_string();
    let mut mac = match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(format!("{sr}\n{expires_at}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig: String = percent_encoding::utf8_percent_encode(&sig, ENCODE).to_string();
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expires_at}&skn={key_name}")
}

const ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG=";

    fn hosts() -> Vec<String> {
        vec!["contoso.servicebus.windows.net".to_string()]
    }

    fn check(token: &str, name: &str) -> Result<VerifiedToken, TokenError> {
        verify(
            token,
            name,
            1_600_000_000,
            |n| (n == "RootManageSharedAccessKey").then(|| KEY.to_string()),
            &hosts(),
            |h| h == "telemetry",
        )
    }

    #[test]
    fn vector_1_upper_case() {
        let t = "SharedAccessSignature sr=sb%3A%2F%2Fcontoso.servicebus.windows.net%2Ftelemetry&sig=xWI0DskrjDMT9UFSPbxq9vOycxMTa86eBQyQS%2BaJU0s%3D&se=1700000000&skn=RootManageSharedAccessKey";
        let v = check(
            t,
            "amqps://contoso.servicebus.windows.net/telemetry/Partitions/0",
        )
        .unwrap();
        assert_eq!(v.audience, "telemetry/partitions/0");
    }

    #[test]
    fn vector_2_lower_case_hex_is_hashed_literally() {
        let t = "SharedAccessSignature sr=amqps%3a%2f%2fcontoso.servicebus.windows.net%2ftelemetry&sig=BHBaA0LqvGJaN5J06fQzwmxUe7Rqwi2UsAgI8NYMyS0%3D&se=1700000000&skn=RootManageSharedAccessKey";
        assert!(check(t, "sb://contoso.servicebus.windows.net:5671/telemetry").is_ok());
    }

    #[test]
    fn sign_matches_reference_vector() {
        let t = sign(
            "sb://contoso.servicebus.windows.net/telemetry",
            "RootManageSharedAccessKey",
            KEY,
            1_700_000_000,
        );
        assert!(t.contains("sig=xWI0DskrjDMT9UFSPbxq9vOycxMTa86eBQyQS%2BaJU0s%3D"));
    }

    #[test]
    fn failures() {
        let good = sign(
            "sb://contoso.servicebus.windows.net/telemetry",
            "RootManageSharedAccessKey",
            KEY,
            1_700_000_000,
        );
        let bad = sign(
            "sb://contoso.servicebus.windows.net/telemetry",
            "RootManageSharedAccessKey",
            "wrong",
            1_700_000_000,
        );
        assert_eq!(
            check(&bad, "sb://contoso.servicebus.windows.net/telemetry")
                .unwrap_err()
                .status(),
            401
        );
        // audience outside sr
        assert!(check(&good, "sb://contoso.servicebus.windows.net/telemetry2").is_err());
        let ns = sign(
            "sb://contoso.servicebus.windows.net/",
            "RootManageSharedAccessKey",
            KEY,
            1_700_000_000,
        );
        assert_eq!(
            check(&ns, "sb://contoso.servicebus.windows.net/nohub")
                .unwrap_err()
                .status(),
            404
        );
        let expired = sign(
            "sb://contoso.servicebus.windows.net/telemetry",
            "RootManageSharedAccessKey",
            KEY,
            1_500_000_000,
        );
        assert_eq!(
            check(&expired, "sb://contoso.servicebus.windows.net/telemetry").unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn normalise_forms() {
        assert_eq!(
            normalise("/Telemetry/Partitions/1", false).path,
            "telemetry/partitions/1"
        );
        let r = normalise("amqps://LocalHost:5671/telemetry/", false);
        assert_eq!(r.host.as_deref(), Some("localhost"));
        assert_eq!(r.path, "telemetry");
        assert!(covers("telemetry", "telemetry/partitions/0"));
        assert!(!covers("tele", "telemetry"));
    }
}
