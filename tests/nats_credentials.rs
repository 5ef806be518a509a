//! NATS credentials as operators give them: `user:password@` and `token@`
//! in `--nats-url`, a comma-separated server list whose first server is
//! down, and — whatever happens — no password, token or `sslpassword` in
//! any output: logs at debug level (async-nats included), JSON logs,
//! errors, `walcast check` and `walcast tail`.

use std::time::Duration;

use crate::support::chaos::Walcast;
use crate::support::daemon::Env;
use crate::support::edge::{Outcome, run_bounded, with_var};
use crate::support::nats::Nats;
use crate::support::postgres::Postgres;
use crate::support::{TempDir, free_port, wait_for};

const PASSWORD: &str = "Nats-Pa55-right";
const WRONG_PASSWORD: &str = "Nats-Pa55-wrong";
/// Short on purpose: redaction must not depend on a secret's length.
const TOKEN: &str = "Tk-9zQ";
const WRONG_TOKEN: &str = "Tk-0xW";
const SSL_PASSWORD: &str = "Ssl-Key-Pa55";
const PLANTED: [&str; 5] = [PASSWORD, WRONG_PASSWORD, TOKEN, WRONG_TOKEN, SSL_PASSWORD];

const BOUND: Duration = Duration::from_secs(30);

fn assert_no_secret(what: &str, text: &str) {
    for secret in PLANTED {
        assert!(!text.contains(secret), "{what} printed {secret:?}:\n{text}");
    }
}

fn assert_clean(what: &str, out: &Outcome) {
    assert_ne!(out.code, Some(101), "{what} panicked:\n{}", out.stderr);
    assert_no_secret(what, &format!("{}{}", out.stdout, out.stderr));
}

/// Postgres (migrated) and a NATS server that requires `authorization`.
async fn env_with_nats_auth(authorization: &str) -> Env {
    let env = Env {
        pg: Postgres::start().expect("start postgres"),
        nats: Nats::start_with_config(&format!("authorization {{ {authorization} }}"))
            .expect("start nats"),
    };
    walcast::migrate::run(&env.settings())
        .await
        .expect("walcast migrate");
    env
}

fn url_with(env: &Env, userinfo: &str) -> String {
    format!("nats://{userinfo}@127.0.0.1:{}", env.nats.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_in_a_server_list_authenticate_and_never_leak() {
    let env = env_with_nats_auth(&format!("user: walcast, password: \"{PASSWORD}\"")).await;
    let creds = format!("walcast:{PASSWORD}");
    // The first listed server is down: walcast must use the second.
    let list = format!(
        "nats://{creds}@127.0.0.1:{},{}",
        free_port(),
        url_with(&env, &creds)
    );
    let mut vars = with_var(&env.env_vars(), "WALCAST_NATS_URL", &list);
    // The default confirm delay: a clean stop must not wait for a
    // confirmation that the delay holds back.
    vars.retain(|(k, _)| k != "WALCAST_CONFIRM_DELAY");
    let dir = TempDir::new("nats-credentials").unwrap();
    let debug = [("RUST_LOG", "debug"), ("WALCAST_LOG_FORMAT", "json")];
    let mut walcast = Walcast::start("walcast", dir.path(), &vars, &debug);
    walcast.wait_log("replicating", BOUND).await;

    let client = env.pg.client().await;
    client
        .batch_execute(
            "INSERT INTO projects (id, tenant_id, name) VALUES
               ('00000000-0000-0000-0000-000000000001', 'acme', 'one'),
               ('00000000-0000-0000-0000-000000000002', 'acme', 'two')",
        )
        .await
        .unwrap();
    // `walcast tail` authenticates the same way and prints both events.
    let tail = wait_for(BOUND, || {
        let vars = vars.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                run_bounded(&["tail", "--tenant", "acme"], &vars, BOUND)
            })
            .await
            .unwrap();
            (out.stdout.lines().count() == 2).then_some(out)
        }
    })
    .await
    .expect("walcast tail prints the two events");
    assert_eq!(tail.code, Some(0), "{}", tail.stderr);
    assert_clean("walcast tail", &tail);
    // The tenant may also be the first argument.
    let positional = run_bounded(&["tail", "acme"], &vars, BOUND);
    assert_eq!(positional.code, Some(0), "{}", positional.stderr);
    assert_eq!(positional.stdout, tail.stdout, "walcast tail acme");

    let check = run_bounded(&["check"], &vars, BOUND);
    assert_clean("walcast check", &check);
    assert!(
        check.stdout.contains("✓ NATS reachable"),
        "{}",
        check.stdout
    );

    walcast.signal("TERM");
    let status = walcast.wait(BOUND).await;
    assert!(
        status.success(),
        "exit {status:?}:\n{}",
        walcast.log_tail(20)
    );
    let log = walcast.log();
    assert_no_secret("walcast run (debug, json)", &log);
    assert!(
        !log.contains("was not sent to Postgres in time"),
        "a clean stop waited for a confirmation:\n{}",
        walcast.log_tail(20)
    );
    assert!(
        log.contains("async_nats"),
        "no dependency debug logs to check"
    );

    // Wrong password: one error line that says "authorization".
    let wrong = with_var(
        &vars,
        "WALCAST_NATS_URL",
        &url_with(&env, &format!("walcast:{WRONG_PASSWORD}")),
    );
    let run = run_bounded(&["run"], &wrong, BOUND);
    assert_clean("walcast run, wrong password", &run);
    assert_ne!(run.code, Some(0));
    assert!(run.last_line().contains("authorization"), "{}", run.stderr);
    let check = run_bounded(&["check"], &wrong, BOUND);
    assert_clean("walcast check, wrong password", &check);
    assert!(
        check
            .stdout
            .lines()
            .any(|l| l.starts_with("✗ ") && l.contains("authorization")),
        "{}",
        check.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_url_authenticates_and_never_leaks() {
    let env = env_with_nats_auth(&format!("token: \"{TOKEN}\"")).await;
    let good = with_var(&env.env_vars(), "WALCAST_NATS_URL", &url_with(&env, TOKEN));
    let check = run_bounded(&["check"], &good, BOUND);
    assert_clean("walcast check, token", &check);
    assert_eq!(check.code, Some(0), "{}", check.stdout);

    let wrong = with_var(&good, "WALCAST_NATS_URL", &url_with(&env, WRONG_TOKEN));
    for command in ["run", "check"] {
        let out = run_bounded(&[command], &wrong, BOUND);
        assert_clean(command, &out);
        assert_ne!(out.code, Some(0));
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(all.contains("authorization"), "{command}:\n{all}");
        assert!(all.contains("nats://***@127.0.0.1"), "{command}:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_print_no_secret_and_each_cause_once() {
    let env = Env::start().await;
    let vars = env.env_vars();
    let ssl = format!(
        "postgres://walcast:{PASSWORD}@127.0.0.1:{}/app?sslpassword={SSL_PASSWORD}&bogus=1",
        env.pg.port()
    );
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("sslpassword", with_var(&vars, "WALCAST_DATABASE_URL", &ssl)),
        (
            "missing url file",
            with_var(&vars, "WALCAST_DATABASE_URL_FILE", "/nonexistent/db-url"),
        ),
        (
            "bad NATS list member",
            with_var(
                &vars,
                "WALCAST_NATS_URL",
                &format!("nats://a:{PASSWORD}@127.0.0.1:1,nats://{TOKEN}@host:port"),
            ),
        ),
    ];
    for (name, case) in cases {
        let mut case = case;
        if name == "missing url file" {
            case.retain(|(k, _)| k != "WALCAST_DATABASE_URL");
        }
        for command in ["run", "check"] {
            let out = run_bounded(&[command], &case, BOUND);
            let what = format!("{name}: walcast {command}");
            assert_clean(&what, &out);
            assert_ne!(out.code, Some(0), "{what}");
            let last = out.last_line();
            assert!(
                last.starts_with("walcast: error: ") || command == "check",
                "{what}: {last}"
            );
            let cause = "No such file or directory";
            assert!(
                last.matches(cause).count() <= 1,
                "{what}: cause printed twice: {last}"
            );
        }
    }
}
