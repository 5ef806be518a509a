//! Logging: human-readable by default, JSON with `--log-format json`,
//! filtered by `RUST_LOG` (default `warn,walcast=info`); Prometheus metrics
//! and the health endpoints.

pub mod http;
pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; call once, at start.
pub fn init_logging(json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,walcast=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
