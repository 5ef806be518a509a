//! Postgres connection settings, parsed once from the libpq URL and used for
//! both the SQL connection (tokio-postgres) and the replication connection
//! (pgwire-replication).

use std::str::FromStr;
use std::time::Duration;

use pgwire_replication::SslMode as ReplSslMode;
use pgwire_replication::{ReadPacing, ReplicationConfig, TlsConfig};
use tokio_postgres::config::{Host, SslMode};

pub mod tls;

/// Drives a SQL connection until its client is dropped.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "postgres SQL connection closed");
    }
}

use crate::secrets::redact_url;

/// Why Postgres could not be used. Messages never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "cannot connect to Postgres at {target}: {} (check that it is running and that --database-url is right)",
        crate::telemetry::error_chain(source)
    )]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("Postgres query failed ({what}): {source}")]
    Query {
        what: &'static str,
        source: tokio_postgres::Error,
    },
    /// The database is not set up as walcast needs; the text says how to fix it.
    #[error("{0}")]
    Precondition(String),
    /// Postgres did not answer in time (a stalled server or a dead network).
    #[error("Postgres did not answer within {seconds} s ({what})")]
    Timeout { what: &'static str, seconds: u64 },
    /// Every host of a multi-host URL is a standby (a failover under way).
    #[error("every host of {0} is in recovery (a standby); waiting for one to be promoted")]
    NoPrimary(String),
    /// Another run took over the slot and its checkpoint.
    #[error(
        "another walcast took over slot {0} and its checkpoint; this one stops publishing and waits as a standby"
    )]
    Fenced(String),
}

/// How long any single exchange with Postgres may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Replication messages the reader may buffer ahead of the pipeline: ~20 ms
/// of a fast drain (~1 MB of typical rows). 16,384 held ~8 MB in a drain,
/// where the pipeline is always the slower side, for no measured gain.
pub const REPLICATION_READ_AHEAD: usize = 2048;

/// Over TCP to a loopback address (the sidecar), reads under a backlog
/// pause 1 ms each time 32 KiB or more went through the read buffer before
/// it ran empty, with a 64 KiB receive buffer: the walsender's writes then
/// queue in the kernel and go out in large segments instead of one `send`
/// each, which cuts its CPU per change by ~40 % when walcast outruns it
/// (docs/BENCHMARKS.md, sessions 17 and 18). The buffer must fill during a
/// pause for that to happen: 128 KiB did on a machine whose walsender
/// decoded ~75 MB of WAL a second, not on one that decoded ~50 (no gain
/// there); 64 KiB did on both. A reader that keeps up never pauses; when
/// it does pause it is 32 KiB (tens of ms of live changes) behind. Other
/// connections are not paced (vendor/README.md).
const READ_PACING: ReadPacing = ReadPacing {
    after_bytes: 32 * 1024,
    pause: Duration::from_millis(1),
    recv_buffer: 64 * 1024,
};

/// Bounds `future` by [`IO_TIMEOUT`].
pub async fn with_timeout<T>(
    what: &'static str,
    future: impl std::future::Future<Output = T>,
) -> Result<T, DbError> {
    tokio::time::timeout(IO_TIMEOUT, future)
        .await
        .map_err(|_| DbError::Timeout {
            what,
            seconds: IO_TIMEOUT.as_secs(),
        })
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Shorthand for a failed query.
pub fn query_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DbError {
    move |source| DbError::Query { what, source }
}

/// A parsed database URL.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: tls::PgTls,
    redacted: String,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl Database {
    pub fn parse(url: &str) -> Result<Database, DbError> {
        tls::install_crypto_provider();
        let redacted = redact_url(url);
        let (url, tls) = tls::split_url(url).map_err(|reason| DbError::BadUrl {
            url: redacted.clone(),
            reason,
        })?;
        let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| DbError::BadUrl {
            url: redacted.clone(),
            reason: e.to_string(),
        })?;
        if config.get_hosts().is_empty() {
            config.host("localhost");
        }
        if config.get_user().is_none() {
            return Err(DbError::BadUrl {
                url: redacted,
                reason: "no user name (postgres://USER@host/db)".into(),
            });
        }
        if config.get_hosts().len() > 1 {
            // walcast writes its checkpoint: with several hosts (a primary
            // and its standbys) only the primary will do.
            config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        config.application_name("walcast");
        config.connect_timeout(Duration::from_secs(10));
        // A dead network fails a socket in ~30 s instead of the kernel's ~15 min.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.tcp_user_timeout(IO_TIMEOUT);
        config.ssl_mode(match tls.mode {
            tls::Mode::Disable => SslMode::Disable,
            tls::Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        Ok(Database {
            config,
            tls,
            redacted,
        })
    }

    /// One `Database` per host of a multi-host URL (libpq's
    /// `host1:port1,host2:port2`), in the URL's order; itself for one host.
    pub fn hosts(&self) -> Vec<Database> {
        let hosts = self.config.get_hosts();
        if hosts.len() <= 1 {
            return vec![self.clone()];
        }
        let ports = self.config.get_ports();
        hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                // libpq: one port for all hosts, or one per host.
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                self.single_host(host, port)
            })
            .collect()
    }

    /// This database's settings with only `host:port`.
    fn single_host(&self, host: &Host, port: u16) -> Database {
        let from = &self.config;
        let mut config = tokio_postgres::Config::new();
        if let Some(user) = from.get_user() {
            config.user(user);
        }
        if let Some(password) = from.get_password() {
            config.password(password);
        }
        if let Some(dbname) = from.get_dbname() {
            config.dbname(dbname);
        }
        if let Some(options) = from.get_options() {
            config.options(options);
        }
        match host {
            Host::Tcp(h) => config.host(h),
            #[cfg(unix)]
            Host::Unix(p) => config.host_path(p),
        };
        config
            .port(port)
            .application_name(from.get_application_name().unwrap_or("walcast"))
            .connect_timeout(Duration::from_secs(10))
            .keepalives(true)
            .keepalives_idle(from.get_keepalives_idle())
            .tcp_user_timeout(IO_TIMEOUT)
            .ssl_mode(from.get_ssl_mode())
            .channel_binding(from.get_channel_binding());
        let (name, port_text) = match host {
            Host::Tcp(h) => (h.clone(), port.to_string()),
            #[cfg(unix)]
            Host::Unix(p) => (p.display().to_string(), port.to_string()),
        };
        Database {
            config,
            tls: self.tls.clone(),
            redacted: format!("{} (host {name}:{port_text})", self.redacted),
        }
    }

    /// The host to stream from: for a multi-host URL the first host that is
    /// not in recovery (a primary; a standby cannot serve the slot until it
    /// is promoted), so walcast follows a failover like libpq's
    /// `target_session_attrs=read-write` does for the SQL connection.
    pub async fn primary(&self) -> Result<Database, DbError> {
        let hosts = self.hosts();
        if hosts.len() == 1 {
            return Ok(self.clone());
        }
        let mut last = None;
        for host in hosts {
            let in_recovery = async {
                let client = host.connect().await?;
                client
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .map(|row| row.get::<_, bool>(0))
                    .map_err(query_err("SELECT pg_is_in_recovery()"))
            };
            match in_recovery.await {
                Ok(false) => return Ok(host),
                Ok(true) => {}
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| DbError::NoPrimary(self.redacted.clone())))
    }

    /// The URL with its password masked, for logs.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    fn host_port(&self) -> (String, u16) {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        (
            host,
            self.config.get_ports().first().copied().unwrap_or(5432),
        )
    }

    /// `host:port`, or every host of a multi-host URL.
    fn target(&self) -> String {
        let hosts = self.hosts();
        if hosts.len() > 1 {
            let all: Vec<String> = hosts.iter().map(Database::target).collect();
            return all.join(",");
        }
        let (host, port) = self.host_port();
        format!("{host}:{port}")
    }

    /// Opens a SQL connection; its driver task ends when the client is dropped.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, DbError> {
        // connect_timeout covers only TCP; this also bounds TLS and login.
        with_timeout("connect", self.connect_unbounded()).await?
    }

    async fn connect_unbounded(&self) -> Result<tokio_postgres::Client, DbError> {
        let failed = |source| DbError::Connect {
            target: self.target(),
            source,
        };
        let client = if self.tls.mode == tls::Mode::Disable {
            let (client, connection) = self
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(failed)?;
            tokio::spawn(drive(connection));
            client
        } else {
            let config = tls::client_config(&self.tls).map_err(DbError::Precondition)?;
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new(config);
            let (client, connection) = self.config.connect(connector).await.map_err(failed)?;
            tokio::spawn(drive(connection));
            client
        };
        Ok(client)
    }

    /// Settings for the replication connection. The session pins the text
    /// formats the event builder parses (ISO dates in UTC).
    pub fn replication_config(&self, slot: &str, publication: &str) -> ReplicationConfig {
        let (host, port) = self.host_port();
        let user = self.config.get_user().unwrap_or("postgres");
        let password = self
            .config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let dbname = self.config.get_dbname().unwrap_or(user);
        let tls = TlsConfig {
            mode: match self.tls.mode {
                tls::Mode::Disable => ReplSslMode::Disable,
                tls::Mode::Prefer => ReplSslMode::Prefer,
                tls::Mode::Require => ReplSslMode::Require,
                tls::Mode::VerifyCa => ReplSslMode::VerifyCa,
                tls::Mode::VerifyFull => ReplSslMode::VerifyFull,
            },
            ca_pem_path: self.tls.root_cert.clone(),
            ..TlsConfig::default()
        };
        ReplicationConfig::new(host, user, password, dbname, slot, publication)
            .with_port(port)
            .with_tls(tls)
            .with_options("-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3")
            .with_application_name("walcast")
            .with_status_interval(Duration::from_millis(200))
            .with_wakeup_interval(Duration::from_secs(5))
            .with_buffer_size(REPLICATION_READ_AHEAD)
            .with_read_pacing(READ_PACING)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walsender's writes batch only if the replication connection is
    /// paced (vendor/README.md), and a pause needs less than a read's worth.
    #[test]
    fn the_replication_connection_is_paced() {
        let db = Database::parse("postgres://walcast@127.0.0.1:5432/app").unwrap();
        let cfg = db.replication_config("walcast", "walcast");
        assert_eq!(cfg.read_pacing, Some(READ_PACING));
        assert!(READ_PACING.after_bytes < READ_PACING.recv_buffer as usize);
    }
}
