//! Tenant isolation at the broker (SPEC §9): walcast as the NATS server's
//! auth callout. A client presents the application's login token as its
//! NATS connection token; the server asks walcast (`$SYS.REQ.USER.AUTH`);
//! walcast verifies the token (`token`) and answers with a user JWT whose
//! permissions reach one tenant only (`permissions`), signed with the
//! issuer nkey (`nats_jwt`, `callout`).
//!
//! Invariant owned here: walcast never issues a user for a token it could
//! not verify, and an issued user can read exactly one tenant's events,
//! catch-up answers and state keys — until the token's `exp` at the latest.
//! A refusal is logged with its reason and the client's address, never the
//! token.
//!
//! The service runs on its own thread and connection (`service_thread`),
//! as `walcast auth` or beside the pipeline in `walcast run`, where
//! [`supervise`] restarts it with backoff if it stops: logins depend on it,
//! the pipeline does not.

mod callout;
mod claims;
mod nats_jwt;
pub mod permissions;
mod settings;
mod token;
pub mod wiring;

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use nkeys::{KeyPair, XKey};
use tokio::sync::watch;

pub use settings::{AuthOptions, AuthSettings, TokenKey};

use crate::config::Settings;
use crate::service_thread::{self, Ready, RestartBackoff, Service, ServiceError, ServiceThread};
use crate::telemetry::metrics as m;
use callout::{Callout, Outcome};
use permissions::Scope;

/// The subject nats-server sends authorization requests on.
pub const CALLOUT_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// Instances of walcast share requests (each is answered once).
const QUEUE_GROUP: &str = "walcast-auth";

/// Why the callout cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the auth callout is not configured: set --auth-issuer-seed-file, --auth-account and --auth-token-secret-file or --auth-token-public-key-file"
    )]
    NotConfigured,
    #[error("cannot read {what} {path}: {reason}")]
    Seed {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("auth token key: {0}")]
    TokenKey(#[from] token::KeyError),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// The issuer's public key (for `walcast check` and logs).
pub fn issuer_public_key(settings: &AuthSettings) -> Result<String, AuthError> {
    Ok(read_issuer(settings)?.public_key())
}

/// Reads every key file: a broken one fails here, before anything connects.
fn load(settings: &Settings) -> Result<Callout, AuthError> {
    let auth = settings.auth.as_ref().ok_or(AuthError::NotConfigured)?;
    let xkey = match &auth.xkey_seed_file {
        None => None,
        Some(path) => {
            let seed = read_seed("auth_xkey_seed_file", path)?;
            Some(XKey::from_seed(&seed).map_err(|e| seed_error("auth_xkey_seed_file", path, e))?)
        }
    };
    Ok(Callout {
        issuer: read_issuer(auth)?,
        xkey,
        verifier: token::Verifier::load(auth)?,
        account: auth.account.clone(),
        scope: Scope {
            prefix: settings.subject_prefix.clone(),
            stream: settings.stream.clone(),
            state_bucket: settings.state_bucket.clone(),
        },
    })
}

fn read_issuer(auth: &AuthSettings) -> Result<KeyPair, AuthError> {
    let what = "auth_issuer_seed_file";
    let path = &auth.issuer_seed_file;
    let seed = read_seed(what, path)?;
    let key = KeyPair::from_seed(&seed).map_err(|e| seed_error(what, path, e))?;
    if key.key_pair_type() != nkeys::KeyPairType::Account {
        return Err(AuthError::Seed {
            what,
            path: path.display().to_string(),
            reason: "not an account seed (SA…): the issuer of auth_callout is an account nkey"
                .into(),
        });
    }
    Ok(key)
}

/// A seed file's first non-empty line, registered as a secret.
fn read_seed(what: &'static str, path: &std::path::Path) -> Result<String, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|e| seed_error(what, path, e))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('S'))
        .unwrap_or("")
        .to_string();
    crate::secrets::register(&seed);
    Ok(seed)
}

fn seed_error(what: &'static str, path: &std::path::Path, e: impl std::fmt::Display) -> AuthError {
    AuthError::Seed {
        what,
        path: path.display().to_string(),
        reason: crate::secrets::scrub(&e.to_string()).into_owned(),
    }
}

/// Starts the callout on its own thread and connection; it answers until
/// the returned thread is dropped.
pub async fn start(settings: &Settings) -> Result<ServiceThread, AuthError> {
    let callout = Arc::new(load(settings)?);
    let (issuer, account, encrypted) = (
        callout.issuer.public_key(),
        callout.account.clone(),
        callout.xkey.is_some(),
    );
    let service = AuthService {
        callout,
        observer: None,
    };
    let thread = service_thread::start(settings, service).await?;
    // Only now: the subscription is live at the server (a login attempted
    // on seeing this line used to race it and be refused).
    tracing::info!(
        %issuer,
        %account,
        encrypted,
        "auth callout answering {CALLOUT_SUBJECT}"
    );
    Ok(thread)
}

/// Checks the key files now (for `walcast run` before it connects).
pub fn validate(settings: &Settings) -> Result<(), AuthError> {
    load(settings).map(drop)
}

/// `walcast auth`: the callout alone, with `/metrics` on `--http-addr`,
/// until `shutdown`. A first start that fails is an error (exit non-zero,
/// saying why); later failures are restarted like in `walcast run`.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    validate(&settings)?;
    crate::telemetry::metrics::install();
    let first = start(&settings).await?;
    let http_client = crate::broker::connect_once(&settings, "walcast-auth-http").await?;
    let health = Arc::new(crate::telemetry::health::Health::default());
    let http = crate::telemetry::http::serve(&settings.http_addr, health)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot serve metrics on --http-addr {}: {e}",
                settings.http_addr
            )
        })?;
    http.connected(http_client);
    let (stop_tx, stop_rx) = watch::channel(false);
    let supervisor = tokio::spawn(supervise(settings, Some(first), stop_rx));
    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = supervisor.await;
    tracing::info!("auth callout stopped");
    Ok(())
}

/// Runs the callout until `stop` (starting with `first` if given),
/// restarting it with backoff whenever it stops or cannot start (each time
/// logged as an error and counted in `walcast_errors_total{stage="auth"}`),
/// so that an outage of the callout is loud but never stops the pipeline.
pub async fn supervise(
    settings: Settings,
    mut first: Option<ServiceThread>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = RestartBackoff::default();
    loop {
        backoff.starting();
        let started = match first.take() {
            Some(thread) => Ok(thread),
            None => start(&settings).await,
        };
        let error = match started {
            Ok(mut thread) => {
                tokio::select! {
                    e = thread.failed() => e.to_string(),
                    _ = stop.changed() => return,
                }
            }
            Err(e) => e.to_string(),
        };
        metrics::counter!(m::ERRORS, "stage" => "auth").increment(1);
        let wait = backoff.stopped();
        tracing::error!(error = %error, retry_in = ?wait, "auth callout down: new NATS logins fail until it is back");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The callout as it runs on its thread.
struct AuthService {
    callout: Arc<Callout>,
    /// Told every outcome (for `walcast check`); full: not told.
    observer: Option<tokio::sync::mpsc::Sender<Outcome>>,
}

impl Service for AuthService {
    const NAME: &'static str = "auth";

    async fn serve(self, client: async_nats::Client, ready: Ready) -> Result<(), String> {
        let mut requests = client
            .queue_subscribe(CALLOUT_SUBJECT, QUEUE_GROUP.into())
            .await
            .map_err(|e| format!("subscribe to {CALLOUT_SUBJECT}: {e}"))?;
        // The subscription is live once the server has seen it.
        client
            .flush()
            .await
            .map_err(|e| format!("subscribe to {CALLOUT_SUBJECT}: {e}"))?;
        ready.serving();
        while let Some(request) = requests.next().await {
            let began = Instant::now();
            let xkey = request
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Server-Xkey"))
                .map(|v| v.as_str().to_string());
            let answer = self
                .callout
                .answer(&request.payload, xkey.as_deref(), unix_now());
            record(&answer.outcome, &answer.client, began);
            if let Some(observer) = &self.observer {
                let _ = observer.try_send(answer.outcome);
            }
            if let (Some(reply), Some(response)) = (request.reply, answer.response)
                && let Err(e) = client.publish(reply, response.into()).await
            {
                tracing::warn!(error = %e, "auth callout answer not sent");
            }
        }
        Err(format!("the {CALLOUT_SUBJECT} subscription ended"))
    }
}

/// Logs and counts one answer. Never the token: outcomes carry reasons only.
fn record(outcome: &Outcome, client: &str, began: Instant) {
    metrics::histogram!(m::AUTH_SECONDS).record(began.elapsed().as_secs_f64());
    match outcome {
        Outcome::Allowed { tenant } => {
            metrics::counter!(m::AUTH_ALLOWED).increment(1);
            tracing::info!(%tenant, client, "auth callout: login allowed");
        }
        Outcome::Refused(refusal) => {
            metrics::counter!(m::AUTH_REFUSED, "reason" => refusal.reason()).increment(1);
            tracing::warn!(reason = refusal.reason(), why = %refusal, client, "auth callout: login refused");
        }
        Outcome::Unanswerable(why) => {
            metrics::counter!(m::AUTH_REFUSED, "reason" => "unanswerable").increment(1);
            tracing::error!(why = %crate::secrets::scrub(why), "auth callout: request not answered");
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
