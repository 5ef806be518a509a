//! The shipped auth callout wiring (SPEC §9) runs: `deploy/nats/auth-callout.conf`
//! with the environment docker-compose.yml gives the nats service, and
//! `walcast auth` with the walcast service's settings and mounted demo
//! keys, let a token signed with the demo secret in, confined to its tenant.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::deploy_files::{bind_mounts, compose, compose_env, services};
use crate::support::callout::{TenantConnection, now, token_with};
use crate::support::chaos::Walcast;
use crate::support::{TempDir, free_port, read_log, repo_root, wait_until};

const BOUND: Duration = Duration::from_secs(30);

/// A nats-server child, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The service's environment, and its container paths mapped to repository files.
fn service(name: &str) -> (HashMap<String, String>, HashMap<String, PathBuf>) {
    let compose = compose();
    let (_, svc) = services(&compose)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no {name} service"));
    let env = compose_env(svc).into_iter().collect();
    let mounts = bind_mounts(svc)
        .into_iter()
        .map(|(host, container, _)| (container, repo_root().join(host)))
        .collect();
    (env, mounts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_callout_config_runs_with_the_compose_settings() {
    let dir = TempDir::new("deploy-callout").unwrap();
    let (nats_env, nats_mounts) = service("nats");
    let conf_path = &nats_mounts["/etc/nats/auth-callout.conf"];
    // Our own WebSocket port: the shipped 8080 may be taken on this machine.
    let ws_port = free_port();
    let conf = std::fs::read_to_string(conf_path)
        .unwrap()
        .replace("port: 8080", &format!("port: {ws_port}"));
    assert!(
        conf.contains(&format!("port: {ws_port}")),
        "no WebSocket port 8080"
    );
    std::fs::write(dir.path().join("nats.conf"), conf).unwrap();
    let port = free_port();
    let log = dir.path().join("nats.log");
    let nats_bin = std::env::var("WALCAST_NATS_SERVER").unwrap_or_else(|_| {
        repo_root()
            .join(".tools/bin/nats-server")
            .display()
            .to_string()
    });
    let child = Command::new(nats_bin)
        .arg("-c")
        .arg(dir.path().join("nats.conf"))
        .args(["-js", "-sd"])
        .arg(dir.path().join("js"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .envs(nats_env.iter().filter(|(k, _)| k.starts_with("NATS_")))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("nats.err")).unwrap())
        .spawn()
        .expect("spawn nats-server");
    let _server = Server(child);
    wait_until(BOUND, || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", ws_port)).is_ok()
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "nats-server with deploy/nats/auth-callout.conf did not start:\n{}{}",
            read_log(&log),
            read_log(&dir.path().join("nats.err"))
        )
    });

    // walcast as the compose file configures it, paths mapped to the repository.
    let (walcast_env, walcast_mounts) = service("walcast");
    let mut vars: Vec<(String, String)> = walcast_env
        .iter()
        .filter(|(k, _)| k.starts_with("WALCAST_AUTH_"))
        .map(|(k, v)| {
            let v = walcast_mounts
                .get(v)
                .map_or(v.clone(), |p| p.display().to_string());
            (k.clone(), v)
        })
        .collect();
    let url = walcast_env["WALCAST_NATS_URL"].replace("@nats:4222", &format!("@127.0.0.1:{port}"));
    vars.push(("WALCAST_NATS_URL".into(), url));
    vars.push((
        "WALCAST_HTTP_ADDR".into(),
        format!("127.0.0.1:{}", free_port()),
    ));
    let mut auth = Walcast::start_command("auth", "auth", dir.path(), &vars, &[]);
    auth.wait_log("auth callout answering", BOUND).await;

    let secret_file = &walcast_mounts[&walcast_env["WALCAST_AUTH_TOKEN_SECRET_FILE"]];
    let secret = std::fs::read_to_string(secret_file).unwrap();
    let token = token_with(
        serde_json::json!({"tenant_id": "acme", "exp": now() + 600}),
        secret.trim_end(),
    );
    let acme = TenantConnection::connect(&format!("nats://127.0.0.1:{port}"), &token, "acme")
        .await
        .unwrap_or_else(|e| panic!("the demo token is refused: {e}\n{}", auth.log_tail(20)));
    let _denied = acme.client.subscribe("walcast.>").await;
    wait_until(BOUND, || async { acme.violated("walcast.>") })
        .await
        .expect("the issued user is confined to its tenant");
    auth.stop(BOUND).await;
}
