//! Logging: human-readable by default, JSON with `--log-format json`,
//! filtered by `RUST_LOG` (default `warn,walcast=info`); Prometheus metrics
//! and the health endpoints.

pub mod health;
pub mod http;
pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; call once, at start.
pub fn init_logging(json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,walcast=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Every line scrubbed of registered secrets, dependencies' logs too.
        .with_writer(|| crate::secrets::ScrubbingStderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// An error with its causes as one line, `a: b: c`, each cause once (a
/// cause its error already quotes is not repeated; tokio-postgres hides TLS
/// causes otherwise), with every registered secret scrubbed.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    crate::secrets::scrub(&one_line(&text)).into_owned()
}

/// An error's text on one line: Postgres adds its DETAIL and HINT on lines
/// of their own, and an operator's log or terminal shows one error a line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
