//! The application's login token: a JWT signed HS256 with a shared secret,
//! or RS256 / EdDSA with a key pair whose public half walcast has.
//!
//! Invariant: [`Verifier::verify`] returns a tenant only for a token whose
//! signature verifies with the configured key under the one algorithm that
//! key allows (no `none`, no HS256 with a public key), that carries an `exp`
//! still in the future (no leeway: the application said when it ends, and
//! the user walcast issues expires with it), an `nbf`, if any, not more than
//! 5 s ahead (clock skew), the configured `aud` / `iss` if any, and a tenant
//! claim that is a valid tenant id — so the tenant can go into subjects as
//! is.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::settings::{AuthSettings, TokenKey};
use crate::events::tenant;

/// Seconds of clock skew an `nbf` is allowed.
const LEEWAY_SECS: u64 = 5;

/// Why a token is refused; `reason()` is the metric label and log field.
/// Messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no token in the connect options")]
    NoToken,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token has no exp claim")]
    NoExpiry,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's algorithm is not the configured key's")]
    WrongAlgorithm,
    #[error("the token's aud or iss is not the configured one")]
    WrongAudienceOrIssuer,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token has no {0:?} claim (a string)")]
    NoTenant(String),
    #[error("the token's tenant claim is invalid: {0}")]
    InvalidTenant(&'static str),
}

impl Refusal {
    /// Low-cardinality label for `walcast_auth_refused_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "no_token",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::NoExpiry => "no_expiry",
            Refusal::BadSignature => "bad_signature",
            Refusal::WrongAlgorithm => "wrong_algorithm",
            Refusal::WrongAudienceOrIssuer => "wrong_audience_or_issuer",
            Refusal::Malformed(_) => "malformed",
            Refusal::NoTenant(_) => "no_tenant",
            Refusal::InvalidTenant(_) => "invalid_tenant",
        }
    }
}

/// A verified token: whose it is and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub tenant: String,
    /// The token's `exp` (Unix seconds).
    pub expires: i64,
}

/// Why the verification key cannot be used (at start).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path} is empty")]
    Empty { what: &'static str, path: String },
    #[error("{path} is not a PEM RSA or Ed25519 public key")]
    Pem { path: String },
}

/// Verifies tokens with the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    tenant_claim: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Reads the key file named in `settings`.
    pub fn load(settings: &AuthSettings) -> Result<Verifier, KeyError> {
        let (key, algorithm) = match &settings.token_key {
            TokenKey::SecretFile(path) => {
                let secret = read("auth_token_secret_file", path)?;
                let secret = secret.trim_ascii_end();
                if secret.is_empty() {
                    return Err(KeyError::Empty {
                        what: "auth_token_secret_file",
                        path: path.display().to_string(),
                    });
                }
                if let Ok(text) = std::str::from_utf8(secret) {
                    crate::secrets::register(text);
                }
                let key = DecodingKey::from_secret(secret).map_err(|_| KeyError::Empty {
                    what: "auth_token_secret_file",
                    path: path.display().to_string(),
                })?;
                (key, Algorithm::HS256)
            }
            TokenKey::PublicKeyFile(path) => {
                let pem = read("auth_token_public_key_file", path)?;
                let rsa = DecodingKey::from_rsa_pem(&pem).map(|key| (key, Algorithm::RS256));
                rsa.or_else(|_| DecodingKey::from_ed_pem(&pem).map(|key| (key, Algorithm::EdDSA)))
                    .map_err(|_| KeyError::Pem {
                        path: path.display().to_string(),
                    })?
            }
        };
        Ok(Verifier {
            key,
            validation: validation(
                algorithm,
                settings.token_audience.as_deref(),
                settings.token_issuer.as_deref(),
            ),
            tenant_claim: settings.tenant_claim.clone(),
        })
    }

    /// The token's tenant and expiry, or why it is refused.
    pub fn verify(&self, token: Option<&str>) -> Result<Verified, Refusal> {
        let token = token.filter(|t| !t.is_empty()).ok_or(Refusal::NoToken)?;
        let data = jsonwebtoken::decode::<HashMap<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| refusal(e.kind()))?;
        let claims = data.claims;
        let expires = claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .ok_or(Refusal::NoExpiry)?;
        // The library allows `exp` the leeway meant for `nbf`.
        if expires <= super::unix_now() {
            return Err(Refusal::Expired);
        }
        let tenant = claims
            .get(&self.tenant_claim)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| Refusal::NoTenant(self.tenant_claim.clone()))?;
        let tenant =
            tenant::validate(Some(tenant)).map_err(|e| Refusal::InvalidTenant(e.reason()))?;
        Ok(Verified {
            tenant: tenant.to_string(),
            expires,
        })
    }
}

/// What a token must satisfy besides its tenant claim (see the invariant).
fn validation(algorithm: Algorithm, audience: Option<&str>, issuer: Option<&str>) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    validation.validate_aud = audience.is_some();
    if let Some(audience) = audience {
        validation.set_audience(&[audience]);
    }
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
    }
    validation
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn refusal(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidSignature => Refusal::BadSignature,
        ErrorKind::InvalidAlgorithm => Refusal::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => Refusal::NoExpiry,
        ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => Refusal::WrongAudienceOrIssuer,
        ErrorKind::MissingRequiredClaim(claim) => Refusal::Malformed(format!("no {claim} claim")),
        ErrorKind::InvalidToken => Refusal::Malformed("not a JWT".into()),
        ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            Refusal::Malformed("undecodable".into())
        }
        other => Refusal::Malformed(format!("{other:?}").chars().take(80).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret-of-the-application";

    fn verifier(audience: Option<&str>) -> Verifier {
        Verifier {
            key: DecodingKey::from_secret(SECRET).unwrap(),
            validation: validation(Algorithm::HS256, audience, None),
            tenant_claim: "tenant_id".into(),
        }
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn a_valid_token_names_its_tenant() {
        let exp = now() + 600;
        // An nbf a moment ahead (the application's clock runs ahead): fine.
        let t = token(
            json!({"tenant_id": "acme", "exp": exp, "nbf": now() + 2}),
            SECRET,
        );
        assert_eq!(
            verifier(None).verify(Some(&t)),
            Ok(Verified {
                tenant: "acme".into(),
                expires: exp
            })
        );
    }

    #[test]
    fn each_bad_token_is_refused_with_its_reason() {
        let exp = now() + 600;
        let cases = [
            (None, "no_token"),
            (
                Some(token(
                    json!({"tenant_id": "acme", "exp": now() - 60}),
                    SECRET,
                )),
                "expired",
            ),
            (
                // Within what clock skew would excuse: still expired.
                Some(token(
                    json!({"tenant_id": "acme", "exp": now() - 1}),
                    SECRET,
                )),
                "expired",
            ),
            (
                Some(token(
                    json!({"tenant_id": "acme", "exp": exp, "nbf": now() + 60}),
                    SECRET,
                )),
                "not_yet_valid",
            ),
            (
                Some(token(json!({"tenant_id": "acme"}), SECRET)),
                "no_expiry",
            ),
            (
                Some(token(
                    json!({"tenant_id": "acme", "exp": exp}),
                    b"another-secret",
                )),
                "bad_signature",
            ),
            (Some(token(json!({"exp": exp}), SECRET)), "no_tenant"),
            (
                Some(token(json!({"tenant_id": 7, "exp": exp}), SECRET)),
                "no_tenant",
            ),
            (Some("not.a.jwt".to_string()), "malformed"),
        ];
        for (t, reason) in cases {
            let refused = verifier(None).verify(t.as_deref()).unwrap_err();
            assert_eq!(refused.reason(), reason, "{refused}");
        }
        for bad in ["a.b", "*", ">", "a b", ""] {
            let t = token(json!({"tenant_id": bad, "exp": exp}), SECRET);
            let refused = verifier(None).verify(Some(&t)).unwrap_err();
            assert_eq!(refused.reason(), "invalid_tenant", "{bad:?}");
        }
    }

    /// An Ed25519 public key verifies EdDSA tokens only: an HS256 token
    /// "signed" with the public key's bytes (algorithm confusion) is refused.
    #[test]
    fn a_public_key_accepts_only_its_own_algorithm() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let dir = std::env::temp_dir().join(format!("walcast-ed-{:x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).unwrap();
        let public = dir.join("public.pem");
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        let settings = AuthSettings {
            issuer_seed_file: "/unused".into(),
            xkey_seed_file: None,
            token_key: TokenKey::PublicKeyFile(public),
            tenant_claim: "org".into(),
            account: "APP".into(),
            token_audience: None,
            token_issuer: None,
        };
        let verifier = Verifier::load(&settings).unwrap();
        let claims = json!({"org": "acme", "exp": now() + 600});
        let signed = encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(verifier.verify(Some(&signed)).unwrap().tenant, "acme");
        let confused = token(claims, pair.public_key_pem().as_bytes());
        assert_eq!(
            verifier.verify(Some(&confused)).unwrap_err().reason(),
            "wrong_algorithm"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_audience_is_checked_when_configured() {
        let exp = now() + 600;
        let t = token(
            json!({"tenant_id": "acme", "exp": exp, "aud": "other"}),
            SECRET,
        );
        assert!(verifier(None).verify(Some(&t)).is_ok());
        assert_eq!(
            verifier(Some("walcast"))
                .verify(Some(&t))
                .unwrap_err()
                .reason(),
            "wrong_audience_or_issuer"
        );
        let mine = token(
            json!({"tenant_id": "acme", "exp": exp, "aud": "walcast"}),
            SECRET,
        );
        assert!(verifier(Some("walcast")).verify(Some(&mine)).is_ok());
    }
}
