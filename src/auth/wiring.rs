//! `walcast check` for the auth callout: the keys load, walcast's own user
//! reaches the server, and — end to end, when the token key is a shared
//! secret — a test token for the tenant `walcast-check` logs in through a
//! callout answered here and gets a user confined to that tenant. Each
//! failure says what to fix in the server config or in walcast's settings.

use std::time::Duration;

use tokio::sync::mpsc;

use super::callout::Outcome;
use super::settings::TokenKey;
use super::{AuthService, CALLOUT_SUBJECT};
use crate::check::{Line, Status};
use crate::config::Settings;

const TENANT: &str = "walcast-check";
const WAIT: Duration = Duration::from_secs(10);

fn line(status: Status, text: impl Into<String>, fix: Option<&str>) -> Line {
    Line {
        status,
        text: text.into(),
        fix: fix.map(str::to_string),
    }
}

/// The report lines (empty when the callout is not configured).
pub async fn check(settings: &Settings) -> Vec<Line> {
    let Some(auth) = &settings.auth else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    let callout = match super::load(settings) {
        Ok(c) => c,
        Err(e) => {
            lines.push(line(
                Status::Fail,
                format!("auth callout: {e}"),
                Some("point the --auth-* settings at readable key files (issuer: an account seed SA…, xkey: a curve seed SX…)"),
            ));
            return lines;
        }
    };
    lines.push(line(
        Status::Pass,
        format!(
            "auth callout keys load: issuer {} (the server's auth_callout {{ issuer }}){}",
            callout.issuer.public_key(),
            callout
                .xkey
                .as_ref()
                .map(|x| format!(", xkey {} (auth_callout {{ xkey }})", x.public_key()))
                .unwrap_or_default()
        ),
        None,
    ));
    let TokenKey::SecretFile(path) = &auth.token_key else {
        lines.push(line(
            Status::Info,
            "auth callout: no end-to-end login test (walcast cannot sign a test token with a public key); log in with a real token to test",
            None,
        ));
        return lines;
    };
    lines.push(login(settings, path).await);
    lines
}

/// Answers the callout here (beside any running walcast: both answer the
/// same way) and logs a test token in.
async fn login(settings: &Settings, secret_file: &std::path::Path) -> Line {
    let (tx, mut outcomes) = mpsc::channel(16);
    let service = match super::load(settings) {
        Ok(callout) => AuthService {
            callout: std::sync::Arc::new(callout),
            observer: Some(tx),
        },
        Err(e) => return line(Status::Fail, e.to_string(), None),
    };
    let _thread = match crate::service_thread::start(settings, service).await {
        Ok(t) => t,
        Err(e) => {
            return line(
                Status::Fail,
                format!("auth callout cannot subscribe to {CALLOUT_SUBJECT}: {e}"),
                Some(
                    "walcast's NATS user (--nats-url / --nats-creds) must be in the server's auth_callout { auth_users } and in its account",
                ),
            );
        }
    };
    let token = match test_token(secret_file) {
        Ok(t) => t,
        Err(e) => return line(Status::Fail, e, None),
    };
    let connected = tokio::time::timeout(WAIT, connect(settings, &token)).await;
    let seen = outcomes.try_recv().ok();
    match (connected, seen) {
        (Ok(Ok((client, errors))), _) => confined(settings, client, errors).await,
        (_, None) => line(
            Status::Fail,
            "auth callout: the server did not call out for a token login",
            Some(
                "add authorization { auth_callout { issuer, auth_users: [<walcast's user>], account: <walcast's account> } } to the server config (deploy/nats/auth-callout.conf)",
            ),
        ),
        (_, Some(Outcome::Unanswerable(why))) => line(
            Status::Fail,
            format!("auth callout: walcast could not read the server's request: {why}"),
            Some(
                "the server's auth_callout { xkey } must be the public key of --auth-xkey-seed-file (or both absent)",
            ),
        ),
        (_, Some(Outcome::Refused(refusal))) => line(
            Status::Fail,
            format!("auth callout: the test token was refused: {refusal}"),
            Some("check --auth-tenant-claim, --auth-token-audience and --auth-token-issuer"),
        ),
        (_, Some(Outcome::Allowed { .. })) => line(
            Status::Fail,
            "auth callout: walcast issued a user but the server refused it",
            Some(
                "the server's auth_callout { issuer } must be the issuer public key above, and --auth-account must be an account of the server config",
            ),
        ),
    }
}

/// The issued user may not subscribe to every tenant's events: the server
/// answers such a subscription with a permission violation.
async fn confined(
    settings: &Settings,
    client: async_nats::Client,
    mut errors: mpsc::Receiver<String>,
) -> Line {
    let everyone = format!("{}.>", settings.subject_prefix);
    let _ = client.subscribe(everyone.clone()).await;
    let violation = tokio::time::timeout(WAIT, async {
        while let Some(error) = errors.recv().await {
            if error.to_lowercase().contains("permissions violation") && error.contains(&everyone) {
                return true;
            }
        }
        false
    })
    .await;
    if violation == Ok(true) {
        line(
            Status::Pass,
            format!(
                "auth callout: a test token for tenant {TENANT} logs in, confined to it ({everyone} denied)"
            ),
            None,
        )
    } else {
        line(
            Status::Fail,
            format!("auth callout: a test token's user may subscribe to {everyone}"),
            Some(
                "the server did not apply walcast's permissions: is another callout answering? is walcast's issuer the auth_callout issuer?",
            ),
        )
    }
}

fn test_token(secret_file: &std::path::Path) -> Result<String, String> {
    let secret = std::fs::read(secret_file).map_err(|e| e.to_string())?;
    let key = jsonwebtoken::EncodingKey::from_secret(secret.trim_ascii_end())
        .map_err(|e| format!("auth token secret: {e}"))?;
    let exp = super::unix_now() + 60;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"tenant_id": TENANT, "exp": exp, "sub": "walcast-check"}),
        &key,
    )
    .map_err(|e| format!("cannot sign a test token: {e}"))
}

/// A connection like a browser's: the token, no other credentials; with
/// the server's asynchronous errors (permission violations).
async fn connect(
    settings: &Settings,
    token: &str,
) -> Result<(async_nats::Client, mpsc::Receiver<String>), String> {
    let servers = crate::broker::servers::parse(&settings.nats_url)?;
    let (tx, errors) = mpsc::channel(16);
    let mut options = async_nats::ConnectOptions::with_token(token.to_string())
        .custom_inbox_prefix(super::permissions::inbox_prefix(TENANT))
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.try_send(e.to_string());
                }
            }
        });
    if let Some(ca) = &settings.nats_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let client = options
        .connect(servers.addrs)
        .await
        .map_err(|e| e.to_string())?;
    Ok((client, errors))
}
