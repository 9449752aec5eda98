//! How the server API knows a request comes from the application's backend,
//! as Azure SignalR Service does it: `Authorization: Bearer <JWT>`, HS256,
//! signed with the access key the operator configured, with an `exp` (a
//! token without one is refused) and an `aud` that is the URL the request
//! was sent to (without its query). The key is given as itself (32 bytes or
//! more) or as Azure's connection string `Endpoint=…;AccessKey=…;Version=1.0;`,
//! so a backend configured for Azure is pointed here by changing that string.
//! Nothing of a token or the key is logged.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The one hub this cluster serves (in the API's paths, the client
/// endpoint's `?hub=` and upstream events' `X-ASRS-Hub`).
pub const HUB: &str = "chathub";
/// Shortest key accepted (the API's whole security rests on it).
pub const MIN_KEY_BYTES: usize = 32;
/// Larger tokens are refused unread.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Seconds of clock difference allowed on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// The configured access key.
pub struct AccessKey {
    key: DecodingKey,
    /// The key itself, for signing upstream requests.
    secret: Vec<u8>,
    validation: Validation,
    /// The connection string's `Endpoint`, when the key came in one.
    pub endpoint: Option<String>,
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKey").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<f64>,
    /// The user, as Azure's SDKs put it in client tokens: `nameid`, or the
    /// long .NET claim type.
    #[serde(default)]
    nameid: Option<String>,
    #[serde(default, rename = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier")]
    name_identifier: Option<String>,
}

/// Who a client endpoint token says the client is.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientClaims {
    pub user: String,
    /// When it stops being accepted (its `exp` plus the leeway), Unix seconds.
    pub expires: u64,
}

/// `aud` as RFC 7519 allows it: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl AccessKey {
    /// The key as configured: a connection string when it has `AccessKey=`,
    /// else the key itself.
    pub fn parse(text: &str) -> Result<AccessKey, String> {
        let text = text.trim();
        let (key, endpoint) = if text.to_ascii_lowercase().contains("accesskey=") {
            let mut key = None;
            let mut endpoint = None;
            for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let (name, value) =
                    part.split_once('=').ok_or("a connection string is name=value pairs separated by ;")?;
                match name.trim().to_ascii_lowercase().as_str() {
                    "accesskey" => key = Some(value.trim().to_string()),
                    "endpoint" => endpoint = Some(value.trim().trim_end_matches('/').to_string()),
                    "version" if value.trim() != "1.0" => {
                        return Err(format!("connection string Version {} is not supported (1.0 is)", value.trim()))
                    }
                    _ => {} // Version=1.0, Port=…, ClientEndpoint=…: nothing to do here
                }
            }
            (key.ok_or("the connection string has no AccessKey")?, endpoint)
        } else {
            (text.to_string(), None)
        };
        if key.len() < MIN_KEY_BYTES {
            return Err(format!("the access key must be at least {MIN_KEY_BYTES} bytes"));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false; // compared as URLs below
        validation.set_required_spec_claims(&["exp"]);
        Ok(AccessKey { key: DecodingKey::from_secret(key.as_bytes()), secret: key.into_bytes(), validation, endpoint })
    }

    /// Checks a request's `Authorization` header for a token signed with the
    /// key whose audience is one of `urls` (the URLs the request may have
    /// been sent to). The error says why, for the 401's body.
    pub fn check(&self, authorization: Option<&str>, urls: &[String]) -> Result<(), String> {
        let header = authorization.ok_or("missing Authorization: Bearer <token>")?;
        let (scheme, token) = header.trim().split_once(' ').ok_or("the Authorization header is not Bearer <token>")?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err("the Authorization header is not Bearer <token>".into());
        }
        self.verify(token.trim(), urls).map(|_| ())
    }

    /// `X-ASRS-Signature` for an upstream request about `connection_id`:
    /// `sha256=` and the hex HMAC-SHA256 of the id with the key, as Azure
    /// signs it (a backend checks it with the key it already has).
    pub fn signature(&self, connection_id: &str) -> String {
        use hmac::Mac;
        let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.secret) {
            Ok(mac) => mac,
            Err(_) => return String::new(), // HMAC takes a key of any length
        };
        mac.update(connection_id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256={hex}")
    }

    /// Checks a client endpoint's access token (its audience is the client
    /// URL, one of `urls`) and reads whom it names.
    pub fn client(&self, token: &str, urls: &[String]) -> Result<ClientClaims, String> {
        let claims = self.verify(token, urls)?;
        // Azure lets a token name nobody; here a connection is someone's:
        // a client endpoint token must name its user.
        let user = claims
            .nameid
            .or(claims.name_identifier)
            .filter(|u| !u.trim().is_empty())
            .ok_or("the token names no user (nameid)")?;
        let user =
            crate::user_name::validate(&user).map_err(|e| format!("the token's user (nameid): {e}"))?.to_string();
        let expires = (claims.exp.unwrap_or(0.0).max(0.0).round() as u64).saturating_add(LEEWAY_SECS);
        Ok(ClientClaims { user, expires })
    }

    /// A token's signature, `exp`, `nbf` and audience checked; its claims.
    fn verify(&self, token: &str, urls: &[String]) -> Result<Claims, String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err("the token is larger than 8 KB".into());
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            match e.kind() {
                ExpiredSignature => "the token has expired",
                ImmatureSignature => "the token is not valid yet (nbf)",
                InvalidSignature => "the token's signature does not match the access key",
                InvalidAlgorithm => "the token is not signed with HS256",
                MissingRequiredClaim(_) => "the token has no exp",
                _ => "the token is malformed",
            }
            .to_string()
        })?;
        let audiences = match &data.claims.aud {
            Some(Audience::One(a)) => vec![a.clone()],
            Some(Audience::Many(a)) => a.clone(),
            None => return Err("the token has no aud (the request's URL)".into()),
        };
        let wanted: Vec<String> = urls.iter().filter_map(|u| normalise_url(u)).collect();
        if audiences.iter().filter_map(|a| normalise_url(a)).any(|a| wanted.contains(&a)) {
            Ok(data.claims)
        } else {
            Err("the token's aud is not this request's URL".into())
        }
    }
}

/// A URL compared as Azure compares audiences: scheme and host without case
/// or default port, the path as given without a trailing slash, no query.
pub fn normalise_url(url: &str) -> Option<String> {
    let url = url.trim();
    let url = url.split(['?', '#']).next().unwrap_or(url);
    let (scheme, rest) = url.split_once("://")?;
    let (host, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let origin = crate::cors::normalise(&format!("{scheme}://{host}"))?;
    Some(format!("{origin}{}", path.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const KEY: &str = "an-access-key-of-thirty-two-bytes-or-more";

    fn token(claims: serde_json::Value, key: &str) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn keys_are_given_raw_or_in_an_azure_connection_string() {
        assert!(AccessKey::parse("short").unwrap_err().contains("at least 32"));
        let k = AccessKey::parse(&format!("Endpoint=https://chat.example.com/;AccessKey={KEY};Version=1.0;")).unwrap();
        assert_eq!(k.endpoint.as_deref(), Some("https://chat.example.com"));
        assert!(AccessKey::parse("Endpoint=https://x;Version=1.0;AccessKey=").unwrap_err().contains("at least"));
        assert!(AccessKey::parse(&format!("AccessKey={KEY};Version=2.0")).unwrap_err().contains("Version"));
        assert!(AccessKey::parse("Endpoint=https://x;Version=1.0").is_err(), "no key at all");
        assert!(AccessKey::parse(KEY).unwrap().endpoint.is_none());
    }

    #[test]
    fn a_token_must_be_signed_with_the_key_unexpired_and_for_this_url() {
        let k = AccessKey::parse(KEY).unwrap();
        let url = "http://localhost:8888/api/hubs/chathub/:send".to_string();
        let urls = std::slice::from_ref(&url);
        let bearer = |t: String| Some(format!("Bearer {t}"));
        let good = token(json!({"aud": "http://LOCALHOST:8888/api/hubs/chathub/:send/", "exp": now() + 60}), KEY);
        assert_eq!(k.check(bearer(good).as_deref(), urls), Ok(()));
        let many = token(json!({"aud": ["x", url], "exp": now() + 60}), KEY);
        assert_eq!(k.check(bearer(many).as_deref(), urls), Ok(()));
        for (why, t) in [
            ("expired", token(json!({"aud": url, "exp": now() - 120}), KEY)),
            ("signature", token(json!({"aud": url, "exp": now() + 60}), "another-key-of-thirty-two-bytes-or-more")),
            ("no exp", token(json!({"aud": url}), KEY)),
            ("aud", token(json!({"aud": "http://localhost:8888/api/hubs/other/:send", "exp": now() + 60}), KEY)),
            ("no aud", token(json!({"exp": now() + 60}), KEY)),
            ("malformed", "not.a.jwt".to_string()),
        ] {
            let e = k.check(bearer(t).as_deref(), urls).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        assert!(k.check(None, urls).unwrap_err().contains("missing"));
        assert!(k.check(Some("Basic abc"), urls).unwrap_err().contains("Bearer"));
    }

    #[test]
    fn client_tokens_name_their_user_as_azures_sdks_do() {
        let k = AccessKey::parse(KEY).unwrap();
        let url = "http://h:8888/client/?hub=chathub".to_string();
        let urls = std::slice::from_ref(&url);
        let exp = now() + 60;
        let short = token(json!({"aud": url, "exp": exp, "nameid": "ana"}), KEY);
        assert_eq!(k.client(&short, urls), Ok(ClientClaims { user: "ana".into(), expires: exp + LEEWAY_SECS }));
        let long = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier";
        let dotnet = token(json!({"aud": url, "exp": exp, long: "bob"}), KEY);
        assert_eq!(k.client(&dotnet, urls).unwrap().user, "bob");
        let anonymous = token(json!({"aud": url, "exp": exp}), KEY);
        assert!(k.client(&anonymous, urls).unwrap_err().contains("names no user"));
        let bad_name = token(json!({"aud": url, "exp": exp, "nameid": "~x"}), KEY);
        assert!(k.client(&bad_name, urls).unwrap_err().contains("nameid"));
        let api = token(json!({"aud": "http://h:8888/api/hubs/chathub/:send", "exp": exp, "nameid": "ana"}), KEY);
        assert!(k.client(&api, urls).unwrap_err().contains("aud"), "a server API token is not a client token");
    }

    #[test]
    fn upstream_signatures_are_the_hmac_of_the_connection_id() {
        // RFC 4231 test case 2: key "Jefe", "what do ya want for nothing?".
        let mut k = AccessKey::parse(KEY).unwrap();
        k.secret = b"Jefe".to_vec();
        assert_eq!(
            k.signature("what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn urls_compare_without_case_default_ports_trailing_slashes_or_queries() {
        assert_eq!(
            normalise_url("HTTPS://Chat.Example.com:443/api/x/?q=1").as_deref(),
            Some("https://chat.example.com/api/x")
        );
        assert_eq!(normalise_url("http://h:8888").as_deref(), Some("http://h:8888"));
        assert_eq!(normalise_url("ftp://h/x"), None);
    }
}
