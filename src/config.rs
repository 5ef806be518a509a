//! Settings: flags > `WALCAST_*` environment > TOML file (`--config`) > defaults.
//!
//! One [`Options`] struct is parsed three ways (clap flags with env fallback,
//! and serde from TOML, which rejects unknown keys by name), merged field by
//! field, then resolved into [`Settings`] with every default applied and every
//! value validated before anything connects.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::events::Tables;

/// Everything `walcast run` can be told. Every field is optional here; the
/// defaults live in [`Options::resolve`] and in each `--help` line.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Postgres libpq URL, e.g. postgres://walcast:secret@db:5432/app (required)
    #[arg(long, env = "WALCAST_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Read the database URL from this file instead (for mounted secrets)
    #[arg(long, env = "WALCAST_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// NATS server URL(s), comma-separated [default: nats://127.0.0.1:4222]
    #[arg(long, env = "WALCAST_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,
    /// NATS credentials file (.creds) for JWT/nkey auth
    #[arg(long, env = "WALCAST_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// NATS nkey seed file (for nkey authentication)
    #[arg(long, env = "WALCAST_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server's TLS certificate; also
    /// makes TLS required (tls:// URLs require it too)
    #[arg(long, env = "WALCAST_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS; needs --nats-client-key
    #[arg(long, env = "WALCAST_NATS_CLIENT_CERT")]
    pub nats_client_cert: Option<PathBuf>,
    /// Client private key (PEM) for NATS mutual TLS
    #[arg(long, env = "WALCAST_NATS_CLIENT_KEY")]
    pub nats_client_key: Option<PathBuf>,
    /// Logical replication slot (pgoutput) [default: walcast]
    #[arg(long, env = "WALCAST_SLOT")]
    pub slot: Option<String>,
    /// Publication covering the source tables [default: walcast]
    #[arg(long, env = "WALCAST_PUBLICATION")]
    pub publication: Option<String>,
    /// JetStream stream name [default: WALCAST]
    #[arg(long, env = "WALCAST_STREAM")]
    pub stream: Option<String>,
    /// Subject prefix: <prefix>.<tenant>.<entity>.<action> [default: walcast]
    #[arg(long, env = "WALCAST_SUBJECT_PREFIX")]
    pub subject_prefix: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints [default: 127.0.0.1:9187]
    #[arg(long, env = "WALCAST_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// How long the slot's confirmed LSN trails the newest acknowledged event, so
    /// events a broker loses before fsync can be replayed; 0 if NATS runs
    /// sync_interval: always [default: 2m]
    #[arg(long, env = "WALCAST_CONFIRM_DELAY")]
    pub confirm_delay: Option<String>,
    /// Schema of the source tables [default: public]
    #[arg(long, env = "WALCAST_SCHEMA")]
    pub schema: Option<String>,
    /// Tasks table [default: tasks]
    #[arg(long, env = "WALCAST_TASKS_TABLE")]
    pub tasks_table: Option<String>,
    /// Projects table [default: projects]
    #[arg(long, env = "WALCAST_PROJECTS_TABLE")]
    pub projects_table: Option<String>,
    /// Editing locks table [default: editing_locks]
    #[arg(long, env = "WALCAST_LOCKS_TABLE")]
    pub locks_table: Option<String>,
    /// Stream replicas (1, 3 or 5 on a cluster) [default: 1]
    #[arg(long, env = "WALCAST_STREAM_REPLICAS")]
    pub stream_replicas: Option<usize>,
    /// Stream max age, e.g. 7d; 0 keeps messages forever [default: 7d]
    #[arg(long, env = "WALCAST_STREAM_MAX_AGE")]
    pub stream_max_age: Option<String>,
    /// Stream max bytes; -1 is unlimited [default: -1]
    #[arg(long, env = "WALCAST_STREAM_MAX_BYTES", allow_hyphen_values = true)]
    pub stream_max_bytes: Option<i64>,
    /// Stream duplicate window for Nats-Msg-Id [default: 2m]
    #[arg(long, env = "WALCAST_DUPLICATE_WINDOW")]
    pub duplicate_window: Option<String>,
    /// Events published and not yet acknowledged by JetStream, at most [default: 4096]
    #[arg(long, env = "WALCAST_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// How long to keep retrying before walcast has replicated once (Postgres
    /// or NATS not up yet); then exit non-zero with the last error [default: 30s]
    #[arg(long, env = "WALCAST_STARTUP_TIMEOUT")]
    pub startup_timeout: Option<String>,
    /// Build events but publish nothing and never confirm the slot (for
    /// checking what would be published and measuring decoding) [default: false]
    #[arg(long, env = "WALCAST_DRY_RUN")]
    pub dry_run: Option<bool>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "WALCAST_LOG_FORMAT")]
    pub log_format: Option<String>,
}

macro_rules! merge_fields {
    ($high:ident, $low:ident, $($f:ident),* $(,)?) => {
        Options { $($f: $high.$f.or($low.$f)),* }
    };
}

/// Fully resolved settings, defaults applied and validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub nats_url: String,
    pub nats_creds: Option<PathBuf>,
    pub nats_nkey: Option<PathBuf>,
    pub nats_ca: Option<PathBuf>,
    pub nats_client_cert: Option<PathBuf>,
    pub nats_client_key: Option<PathBuf>,
    pub slot: String,
    pub publication: String,
    pub stream: String,
    pub subject_prefix: String,
    pub http_addr: String,
    pub confirm_delay: Duration,
    pub tables: Tables,
    pub stream_replicas: usize,
    pub stream_max_age: Duration,
    pub stream_max_bytes: i64,
    pub duplicate_window: Duration,
    pub max_in_flight: usize,
    pub startup_timeout: Duration,
    pub dry_run: bool,
    pub log_json: bool,
}

/// A setting that cannot be used; the message names it and says what is expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Options {
    /// `self` wins over `lower` field by field.
    pub fn merge(self, lower: Options) -> Options {
        let high = self;
        merge_fields!(
            high,
            lower,
            database_url,
            database_url_file,
            nats_url,
            nats_creds,
            nats_nkey,
            nats_ca,
            nats_client_cert,
            nats_client_key,
            slot,
            publication,
            stream,
            subject_prefix,
            http_addr,
            confirm_delay,
            schema,
            tasks_table,
            projects_table,
            locks_table,
            stream_replicas,
            stream_max_age,
            stream_max_bytes,
            duplicate_window,
            max_in_flight,
            startup_timeout,
            dry_run,
            log_format,
        )
    }

    /// Reads a TOML config file; unknown keys are an error naming the key.
    pub fn from_file(path: &std::path::Path) -> Result<Options, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_string(),
        })
    }

    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        self.resolve_for(true)
    }

    /// Like [`Options::resolve`], for commands that only talk to NATS
    /// (`walcast tail`): the database URL may be absent (then empty).
    pub fn resolve_nats_only(self) -> Result<Settings, ConfigError> {
        self.resolve_for(false)
    }

    fn resolve_for(self, need_database: bool) -> Result<Settings, ConfigError> {
        let database_url = match (self.database_url, &self.database_url_file) {
            (Some(url), _) => url,
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    ConfigError::Invalid(format!(
                        "cannot read --database-url-file {}: {e}",
                        path.display()
                    ))
                })?
                .trim()
                .to_string(),
            (None, None) if !need_database => String::new(),
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "no database URL: set --database-url or WALCAST_DATABASE_URL (e.g. postgres://walcast@localhost/app)".into(),
                ));
            }
        };
        let settings = Settings {
            database_url,
            nats_url: self
                .nats_url
                .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            nats_creds: self.nats_creds,
            nats_nkey: self.nats_nkey,
            nats_ca: self.nats_ca,
            nats_client_cert: self.nats_client_cert,
            nats_client_key: self.nats_client_key,
            slot: self.slot.unwrap_or_else(|| "walcast".into()),
            publication: self.publication.unwrap_or_else(|| "walcast".into()),
            stream: self.stream.unwrap_or_else(|| "WALCAST".into()),
            subject_prefix: self.subject_prefix.unwrap_or_else(|| "walcast".into()),
            http_addr: self.http_addr.unwrap_or_else(|| "127.0.0.1:9187".into()),
            confirm_delay: duration(
                "confirm_delay",
                self.confirm_delay.as_deref().unwrap_or("2m"),
            )?,
            tables: Tables {
                schema: self.schema.unwrap_or_else(|| "public".into()),
                tasks: self.tasks_table.unwrap_or_else(|| "tasks".into()),
                projects: self.projects_table.unwrap_or_else(|| "projects".into()),
                locks: self.locks_table.unwrap_or_else(|| "editing_locks".into()),
            },
            stream_replicas: self.stream_replicas.unwrap_or(1),
            stream_max_age: duration(
                "stream_max_age",
                self.stream_max_age.as_deref().unwrap_or("7d"),
            )?,
            stream_max_bytes: self.stream_max_bytes.unwrap_or(-1),
            duplicate_window: duration(
                "duplicate_window",
                self.duplicate_window.as_deref().unwrap_or("2m"),
            )?,
            max_in_flight: self.max_in_flight.unwrap_or(4096),
            startup_timeout: duration(
                "startup_timeout",
                self.startup_timeout.as_deref().unwrap_or("30s"),
            )?,
            dry_run: self.dry_run.unwrap_or(false),
            log_json: match self.log_format.as_deref().unwrap_or("text") {
                "text" => false,
                "json" => true,
                other => {
                    return Err(ConfigError::Invalid(format!(
                        "log_format must be text or json, not {other:?}"
                    )));
                }
            },
        };
        settings.validate()?;
        Ok(settings)
    }
}

impl Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        let token = |name: &str, value: &str| {
            let ok = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "{name} {value:?} must be non-empty [A-Za-z0-9_-]"
                )))
            }
        };
        token("subject_prefix", &self.subject_prefix)?;
        token("stream", &self.stream)?;
        let ident = |name: &str, value: &str| {
            let ok = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "{name} {value:?} must be a lower-case identifier [a-z0-9_]"
                )))
            }
        };
        ident("slot", &self.slot)?;
        ident("publication", &self.publication)?;
        if !self.database_url.is_empty()
            && !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return Err(ConfigError::Invalid(
                "database URL must start with postgres:// or postgresql://".into(),
            ));
        }
        if self.nats_client_cert.is_some() != self.nats_client_key.is_some() {
            return Err(ConfigError::Invalid(
                "nats_client_cert and nats_client_key go together: set both or neither".into(),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "max_in_flight must be at least 1".into(),
            ));
        }
        if ![1, 3, 5].contains(&self.stream_replicas) {
            return Err(ConfigError::Invalid(
                "stream_replicas must be 1, 3 or 5".into(),
            ));
        }
        Ok(())
    }
}

fn duration(name: &str, text: &str) -> Result<Duration, ConfigError> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text).map_err(|e| {
        ConfigError::Invalid(format!(
            "{name} {text:?} is not a duration like 30s, 2m or 7d: {e}"
        ))
    })
}

/// Replaces the password in a URL's userinfo with `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else if user.len() > 20 {
                "***".into()
            } else {
                user.into()
            };
            format!("{scheme}://{masked}@{host}{}", redact_query(tail))
        }
        None => format!("{scheme}://{authority}{}", redact_query(tail)),
    }
}

/// Masks `password=` in a libpq URL query string.
fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_flags_then_env_then_file() {
        let flags = Options {
            slot: Some("from_flag".into()),
            ..Default::default()
        };
        let file = Options {
            slot: Some("from_file".into()),
            stream: Some("FILE".into()),
            ..Default::default()
        };
        let merged = flags.merge(file);
        assert_eq!(merged.slot.as_deref(), Some("from_flag"));
        assert_eq!(merged.stream.as_deref(), Some("FILE"));
    }

    #[test]
    fn defaults_and_validation() {
        let s = Options {
            database_url: Some("postgres://u@h/db".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            (
                s.slot.as_str(),
                s.stream.as_str(),
                s.subject_prefix.as_str()
            ),
            ("walcast", "WALCAST", "walcast")
        );
        assert_eq!(s.confirm_delay, Duration::from_secs(120));
        assert_eq!(s.nats_url, "nats://127.0.0.1:4222");
        let bad = Options {
            database_url: Some("postgres://u@h/db".into()),
            subject_prefix: Some("a.b".into()),
            ..Default::default()
        };
        assert!(
            bad.resolve()
                .unwrap_err()
                .to_string()
                .contains("subject_prefix")
        );
        let zero = Options {
            database_url: Some("postgres://u@h/db".into()),
            confirm_delay: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(zero.resolve().unwrap().confirm_delay, Duration::ZERO);
        assert!(
            Options::default()
                .resolve()
                .unwrap_err()
                .to_string()
                .contains("WALCAST_DATABASE_URL")
        );
    }

    #[test]
    fn unknown_toml_key_is_named() {
        let err = toml::from_str::<Options>("slot = \"a\"\nslott = \"b\"\n").unwrap_err();
        assert!(err.message().contains("slott"), "{}", err.message());
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact_url("postgres://walcast:s3cret@db:5432/app"),
            "postgres://walcast:***@db:5432/app"
        );
        assert_eq!(
            redact_url("postgres://db/app?user=a&password=s3cret"),
            "postgres://db/app?user=a&password=***"
        );
        assert_eq!(
            redact_url("nats://tok3n-that-is-very-long-secret@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert!(!redact_url("nats://user:pa@ss@h:1").contains("pa@ss"));
    }
}
