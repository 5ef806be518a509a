//! SPEC §5: TLS to Postgres (libpq sslmode semantics) and to NATS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::support::TempDir;
use crate::support::daemon::{Daemon, Env};
use crate::support::nats::{Nats, NatsOptions};
use crate::support::postgres::Postgres;

/// A CA and a server certificate for localhost / 127.0.0.1, as PEM files.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn certs(dir: &Path, name: &str) -> Certs {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let out = Certs {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&out.ca, ca.pem()).unwrap();
    std::fs::write(&out.cert, server.pem()).unwrap();
    std::fs::write(&out.key, key.serialize_pem()).unwrap();
    out
}

/// Makes the files readable by the postgres server (which runs as `postgres` when we are root).
fn give_to_postgres(dir: &Path, key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _ = std::process::Command::new("chown")
        .args(["-R", "postgres"])
        .arg(dir)
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_nats_over_verified_tls() {
    crate::support::daemon::init_logging();
    let dir = TempDir::new("walcast-tls").unwrap();
    let pg_certs = certs(dir.path(), "pg");
    let nats_certs = certs(dir.path(), "nats");
    let other = certs(dir.path(), "other");
    give_to_postgres(dir.path(), &pg_certs.key);
    let pg = Postgres::start_with(&[
        ("ssl", "on"),
        ("ssl_cert_file", pg_certs.cert.to_str().unwrap()),
        ("ssl_key_file", pg_certs.key.to_str().unwrap()),
    ])
    .unwrap();
    let nats = Nats::start_with(NatsOptions {
        extra: format!(
            "tls {{ cert_file: {:?}, key_file: {:?} }}",
            nats_certs.cert, nats_certs.key
        ),
        ..Default::default()
    })
    .unwrap();
    let env = Env { pg, nats };
    let url = |ca: &Path| {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            env.pg.port(),
            ca.display()
        )
    };
    let mut options = env.options();
    options.database_url = Some(url(&pg_certs.ca));
    options.nats_url = Some(format!("tls://localhost:{}", env.nats.port()));
    options.nats_ca = Some(nats_certs.ca.clone());
    walcast::migrate::run(&options.clone().resolve().unwrap())
        .await
        .expect("migrate over TLS");
    let daemon = Daemon::start(options.clone().resolve().unwrap());
    let client = env.pg.client().await;
    client
        .batch_execute("INSERT INTO tasks (id, tenant_id, title) VALUES ('b0000000-0000-4000-8000-000000000001', 'acme', 'secure')")
        .await
        .unwrap();
    crate::support::wait_until(Duration::from_secs(30), || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND application_name = 'walcast'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) >= 2)
            .unwrap_or(false)
    })
    .await
    .expect("walcast's SQL and replication connections use TLS");
    // Read the event back over TLS too.
    let nats_client = async_nats::ConnectOptions::new()
        .add_root_certificates(nats_certs.ca.clone())
        .require_tls(true)
        .connect(format!("tls://localhost:{}", env.nats.port()))
        .await
        .expect("test client over TLS");
    let js = async_nats::jetstream::new(nats_client);
    crate::support::wait_until(Duration::from_secs(30), || async {
        match js.get_stream("WALCAST").await {
            Ok(mut s) => s
                .info()
                .await
                .map(|i| i.state.messages == 1)
                .unwrap_or(false),
            Err(_) => false,
        }
    })
    .await
    .expect("the event was published over TLS");
    daemon.stop().await.unwrap();

    // A server certificate from another CA is refused, with a clear error.
    options.database_url = Some(url(&other.ca));
    options.startup_timeout = Some("1s".into());
    options.http_addr = Some(format!("127.0.0.1:{}", crate::support::free_port()));
    let err = walcast::app::run(options.resolve().unwrap(), std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}
