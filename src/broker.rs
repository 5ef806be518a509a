//! The NATS connection: one place for URL, credentials and reconnect policy.

use std::time::Duration;

use crate::config::Settings;

/// Connects to NATS. The client reconnects by itself (forever, with backoff),
/// and connection changes are logged, so an outage says what walcast waits for.
pub async fn connect(settings: &Settings) -> Result<async_nats::Client, String> {
    let mut options = async_nats::ConnectOptions::new()
        .name("walcast")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS disconnected; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if let Some(creds) = &settings.nats_creds {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| format!("cannot read NATS credentials {}: {e}", creds.display()))?;
    }
    options
        .connect(settings.nats_url.as_str())
        .await
        .map_err(|e| e.to_string())
}
