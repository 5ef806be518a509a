//! SPEC §9: walcast as the auth callout of a real nats-server. A tenant's
//! token reaches that tenant's events (live and via catch-up) and state,
//! and every other door — other tenants' subjects, unfiltered or foreign
//! consumers, direct gets, state keys, publishing, foreign catch-up — is a
//! permission error. Bad tokens are refused with a reason, never logged.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde_json::json;
use walcast::config::Options;
use walcast_client::{StateUpdate, Update};

use crate::support::callout::{
    Callout, SECRET, TenantConnection, admin, now, token, token_with, walcast_url,
};
use crate::support::chaos::Walcast;
use crate::support::daemon::{Daemon, Env, init_logging};
use crate::support::edge::{run_bounded, wait_metric};
use crate::support::postgres::Postgres;
use crate::support::{TempDir, free_port, wait_for, wait_until};

const BOUND: Duration = Duration::from_secs(30);

async fn insert_projects(pg: &tokio_postgres::Client, tenant: &str, names: &[&str]) {
    for name in names {
        pg.execute(
            "INSERT INTO projects (id, tenant_id, name) VALUES (gen_random_uuid(), $1, $2)",
            &[&tenant, name],
        )
        .await
        .expect("insert project");
    }
}

/// Connects as `tenant` once the callout answers.
async fn connect_tenant(url: &str, tenant: &str) -> TenantConnection {
    let token = token(tenant);
    wait_for(BOUND, || {
        let token = token.clone();
        async move { TenantConnection::connect(url, &token, tenant).await.ok() }
    })
    .await
    .expect("the callout lets a valid token in")
}

/// Waits for the server's permission error naming `subject`.
async fn assert_denied(conn: &TenantConnection, subject: &str) {
    wait_until(Duration::from_secs(10), || async { conn.violated(subject) })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no permission violation for {subject:?}; server errors: {:?}",
                conn.errors()
            )
        });
}

/// A migrated Postgres and a nats-server whose auth callout is walcast's
/// (encrypted with an xkey when `encrypted`).
async fn migrated_env(encrypted: bool) -> (Callout, Env) {
    init_logging();
    let callout = Callout::new(encrypted);
    let env = Env {
        pg: Postgres::start().expect("start postgres"),
        nats: callout.start_nats(),
    };
    walcast::migrate::run(&env.settings())
        .await
        .expect("migrate");
    (callout, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_token_reaches_its_own_tenant_and_nothing_else() {
    let (callout, env) = migrated_env(true).await;
    let admin_url = walcast_url(&env.nats);
    let options = callout.apply(Options {
        nats_url: Some(admin_url.clone()),
        ..env.options()
    });
    let daemon = Daemon::start(options.resolve().expect("valid settings"));
    let pg = env.pg.client().await;
    // Rows from before any tenant connects: A loads them from the state.
    insert_projects(&pg, "acme", &["a1", "a2"]).await;
    insert_projects(&pg, "globex", &["g1", "g2"]).await;
    let operator = jetstream::new(admin(&env.nats).await);
    wait_until(BOUND, || async {
        match operator.get_stream("WALCAST").await {
            Ok(mut s) => s.info().await.is_ok_and(|i| i.state.last_sequence >= 4),
            Err(_) => false,
        }
    })
    .await
    .expect("the first events are published");

    let acme = connect_tenant(&env.nats.url(), "acme").await;
    let mut live = acme.client.subscribe("walcast.acme.>").await.unwrap();
    let client = walcast_client::Client::new(acme.client.clone(), Default::default());
    let mut state = client.load_and_follow("acme").expect("load starts");
    let snapshot = match tokio::time::timeout(BOUND, state.next()).await {
        Ok(Some(Ok(StateUpdate::Snapshot(s)))) => s,
        other => panic!("expected acme's snapshot, got {other:?}"),
    };
    assert_eq!(snapshot.rows.len(), 2, "{:?}", snapshot.rows.keys());
    assert!(snapshot.rows.keys().all(|k| k.starts_with("acme.")));
    let mut history = client.subscribe("acme", 0).expect("subscribe");

    // A workload of both tenants: A sees exactly its own.
    insert_projects(&pg, "globex", &["g3", "g4", "g5"]).await;
    insert_projects(&pg, "acme", &["a3", "a4", "a5"]).await;
    insert_projects(&pg, "globex", &["g6"]).await;
    for seq in 3..=5 {
        match tokio::time::timeout(BOUND, state.next()).await {
            Ok(Some(Ok(StateUpdate::Event(e)))) => {
                assert_eq!((e.tenant_id.as_str(), e.seq), ("acme", seq));
            }
            other => panic!("expected acme's event {seq}, got {other:?}"),
        }
    }
    // Via catch-up, from the tenant's first event.
    for seq in 1..=5 {
        match tokio::time::timeout(BOUND, history.next()).await {
            Ok(Some(Ok(Update::Event(e)))) => {
                assert_eq!((e.tenant_id.as_str(), e.seq), ("acme", seq));
            }
            other => panic!("expected acme's event {seq} via catch-up, got {other:?}"),
        }
    }
    let mut live_subjects = Vec::new();
    while live_subjects.len() < 3 {
        let msg = tokio::time::timeout(BOUND, live.next())
            .await
            .expect("live events arrive")
            .unwrap();
        live_subjects.push(msg.subject.to_string());
    }

    // Every other door is a permission error.
    for subject in [
        "walcast.globex.>",
        "walcast.>",
        "_INBOX.>",
        "_INBOX_globex.>",
    ] {
        let _ignored = acme.client.subscribe(subject.to_string()).await;
        assert_denied(&acme, subject).await;
    }
    acme.client
        .publish("walcast.acme.project.created", "forged".into())
        .await
        .unwrap();
    acme.client.flush().await.unwrap();
    assert_denied(&acme, "walcast.acme.project.created").await;
    for subject in ["walcast-api.v1.catchup.globex", "walcast-api.v1.catchup"] {
        let body = json!({"tenant_id": "globex", "after_seq": 0}).to_string();
        let request = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(Duration::from_secs(1)));
        let answer = acme.client.send_request(subject, request).await;
        assert!(answer.is_err(), "{subject} answered");
        assert_denied(&acme, subject).await;
    }
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(acme.client.clone());
    let consumers = [
        ("x1", "", "$JS.API.CONSUMER.CREATE.WALCAST.x1"),
        (
            "x2",
            "walcast.globex.>",
            "$JS.API.CONSUMER.CREATE.WALCAST.x2.walcast.globex.>",
        ),
    ];
    for (name, filter, subject) in consumers {
        let config = consumer::pull::OrderedConfig {
            name: Some(name.into()),
            filter_subject: filter.into(),
            ..Default::default()
        };
        let created = js.create_consumer_on_stream(config, "WALCAST").await;
        assert!(created.is_err(), "consumer {name} ({filter:?}) was created");
        assert_denied(&acme, subject).await;
    }
    // Unnamed: the subject without the filter.
    let unnamed = consumer::pull::OrderedConfig {
        filter_subject: "walcast.acme.>".into(),
        ..Default::default()
    };
    assert!(
        js.create_consumer_on_stream(unnamed, "WALCAST")
            .await
            .is_err()
    );
    assert_denied(&acme, "$JS.API.CONSUMER.CREATE.WALCAST\"").await;
    // The allowed subject with another tenant's filter in the body.
    let smuggled = json!({"stream_name": "WALCAST", "action": "",
        "config": {"name": "x3", "filter_subject": "walcast.globex.>",
                   "deliver_policy": "all", "ack_policy": "none"}});
    let reply = acme
        .client
        .request(
            "$JS.API.CONSUMER.CREATE.WALCAST.x3.walcast.acme.>",
            smuggled.to_string().into(),
        )
        .await
        .expect("JetStream answers");
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        reply.get("error").is_some(),
        "foreign filter accepted: {reply}"
    );
    // Direct gets of another tenant's events and state keys; stream info.
    let stream = js.get_stream_no_info("WALCAST").await.unwrap();
    assert!(
        stream
            .direct_get_last_for_subject("walcast.globex.project.created")
            .await
            .is_err()
    );
    assert_denied(
        &acme,
        "$JS.API.DIRECT.GET.WALCAST.walcast.globex.project.created",
    )
    .await;
    let kv = js.get_stream_no_info("KV_WALCAST_STATE").await.unwrap();
    let own_key = snapshot.rows.keys().next().unwrap().clone();
    let theirs = own_key.replacen("acme.", "globex.", 1);
    let own = kv
        .direct_get_last_for_subject(format!("$KV.WALCAST_STATE.{own_key}"))
        .await;
    assert!(own.is_ok(), "A cannot read its own key {own_key}: {own:?}");
    assert!(
        kv.direct_get_last_for_subject(format!("$KV.WALCAST_STATE.{theirs}"))
            .await
            .is_err()
    );
    assert_denied(
        &acme,
        &format!("$JS.API.DIRECT.GET.KV_WALCAST_STATE.$KV.WALCAST_STATE.{theirs}"),
    )
    .await;
    assert!(js.get_stream("WALCAST").await.is_err());
    assert_denied(&acme, "$JS.API.STREAM.INFO.WALCAST").await;

    // Nothing of globex ever reached A.
    insert_projects(&pg, "globex", &["g7"]).await;
    insert_projects(&pg, "acme", &["a6"]).await;
    let last = tokio::time::timeout(BOUND, live.next())
        .await
        .unwrap()
        .unwrap();
    live_subjects.push(last.subject.to_string());
    assert!(
        live_subjects.iter().all(|s| s.starts_with("walcast.acme.")),
        "{live_subjects:?}"
    );
    match tokio::time::timeout(BOUND, state.next()).await {
        Ok(Some(Ok(StateUpdate::Event(e)))) => {
            assert_eq!((e.tenant_id.as_str(), e.seq), ("acme", 6))
        }
        other => panic!("expected acme's event 6, got {other:?}"),
    }
    drop((state, history));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_a_reason_and_a_callout_outage_spares_open_connections() {
    let callout = Callout::new(false);
    let nats = callout.start_nats();
    let dir = TempDir::new("auth-callout").unwrap();
    let mut vars = callout.env_vars();
    vars.push(("WALCAST_NATS_URL".into(), walcast_url(&nats)));
    let http_addr = format!("127.0.0.1:{}", free_port());
    vars.push(("WALCAST_HTTP_ADDR".into(), http_addr.clone()));
    let mut auth = Walcast::start_command("auth", "auth", dir.path(), &vars, &[]);
    auth.wait_log("auth callout answering", BOUND).await;

    let good = connect_tenant(&nats.url(), "acme").await;
    let mut live = good.client.subscribe("walcast.acme.>").await.unwrap();
    good.client.flush().await.unwrap();

    let exp = now() + 3600;
    let bad = [
        (
            "expired",
            token_with(json!({"tenant_id": "acme", "exp": now() - 120}), SECRET),
        ),
        (
            "bad_signature",
            token_with(json!({"tenant_id": "acme", "exp": exp}), "not-the-secret"),
        ),
        (
            "no_tenant",
            token_with(json!({"sub": "u", "exp": exp}), SECRET),
        ),
        (
            "invalid_tenant",
            token_with(json!({"tenant_id": "a.b", "exp": exp}), SECRET),
        ),
        (
            "invalid_tenant",
            token_with(json!({"tenant_id": "*", "exp": exp}), SECRET),
        ),
        (
            "invalid_tenant",
            token_with(json!({"tenant_id": ">", "exp": exp}), SECRET),
        ),
        (
            "no_expiry",
            token_with(json!({"tenant_id": "acme"}), SECRET),
        ),
        ("malformed", "not-a-jwt-at-all".to_string()),
    ];
    for (reason, token) in &bad {
        let refused = TenantConnection::connect(&nats.url(), token, "acme").await;
        let error = refused
            .err()
            .unwrap_or_else(|| panic!("{reason}: token let in"));
        assert!(
            error.to_string().to_lowercase().contains("authorization"),
            "{reason}: {error}"
        );
        auth.wait_log(&format!("reason=\"{reason}\""), BOUND).await;
    }
    let log = auth.log();
    for (reason, token) in &bad {
        let payload = token.split('.').nth(1).unwrap_or(token);
        assert!(
            !log.contains(token.as_str()) && !log.contains(payload),
            "{reason}: the token is in the log"
        );
    }
    assert!(!log.contains(SECRET), "the secret is in the log");
    // Counted: one login allowed, each refusal by its reason, and timed.
    let metrics = [
        ("walcast_auth_allowed_total", 1.0),
        ("walcast_auth_refused_total{reason=\"expired\"}", 1.0),
        ("walcast_auth_refused_total{reason=\"invalid_tenant\"}", 3.0),
        ("walcast_auth_seconds_count", bad.len() as f64 + 1.0),
    ];
    for (name, want) in metrics {
        let seen = wait_metric(&http_addr, name, want, BOUND).await;
        assert_eq!(seen, Some(want), "{name}");
    }
    assert!(
        !log.contains(&callout.issuer.seed().unwrap()),
        "the seed is in the log"
    );

    // Callout down: open connections keep streaming, new logins fail.
    auth.kill9().await;
    let admin = admin(&nats).await;
    admin
        .publish("walcast.acme.task.created", "after the outage".into())
        .await
        .unwrap();
    admin.flush().await.unwrap();
    let msg = tokio::time::timeout(BOUND, live.next())
        .await
        .expect("the open connection still receives")
        .unwrap();
    assert_eq!(msg.payload.as_ref(), b"after the outage");
    let refused = TenantConnection::connect(&nats.url(), &token("acme"), "acme").await;
    let error = refused.err().expect("no login while the callout is down");
    assert!(
        error.to_string().to_lowercase().contains("authorization"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walcast_check_tests_the_callout_wiring_and_names_the_fix() {
    let check = |callout: &Callout, nats: &crate::support::nats::Nats| {
        let mut vars = callout.env_vars();
        vars.push(("WALCAST_NATS_URL".into(), walcast_url(nats)));
        vars.push((
            "WALCAST_DATABASE_URL".into(),
            "postgres://walcast@127.0.0.1:1/app".into(),
        ));
        let out = run_bounded(&["check"], &vars, BOUND);
        assert_ne!(out.code, Some(101), "check panicked:\n{}", out.stderr);
        out.stdout
    };
    let encrypted = Callout::new(true);
    let nats = encrypted.start_nats();
    let good = check(&encrypted, &nats);
    let issuer = encrypted.issuer.public_key();
    assert!(
        good.contains(&format!("✓ auth callout keys load: issuer {issuer}")),
        "{good}"
    );
    assert!(
        good.contains("✓ auth callout: a test token for tenant walcast-check logs in, confined"),
        "{good}"
    );
    // walcast's keys are not the ones the server names.
    let stranger = Callout::new(true);
    let wrong_xkey = check(&stranger, &nats);
    assert!(
        wrong_xkey.contains("✗ auth callout: walcast could not read the server's request")
            && wrong_xkey.contains("auth_callout { xkey }"),
        "{wrong_xkey}"
    );
    let plain = Callout::new(false);
    let plain_nats = plain.start_nats();
    let wrong_issuer = check(&Callout::new(false), &plain_nats);
    assert!(
        wrong_issuer.contains("✗ auth callout: walcast issued a user but the server refused it")
            && wrong_issuer.contains("auth_callout { issuer }"),
        "{wrong_issuer}"
    );
    for out in [&good, &wrong_xkey, &wrong_issuer] {
        assert!(!out.contains(SECRET), "{out}");
    }
}

/// Over a randomized workload of five tenants, a tenant user's connection
/// (a live subscription and a client subscription from seq 0) receives
/// exactly its tenant's events and none of the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_workload_a_tenant_receives_only_its_own_events() {
    let (callout, env) = migrated_env(false).await;
    let options = callout.apply(Options {
        nats_url: Some(walcast_url(&env.nats)),
        ..env.options()
    });
    let daemon = Daemon::start(options.resolve().expect("valid settings"));
    let tenant = "tenant-0";
    let conn = connect_tenant(&env.nats.url(), tenant).await;
    let mut live = conn.client.subscribe("walcast.>").await.unwrap();
    // That subscription is refused; its own tenant's is not.
    assert_denied(&conn, "walcast.>").await;
    let mut own = conn
        .client
        .subscribe(format!("walcast.{tenant}.>"))
        .await
        .unwrap();
    let client = walcast_client::Client::new(conn.client.clone(), Default::default());
    let mut history = client.subscribe(tenant, 0).expect("subscribe");

    let mut pg = env.pg.client().await;
    let mut workload =
        crate::support::workload::Workload::new(crate::support::workload::Workload::seed(), 5);
    workload.run(&mut pg, 300).await;
    env.wait_caught_up(&pg, Duration::from_secs(60)).await;
    let operator = jetstream::new(admin(&env.nats).await);
    let mut stream = operator.get_stream("WALCAST").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    // The tenant's events, counted from the stream as an operator sees it.
    let mut expected = 0u64;
    for seq in 1..=last {
        let msg = stream.get_raw_message(seq).await.unwrap();
        if msg.subject.starts_with(&format!("walcast.{tenant}.")) {
            expected += 1;
        }
    }
    assert!(expected > 0, "the workload never touched {tenant}");
    let mut seen = 0u64;
    while seen < expected {
        let msg = tokio::time::timeout(BOUND, own.next())
            .await
            .expect("the tenant's live events arrive")
            .unwrap();
        assert!(
            msg.subject.starts_with(&format!("walcast.{tenant}.")),
            "{}",
            msg.subject
        );
        seen += 1;
    }
    for seq in 1..=expected {
        match tokio::time::timeout(BOUND, history.next()).await {
            Ok(Some(Ok(Update::Event(e)))) => {
                assert_eq!((e.tenant_id.as_str(), e.seq), (tenant, seq))
            }
            other => panic!("expected {tenant}'s event {seq}, got {other:?}"),
        }
    }
    // The refused subscription delivered nothing: anything sent to it would
    // have been dispatched before the tenant's last event, read above.
    assert!(
        futures::FutureExt::now_or_never(live.next()).is_none(),
        "the refused walcast.> subscription delivered a message"
    );
    drop(history);
    daemon.stop().await.expect("clean stop");
}

/// The nats-server lets a user write copies of what it may read anywhere
/// in its account (nats-server issue 8274): a pull request's reply subject
/// and a push consumer's deliver subject are not checked against its
/// permissions. A tenant user that pulls its own state values with a reply
/// subject in the stream's subjects, or pushes them to one it subscribes to
/// itself, makes the server store them in the event stream. Before walcast
/// chained its publishes by id and recorded such messages, it took them for
/// its own events and skipped as many real ones — other tenants' too —
/// without a word. Now every committed change is in the stream exactly
/// once, in order, and the foreign messages are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_writing_into_the_stream_cannot_make_walcast_lose_events() {
    let (callout, env) = migrated_env(false).await;
    let pg = env.pg.client().await;
    let oracle = crate::support::oracle::Oracle::create(&pg).await;
    let http = format!("127.0.0.1:{}", free_port());
    let options = callout.apply(Options {
        nats_url: Some(walcast_url(&env.nats)),
        http_addr: Some(http.clone()),
        ..env.options()
    });
    let daemon = Daemon::start(options.resolve().expect("valid settings"));
    insert_projects(&pg, "acme", &["a1", "a2"]).await;
    let operator = jetstream::new(admin(&env.nats).await);
    let state_ready = || async {
        match operator.get_stream("KV_WALCAST_STATE").await {
            Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages >= 2),
            Err(_) => false,
        }
    };
    wait_until(BOUND, state_ready)
        .await
        .expect("acme's rows reach the state");
    let acme = connect_tenant(&env.nats.url(), "acme").await;
    // Push: a consumer delivering to a literal subject of the stream the
    // tenant subscribes to itself (the server delivers only with interest).
    let _bait = acme
        .client
        .subscribe("walcast.acme.task.created")
        .await
        .unwrap();
    acme.client.flush().await.unwrap();
    let push = json!({"deliver_subject": "walcast.acme.task.created"});
    create_state_consumer(&acme, "push", push).await;
    let writes = async {
        for round in 0..12 {
            insert_projects(&pg, "acme", &[&format!("a-{round}")]).await;
            insert_projects(&pg, "globex", &[&format!("g-{round}"), "g"]).await;
        }
    };
    // Pull: state values delivered to a reply subject in the stream's.
    let pulls = async {
        for round in 0..12 {
            let name = format!("pull{round}");
            create_state_consumer(&acme, &name, json!({})).await;
            let next = format!("$JS.API.CONSUMER.MSG.NEXT.KV_WALCAST_STATE.{name}");
            let request = json!({"batch": 3, "no_wait": true}).to_string();
            acme.client
                .publish_with_reply(next, "walcast.acme.project.created", request.into())
                .await
                .unwrap();
            acme.client.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::join!(writes, pulls);
    insert_projects(&pg, "globex", &["last"]).await;
    env.wait_caught_up(&pg, Duration::from_secs(60)).await;

    let stream = crate::support::daemon::read_stream_as(admin(&env.nats).await, "WALCAST").await;
    let (own, foreign): (Vec<_>, Vec<_>) = stream
        .into_iter()
        .partition(crate::support::daemon::StreamEvent::is_walcasts);
    assert!(
        !foreign.is_empty(),
        "no message reached the stream from the tenant: the test proves nothing"
    );
    let changes = oracle.changes(&pg).await;
    assert_eq!(changes.len(), 2 + 12 * 3 + 1);
    crate::support::oracle::assert_matches_oracle(&own, &changes);
    let mut seqs: std::collections::HashMap<&str, u64> = Default::default();
    for m in &own {
        let last = seqs.entry(m.event.tenant_id.as_str()).or_default();
        assert_eq!(
            m.event.seq,
            *last + 1,
            "{} seq after {last}",
            m.event.event_id
        );
        *last += 1;
    }
    assert_eq!(
        (seqs.get("acme"), seqs.get("globex")),
        (Some(&14), Some(&25))
    );
    let counted =
        crate::support::edge::scrape(&http, "walcast_stream_foreign_messages_total").await;
    assert!(counted.is_some_and(|n| n >= 1.0), "{counted:?}");
    drop(pg);
    daemon.stop().await.expect("clean stop");
}

/// Creates a consumer on the tenant's state keys, as the tenant may.
async fn create_state_consumer(conn: &TenantConnection, name: &str, extra: serde_json::Value) {
    let mut config = json!({"name": name, "filter_subject": "$KV.WALCAST_STATE.acme.>",
        "deliver_policy": "all", "ack_policy": "none"});
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let body = json!({"stream_name": "KV_WALCAST_STATE", "action": "", "config": config});
    let subject =
        format!("$JS.API.CONSUMER.CREATE.KV_WALCAST_STATE.{name}.$KV.WALCAST_STATE.acme.>");
    let reply = conn
        .client
        .request(subject, body.to_string().into())
        .await
        .expect("JetStream answers");
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(reply.get("error").is_none(), "{reply}");
}
