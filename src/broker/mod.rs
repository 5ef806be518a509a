//! The NATS connection: one place for the server list, credentials, TLS
//! and reconnect policy (see [`servers`] for how `--nats-url` is read).

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Settings;
use crate::error_policy;
use crate::secrets::redact_url;
use crate::telemetry::metrics as m;

pub mod limits;
pub mod ordered;
pub mod range;
pub mod servers;

/// A connected client and a counter that ticks on every (re)connection, so
/// the pipeline can reconcile with the stream each time (SPEC §4.7).
pub struct Connection {
    pub client: async_nats::Client,
    pub connects: watch::Receiver<u64>,
}

/// Where and how to connect: every listed server, with authentication and
/// TLS from the settings. User/password and token auth come from the URLs
/// (`nats://user:pass@host`, `nats://token@host`).
struct Target {
    options: async_nats::ConnectOptions,
    servers: Vec<async_nats::ServerAddr>,
}

/// The wait before reconnect attempt `attempts` (counted from 1): the
/// first at once (a blip), then 100 ms doubling to 4 s, jittered, so the
/// connections of instances cut off together do not return in lockstep
/// (async-nats' default has no jitter).
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let step = u32::try_from(attempts - 2).unwrap_or(u32::MAX);
    error_policy::backoff(step, Duration::from_millis(100), Duration::from_secs(4))
}

async fn target(settings: &Settings, name: &str) -> Result<Target, BrokerError> {
    crate::database::tls::install_crypto_provider();
    let list = servers::parse(&settings.nats_url).map_err(|reason| BrokerError::Refused {
        url: redact_url(&settings.nats_url),
        reason,
        fix: error_policy::FIX_NATS_URL,
    })?;
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        // A silently dead connection is noticed after two unanswered pings
        // (~10 s) instead of the client default's minutes.
        .ping_interval(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .reconnect_delay_callback(reconnect_delay);
    options = match list.auth {
        servers::UrlAuth::None => options,
        servers::UrlAuth::UserPassword { user, password } => {
            options.user_and_password(user, password)
        }
        servers::UrlAuth::Token(token) => options.token(token),
    };
    let setup = BrokerError::Setup;
    if let Some(creds) = &settings.nats_creds {
        options = options.credentials_file(creds).await.map_err(|e| {
            setup(format!(
                "cannot read NATS credentials {}: {e}",
                creds.display()
            ))
        })?;
    }
    if let Some(path) = &settings.nats_nkey {
        let seed = std::fs::read_to_string(path).map_err(|e| {
            setup(format!(
                "cannot read NATS nkey seed {}: {e}",
                path.display()
            ))
        })?;
        crate::secrets::register(seed.trim());
        options = options.nkey(seed.trim().to_string());
    }
    if let Some(ca) = &settings.nats_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&settings.nats_client_cert, &settings.nats_client_key) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(Target {
        options,
        servers: list.addrs,
    })
}

/// Why walcast could not get a NATS connection. Messages name the servers by
/// their redacted URLs and never carry a password, token or seed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Credentials, nkey or TLS files could not be read.
    #[error("{0}")]
    Setup(String),
    /// Nothing answered at the address for the whole startup timeout.
    #[error(
        "NATS unreachable at {url}: {reason} (kept trying for --startup-timeout {waited}); check that nats-server runs and that --nats-url is right"
    )]
    Unreachable {
        url: String,
        reason: String,
        waited: String,
    },
    /// The server answered but refused us, or the URL is unusable: retrying
    /// cannot help.
    #[error("cannot connect to NATS at {url}: {reason}; {fix}")]
    Refused {
        url: String,
        reason: String,
        fix: &'static str,
    },
}

/// One connection attempt to any listed server, for commands (`check`,
/// `tail`) and side connections: a refusal says what to fix, anything else
/// is "unreachable".
pub async fn connect_once(
    settings: &Settings,
    name: &str,
) -> Result<async_nats::Client, BrokerError> {
    connect_once_watched(settings, name, None).await
}

/// [`connect_once`], notifying `on_disconnect` (if given) whenever the
/// connection drops.
pub async fn connect_once_watched(
    settings: &Settings,
    name: &str,
    on_disconnect: Option<std::sync::Arc<tokio::sync::Notify>>,
) -> Result<async_nats::Client, BrokerError> {
    let Target {
        mut options,
        servers,
    } = target(settings, name).await?;
    if let Some(notify) = on_disconnect {
        options = options.event_callback(move |event| {
            let notify = notify.clone();
            async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    notify.notify_one();
                }
            }
        });
    }
    options.connect(servers).await.map_err(|error| {
        let url = redact_url(&settings.nats_url);
        let reason = crate::secrets::scrub(&error.to_string()).into_owned();
        match error_policy::nats_connect_fix(error.kind()) {
            Some(fix) => BrokerError::Refused { url, reason, fix },
            None => BrokerError::Unreachable {
                url,
                reason,
                waited: "one attempt".into(),
            },
        }
    })
}

/// Connects to NATS, waiting at most `--startup-timeout` for any listed
/// server to answer (with capped backoff, one WARN per attempt naming the
/// servers). Once connected the client reconnects by itself (forever, with
/// backoff, to any listed or discovered server), and connection changes are
/// logged, so an outage says what walcast waits for.
pub async fn connect(settings: &Settings) -> Result<Connection, BrokerError> {
    let (connects_tx, connects) = watch::channel(0u64);
    let url = redact_url(&settings.nats_url);
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        let connects_tx = connects_tx.clone();
        let Target { options, servers } = target(settings, "walcast").await?;
        let options = options.event_callback(move |event| {
            let connects_tx = connects_tx.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        metrics::counter!(m::NATS_RECONNECTS).increment(1);
                        tracing::warn!("NATS disconnected; reconnecting");
                    }
                    async_nats::Event::Connected => {
                        connects_tx.send_modify(|n| *n += 1);
                        tracing::info!("NATS connected");
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
        let error = match options.connect(servers).await {
            Ok(client) => return Ok(Connection { client, connects }),
            Err(e) => e,
        };
        let reason = crate::secrets::scrub(&error.to_string()).into_owned();
        if let Some(fix) = error_policy::nats_connect_fix(error.kind()) {
            return Err(BrokerError::Refused { url, reason, fix });
        }
        let waited = started.elapsed();
        if waited >= settings.startup_timeout {
            return Err(BrokerError::Unreachable {
                url,
                reason,
                waited: humantime::format_duration(settings.startup_timeout).to_string(),
            });
        }
        let wait =
            error_policy::backoff(attempt, Duration::from_millis(100), Duration::from_secs(5))
                .min(settings.startup_timeout.saturating_sub(waited));
        attempt = attempt.saturating_add(1);
        tracing::warn!(nats = %url, error = %reason, retry_in = ?wait, "NATS unreachable; waiting for it");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_to_four_seconds_with_jitter() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        let second = reconnect_delay(2);
        assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&second));
        for attempts in 8..100 {
            let d = reconnect_delay(attempts);
            assert!(
                (Duration::from_secs(2)..=Duration::from_secs(4)).contains(&d),
                "{d:?}"
            );
        }
        let waits: std::collections::BTreeSet<_> = (0..20).map(|_| reconnect_delay(10)).collect();
        assert!(waits.len() > 1, "jittered: {waits:?}");
    }
}
