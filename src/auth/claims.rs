//! The three NATS JWTs of an auth callout (ADR-26; nats-io/jwt v2 field
//! names): the server's authorization request, walcast's authorization
//! response, and the user JWT inside it.

use serde::{Deserialize, Serialize};

use super::permissions::Permissions;

/// The audience of every authorization request.
pub const REQUEST_AUDIENCE: &str = "nats-authorization-request";

/// The server's request (only the fields walcast reads).
#[derive(Debug, Deserialize)]
pub struct AuthorizationRequest {
    #[serde(default)]
    pub aud: String,
    pub nats: RequestBody,
}

#[derive(Debug, Deserialize)]
pub struct RequestBody {
    pub server_id: ServerId,
    /// The nkey the issued user must have (the response's and the user
    /// JWT's `sub`): the server made it for this connection, so a response
    /// cannot be replayed for another one.
    pub user_nkey: String,
    #[serde(default)]
    pub connect_opts: ConnectOpts,
    #[serde(default)]
    pub client_info: ClientInfo,
}

#[derive(Debug, Deserialize)]
pub struct ServerId {
    /// The response's `aud`.
    pub id: String,
}

/// What the client sent in CONNECT (only what walcast reads).
#[derive(Debug, Default, Deserialize)]
pub struct ConnectOpts {
    /// The `token` / `auth_token` connect option: the application's JWT.
    #[serde(default)]
    pub auth_token: Option<String>,
}

/// For log lines: where the client connects from.
#[derive(Debug, Default, Deserialize)]
pub struct ClientInfo {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// walcast's answer: a user JWT or an error, for one server and user nkey.
#[derive(Debug, Serialize)]
pub struct AuthorizationResponse {
    pub jti: String,
    pub iat: i64,
    /// The issuer's public key.
    pub iss: String,
    /// The request's `user_nkey`.
    pub sub: String,
    /// The request's server id.
    pub aud: String,
    pub nats: ResponseBody,
}

#[derive(Debug, Serialize)]
pub struct ResponseBody {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwt: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub version: u8,
}

/// The issued user.
#[derive(Debug, Serialize)]
pub struct UserClaims {
    pub jti: String,
    pub iat: i64,
    /// Never later than the application token's `exp`.
    pub exp: i64,
    pub iss: String,
    /// Shown by the server as the connection's user name.
    pub name: String,
    /// The request's `user_nkey`.
    pub sub: String,
    /// The account the user joins (non-operator mode: its name).
    pub aud: String,
    pub nats: UserBody,
}

#[derive(Debug, Serialize)]
pub struct UserBody {
    #[serde(rename = "pub")]
    pub publish: Permissions,
    #[serde(rename = "sub")]
    pub subscribe: Permissions,
    /// -1: no limit of its own (the account's limits apply), as nats-io/jwt
    /// `NewUserClaims` sets them.
    pub subs: i64,
    pub data: i64,
    pub payload: i64,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub version: u8,
}
