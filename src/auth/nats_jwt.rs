//! NATS JWTs (`alg: ed25519-nkey`), as nats-server reads and writes them:
//! `base64url(header).base64url(claims).base64url(signature)`, unpadded,
//! the signature an ed25519 signature by the `iss` nkey over the first two
//! parts. The signing and verifying are nkeys' (ed25519-dalek); this file
//! only encodes.
//!
//! Invariant: [`decode`] returns claims only when the signature verifies
//! with the public key the claims name as `iss`.

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a NATS JWT could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT (three base64url parts)")]
    Shape,
    #[error("JWT {0} is not valid JSON: {1}")]
    Json(&'static str, serde_json::Error),
    #[error("JWT algorithm {0:?} is not ed25519-nkey")]
    Algorithm(String),
    #[error("JWT issuer is not an nkey: {0}")]
    Issuer(String),
    #[error("JWT signature does not verify")]
    Signature,
    #[error("cannot sign: {0}")]
    Sign(String),
}

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// A unique `jti`: base32 of 20 random bytes.
pub fn new_jti() -> String {
    BASE32_NOPAD.encode(&rand::random::<[u8; 20]>())
}

/// Encodes `claims` and signs them with `signer`.
pub fn encode<C: Serialize>(claims: &C, signer: &KeyPair) -> Result<String, JwtError> {
    let body = serde_json::to_vec(claims).map_err(|e| JwtError::Json("claims", e))?;
    let signing_input = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(HEADER.as_bytes()),
        BASE64URL_NOPAD.encode(&body)
    );
    let signature = signer
        .sign(signing_input.as_bytes())
        .map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!(
        "{signing_input}.{}",
        BASE64URL_NOPAD.encode(&signature)
    ))
}

/// The claims of a JWT whose signature verifies with its own `iss`.
pub fn decode<C: DeserializeOwned>(token: &str) -> Result<C, JwtError> {
    let mut parts = token.trim().split('.');
    let (Some(header), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Shape);
    };
    let bytes = |part: &str| {
        BASE64URL_NOPAD
            .decode(part.trim_end_matches('=').as_bytes())
            .map_err(|_| JwtError::Shape)
    };
    let head: serde_json::Value =
        serde_json::from_slice(&bytes(header)?).map_err(|e| JwtError::Json("header", e))?;
    let alg = head.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    // nats-io/jwt v2 writes `ed25519-nkey` and still reads v1's `ed25519`.
    if alg != "ed25519-nkey" && alg != "ed25519" {
        return Err(JwtError::Algorithm(alg.to_string()));
    }
    let body_bytes = bytes(body)?;
    let generic: serde_json::Value =
        serde_json::from_slice(&body_bytes).map_err(|e| JwtError::Json("claims", e))?;
    let issuer = generic.get("iss").and_then(|i| i.as_str()).unwrap_or("");
    let key = KeyPair::from_public_key(issuer).map_err(|e| JwtError::Issuer(e.to_string()))?;
    let signed = &token.trim()[..header.len() + 1 + body.len()];
    key.verify(signed.as_bytes(), &bytes(signature)?)
        .map_err(|_| JwtError::Signature)?;
    serde_json::from_slice(&body_bytes).map_err(|e| JwtError::Json("claims", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Claims {
        iss: String,
        sub: String,
    }

    #[test]
    fn round_trip_and_tamper() {
        let signer = KeyPair::new_account();
        let claims = Claims {
            iss: signer.public_key(),
            sub: "U".into(),
        };
        let token = encode(&claims, &signer).unwrap();
        assert_eq!(decode::<Claims>(&token).unwrap(), claims);
        // Another issuer named in the claims: the signature fails.
        let other = KeyPair::new_account();
        let forged = encode(
            &Claims {
                iss: signer.public_key(),
                sub: "U".into(),
            },
            &other,
        )
        .unwrap();
        assert!(matches!(
            decode::<Claims>(&forged),
            Err(JwtError::Signature)
        ));
        assert!(matches!(decode::<Claims>("a.b"), Err(JwtError::Shape)));
    }
}
