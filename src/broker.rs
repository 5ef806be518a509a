//! The NATS connection: one place for URL, credentials, TLS and reconnect policy.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::Settings;
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

/// Connects to NATS. The client reconnects by itself (forever, with backoff),
/// and connection changes are logged, so an outage says what walcast waits for.
pub async fn connect(settings: &Settings) -> Result<Connection, String> {
    let (connects_tx, connects) = watch::channel(0u64);
    let options = options(settings, "walcast")
        .await?
        .retry_on_initial_connect()
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
    let client = options
        .connect(settings.nats_url.as_str())
        .await
        .map_err(|e| e.to_string())?;
    Ok(Connection { client, connects })
}
