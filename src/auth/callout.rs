//! One authorization request in, one signed response out: decrypt (xkey),
//! check the server's request, verify the application's token, and answer
//! with a tenant user or a refusal. Pure (no I/O), so every branch is
//! tested without a server.
//!
//! Invariant: an answer with a user JWT is produced only for a verified
//! token (see `token`), for the request's own `user_nkey` and server, and
//! the user expires no later than the token and carries exactly
//! `permissions::for_tenant` of the token's tenant.

use nkeys::{KeyPair, XKey};

use super::claims::{
    AuthorizationRequest, AuthorizationResponse, REQUEST_AUDIENCE, ResponseBody, UserBody,
    UserClaims,
};
use super::nats_jwt::{self, new_jti};
use super::permissions::{self, Scope};
use super::token::{Refusal, Verifier};

/// What became of a request, for the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allowed {
        tenant: String,
    },
    Refused(Refusal),
    /// No answer can be sent (not a request from a server we can read);
    /// the server times the login out.
    Unanswerable(String),
}

/// The answer to send (if any) and what happened. `client` describes the
/// connecting client for the log (host, name; never its token).
pub struct Answer {
    pub response: Option<Vec<u8>>,
    pub outcome: Outcome,
    pub client: String,
}

/// Everything needed to answer: keys, the token verifier, the account and
/// the names the permissions are built from.
pub struct Callout {
    pub issuer: KeyPair,
    pub xkey: Option<XKey>,
    pub verifier: Verifier,
    pub account: String,
    pub scope: Scope,
}

impl Callout {
    /// Answers one request (`payload` as received; `server_xkey` from the
    /// `Nats-Server-Xkey` header); `now` in Unix seconds.
    pub fn answer(&self, payload: &[u8], server_xkey: Option<&str>, now: i64) -> Answer {
        let unanswerable = |why: String| Answer {
            response: None,
            outcome: Outcome::Unanswerable(why),
            client: String::new(),
        };
        let (plain, server) = match self.open(payload, server_xkey) {
            Ok(opened) => opened,
            Err(why) => return unanswerable(why),
        };
        let request = match std::str::from_utf8(&plain)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|t| nats_jwt::decode::<AuthorizationRequest>(t).map_err(|e| e.to_string()))
        {
            Ok(r) if r.aud == REQUEST_AUDIENCE => r,
            Ok(r) => return unanswerable(format!("request audience {:?}", r.aud)),
            Err(why) => return unanswerable(format!("unreadable authorization request: {why}")),
        };
        let body = &request.nats;
        let client = format!(
            "{} {}",
            body.client_info.host.as_deref().unwrap_or("?"),
            body.client_info.name.as_deref().unwrap_or("")
        );
        let verified = self
            .verifier
            .verify(body.connect_opts.auth_token.as_deref());
        let (jwt, error, outcome) = match verified {
            Ok(v) => match self.user_jwt(&body.user_nkey, &v.tenant, v.expires, now) {
                Ok(jwt) => (jwt, String::new(), Outcome::Allowed { tenant: v.tenant }),
                Err(why) => return unanswerable(why),
            },
            Err(refusal) => (
                String::new(),
                format!("walcast: {refusal}"),
                Outcome::Refused(refusal),
            ),
        };
        let response = AuthorizationResponse {
            jti: new_jti(),
            iat: now,
            iss: self.issuer.public_key(),
            sub: body.user_nkey.clone(),
            aud: body.server_id.id.clone(),
            nats: ResponseBody {
                jwt,
                error,
                kind: "authorization_response",
                version: 2,
            },
        };
        let signed = match nats_jwt::encode(&response, &self.issuer) {
            Ok(s) => s.into_bytes(),
            Err(e) => return unanswerable(e.to_string()),
        };
        let response = match (&self.xkey, server) {
            (Some(ours), Some(server)) => match ours.seal(&signed, &server) {
                Ok(sealed) => sealed,
                Err(e) => return unanswerable(format!("cannot encrypt the response: {e}")),
            },
            _ => signed,
        };
        Answer {
            response: Some(response),
            outcome,
            client,
        }
    }

    /// The request in plain text, and the server's xkey if it encrypted it.
    fn open(
        &self,
        payload: &[u8],
        server_xkey: Option<&str>,
    ) -> Result<(Vec<u8>, Option<XKey>), String> {
        match (&self.xkey, server_xkey) {
            (None, None) => Ok((payload.to_vec(), None)),
            (Some(ours), Some(theirs)) => {
                let server = XKey::from_public_key(theirs)
                    .map_err(|e| format!("Nats-Server-Xkey is not an xkey: {e}"))?;
                let plain = ours.open(payload, &server).map_err(|e| {
                    format!("cannot decrypt the request (is auth_callout {{ xkey }} the public key of --auth-xkey-seed-file?): {e}")
                })?;
                Ok((plain, Some(server)))
            }
            (None, Some(_)) => Err(
                "the server encrypts the callout (auth_callout { xkey }): set --auth-xkey-seed-file to the matching seed".into(),
            ),
            (Some(_), None) => Err(
                "--auth-xkey-seed-file is set but the server does not encrypt: add its public key as auth_callout { xkey } in the server config".into(),
            ),
        }
    }

    fn user_jwt(
        &self,
        user_nkey: &str,
        tenant: &str,
        expires: i64,
        now: i64,
    ) -> Result<String, String> {
        let (publish, subscribe) = permissions::for_tenant(&self.scope, tenant);
        let user = UserClaims {
            jti: new_jti(),
            iat: now,
            exp: expires,
            iss: self.issuer.public_key(),
            name: format!("tenant:{tenant}"),
            sub: user_nkey.to_string(),
            aud: self.account.clone(),
            nats: UserBody {
                publish,
                subscribe,
                subs: -1,
                data: -1,
                payload: -1,
                kind: "user",
                version: 2,
            },
        };
        nats_jwt::encode(&user, &self.issuer).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
