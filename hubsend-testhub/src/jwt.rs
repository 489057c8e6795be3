//! Entra ID-style JWT put-tokens (`type` = `jwt`): HS256 signature, issuer, audience, expiry
//! and a `roles` claim mapped to rights.
//!
//! The real service checks RS256 tokens from Entra ID against Azure RBAC role assignments; a
//! test hub trusts an issuer sharing an HMAC secret with the test's token endpoint and reads
//! the roles from the token itself.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{
    sas::{covers, normalise, TokenError},
    server::Shared,
    HubConfig, Right,
};

/// The audience Event Hubs tokens are issued for.
pub const EVENT_HUBS_AUDIENCE: &str = "https://eventhubs.azure.net/";

/// An issuer whose HS256-signed tokens the hub accepts.
#[derive(Clone)]
pub(crate) struct TrustedIssuer {
    pub issuer: String,
    pub audience: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for TrustedIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedIssuer")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl HubConfig {
    /// Accepts `jwt` put-tokens signed with HS256 under `hs256_secret` whose `iss` equals
    /// `issuer` and whose `aud` equals (or, as an array, contains) `audience` — for Event Hubs
    /// [`EVENT_HUBS_AUDIENCE`]. The `roles` claim grants rights:
    /// `Azure Event Hubs Data Sender` → Send, `… Data Receiver` → Listen, `… Data Owner` → all.
    /// A token is valid until its `exp`; links authorised by it are detached then unless a
    /// newer token was put.
    pub fn trust_jwt_issuer(
        mut self,
        issuer: impl Into<String>,
        audience: impl Into<String>,
        hs256_secret: impl AsRef<[u8]>,
    ) -> Self {
        self.jwt_issuers.push(TrustedIssuer {
            issuer: issuer.into(),
            audience: audience.into(),
            secret: hs256_secret.as_ref().to_vec(),
        });
        self
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    }
}

/// Signs `claims` (a JSON object) as an HS256 JWT under `secret`.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    let header = b64().encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64().encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let mut mac = mac(secret);
    mac.update(signing_input.as_bytes());
    let signature = b64().encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

/// What a verified JWT grants.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedJwt {
    /// Normalised CBS `name` path the grant applies to.
    pub audience: String,
    /// Unix seconds (`exp`).
    pub expires_at: u64,
    pub rights: Vec<Right>,
}

fn rights_of(roles: &[&str]) -> Vec<Right> {
    let mut rights = Vec::new();
    for role in roles {
        let granted: &[Right] = match role.to_ascii_lowercase().as_str() {
            "azure event hubs data sender" => &[Right::Send],
            "azure event hubs data receiver" => &[Right::Listen],
            "azure event hubs data owner" => &[Right::Manage, Right::Send, Right::Listen],
            _ => &[],
        };
        for r in granted {
            if !rights.contains(r) {
                rights.push(*r);
            }
        }
    }
    rights
}

fn unauthorized(why: &str) -> TokenError {
    TokenError::Unauthorized(format!("InvalidToken: {why}"))
}

/// Verifies a JWT put for the CBS `name` against `issuers`.
// Our own, not jsonwebtoken: its time checks read the clock (tests pass `now_secs`) with one
// leeway for `exp` and `nbf` (ours: none and 60 s), leaving it only split, HS256 and `aud`, for
// a crypto backend of its own (aws-lc-rs, or RustCrypto's rsa/p256/p384/ed25519: a second stack
// in a `ring` build) here and in the CLI's `local-hub`. `verify_slice` is constant-time.
pub(crate) fn verify(
    token: &str,
    name: &str,
    now_secs: u64,
    issuers: &[TrustedIssuer],
    hosts: &[String],
    entity_exists: impl Fn(&str) -> bool,
) -> Result<VerifiedJwt, TokenError> {
    let token = token.trim();
    let token = token
        .strip_prefix("Bearer ")
        .or_else(|| token.strip_prefix("bearer "))
        .unwrap_or(token);
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unauthorized("The token is not a JWT."));
    };
    let decode_json = |part: &str| -> Result<serde_json::Value, TokenError> {
        let bytes = b64()
            .decode(part)
            .map_err(|_| unauthorized("The token is not a JWT."))?;
        serde_json::from_slice(&bytes).map_err(|_| unauthorized("The token is not a JWT."))
    };
    let header = {
        let h = decode_json(header)?;
        h.get("alg").and_then(|a| a.as_str()).map(str::to_owned)
    };
    if header.as_deref() != Some("HS256") {
        return Err(unauthorized(
            "The token's signing algorithm is not trusted.",
        ));
    }
    let claims = decode_json(payload)?;
    let iss = claims.get("iss").and_then(|v| v.as_str()).unwrap_or("");
    let issuer = issuers
        .iter()
        .find(|i| i.issuer == iss)
        .ok_or_else(|| unauthorized(&format!("The token issuer '{iss}' is not trusted.")))?;
    let signature = b64()
        .decode(signature)
        .map_err(|_| unauthorized("The token has an invalid signature."))?;
    let mut mac = mac(&issuer.secret);
    mac.update(header_and_payload(token).as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| unauthorized("The token has an invalid signature."))?;
    let aud_ok = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => *a == issuer.audience,
        Some(serde_json::Value::Array(list)) => {
            list.iter().any(|a| a.as_str() == Some(&issuer.audience))
        }
        _ => false,
    };
    if !aud_ok {
        return Err(unauthorized(&format!(
            "The token audience is not '{}'.",
            issuer.audience
        )));
    }
    let Some(exp) = claims.get("exp").and_then(|v| v.as_u64()) else {
        return Err(unauthorized("The token has no 'exp' claim."));
    };
    if exp <= now_secs {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = claims.get("nbf").and_then(|v| v.as_u64()) {
        if nbf > now_secs + 60 {
            return Err(unauthorized("The token is not valid yet."));
        }
    }
    let roles: Vec<&str> = claims
        .get("roles")
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let rights = rights_of(&roles);
    if rights.is_empty() {
        return Err(unauthorized(
            "The principal has no Event Hubs data role (roles claim).",
        ));
    }
    let name_res = normalise(name, true);
    if let Some(h) = &name_res.host {
        if !hosts.iter().any(|a| a.eq_ignore_ascii_case(h)) {
            return Err(TokenError::Unauthorized(format!(
                "InvalidAudience: The audience '{name}' does not match this namespace."
            )));
        }
    }
    let first = name_res.path.split('/').next().unwrap_or("");
    if !first.is_empty() && !entity_exists(first) {
        let host = name_res.host.clone().unwrap_or_default();
        return Err(TokenError::NotFound(format!("sb://{host}/{first}")));
    }
    Ok(VerifiedJwt {
        audience: name_res.path,
        expires_at: exp,
        rights,
    })
}

/// `header.payload` of a compact JWT (what the signature covers).
fn header_and_payload(token: &str) -> &str {
    token.rsplit_once('.').map(|(hp, _)| hp).unwrap_or(token)
}

impl Shared {
    /// Verifies a `jwt` put-token for the CBS `name`.
    pub(crate) fn verify_jwt(&self, token: &str, name: &str) -> Result<VerifiedJwt, TokenError> {
        let now = (crate::server::now_ms() / 1000) as u64;
        verify(
            token,
            name,
            now,
            &self.config.jwt_issuers,
            &self.hosts,
            |h| self.find_hub(h).is_some(),
        )
    }

    /// Whether a `$management` `security_token` that is a JWT authorises `entity`.
    pub(crate) fn jwt_security_token_ok(&self, token: &str, entity: &str) -> bool {
        !self.config.jwt_issuers.is_empty()
            && self
                .verify_jwt(token, &format!("/{entity}"))
                .is_ok_and(|v| covers(&v.audience, entity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"hub-and-idp-shared-secret";
    const ISS: &str = "https://sts.test/tenant-1/";

    fn issuers() -> Vec<TrustedIssuer> {
        vec![TrustedIssuer {
            issuer: ISS.into(),
            audience: EVENT_HUBS_AUDIENCE.into(),
            secret: SECRET.to_vec(),
        }]
    }

    fn check(token: &str) -> Result<VerifiedJwt, TokenError> {
        verify(
            token,
            "amqps://localhost:5671/telemetry",
            1_000,
            &issuers(),
            &["localhost".to_string()],
            |h| h == "telemetry",
        )
    }

    fn claims(exp: u64, roles: &[&str]) -> serde_json::Value {
        json!({"iss": ISS, "aud": EVENT_HUBS_AUDIENCE, "exp": exp, "roles": roles})
    }

    #[test]
    fn accepts_a_signed_sender_token() {
        let token = sign_hs256(SECRET, &claims(2_000, &["Azure Event Hubs Data Sender"]));
        let v = check(&token).unwrap();
        assert_eq!(v.audience, "telemetry");
        assert_eq!(v.expires_at, 2_000);
        assert_eq!(v.rights, vec![Right::Send]);
    }

    #[test]
    fn refuses_bad_tokens() {
        let sender = &["Azure Event Hubs Data Sender"];
        let wrong_key = sign_hs256(b"other", &claims(2_000, sender));
        assert!(matches!(
            check(&wrong_key),
            Err(TokenError::Unauthorized(_))
        ));
        let expired = sign_hs256(SECRET, &claims(999, sender));
        assert_eq!(check(&expired).unwrap_err(), TokenError::Expired);
        let no_role = sign_hs256(SECRET, &claims(2_000, &["Reader"]));
        assert!(matches!(check(&no_role), Err(TokenError::Unauthorized(_))));
        let other_aud = sign_hs256(
            SECRET,
            &json!({"iss": ISS, "aud": "https://storage.azure.com/", "exp": 2_000, "roles": sender}),
        );
        assert!(matches!(
            check(&other_aud),
            Err(TokenError::Unauthorized(_))
        ));
        let other_iss = sign_hs256(
            SECRET,
            &json!({"iss": "https://evil/", "aud": EVENT_HUBS_AUDIENCE, "exp": 2_000, "roles": sender}),
        );
        assert!(matches!(
            check(&other_iss),
            Err(TokenError::Unauthorized(_))
        ));
        // alg=none with the signature stripped.
        let good = sign_hs256(SECRET, &claims(2_000, sender));
        let (_, rest) = good.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        let none = format!("{}.{payload}.", b64().encode(br#"{"alg":"none"}"#));
        assert!(matches!(check(&none), Err(TokenError::Unauthorized(_))));
        // Tampered payload.
        let richer = b64().encode(claims(9_999, sender).to_string());
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!("{}.{richer}.{}", parts[0], parts[2]);
        assert!(matches!(check(&tampered), Err(TokenError::Unauthorized(_))));
        assert!(matches!(
            check("not-a-jwt"),
            Err(TokenError::Unauthorized(_))
        ));
    }

    #[test]
    fn unknown_entity_is_not_found() {
        let token = sign_hs256(SECRET, &claims(2_000, &["Azure Event Hubs Data Owner"]));
        let err = verify(
            &token,
            "amqps://localhost/nope",
            1_000,
            &issuers(),
            &["localhost".to_string()],
            |h| h == "telemetry",
        )
        .unwrap_err();
        assert_eq!(err.status(), 404);
    }
}
