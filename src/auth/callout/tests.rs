//! The callout's answers, against requests built as nats-server builds them.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nkeys::{KeyPair, XKey};
use serde_json::{Value, json};

use super::*;
use crate::auth::settings::{AuthSettings, TokenKey};

const SECRET: &str = "callout-test-secret";
const NOW: i64 = 1_900_000_000;

struct Server {
    key: KeyPair,
    user_nkey: String,
}

impl Server {
    fn new() -> Server {
        Server {
            key: KeyPair::new_server(),
            user_nkey: KeyPair::new_user().public_key(),
        }
    }

    fn request(&self, token: Option<&str>) -> Vec<u8> {
        let claims = json!({
            "jti": "x", "iat": NOW, "iss": self.key.public_key(), "sub": "ISSUER",
            "aud": "nats-authorization-request",
            "nats": {
                "server_id": {"name": "n", "host": "h", "id": "NSERVERID", "version": "2.12.0"},
                "user_nkey": self.user_nkey,
                "client_info": {"host": "127.0.0.1", "id": 5, "name": "browser"},
                "connect_opts": {"auth_token": token, "lang": "rust", "version": "1", "protocol": 1},
                "type": "authorization_request", "version": 2
            }
        });
        nats_jwt::encode(&claims, &self.key).unwrap().into_bytes()
    }
}

fn callout(xkey: Option<XKey>) -> (Callout, tempfile_path::Guard) {
    let guard = tempfile_path::Guard::with(SECRET);
    let settings = AuthSettings {
        issuer_seed_file: "/unused".into(),
        xkey_seed_file: None,
        token_key: TokenKey::SecretFile(guard.0.clone()),
        tenant_claim: "tenant_id".into(),
        account: "APP".into(),
        token_audience: None,
        token_issuer: None,
    };
    let callout = Callout {
        issuer: KeyPair::new_account(),
        xkey,
        verifier: Verifier::load(&settings).unwrap(),
        account: "APP".into(),
        scope: Scope {
            prefix: "walcast".into(),
            stream: "WALCAST".into(),
            state_bucket: Some("WALCAST_STATE".into()),
        },
    };
    (callout, guard)
}

/// A file holding `text`, removed on drop (no tempfile crate needed here).
mod tempfile_path {
    pub struct Guard(pub std::path::PathBuf);
    impl Guard {
        pub fn with(text: &str) -> Guard {
            let path = std::env::temp_dir().join(format!(
                "walcast-callout-test-{}-{:x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::write(&path, text).unwrap();
            Guard(path)
        }
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn app_token(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn far_future() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 3600
}

fn decode_response(bytes: &[u8]) -> Value {
    nats_jwt::decode(std::str::from_utf8(bytes).unwrap()).unwrap()
}

#[test]
fn a_valid_token_gets_a_tenant_user_for_this_server_and_nkey() {
    let (callout, _g) = callout(None);
    let server = Server::new();
    let exp = far_future();
    let token = app_token(json!({"tenant_id": "acme", "exp": exp}));
    let answer = callout.answer(&server.request(Some(&token)), None, NOW);
    assert_eq!(
        answer.outcome,
        Outcome::Allowed {
            tenant: "acme".into()
        }
    );
    let bytes = answer.response.unwrap();
    // The token itself is never in the answer.
    assert!(!String::from_utf8_lossy(&bytes).contains(&token));
    let response = decode_response(&bytes);
    assert_eq!(response["iss"], callout.issuer.public_key());
    assert_eq!(response["sub"], server.user_nkey);
    assert_eq!(response["aud"], "NSERVERID");
    assert!(response["nats"].get("error").is_none());
    let user: Value = nats_jwt::decode(response["nats"]["jwt"].as_str().unwrap()).unwrap();
    assert_eq!(user["sub"], server.user_nkey);
    assert_eq!(user["aud"], "APP");
    assert_eq!(user["exp"], exp);
    assert_eq!(user["nats"]["type"], "user");
    assert_eq!(
        user["nats"]["sub"]["allow"],
        json!(["walcast.acme.>", "_INBOX_acme.>"])
    );
    let publish = user["nats"]["pub"]["allow"].as_array().unwrap();
    assert!(publish.contains(&json!("walcast-api.v1.catchup.acme")));
}

#[test]
fn a_bad_token_gets_a_signed_refusal_without_a_user() {
    let (callout, _g) = callout(None);
    let server = Server::new();
    let expired = app_token(json!({"tenant_id": "acme", "exp": 1000}));
    let answer = callout.answer(&server.request(Some(&expired)), None, NOW);
    assert_eq!(answer.outcome, Outcome::Refused(Refusal::Expired));
    let response = decode_response(&answer.response.unwrap());
    assert_eq!(response["sub"], server.user_nkey);
    assert!(response["nats"].get("jwt").is_none());
    let error = response["nats"]["error"].as_str().unwrap();
    assert!(
        error.contains("expired") && !error.contains(&expired),
        "{error}"
    );
}

#[test]
fn an_encrypted_request_gets_an_encrypted_answer() {
    let ours = XKey::new();
    let ours_public = XKey::from_public_key(&ours.public_key()).unwrap();
    let (callout, _g) = callout(Some(ours));
    let server = Server::new();
    let server_xkey = XKey::new();
    let token = app_token(json!({"tenant_id": "acme", "exp": far_future()}));
    let sealed = server_xkey
        .seal(&server.request(Some(&token)), &ours_public)
        .unwrap();
    let answer = callout.answer(&sealed, Some(&server_xkey.public_key()), NOW);
    assert!(matches!(answer.outcome, Outcome::Allowed { .. }));
    let response = answer.response.unwrap();
    assert!(!response.starts_with(b"eyJ"), "the answer is not encrypted");
    let ours_again = XKey::from_public_key(&callout.xkey.as_ref().unwrap().public_key()).unwrap();
    let plain = server_xkey.open(&response, &ours_again).unwrap();
    assert_eq!(decode_response(&plain)["sub"], server.user_nkey);
    // Unencrypted request while an xkey is configured: no answer.
    let plain_request = callout.answer(&server.request(Some(&token)), None, NOW);
    assert!(matches!(plain_request.outcome, Outcome::Unanswerable(_)));
}

#[test]
fn a_forged_request_is_not_answered() {
    let (callout, _g) = callout(None);
    let server = Server::new();
    let mut request = server.request(None);
    let last = request.len() - 3;
    request[last] = if request[last] == b'A' { b'B' } else { b'A' };
    let answer = callout.answer(&request, None, NOW);
    assert!(
        matches!(answer.outcome, Outcome::Unanswerable(_)),
        "{:?}",
        answer.outcome
    );
    assert!(answer.response.is_none());
    let garbage = callout.answer(b"\xff\x00garbage", None, NOW);
    assert!(matches!(garbage.outcome, Outcome::Unanswerable(_)));
}
