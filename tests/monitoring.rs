//! The operator's dashboard and alert rules (deploy/monitoring/, issue 19):
//! every metric a query or alert expression reads is one walcast exports —
//! a constant of `src/telemetry/metrics.rs`, with only the labels the code
//! records for it — and, scraped from a running walcast, each one the
//! workload here exercises is really on `/metrics`. A renamed metric or a
//! typo in a panel fails here instead of leaving an on-call dashboard blank.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use yaml_rust2::YamlLoader;

use crate::support::daemon::Env;
use crate::support::edge::{http_get, start_walcast, uuid};
use crate::support::{TempDir, repo_root, wait_for};

const DASHBOARD: &str = "deploy/monitoring/walcast-dashboard.json";
const ALERTS: &str = "deploy/monitoring/walcast-alerts.yaml";

/// Metrics that appear on `/metrics` only after an incident (an error, a
/// restart, a broker loss, a reconnect, a row left out of the state).
/// (`walcast_errors_total` and `walcast_dead_letters_total` are there from
/// the start, at 0: SPEC §5 lists them.)
const AFTER_AN_INCIDENT: &[&str] = &[
    "walcast_pipeline_restarts_total",
    "walcast_republished_events_total",
    "walcast_nats_reconnects_total",
    "walcast_state_skipped_total",
];

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// What walcast exports: metric name -> label names the code records.
/// Histograms also export `_bucket` (with `le`), `_sum` and `_count`.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let metrics_rs = read("src/telemetry/metrics.rs");
    let mut consts = BTreeMap::new();
    for line in metrics_rs.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, value)) = rest.split_once(": &str = \"") else {
            continue;
        };
        consts.insert(name.to_string(), value.trim_end_matches("\";").to_string());
    }
    assert!(consts.len() > 20, "metric constants parsed: {consts:?}");
    let histograms: BTreeSet<&str> = metrics_rs
        .split("describe_histogram!(")
        .skip(1)
        .filter_map(|rest| rest.split([',', ')']).next())
        .map(str::trim)
        .collect();
    // The labels each constant is recorded with, from every recording site.
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in source_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for macro_ in ["counter!(", "gauge!(", "histogram!("] {
            for site in text.split(macro_).skip(1) {
                let call = site.split(')').next().unwrap_or_default();
                let constant = call.split(',').next().unwrap_or_default();
                let constant = constant.rsplit("::").next().unwrap_or_default().trim();
                let Some(name) = consts.get(constant) else {
                    continue;
                };
                let keys = labels.entry(name.clone()).or_default();
                for part in call.split(',').skip(1) {
                    if let Some((key, _)) = part.split_once("=>") {
                        keys.insert(key.trim().trim_matches('"').to_string());
                    }
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for (constant, name) in &consts {
        let keys = labels.get(name).cloned().unwrap_or_default();
        if histograms.contains(constant.as_str()) {
            let mut bucket = keys.clone();
            bucket.insert("le".into());
            out.insert(format!("{name}_bucket"), bucket);
            out.insert(format!("{name}_sum"), keys.clone());
            out.insert(format!("{name}_count"), keys.clone());
        }
        out.insert(name.clone(), keys);
    }
    out
}

fn source_files() -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo_root().join("src"), &mut out);
    out
}

/// PromQL words that are not metric names.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metrics a PromQL expression reads, each with the label names its
/// matchers use. A small scanner: strings, ranges and numbers are skipped,
/// identifiers followed by `(` are functions, aggregations and label lists
/// are not metrics.
fn promql_metrics(expr: &str) -> Vec<(String, Vec<String>)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut i = 0;
    let skip_string = |i: usize| -> usize {
        let quote = chars[i];
        let mut j = i + 1;
        while j < chars.len() && chars[j] != quote {
            j += if chars[j] == '\\' { 2 } else { 1 };
        }
        j + 1
    };
    let next_non_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || chars[i] == '+' && matches!(chars[i - 1], 'e' | 'E'))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_space(i);
            let followed = chars.get(after).copied();
            if LABEL_LISTS.contains(&word.as_str()) && followed == Some('(') {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
            } else if followed == Some('(')
                || AGGREGATIONS.contains(&word.as_str())
                || KEYWORDS.contains(&word.as_str())
            {
                continue;
            } else {
                let mut labels = Vec::new();
                if followed == Some('{') {
                    i = after + 1;
                    let mut name = String::new();
                    while i < chars.len() && chars[i] != '}' {
                        match chars[i] {
                            '"' | '\'' | '`' => i = skip_string(i),
                            '=' | '!' => {
                                if !name.is_empty() {
                                    labels.push(std::mem::take(&mut name));
                                }
                                i += 1;
                            }
                            ',' => {
                                name.clear();
                                i += 1;
                            }
                            ch => {
                                if !ch.is_whitespace() && ch != '~' {
                                    name.push(ch);
                                }
                                i += 1;
                            }
                        }
                    }
                    i += 1;
                }
                out.push((word, labels));
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every query of the dashboard: (where, PromQL), and the metrics its
/// template variables read.
fn dashboard_queries(dashboard: &Value) -> (Vec<(String, String)>, Vec<String>) {
    fn panels<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            panels(&panel["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    let mut queries = Vec::new();
    for panel in all {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            queries.push((format!("panel {:?}", panel["title"]), expr.to_string()));
        }
    }
    let mut variables = Vec::new();
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            let q = var["query"]["query"]
                .as_str()
                .expect("a query variable has a query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .expect("query variables use label_values(metric, label)");
            variables.push(inner.split(',').next().unwrap().trim().to_string());
        }
    }
    (queries, variables)
}

fn alert_exprs() -> Vec<(String, String)> {
    let docs = YamlLoader::load_from_str(&read(ALERTS)).expect("alerts are YAML");
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            assert!(names.insert(name.to_string()), "duplicate alert {name}");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some()
                    && rule["annotations"]["description"].as_str().is_some(),
                "{name}: summary and description"
            );
            let expr = rule["expr"].as_str().expect("expr").to_string();
            out.push((format!("alert {name}"), expr));
        }
    }
    out
}

/// Every (where, metric, labels) the two files read.
fn referenced() -> Vec<(String, String, Vec<String>)> {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let (queries, variables) = dashboard_queries(&dashboard);
    let mut out = Vec::new();
    for (place, expr) in queries.into_iter().chain(alert_exprs()) {
        let metrics = promql_metrics(&expr);
        assert!(!metrics.is_empty(), "{place}: no metric in {expr}");
        for (name, labels) in metrics {
            out.push((place.clone(), name, labels));
        }
    }
    for name in variables {
        out.push(("a template variable".into(), name, Vec::new()));
    }
    out
}

#[test]
fn promql_scanner_finds_metrics_and_labels() {
    let found = promql_metrics(
        r#"histogram_quantile(0.99, sum by (le) (rate(walcast_x_bucket{instance=~"$instance", le!="1"}[$__rate_interval]))) > 1e9 and on (instance) changes(walcast_y[15m]) == 0"#,
    );
    assert_eq!(
        found,
        vec![
            (
                "walcast_x_bucket".to_string(),
                vec!["instance".to_string(), "le".to_string()]
            ),
            ("walcast_y".to_string(), vec![]),
        ]
    );
}

#[test]
fn the_dashboard_and_alerts_read_only_metrics_walcast_exports() {
    let exported = exported();
    let mut problems = Vec::new();
    let refs = referenced();
    for (place, name, labels) in &refs {
        let Some(known) = exported.get(name) else {
            problems.push(format!("{place}: {name} is not a metric walcast exports"));
            continue;
        };
        for label in labels {
            if !(known.contains(label) || label == "instance" || label == "job") {
                problems.push(format!(
                    "{place}: {name} has no label {label} (it has {known:?})"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // What the on-call person watches (issue 19) is in both files.
    let dashboard_text = read(DASHBOARD);
    let alerts_text = read(ALERTS);
    for watched in [
        "walcast_replication_lag_bytes",
        "walcast_replication_lag_seconds",
        "walcast_slot_confirm_lag_bytes",
        "walcast_slot_retained_wal_bytes",
        "walcast_errors_total",
        "walcast_dead_letters_total",
        "walcast_confirmed_lsn",
        "walcast_state_lag_events",
        "walcast_catchup_requests_total",
        "walcast_up",
    ] {
        assert!(
            dashboard_text.contains(watched),
            "the dashboard shows {watched}"
        );
        assert!(alerts_text.contains(watched), "an alert watches {watched}");
    }
}

#[test]
fn the_dashboard_is_importable_with_a_datasource_variable() {
    let d: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    assert!(d["uid"].is_string() && d["title"].is_string() && d["schemaVersion"].is_u64());
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let mut ids = BTreeSet::new();
    for panel in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "unique panel ids"
        );
        assert!(
            panel["gridPos"]["w"].is_u64(),
            "{}: gridPos",
            panel["title"]
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_they_read_is_on_a_live_walcast_metrics_page() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("monitoring").unwrap();
    let (mut walcast, addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    // Events, a dead letter, a catch-up request.
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title) VALUES ($1::text::uuid, 'acme', 'a'), ($2::text::uuid, 'bad.tenant', 'b')",
            &[&uuid(1), &uuid(2)],
        )
        .await
        .unwrap();
    env.wait_for_messages(2, Duration::from_secs(30)).await;
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let reply = nats
        .request(
            "walcast-api.v1.catchup",
            r#"{"tenant_id":"acme","after_seq":0}"#.into(),
        )
        .await
        .expect("catch-up answers");
    assert!(String::from_utf8_lossy(&reply.payload).contains("start_stream_seq"));

    let wanted: BTreeSet<String> = referenced()
        .into_iter()
        .map(|(_, name, _)| name)
        .filter(|name| !AFTER_AN_INCIDENT.contains(&name.as_str()))
        .collect();
    // The slot gauges are measured every few checkpoint ticks.
    let scraped = wait_for(Duration::from_secs(30), || {
        let (addr, wanted) = (&addr, &wanted);
        async move {
            let (_, body) = http_get(addr, "/metrics").await?;
            let names: BTreeSet<String> = body
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split(['{', ' ']).next())
                .map(str::to_string)
                .collect();
            wanted.is_subset(&names).then_some(names)
        }
    })
    .await;
    let scraped = match scraped {
        Ok(names) => names,
        Err(_) => {
            let (_, body) = http_get(&addr, "/metrics").await.unwrap_or_default();
            panic!(
                "missing from /metrics: {:?}\n--- /metrics ---\n{body}",
                wanted
                    .iter()
                    .filter(|w| !body.contains(w.as_str()))
                    .collect::<Vec<_>>()
            );
        }
    };
    assert!(scraped.contains("walcast_dead_letters_total"));
    assert!(
        scraped.contains("walcast_errors_total"),
        "errors are on /metrics at 0 before any (SPEC §5)"
    );
    walcast.stop(Duration::from_secs(20)).await;
}
