//! The NATS connection: one place for URL, credentials, TLS and reconnect policy.

use std::time::{Duration, Instant};

use async_nats::ConnectErrorKind;
use tokio::sync::watch;

use crate::config::{Settings, redact_url};
use crate::telemetry::metrics as m;

/// A connected client and a counter that ticks on every (re)connection, so
/// the pipeline can reconcile with the stream each time (SPEC §4.7).
pub struct Connection {
    pub client: async_nats::Client,
    pub connects: watch::Receiver<u64>,
}

/// Authentication and TLS from the settings. User/password and token auth
/// come from the URL (`nats://user:pass@host`, `nats://token@host`).
pub async fn options(
    settings: &Settings,
    name: &str,
) -> Result<async_nats::ConnectOptions, String> {
    crate::database::tls::install_crypto_provider();
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        // A silently dead connection is noticed after two unanswered pings
        // (~10 s) instead of the client default's minutes.
        .ping_interval(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)));
    if let Some(creds) = &settings.nats_creds {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| format!("cannot read NATS credentials {}: {e}", creds.display()))?;
    }
    if let Some(path) = &settings.nats_nkey {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read NATS nkey seed {}: {e}", path.display()))?;
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
    Ok(options)
}

/// Why walcast could not get a NATS connection. Messages name the server by
/// its redacted URL and never carry a password, token or seed.
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

/// Connects to NATS, waiting at most `--startup-timeout` for the server to
/// answer (with capped backoff, one WARN per attempt naming the server).
/// Once connected the client reconnects by itself (forever, with backoff),
/// and connection changes are logged, so an outage says what walcast waits for.
pub async fn connect(settings: &Settings) -> Result<Connection, BrokerError> {
    let (connects_tx, connects) = watch::channel(0u64);
    let url = redact_url(&settings.nats_url);
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        let connects_tx = connects_tx.clone();
        let options = options(settings, "walcast")
            .await
            .map_err(BrokerError::Setup)?
            .event_callback(move |event| {
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
        let error = match options.connect(settings.nats_url.as_str()).await {
            Ok(client) => return Ok(Connection { client, connects }),
            Err(e) => e,
        };
        let reason = scrub(&error.to_string(), &settings.nats_url);
        if let Some(fix) = definite(error.kind()) {
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
        let wait = backoff(attempt).min(settings.startup_timeout.saturating_sub(waited));
        attempt = attempt.saturating_add(1);
        tracing::warn!(nats = %url, error = %reason, retry_in = ?wait, "NATS unreachable; waiting for it");
        tokio::time::sleep(wait).await;
    }
}

/// Capped exponential backoff with jitter for the first connection.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(6));
    base.min(Duration::from_secs(5))
        .mul_f64(rand::random_range(0.5..1.0))
}

/// The fix for a connection failure that retrying cannot cure, or `None` if
/// the server may still come up (refused, timed out, DNS not ready yet).
fn definite(kind: ConnectErrorKind) -> Option<&'static str> {
    match kind {
        ConnectErrorKind::ServerParse => Some("fix --nats-url (nats://HOST:PORT, tls://HOST:PORT)"),
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => Some(
            "check the NATS credentials (--nats-creds, --nats-nkey, or user:password / token in --nats-url)",
        ),
        ConnectErrorKind::Tls => Some(
            "check the server's TLS setup and --nats-ca / --nats-client-cert / --nats-client-key",
        ),
        ConnectErrorKind::Dns
        | ConnectErrorKind::TimedOut
        | ConnectErrorKind::Io
        | ConnectErrorKind::MaxReconnects => None,
    }
}

/// Removes the URL's password or token from an error text, in case the
/// client quotes it.
fn scrub(text: &str, raw_url: &str) -> String {
    let Some((_, rest)) = raw_url.split_once("://") else {
        return text.to_string();
    };
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return text.to_string();
    };
    let secret = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
    if secret.is_empty() {
        return text.to_string();
    }
    text.replace(secret, "***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_passwords_and_tokens() {
        assert_eq!(
            scrub("bad s3cret here", "nats://ann:s3cret@host:4222"),
            "bad *** here"
        );
        assert_eq!(scrub("tok3n!", "nats://tok3n@host"), "***!");
        assert_eq!(scrub("plain", "nats://host:4222"), "plain");
    }

    #[test]
    fn only_unreachable_servers_are_waited_for() {
        assert!(definite(ConnectErrorKind::Io).is_none());
        assert!(definite(ConnectErrorKind::TimedOut).is_none());
        assert!(definite(ConnectErrorKind::ServerParse).is_some());
        assert!(definite(ConnectErrorKind::AuthorizationViolation).is_some());
    }

    #[test]
    fn backoff_is_capped() {
        assert!(backoff(0) <= Duration::from_millis(100));
        assert!(backoff(40) <= Duration::from_secs(5));
    }
}
