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
    /// Postgres libpq URL, e.g. postgres://walcast:secret@db:5432/app (required,
    /// or --database-url-file)
    #[arg(long, env = "WALCAST_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Read the database URL from this file instead (for mounted secrets); the
    /// URL and its file are one setting, a flag wins over either variable
    #[arg(long, env = "WALCAST_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// NATS server URL(s), comma-separated for a cluster; user:password@ or
    /// token@ in a URL authenticates [default: nats://127.0.0.1:4222]
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
    /// Create the slot as a failover slot on PostgreSQL 17+ (standbys with
    /// sync_replication_slots = on keep a copy, so a promoted standby serves
    /// it; see README "Failover"); false creates a plain slot [default: true]
    #[arg(long, env = "WALCAST_SLOT_FAILOVER", num_args = 0..=1, default_missing_value = "true")]
    pub slot_failover: Option<bool>,
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
    /// sync_interval: always; 0 to 7d [default: 2m]
    #[arg(long, env = "WALCAST_CONFIRM_DELAY")]
    pub confirm_delay: Option<String>,
    /// Go on past messages missing from the middle of the stream up to this
    /// stream sequence although the slot still holds them (walcast stops at
    /// such a hole and names its tenants and seqs; set this once their
    /// consumers are re-synced). 0 accepts none [default: 0]
    #[arg(long, env = "WALCAST_ACCEPT_HOLES_THROUGH")]
    pub accept_holes_through: Option<u64>,
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
    /// Stream max age, e.g. 7d; 0 keeps messages forever; at most 100y [default: 7d]
    #[arg(long, env = "WALCAST_STREAM_MAX_AGE")]
    pub stream_max_age: Option<String>,
    /// Stream max bytes; -1 is unlimited, else at least 1 [default: -1]
    #[arg(long, env = "WALCAST_STREAM_MAX_BYTES", allow_hyphen_values = true)]
    pub stream_max_bytes: Option<i64>,
    /// Stream duplicate window for Nats-Msg-Id; 1s to 7d, at most the max age [default: 2m]
    #[arg(long, env = "WALCAST_DUPLICATE_WINDOW")]
    pub duplicate_window: Option<String>,
    /// Events published and not yet acknowledged by JetStream, at most; 1 to
    /// 1048576 [default: 4096]
    #[arg(long, env = "WALCAST_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// How long to keep retrying before walcast has replicated once (Postgres
    /// or NATS not up yet); then exit non-zero with the last error; 1s to 7d
    /// [default: 30s]
    #[arg(long, env = "WALCAST_STARTUP_TIMEOUT")]
    pub startup_timeout: Option<String>,
    /// Build events but publish nothing and never confirm the slot (for
    /// checking what would be published and measuring decoding) [default: false]
    #[arg(long, env = "WALCAST_DRY_RUN", num_args = 0..=1, default_missing_value = "true")]
    pub dry_run: Option<bool>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "WALCAST_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Key-value bucket holding each tenant's current rows (SPEC §8); an
    /// empty name turns the state off [default: <stream>_STATE]
    #[arg(long, env = "WALCAST_STATE_BUCKET")]
    pub state_bucket: Option<String>,
    /// Auth callout (SPEC §9): nkey seed file (SA…) of the issuer named in
    /// the server's `auth_callout { issuer }`; setting it (with
    /// --auth-account and a token key) makes `walcast run` answer the callout
    /// [default: none, the callout is off]
    #[arg(long, env = "WALCAST_AUTH_ISSUER_SEED_FILE")]
    pub auth_issuer_seed_file: Option<PathBuf>,
    /// Auth callout: curve (xkey) seed file (SX…) whose public key is the
    /// server's `auth_callout { xkey }`, for an encrypted callout [default: none]
    #[arg(long, env = "WALCAST_AUTH_XKEY_SEED_FILE")]
    pub auth_xkey_seed_file: Option<PathBuf>,
    /// Auth callout: file holding the HS256 secret that signs the
    /// application's tokens (trailing whitespace ignored); or
    /// --auth-token-public-key-file [default: none]
    #[arg(long, env = "WALCAST_AUTH_TOKEN_SECRET_FILE")]
    pub auth_token_secret_file: Option<PathBuf>,
    /// Auth callout: PEM public key (RSA → RS256, Ed25519 → EdDSA) that
    /// verifies the application's tokens; or --auth-token-secret-file [default: none]
    #[arg(long, env = "WALCAST_AUTH_TOKEN_PUBLIC_KEY_FILE")]
    pub auth_token_public_key_file: Option<PathBuf>,
    /// Auth callout: the token claim holding the tenant id [default: tenant_id]
    #[arg(long, env = "WALCAST_AUTH_TENANT_CLAIM")]
    pub auth_tenant_claim: Option<String>,
    /// Auth callout: the NATS account the issued tenant users join, the one
    /// holding the stream (the user JWT's `aud`) [default: none]
    #[arg(long, env = "WALCAST_AUTH_ACCOUNT")]
    pub auth_account: Option<String>,
    /// Auth callout: when set, a token's `aud` must contain this value
    /// [default: not checked]
    #[arg(long, env = "WALCAST_AUTH_TOKEN_AUDIENCE")]
    pub auth_token_audience: Option<String>,
    /// Auth callout: when set, a token's `iss` must be this value [default:
    /// not checked]
    #[arg(long, env = "WALCAST_AUTH_TOKEN_ISSUER")]
    pub auth_token_issuer: Option<String>,
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
    /// Create the slot with `failover = true` (PostgreSQL 17+).
    pub slot_failover: bool,
    pub publication: String,
    pub stream: String,
    pub subject_prefix: String,
    pub http_addr: String,
    pub confirm_delay: Duration,
    /// Holes in the stream up to this stream sequence were accepted by the
    /// operator (`publish::holes`).
    pub accept_holes_through: u64,
    pub tables: Tables,
    pub stream_replicas: usize,
    pub stream_max_age: Duration,
    pub stream_max_bytes: i64,
    pub duplicate_window: Duration,
    pub max_in_flight: usize,
    pub startup_timeout: Duration,
    pub dry_run: bool,
    pub log_json: bool,
    /// The state bucket (SPEC §8); `None` when turned off.
    pub state_bucket: Option<String>,
    /// The auth callout (SPEC §9); `None` when not configured.
    pub auth: Option<crate::auth::AuthSettings>,
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
    /// `self` wins over `lower` field by field. The database URL and its file
    /// are one setting: the higher layer's choice wins whole, so a flag's
    /// `--database-url-file` beats an environment's `WALCAST_DATABASE_URL`.
    pub fn merge(self, lower: Options) -> Options {
        let (database_url, database_url_file) =
            if self.database_url.is_some() || self.database_url_file.is_some() {
                (self.database_url.clone(), self.database_url_file.clone())
            } else {
                (lower.database_url.clone(), lower.database_url_file.clone())
            };
        let high = self;
        let merged = merge_fields!(
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
            slot_failover,
            publication,
            stream,
            subject_prefix,
            http_addr,
            confirm_delay,
            accept_holes_through,
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
            state_bucket,
            auth_issuer_seed_file,
            auth_xkey_seed_file,
            auth_token_secret_file,
            auth_token_public_key_file,
            auth_tenant_claim,
            auth_account,
            auth_token_audience,
            auth_token_issuer,
        );
        Options {
            database_url,
            database_url_file,
            ..merged
        }
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
        let database_url = database_url(
            self.database_url,
            self.database_url_file.as_deref(),
            need_database,
        )?;
        crate::secrets::register_url(&database_url);
        let nats_url = self
            .nats_url
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        crate::secrets::register_url(&nats_url);
        let stream = self.stream.unwrap_or_else(|| "WALCAST".into());
        let state_bucket = match self.state_bucket {
            None => Some(format!("{stream}_STATE")),
            Some(name) if name.is_empty() => None,
            Some(name) => Some(name),
        };
        let auth = crate::auth::AuthSettings::resolve(crate::auth::AuthOptions {
            issuer_seed_file: self.auth_issuer_seed_file,
            xkey_seed_file: self.auth_xkey_seed_file,
            token_secret_file: self.auth_token_secret_file,
            token_public_key_file: self.auth_token_public_key_file,
            tenant_claim: self.auth_tenant_claim,
            account: self.auth_account,
            token_audience: self.auth_token_audience,
            token_issuer: self.auth_token_issuer,
        })?;
        let settings = Settings {
            database_url,
            nats_url,
            nats_creds: self.nats_creds,
            nats_nkey: self.nats_nkey,
            nats_ca: self.nats_ca,
            nats_client_cert: self.nats_client_cert,
            nats_client_key: self.nats_client_key,
            slot: self.slot.unwrap_or_else(|| "walcast".into()),
            slot_failover: self.slot_failover.unwrap_or(true),
            publication: self.publication.unwrap_or_else(|| "walcast".into()),
            stream,
            subject_prefix: self.subject_prefix.unwrap_or_else(|| "walcast".into()),
            http_addr: self.http_addr.unwrap_or_else(|| "127.0.0.1:9187".into()),
            confirm_delay: CONFIRM_DELAY.parse(self.confirm_delay.as_deref())?,
            accept_holes_through: self.accept_holes_through.unwrap_or(0),
            tables: Tables {
                schema: self.schema.unwrap_or_else(|| "public".into()),
                tasks: self.tasks_table.unwrap_or_else(|| "tasks".into()),
                projects: self.projects_table.unwrap_or_else(|| "projects".into()),
                locks: self.locks_table.unwrap_or_else(|| "editing_locks".into()),
            },
            stream_replicas: self.stream_replicas.unwrap_or(1),
            stream_max_age: STREAM_MAX_AGE.parse(self.stream_max_age.as_deref())?,
            stream_max_bytes: self.stream_max_bytes.unwrap_or(-1),
            duplicate_window: DUPLICATE_WINDOW.parse(self.duplicate_window.as_deref())?,
            max_in_flight: self.max_in_flight.unwrap_or(4096),
            startup_timeout: STARTUP_TIMEOUT.parse(self.startup_timeout.as_deref())?,
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
            state_bucket,
            auth,
        };
        settings.validate()?;
        Ok(settings)
    }
}

/// The database URL from the setting or its file (never both).
fn database_url(
    url: Option<String>,
    file: Option<&std::path::Path>,
    need_database: bool,
) -> Result<String, ConfigError> {
    match (url, file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(
            "database_url and database_url_file are both set: keep one".into(),
        )),
        (Some(url), None) => Ok(url),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "cannot read --database-url-file {}: {e}",
                    path.display()
                ))
            })?;
            Ok(text.trim().to_string())
        }
        (None, None) if !need_database => Ok(String::new()),
        (None, None) => Err(ConfigError::Invalid(
            "no database URL: set --database-url or WALCAST_DATABASE_URL (e.g. postgres://walcast@localhost/app)".into(),
        )),
    }
}

/// A duration setting: its name, default and documented range.
struct DurationSetting {
    name: &'static str,
    default: &'static str,
    min: Duration,
    max: Duration,
    /// `0` is allowed (and means "off" / "forever") even below `min`.
    zero_ok: bool,
}

const DAY: Duration = Duration::from_secs(86_400);

const CONFIRM_DELAY: DurationSetting = DurationSetting {
    name: "confirm_delay",
    default: "2m",
    min: Duration::ZERO,
    max: DAY.saturating_mul(7),
    zero_ok: true,
};
const STREAM_MAX_AGE: DurationSetting = DurationSetting {
    name: "stream_max_age",
    default: "7d",
    min: Duration::from_secs(1),
    max: DAY.saturating_mul(36_500),
    zero_ok: true,
};
const DUPLICATE_WINDOW: DurationSetting = DurationSetting {
    name: "duplicate_window",
    default: "2m",
    min: Duration::from_secs(1),
    max: DAY.saturating_mul(7),
    zero_ok: false,
};
const STARTUP_TIMEOUT: DurationSetting = DurationSetting {
    name: "startup_timeout",
    default: "30s",
    min: Duration::from_secs(1),
    max: DAY.saturating_mul(7),
    zero_ok: false,
};

impl DurationSetting {
    fn parse(&self, text: Option<&str>) -> Result<Duration, ConfigError> {
        let text = text.unwrap_or(self.default).trim();
        let value = if text == "0" {
            Duration::ZERO
        } else {
            humantime::parse_duration(text).map_err(|e| {
                ConfigError::Invalid(format!(
                    "{} {text:?} is not a duration like 30s, 2m or 7d: {e}",
                    self.name
                ))
            })?
        };
        let in_range = (self.min..=self.max).contains(&value) || (self.zero_ok && value.is_zero());
        if !in_range {
            let fmt = |d| humantime::format_duration(d).to_string();
            let low = match (self.zero_ok, self.min.is_zero()) {
                (_, true) => "0".to_string(),
                (true, false) => format!("0 or {}", fmt(self.min)),
                (false, false) => fmt(self.min),
            };
            return Err(ConfigError::Invalid(format!(
                "{} {text:?} is out of range: use {low} to {}",
                self.name,
                fmt(self.max)
            )));
        }
        Ok(value)
    }
}

/// Upper bound of `max_in_flight`: a million unacknowledged events is far
/// past any throughput gain and still a bounded amount of memory.
pub const MAX_IN_FLIGHT_LIMIT: usize = 1 << 20;

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
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&self.max_in_flight) {
            return Err(ConfigError::Invalid(format!(
                "max_in_flight {} is out of range: use 1 to {MAX_IN_FLIGHT_LIMIT}",
                self.max_in_flight
            )));
        }
        if self.stream_max_bytes < -1 || self.stream_max_bytes == 0 {
            return Err(ConfigError::Invalid(format!(
                "stream_max_bytes {} is out of range: use -1 (unlimited) or a positive size in bytes",
                self.stream_max_bytes
            )));
        }
        if !self.stream_max_age.is_zero() && self.duplicate_window > self.stream_max_age {
            return Err(ConfigError::Invalid(
                "duplicate_window is longer than stream_max_age: NATS needs it at most the max age"
                    .into(),
            ));
        }
        if let Some(bucket) = &self.state_bucket {
            let valid = bucket.len() <= 64
                && bucket
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(ConfigError::Invalid(format!(
                    "state_bucket {bucket:?} is not a valid bucket name: use letters, digits, _ and - (at most 64), or an empty name to turn the state off"
                )));
            }
        }
        if ![1, 3, 5].contains(&self.stream_replicas) {
            return Err(ConfigError::Invalid(
                "stream_replicas must be 1, 3 or 5".into(),
            ));
        }
        Ok(())
    }
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

    fn with_db(options: Options) -> Options {
        Options {
            database_url: Some("postgres://u@h/db".into()),
            ..options
        }
    }

    #[test]
    fn extreme_settings_are_refused_with_the_range() {
        let cases: [(Options, &str); 7] = [
            (
                Options {
                    max_in_flight: Some(2_305_843_009_213_693_000),
                    ..Default::default()
                },
                "max_in_flight",
            ),
            (
                Options {
                    max_in_flight: Some(usize::MAX),
                    ..Default::default()
                },
                "max_in_flight",
            ),
            (
                Options {
                    confirm_delay: Some("18446744073709551615s".into()),
                    ..Default::default()
                },
                "confirm_delay",
            ),
            (
                Options {
                    stream_max_age: Some("300y".into()),
                    ..Default::default()
                },
                "stream_max_age",
            ),
            (
                Options {
                    duplicate_window: Some("0".into()),
                    ..Default::default()
                },
                "duplicate_window",
            ),
            (
                Options {
                    startup_timeout: Some("100000d".into()),
                    ..Default::default()
                },
                "startup_timeout",
            ),
            (
                Options {
                    stream_max_bytes: Some(-5),
                    ..Default::default()
                },
                "stream_max_bytes",
            ),
        ];
        for (options, name) in cases {
            let error = with_db(options).resolve().unwrap_err().to_string();
            assert!(
                error.starts_with(name) && error.contains("out of range"),
                "{error}"
            );
        }
        let fine = with_db(Options {
            max_in_flight: Some(MAX_IN_FLIGHT_LIMIT),
            confirm_delay: Some("7d".into()),
            stream_max_age: Some("0".into()),
            ..Default::default()
        });
        assert!(fine.resolve().is_ok());
    }

    #[test]
    fn a_database_url_file_flag_wins_over_the_url_from_env() {
        let flags = Options {
            database_url_file: Some("/run/secrets/db".into()),
            ..Default::default()
        };
        let env = Options {
            database_url: Some("postgres://env@h/db".into()),
            ..Default::default()
        };
        let merged = flags.merge(env);
        assert_eq!(merged.database_url, None);
        assert_eq!(merged.database_url_file, Some("/run/secrets/db".into()));
        let file = Options {
            database_url: Some("postgres://toml@h/db".into()),
            ..Default::default()
        };
        let env_file = Options {
            database_url_file: Some("/env/file".into()),
            ..Default::default()
        };
        assert_eq!(env_file.merge(file).database_url, None);
    }
}
