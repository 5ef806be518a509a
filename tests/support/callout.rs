//! A nats-server configured for walcast's auth callout (SPEC §9), with
//! freshly generated keys in files as an operator would mount them, and
//! application tokens signed with the test's shared secret.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nkeys::{KeyPair, XKey};
use serde_json::Value;

use super::TempDir;
use super::nats::{Nats, NatsOptions};

/// The user walcast (pipeline and callout) connects as: in the callout's
/// `auth_users`, so it bypasses the callout.
pub const WALCAST_USER: &str = "walcast";
pub const WALCAST_PASSWORD: &str = "walcast-Pa55-callout";
/// The application's HS256 secret.
pub const SECRET: &str = "app-secret-for-the-callout-tests";

/// Keys in files, and the server config that names them.
pub struct Callout {
    pub issuer: KeyPair,
    pub xkey: Option<XKey>,
    dir: TempDir,
}

impl Callout {
    /// New keys; `encrypted` adds an xkey (the server encrypts requests).
    pub fn new(encrypted: bool) -> Callout {
        let dir = TempDir::new("callout").expect("temp dir");
        let issuer = KeyPair::new_account();
        let xkey = encrypted.then(XKey::new);
        std::fs::write(dir.path().join("issuer.nk"), issuer.seed().unwrap()).unwrap();
        if let Some(x) = &xkey {
            std::fs::write(dir.path().join("xkey.xk"), x.seed().unwrap()).unwrap();
        }
        std::fs::write(dir.path().join("token.secret"), format!("{SECRET}\n")).unwrap();
        Callout { issuer, xkey, dir }
    }

    pub fn issuer_file(&self) -> PathBuf {
        self.dir.path().join("issuer.nk")
    }

    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("token.secret")
    }

    pub fn xkey_file(&self) -> Option<PathBuf> {
        self.xkey.as_ref().map(|_| self.dir.path().join("xkey.xk"))
    }

    /// Account APP (JetStream; walcast's user), the callout for it.
    pub fn server_config(&self) -> String {
        let xkey = match &self.xkey {
            Some(x) => format!("    xkey: \"{}\"\n", x.public_key()),
            None => String::new(),
        };
        format!(
            "accounts {{\n  APP {{\n    jetstream: enabled\n    users: [ {{ user: {WALCAST_USER}, password: \"{WALCAST_PASSWORD}\" }} ]\n  }}\n}}\n\
             authorization {{\n  auth_callout {{\n    issuer: \"{}\"\n    auth_users: [ {WALCAST_USER} ]\n    account: APP\n{xkey}  }}\n}}\n",
            self.issuer.public_key()
        )
    }

    /// A server with this config.
    pub fn start_nats(&self) -> Nats {
        Nats::start_with(NatsOptions {
            extra: self.server_config(),
            ..NatsOptions::default()
        })
        .expect("start nats with the auth callout")
    }

    /// The `WALCAST_AUTH_*` variables for a walcast process.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            (
                "WALCAST_AUTH_ISSUER_SEED_FILE".into(),
                self.issuer_file().display().to_string(),
            ),
            (
                "WALCAST_AUTH_TOKEN_SECRET_FILE".into(),
                self.secret_file().display().to_string(),
            ),
            ("WALCAST_AUTH_ACCOUNT".into(), "APP".into()),
        ];
        if let Some(x) = self.xkey_file() {
            vars.push((
                "WALCAST_AUTH_XKEY_SEED_FILE".into(),
                x.display().to_string(),
            ));
        }
        vars
    }

    /// Sets the auth options of walcast's settings.
    pub fn apply(&self, options: walcast::config::Options) -> walcast::config::Options {
        walcast::config::Options {
            auth_issuer_seed_file: Some(self.issuer_file()),
            auth_token_secret_file: Some(self.secret_file()),
            auth_xkey_seed_file: self.xkey_file(),
            auth_account: Some("APP".into()),
            ..options
        }
    }
}

/// `nats://walcast:…@127.0.0.1:<port>`: walcast's own (auth user) URL.
pub fn walcast_url(nats: &Nats) -> String {
    format!(
        "nats://{WALCAST_USER}:{WALCAST_PASSWORD}@127.0.0.1:{}",
        nats.port()
    )
}

/// walcast's user, connected (for publishing and reading as an operator).
pub async fn admin(nats: &Nats) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(WALCAST_USER.into(), WALCAST_PASSWORD.into())
        .connect(nats.url())
        .await
        .expect("walcast's user connects")
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An application token: `claims` signed HS256 with `secret`.
pub fn token_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A valid token of `tenant` for an hour.
pub fn token(tenant: &str) -> String {
    token_with(
        serde_json::json!({"sub": "user-1", "tenant_id": tenant, "exp": now() + 3600}),
        SECRET,
    )
}

/// A tenant connection and the server errors it was sent (permission
/// violations arrive as asynchronous `-ERR`s).
pub struct TenantConnection {
    pub client: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
}

impl TenantConnection {
    /// Connects with `token` and the tenant's inbox prefix `_INBOX_<tenant>`.
    pub async fn connect(
        url: &str,
        token: &str,
        tenant: &str,
    ) -> Result<TenantConnection, async_nats::ConnectError> {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = errors.clone();
        let client = async_nats::ConnectOptions::with_token(token.to_string())
            .custom_inbox_prefix(format!("_INBOX_{tenant}"))
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(url)
            .await?;
        Ok(TenantConnection { client, errors })
    }

    /// Whether the server reported a permission violation naming `subject`.
    pub fn violated(&self, subject: &str) -> bool {
        self.errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }
}
