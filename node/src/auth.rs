//! Sign-in with JWT bearer tokens, as ASP.NET Core SignalR apps do it. The
//! token comes in `Authorization: Bearer …` or, because browsers cannot set
//! headers on WebSockets and EventSource, in the `access_token` query
//! parameter; it is checked at negotiate and on every transport request.
//! HS256 with a shared secret, or RS256/ES256 with a public key; `exp` (with
//! a clock skew), `nbf`, and `iss`/`aud` when configured. The only algorithm
//! accepted is the one the key is for, so `alg: none` and algorithm swaps are
//! refused. A signed-in connection's user name is the token's `name` claim,
//! else its `sub`, and the hub uses it in place of the `user` argument.
//! `issue` signs tokens with the configured secret (the `token` subcommand
//! and the optional development sign-in).

use crate::config::{AuthKeys, AuthMode, NodeConfig};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Longest token accepted, in bytes (ASP.NET Core's default header limits
/// allow more, but no sane identity token is this large).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Who a request is, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    /// When the token stops being accepted (its `exp` plus the clock skew), in Unix seconds.
    pub expires: Option<u64>,
}

/// Why a request was not let in; the text goes back to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// `auth = "required"` and no token came.
    Missing,
    /// A token came and is not acceptable (expired, tampered, malformed…).
    Invalid(String),
    /// The token names another user than the one who opened the connection.
    OtherUser,
}

impl AuthError {
    /// The metric label of this refusal.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid(_) => "invalid",
            AuthError::OtherUser => "other_user",
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => write!(f, "A bearer token is required (Authorization header or access_token)."),
            AuthError::Invalid(why) => write!(f, "The bearer token was refused: {why}."),
            AuthError::OtherUser => write!(f, "The token is for another user than this connection's."),
        }
    }
}

/// The claims a token read here may carry that the node uses itself.
/// `aud` and `iss` are left to `jsonwebtoken` (which takes `aud` as a string
/// or an array, RFC 7519 §4.1.3), and `exp` may have a fraction (a
/// NumericDate need not be an integer).
#[derive(Debug, Deserialize)]
struct Presented {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<f64>,
}

/// The claims of a token this node signs.
#[derive(Debug, Serialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// The node's token checker, built once from the settings.
pub struct Auth {
    pub mode: AuthMode,
    key: Option<(DecodingKey, Validation)>,
    /// Seconds a token is still accepted after its `exp`.
    clock_skew: u64,
    signer: Option<EncodingKey>,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl Auth {
    /// Reads the key material the settings name; an unusable key is an error.
    pub fn from_config(cfg: &NodeConfig) -> Result<Auth, String> {
        let AuthKeys { secret, public } = cfg.auth_keys()?;
        let signer = secret.as_deref().map(EncodingKey::from_secret);
        let (key, alg) = match (public, secret) {
            (Some(p), _) => (Some(p.0), p.1),
            (None, Some(s)) => (Some(DecodingKey::from_secret(&s)), Algorithm::HS256),
            (None, None) => (None, Algorithm::HS256),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.auth_clock_skew_secs;
        validation.validate_nbf = true;
        validation.validate_aud = !cfg.auth_audience.is_empty();
        if !cfg.auth_audience.is_empty() {
            validation.set_audience(&[&cfg.auth_audience]);
            validation.set_required_spec_claims(&["exp", "aud"]);
        }
        if !cfg.auth_issuer.is_empty() {
            validation.set_issuer(&[&cfg.auth_issuer]);
            let mut required = vec!["exp", "iss"];
            if !cfg.auth_audience.is_empty() {
                required.push("aud");
            }
            validation.set_required_spec_claims(&required);
        }
        Ok(Auth {
            mode: cfg.auth,
            key: key.map(|k| (k, validation)),
            clock_skew: cfg.auth_clock_skew_secs,
            signer,
            issuer: cfg.auth_issuer.clone(),
            audience: cfg.auth_audience.clone(),
        })
    }

    /// Checks one token.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let invalid = |why: &str| AuthError::Invalid(why.to_string());
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("it is larger than 8 KB"));
        }
        let Some((key, validation)) = &self.key else { return Err(invalid("this node has no key to check it")) };
        // RFC 7515 §4.1.11: a token whose header names extensions it
        // requires (`crit`) is refused by a reader that knows none of them.
        if jsonwebtoken::decode_header(token).is_ok_and(|h| h.crit.is_some()) {
            return Err(invalid("it requires header extensions this node does not understand (crit)"));
        }
        let data = jsonwebtoken::decode::<Presented>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            AuthError::Invalid(
                match e.kind() {
                    ExpiredSignature => "it has expired",
                    ImmatureSignature => "it is not valid yet (nbf)",
                    InvalidSignature => "its signature does not match",
                    InvalidAlgorithm => "it is signed with an algorithm this node does not accept",
                    InvalidIssuer => "wrong issuer (iss)",
                    InvalidAudience => "wrong audience (aud)",
                    MissingRequiredClaim(_) => "a required claim (exp, iss or aud) is missing",
                    _ => "it is malformed",
                }
                .to_string(),
            )
        })?;
        let claims = data.claims;
        let name = claims.name.filter(|n| !n.trim().is_empty()).or(claims.sub).unwrap_or_default();
        if name.trim().is_empty() {
            return Err(invalid("it names no user (name or sub)"));
        }
        let name = crate::user_name::validate(&name).map_err(|e| AuthError::Invalid(format!("its user name: {e}")))?;
        // Accepted until `exp` plus the clock skew, and so closed then: a
        // connection closed earlier would reconnect with the same token.
        let expires = claims.exp.map(|exp| (exp.max(0.0).round() as u64).saturating_add(self.clock_skew));
        Ok(Identity { name: name.to_string(), expires })
    }

    /// Who a request is: its token checked, or `None` when it has none and
    /// that is allowed. With `auth = "off"` tokens are not looked at.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        params: &HashMap<String, String>,
    ) -> Result<Option<Identity>, AuthError> {
        if self.mode == AuthMode::Off {
            return Ok(None);
        }
        match bearer(authorization, params) {
            Some(token) => self.verify(token).map(Some),
            None if self.mode == AuthMode::Required => Err(AuthError::Missing),
            None => Ok(None),
        }
    }

    /// Signs a token for `user` valid for `ttl_secs`, with the configured
    /// secret (HS256), issuer and audience.
    pub fn issue(&self, user: &str, ttl_secs: u64) -> Result<String, String> {
        let signer = self.signer.as_ref().ok_or("no auth_secret is set to sign with")?;
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            name: Some(user.to_string()),
            sub: Some(user.to_string()),
            exp: Some(now + ttl_secs),
            iat: Some(now),
            iss: (!self.issuer.is_empty()).then(|| self.issuer.clone()),
            aud: (!self.audience.is_empty()).then(|| self.audience.clone()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, signer).map_err(|e| e.to_string())
    }
}

/// The token of a request: the `Authorization: Bearer` header first, then
/// `access_token` in the query.
pub fn bearer<'a>(authorization: Option<&'a str>, params: &'a HashMap<String, String>) -> Option<&'a str> {
    let from_header = authorization.and_then(|h| {
        let (scheme, rest) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    from_header.or_else(|| params.get("access_token").map(String::as_str)).filter(|t| !t.is_empty())
}

/// A duration such as `90s`, `15m`, `1h` or `2d` (a bare number is seconds).
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 1h or 2d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m, h or d)")),
    };
    n.checked_mul(scale).filter(|s| *s > 0).ok_or_else(|| format!("{text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn auth(mode: AuthMode) -> Auth {
        let cfg = NodeConfig {
            auth: mode,
            auth_secret: "a-test-secret-of-some-length-0123".into(),
            auth_clock_skew_secs: 0,
            ..NodeConfig::default()
        };
        Auth::from_config(&cfg).unwrap()
    }

    fn params(token: &str) -> HashMap<String, String> {
        HashMap::from([("access_token".to_string(), token.to_string())])
    }

    #[test]
    fn a_signed_token_names_its_user_from_header_or_query() {
        let a = auth(AuthMode::Required);
        let token = a.issue("ana", 3600).unwrap();
        let who = a.authenticate(Some(&format!("Bearer {token}")), &HashMap::new()).unwrap().unwrap();
        assert_eq!(who.name, "ana");
        assert_eq!(a.authenticate(None, &params(&token)).unwrap().unwrap().name, "ana");
        assert_eq!(a.authenticate(None, &HashMap::new()), Err(AuthError::Missing));
        assert_eq!(auth(AuthMode::Optional).authenticate(None, &HashMap::new()), Ok(None));
        assert_eq!(auth(AuthMode::Off).authenticate(None, &params("garbage")), Ok(None));
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let a = auth(AuthMode::Optional);
        let token = a.issue("ana", 3600).unwrap();
        let refused = |t: &str| match a.authenticate(None, &params(t)) {
            Err(AuthError::Invalid(why)) => why,
            other => panic!("{t:?} was let in: {other:?}"),
        };
        // Tampered: the payload changed, the signature kept.
        let parts: Vec<&str> = token.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged = b64.encode(br#"{"name":"root","exp":99999999999}"#);
        assert!(refused(&format!("{}.{forged}.{}", parts[0], parts[2])).contains("signature"));
        // alg: none, unsigned.
        let none = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert!(!refused(&format!("{none}.{}.", parts[1])).is_empty());
        // Another algorithm with the same secret.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims { name: Some("x".into()), sub: None, exp: Some(u64::MAX / 2), iat: None, iss: None, aud: None },
            &EncodingKey::from_secret(b"a-test-secret-of-some-length-0123"),
        )
        .unwrap();
        assert!(refused(&hs512).contains("algorithm"));
        // Expired, malformed, oversized.
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims { name: Some("x".into()), sub: None, exp: Some(1000), iat: None, iss: None, aud: None },
            &EncodingKey::from_secret(b"a-test-secret-of-some-length-0123"),
        )
        .unwrap();
        assert!(refused(&old).contains("expired"));
        assert!(refused("not.a.token").contains("malformed"));
        assert!(refused(&"a".repeat(MAX_TOKEN_BYTES + 1)).contains("8 KB"));
        // Signed by another secret.
        let other = Auth::from_config(&NodeConfig {
            auth: AuthMode::Optional,
            auth_secret: "another-secret-entirely-0123456789".into(),
            ..NodeConfig::default()
        })
        .unwrap();
        assert!(refused(&other.issue("ana", 60).unwrap()).contains("signature"));
    }

    fn sign(claims: serde_json::Value, header: Header) -> String {
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"a-test-secret-of-some-length-0123")).unwrap()
    }

    #[test]
    fn standard_tokens_with_audience_arrays_and_fractional_expiry_are_accepted_and_crit_is_refused() {
        let a = Auth::from_config(&NodeConfig {
            auth: AuthMode::Required,
            auth_secret: "a-test-secret-of-some-length-0123".into(),
            auth_audience: "chat".into(),
            auth_clock_skew_secs: 30,
            ..NodeConfig::default()
        })
        .unwrap();
        let exp = jsonwebtoken::get_current_timestamp() + 600;
        let hs = || Header::new(Algorithm::HS256);
        let arrays = sign(serde_json::json!({"sub": "ana", "aud": ["chat", "api"], "exp": exp as f64 + 0.5}), hs());
        let who = a.verify(&arrays).expect("aud array and fractional exp");
        assert_eq!(who.name, "ana");
        assert_eq!(who.expires, Some(exp + 1 + 30), "exp rounded as jsonwebtoken does, plus the skew");
        let wrong = sign(serde_json::json!({"sub": "ana", "aud": ["api", "web"], "exp": exp}), hs());
        assert!(matches!(a.verify(&wrong), Err(AuthError::Invalid(w)) if w.contains("audience")));
        let mut critical = hs();
        critical.crit = Some(vec!["urn:example:extension".into()]);
        let crit = sign(serde_json::json!({"sub": "ana", "aud": "chat", "exp": exp}), critical);
        assert!(matches!(a.verify(&crit), Err(AuthError::Invalid(w)) if w.contains("crit")));
        // Past exp but inside the skew: accepted, and expiring at exp + skew.
        let now = jsonwebtoken::get_current_timestamp();
        let late = sign(serde_json::json!({"sub": "ana", "aud": "chat", "exp": now - 10}), hs());
        assert_eq!(a.verify(&late).unwrap().expires, Some(now - 10 + 30));
        for bad in ["~ana", "ana\u{202E}", "a\u{200B}na"] {
            let t = sign(serde_json::json!({"sub": bad, "aud": "chat", "exp": exp}), hs());
            assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let strict = Auth::from_config(&NodeConfig {
            auth: AuthMode::Required,
            auth_secret: "a-test-secret-of-some-length-0123".into(),
            auth_issuer: "switchboard".into(),
            auth_audience: "chat".into(),
            ..NodeConfig::default()
        })
        .unwrap();
        assert!(strict.verify(&strict.issue("ana", 60).unwrap()).is_ok());
        // Same secret, no iss/aud.
        let loose = auth(AuthMode::Required).issue("ana", 60).unwrap();
        assert!(matches!(strict.verify(&loose), Err(AuthError::Invalid(_))));
    }

    fn with_public_key(file: &str) -> Auth {
        let path = format!("{}/testdata/{file}", env!("CARGO_MANIFEST_DIR"));
        Auth::from_config(&NodeConfig { auth: AuthMode::Required, auth_public_key_file: path, ..NodeConfig::default() })
            .unwrap()
    }

    fn signed(alg: Algorithm, key: &EncodingKey) -> String {
        let claims =
            Claims { name: Some("eve".into()), sub: None, exp: Some(u64::MAX / 2), iat: None, iss: None, aud: None };
        jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
    }

    #[test]
    fn public_keys_check_rs256_and_es256_and_refuse_algorithm_confusion() {
        let pem = |f: &str| std::fs::read(format!("{}/testdata/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let rsa = with_public_key("rs256-public.pem");
        let es = with_public_key("es256-public.pem");
        let rs_token = signed(Algorithm::RS256, &EncodingKey::from_rsa_pem(&pem("rs256-private.pem")).unwrap());
        let es_token = signed(Algorithm::ES256, &EncodingKey::from_ec_pem(&pem("es256-private.pem")).unwrap());
        assert_eq!(rsa.verify(&rs_token).unwrap().name, "eve");
        assert_eq!(es.verify(&es_token).unwrap().name, "eve");
        assert!(rsa.verify(&es_token).is_err() && es.verify(&rs_token).is_err());
        // The public key used as an HS256 secret (the classic confusion attack).
        let confused = signed(Algorithm::HS256, &EncodingKey::from_secret(&pem("rs256-public.pem")));
        assert!(matches!(rsa.verify(&confused), Err(AuthError::Invalid(why)) if why.contains("algorithm")));
        // Garbage as a key file is refused at start.
        let bad = NodeConfig {
            auth: AuthMode::Required,
            auth_public_key_file: format!("{}/testdata/README.md", env!("CARGO_MANIFEST_DIR")),
            ..NodeConfig::default()
        };
        assert!(Auth::from_config(&bad).is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert!(parse_ttl("0s").is_err() && parse_ttl("1y").is_err() && parse_ttl("h").is_err());
    }
}
