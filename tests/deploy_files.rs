//! Config check of the files users deploy walcast with (SPEC §5):
//! `docker-compose.yml`, `deploy/` (Kubernetes), `Dockerfile`, `.dockerignore`
//! and `walcast.example.toml`. They cannot run on the development machines, so
//! these tests hold them to the code: every setting they use exists, every TOML
//! file is accepted by walcast's own parser and resolves, subcommands, ports,
//! probes, mounts and the binary name agree. The list of settings comes from
//! `src/config.rs` (and serde), so a renamed or added setting fails here until
//! the files follow. Each test lists every problem it finds, with its place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use walcast::config::{Options, Settings};
use yaml_rust2::{Yaml, YamlLoader};

const HTTP_PORT: u16 = 9187;
const NATS_PORT: u16 = 4222;
const PG_PORT: u16 = 5432;
/// The subcommands SPEC §5 names.
const SUBCOMMANDS: &[&str] = &["run", "migrate", "check", "tail"];
const COMPOSE: &str = "docker-compose.yml";
const EXAMPLE_TOML: &str = "walcast.example.toml";
const DOCKERFILE: &str = "Dockerfile";
const INITDB_DIR: &str = "/docker-entrypoint-initdb.d/";

// ----------------------------------------------------------------------------
// Reading files and reporting

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// The documents of a YAML file (empty documents dropped).
fn load_yaml(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel))
        .unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
        .into_iter()
        .filter(|d| !d.is_null() && !d.is_badvalue())
        .collect()
}

/// Every `*.yaml` / `*.yml` under deploy/, relative to the repository root,
/// except deploy/monitoring/ (Prometheus rules, not Kubernetes manifests;
/// tests/monitoring.rs checks them).
fn deploy_yaml_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("read deploy/ entry").path();
            if path.is_dir() && path.ends_with("monitoring") {
                continue;
            }
            if path.is_dir() {
                walk(&path, out);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&root().join("deploy"), &mut paths);
    let mut files: Vec<String> = paths
        .iter()
        .map(|p| {
            p.strip_prefix(root())
                .expect("under the repository")
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/ has no *.yaml files");
    files
}

/// Collects every problem a test finds, then fails once with all of them.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, message: impl Into<String>) {
        self.0.push(message.into());
    }

    fn check(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.0.push(message());
        }
    }

    #[track_caller]
    fn assert_none(self, what: &str) {
        if !self.0.is_empty() {
            panic!(
                "{what}: {} problem(s):\n  - {}",
                self.0.len(),
                self.0.join("\n  - ")
            );
        }
    }
}

// ----------------------------------------------------------------------------
// What the code says: settings, environment variables, binaries

/// One field of `Options` as declared in src/config.rs.
struct OptionSpec {
    field: String,
    env: Option<String>,
}

impl OptionSpec {
    /// The clap flag: `--` and the field name in kebab-case.
    fn flag(&self) -> String {
        format!("--{}", self.field.replace('_', "-"))
    }
}

/// The strings in double quotes right after each `marker` in `text`.
fn quoted_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.match_indices(marker)
        .filter_map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            rest.find('"').map(|end| &rest[..end])
        })
        .collect()
}

/// The fields of `struct Options` in src/config.rs, in order, each with the
/// `env = "WALCAST_..."` of its `#[arg]` attribute.
fn config_rs_options() -> Vec<OptionSpec> {
    let text = read("src/config.rs");
    let start = text
        .find("pub struct Options {")
        .expect("src/config.rs has no `pub struct Options {`: update tests/deploy_files.rs");
    let mut specs = Vec::new();
    let mut env = None;
    for line in text[start..].lines().skip(1) {
        let line = line.trim();
        if line == "}" {
            break;
        }
        if let Some(name) = quoted_after(line, "env = \"").first() {
            env = Some(name.to_string());
        }
        if let Some((field, _)) = line.strip_prefix("pub ").and_then(|l| l.split_once(':')) {
            specs.push(OptionSpec {
                field: field.trim().to_string(),
                env: env.take(),
            });
        }
    }
    assert!(
        specs.iter().any(|s| s.field == "database_url"),
        "could not read the fields of Options from src/config.rs (found {:?}): update tests/deploy_files.rs",
        specs.iter().map(|s| &s.field).collect::<Vec<_>>()
    );
    specs
}

/// The keys the TOML parser accepts, from serde's "unknown field" message.
fn serde_option_fields() -> BTreeSet<String> {
    let err = toml::from_str::<Options>("deploy_files_probe_key = 1\n")
        .expect_err("Options must reject unknown keys (#[serde(deny_unknown_fields)])");
    let message = err.message().to_string();
    let list = message
        .split_once("expected one of")
        .or_else(|| message.split_once("expected"))
        .map(|(_, list)| list)
        .unwrap_or_else(|| panic!("unexpected serde message for an unknown key: {message}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// The `.rs` files under src/, relative to the repository root.
fn source_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("list src/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every `WALCAST_*` variable walcast reads as a setting: the `env = "..."` of
/// the clap arguments (src/config.rs's `Options`, src/cli.rs and any other
/// command's arguments under src/), and WALCAST_CONFIG.
fn real_env_vars() -> BTreeSet<String> {
    let mut vars: BTreeSet<String> = source_files()
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            quoted_after(&text, "env = \"")
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|v| v.starts_with("WALCAST_"))
        .collect();
    vars.insert("WALCAST_CONFIG".into());
    assert!(
        vars.contains("WALCAST_DATABASE_URL"),
        "found no `env = \"WALCAST_DATABASE_URL\"` in src/config.rs: update tests/deploy_files.rs"
    );
    vars
}

/// The binary names Cargo builds.
fn cargo_bins() -> BTreeSet<String> {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml parses");
    let mut bins: BTreeSet<String> = manifest
        .get("bin")
        .and_then(|b| b.as_array())
        .map(|bins| {
            bins.iter()
                .filter_map(|b| b.get("name")?.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if bins.is_empty() {
        bins.insert(manifest["package"]["name"].as_str().unwrap().to_string());
    }
    bins
}

// ----------------------------------------------------------------------------
// Small parsers: YAML scalars, URLs, addresses

/// A YAML scalar as text (strings, numbers, booleans).
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| v.iter().filter_map(scalar).collect())
        .unwrap_or_default()
}

/// The parts of `scheme://user:password@host:port/path?query` walcast's
/// deployment files use.
#[derive(Debug)]
struct Url {
    user: Option<String>,
    password: Option<String>,
    host: String,
    port: Option<u16>,
    path: String,
}

fn parse_url(url: &str) -> Option<Url> {
    let (_, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((user, pw)) => (Some(user.to_string()), Some(pw.to_string())),
            None => (Some(u.to_string()), None),
        },
        None => (None, None),
    };
    let (host, port) = split_host_port(hostport)?;
    let path = tail.split('?').next().unwrap_or("").trim_start_matches('/');
    Some(Url {
        user,
        password,
        host,
        port,
        path: path.to_string(),
    })
}

/// `host:port`, `[v6]:port` or `host` (port `None`).
fn split_host_port(text: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None => None,
        };
        return Some((host.to_string(), port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), Some(port.parse().ok()?))),
        None => Some((text.to_string(), None)),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

// ----------------------------------------------------------------------------
// docker-compose.yml

pub(crate) fn compose() -> Yaml {
    let mut docs = load_yaml(COMPOSE);
    assert_eq!(docs.len(), 1, "{COMPOSE} must be one YAML document");
    docs.remove(0)
}

pub(crate) fn services(compose: &Yaml) -> Vec<(String, &Yaml)> {
    compose["services"]
        .as_hash()
        .unwrap_or_else(|| panic!("{COMPOSE} has no `services:` mapping"))
        .iter()
        .map(|(k, v)| (scalar(k).unwrap_or_default(), v))
        .collect()
}

/// A service's environment, in either the mapping or the `KEY=value` list form.
pub(crate) fn compose_env(service: &Yaml) -> Vec<(String, String)> {
    let env = &service["environment"];
    if let Some(map) = env.as_hash() {
        map.iter()
            .map(|(k, v)| (scalar(k).unwrap_or_default(), scalar(v).unwrap_or_default()))
            .collect()
    } else {
        strs(env)
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv, String::new()),
            })
            .collect()
    }
}

/// `command:` / `entrypoint:` as a list (a string is split on whitespace).
fn compose_words(y: &Yaml) -> Option<Vec<String>> {
    match y {
        Yaml::String(s) => Some(s.split_whitespace().map(String::from).collect()),
        Yaml::Array(_) => Some(strs(y)),
        _ => None,
    }
}

/// The container side of each `ports:` entry.
fn compose_ports(service: &Yaml) -> Vec<u16> {
    let mut ports = Vec::new();
    for p in service["ports"].as_vec().into_iter().flatten() {
        let text = if let Some(target) = scalar(&p["target"]) {
            target
        } else {
            scalar(p).unwrap_or_default()
        };
        let container = text
            .rsplit(':')
            .next()
            .unwrap_or("")
            .split('/')
            .next()
            .unwrap_or("");
        if let Ok(port) = container.parse() {
            ports.push(port);
        }
    }
    ports
}

/// Bind mounts of a service: (host path, container path, read-only).
pub(crate) fn bind_mounts(service: &Yaml) -> Vec<(String, String, bool)> {
    let mut mounts = Vec::new();
    for v in service["volumes"].as_vec().into_iter().flatten() {
        if let Some(short) = v.as_str() {
            let parts: Vec<&str> = short.split(':').collect();
            if parts.len() >= 2 && (parts[0].starts_with('.') || parts[0].starts_with('/')) {
                let ro = parts
                    .get(2)
                    .is_some_and(|m| m.split(',').any(|o| o == "ro"));
                mounts.push((parts[0].to_string(), parts[1].to_string(), ro));
            }
        } else if v["type"].as_str() == Some("bind") {
            mounts.push((
                scalar(&v["source"]).unwrap_or_default(),
                scalar(&v["target"]).unwrap_or_default(),
                v["read_only"].as_bool() == Some(true),
            ));
        }
    }
    mounts
}

/// Named volumes a service mounts: (volume, container path).
fn named_volumes(service: &Yaml) -> Vec<(String, String)> {
    strs(&service["volumes"])
        .into_iter()
        .filter_map(|v| {
            let mut parts = v.split(':');
            let (source, target) = (parts.next()?, parts.next()?);
            (!source.starts_with('.') && !source.starts_with('/'))
                .then(|| (source.to_string(), target.to_string()))
        })
        .collect()
}

/// The repository name of an image reference: `registry/x/walcast:tag` -> `walcast`.
fn image_repo(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(['@', ':']).next().unwrap_or(last)
}

fn is_walcast_image(image: &str) -> bool {
    image_repo(image) == "walcast"
}

/// The compose services that run the walcast image.
fn is_walcast_service(service: &Yaml) -> bool {
    let built_here = match &service["build"] {
        Yaml::String(context) => context == ".",
        b @ Yaml::Hash(_) => scalar(&b["context"]).as_deref() == Some("."),
        _ => false,
    };
    built_here || service["image"].as_str().is_some_and(is_walcast_image)
}

// ----------------------------------------------------------------------------
// Kubernetes objects in deploy/

struct Object {
    file: String,
    doc: Yaml,
}

impl Object {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("?")
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("?")
    }

    fn place(&self) -> String {
        format!("{} {}/{}", self.file, self.kind(), self.name())
    }

    /// The Pod template's spec of a workload, or a Pod's spec.
    fn pod_spec(&self) -> Option<&Yaml> {
        let spec = match self.kind() {
            "Pod" => &self.doc["spec"],
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                &self.doc["spec"]["template"]["spec"]
            }
            "CronJob" => &self.doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => return None,
        };
        spec.as_hash().map(|_| spec)
    }

    fn pod_labels(&self) -> &Yaml {
        match self.kind() {
            "Pod" => &self.doc["metadata"]["labels"],
            "CronJob" => &self.doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"],
            _ => &self.doc["spec"]["template"]["metadata"]["labels"],
        }
    }
}

/// Every Kubernetes object in deploy/*.yaml (kustomization files excluded).
fn objects() -> Vec<Object> {
    let mut objects = Vec::new();
    for file in deploy_yaml_files() {
        for doc in load_yaml(&file) {
            if doc["kind"].as_str() == Some("Kustomization") {
                continue;
            }
            assert!(
                doc["apiVersion"].as_str().is_some() && doc["kind"].as_str().is_some(),
                "{file}: a document without apiVersion and kind"
            );
            objects.push(Object {
                file: file.clone(),
                doc,
            });
        }
    }
    objects
}

/// A container of a Pod spec.
struct Container<'a> {
    object: &'a Object,
    pod: &'a Yaml,
    c: &'a Yaml,
    /// In `initContainers` without `restartPolicy: Always`: runs to completion.
    one_shot: bool,
}

impl Container<'_> {
    fn name(&self) -> &str {
        self.c["name"].as_str().unwrap_or("?")
    }

    fn place(&self) -> String {
        format!("{} container {}", self.object.place(), self.name())
    }

    fn image(&self) -> &str {
        self.c["image"].as_str().unwrap_or("")
    }

    /// A port number, or a port name looked up in this container's ports.
    fn resolve_port(&self, port: &Yaml) -> Option<u16> {
        if let Some(n) = port.as_i64() {
            return u16::try_from(n).ok();
        }
        let name = port.as_str()?;
        if let Ok(n) = name.parse() {
            return Some(n);
        }
        self.c["ports"]
            .as_vec()?
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| u16::try_from(p["containerPort"].as_i64()?).ok())
    }

    fn container_ports(&self) -> Vec<u16> {
        self.c["ports"]
            .as_vec()
            .into_iter()
            .flatten()
            .filter_map(|p| u16::try_from(p["containerPort"].as_i64()?).ok())
            .collect()
    }

    /// A security setting, from the container or else the Pod.
    fn security(&self, key: &str) -> &Yaml {
        let own = &self.c["securityContext"][key];
        if own.is_badvalue() {
            &self.pod["securityContext"][key]
        } else {
            own
        }
    }
}

fn containers(objects: &[Object]) -> Vec<Container<'_>> {
    let mut out = Vec::new();
    for object in objects {
        let Some(pod) = object.pod_spec() else {
            continue;
        };
        for (list, init) in [("initContainers", true), ("containers", false)] {
            for c in pod[list].as_vec().into_iter().flatten() {
                let one_shot = init && c["restartPolicy"].as_str() != Some("Always");
                out.push(Container {
                    object,
                    pod,
                    c,
                    one_shot,
                });
            }
        }
    }
    out
}

/// A Secret's value from `stringData` in deploy/ (examples only).
fn secret_value(objects: &[Object], name: &str, key: &str) -> Result<String, String> {
    let secret = objects
        .iter()
        .find(|o| o.kind() == "Secret" && o.name() == name)
        .ok_or_else(|| format!("no Secret {name} in deploy/ (add an example of it)"))?;
    scalar(&secret.doc["stringData"][key])
        .ok_or_else(|| format!("{} has no stringData key {key}", secret.place()))
}

// ----------------------------------------------------------------------------
// The Dockerfile

/// Instructions with line continuations joined: (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let text = read(DOCKERFILE);
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (instr, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((instr.to_ascii_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

/// The stages: (FROM arguments, instructions after it).
fn dockerfile_stages() -> Vec<(String, Vec<(String, String)>)> {
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (instr, args) in dockerfile() {
        if instr == "FROM" {
            stages.push((args, Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.1.push((instr, args));
        }
    }
    stages
}

fn exec_form(args: &str, what: &str) -> Result<Vec<String>, String> {
    serde_json::from_str(args).map_err(|_| {
        format!("{DOCKERFILE}: {what} must be in exec form, like [\"walcast\"], not {args}")
    })
}

/// `COPY` sources and destination; `None` for `COPY --from=...`.
fn copy_parts(args: &str) -> Option<(Vec<String>, String)> {
    if args.contains("--from=") {
        return None;
    }
    let mut words: Vec<String> = args
        .split_whitespace()
        .filter(|w| !w.starts_with("--"))
        .map(String::from)
        .collect();
    let dest = words.pop()?;
    Some((words, dest))
}

// ----------------------------------------------------------------------------
// How each walcast container is started, and what settings it resolves to

/// A way walcast is started by one of the files.
struct Invocation {
    place: String,
    /// The arguments after the `walcast` entrypoint.
    args: Vec<String>,
    /// Environment; `Err` says why a value is unknown (e.g. a missing Secret).
    env: Vec<(String, Result<String, String>)>,
    /// Files mounted into the container: path -> content.
    files: BTreeMap<String, String>,
    /// Whether the settings can be resolved (false for the image's bare default).
    resolve: bool,
    /// Compose service or Kubernetes container, for port checks.
    origin: Origin,
    /// Kept running (restarted when it exits), so it must be the daemon.
    long_running: bool,
    /// Runs to completion before the Pod's containers start (Kubernetes init container).
    blocks_startup: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Origin {
    Dockerfile,
    Compose,
    Kubernetes,
}

/// `ENTRYPOINT` / `command:` must run the walcast binary (or be left alone).
fn check_entrypoint(p: &mut Problems, place: &str, command: Option<Vec<String>>) {
    if let Some(command) = command {
        p.check(command == ["walcast"], || {
            format!("{place}: command/entrypoint {command:?} replaces the image's `walcast` entrypoint; give arguments only")
        });
    }
}

fn invocations(p: &mut Problems) -> Vec<Invocation> {
    let mut out = Vec::new();

    // The image's default command.
    for (instr, args) in dockerfile() {
        if instr == "CMD" {
            match exec_form(&args, "CMD") {
                Ok(cmd) => out.push(Invocation {
                    place: format!("{DOCKERFILE} CMD"),
                    args: cmd,
                    env: Vec::new(),
                    files: BTreeMap::new(),
                    resolve: false,
                    origin: Origin::Dockerfile,
                    long_running: true,
                    blocks_startup: false,
                }),
                Err(e) => p.add(e),
            }
        }
    }

    // Compose services running the walcast image.
    let compose = compose();
    for (name, service) in services(&compose) {
        if !is_walcast_service(service) {
            continue;
        }
        let place = format!("{COMPOSE} service {name}");
        check_entrypoint(p, &place, compose_words(&service["entrypoint"]));
        let mut files = BTreeMap::new();
        for (source, target, _) in bind_mounts(service) {
            if let Ok(text) = std::fs::read_to_string(root().join(&source)) {
                files.insert(target, text);
            }
        }
        out.push(Invocation {
            args: compose_words(&service["command"]).unwrap_or_else(|| vec!["run".into()]),
            env: compose_env(service)
                .into_iter()
                .map(|(k, v)| (k, Ok(v)))
                .collect(),
            files,
            resolve: true,
            origin: Origin::Compose,
            long_running: matches!(
                service["restart"].as_str(),
                Some("always" | "unless-stopped")
            ),
            blocks_startup: false,
            place,
        });
    }

    // Kubernetes containers running the walcast image.
    let objects = objects();
    for c in containers(&objects) {
        if !is_walcast_image(c.image()) {
            continue;
        }
        let place = c.place();
        let command = c.c["command"].as_vec().map(|_| strs(&c.c["command"]));
        check_entrypoint(p, &place, command);
        let mut env = Vec::new();
        for e in c.c["env"].as_vec().into_iter().flatten() {
            let name = scalar(&e["name"]).unwrap_or_default();
            let value = if let Some(v) = scalar(&e["value"]) {
                Ok(v)
            } else if e["valueFrom"]["secretKeyRef"].is_hash() {
                let secret = &e["valueFrom"]["secretKeyRef"];
                let (sname, key) = (
                    secret["name"].as_str().unwrap_or(""),
                    secret["key"].as_str().unwrap_or(""),
                );
                secret_value(&objects, sname, key)
            } else {
                Err(format!("{name} has no value or secretKeyRef"))
            };
            env.push((name, value));
        }
        // ConfigMaps mounted as directories: one file per key.
        let mut files = BTreeMap::new();
        for m in c.c["volumeMounts"].as_vec().into_iter().flatten() {
            let (Some(vname), Some(path)) = (m["name"].as_str(), m["mountPath"].as_str()) else {
                continue;
            };
            let Some(volume) = c.pod["volumes"]
                .as_vec()
                .into_iter()
                .flatten()
                .find(|v| v["name"].as_str() == Some(vname))
            else {
                continue;
            };
            let Some(cm_name) = volume["configMap"]["name"].as_str() else {
                continue;
            };
            let Some(cm) = objects
                .iter()
                .find(|o| o.kind() == "ConfigMap" && o.name() == cm_name)
            else {
                continue;
            };
            for (k, v) in cm.doc["data"].as_hash().into_iter().flatten() {
                let (Some(key), Some(value)) = (scalar(k), scalar(v)) else {
                    continue;
                };
                files.insert(format!("{}/{key}", path.trim_end_matches('/')), value);
            }
        }
        out.push(Invocation {
            place,
            args: strs(&c.c["args"]),
            env,
            files,
            resolve: true,
            origin: Origin::Kubernetes,
            long_running: !c.one_shot && !matches!(c.object.kind(), "Job" | "CronJob"),
            blocks_startup: c.one_shot,
        });
    }
    out
}

/// Parses `--flag value` / `--flag=value` pairs (after the subcommand).
fn flag_pairs(args: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        match flag.split_once('=') {
            Some((f, v)) => pairs.push((f.to_string(), v.to_string())),
            None => {
                let value = it.next().ok_or_else(|| format!("--{flag} has no value"))?;
                pairs.push((flag.to_string(), value.clone()));
            }
        }
    }
    Ok(pairs)
}

/// Just the `Options` flags, parsed by clap exactly as `walcast run` does.
#[derive(clap::Parser)]
#[command(no_binary_name = true)]
struct OptionFlags {
    #[command(flatten)]
    options: Options,
}

/// The settings an invocation ends up with: flags > env > config file > defaults.
fn resolve(inv: &Invocation, specs: &[OptionSpec]) -> Result<Settings, String> {
    use clap::Parser;
    let flag_of_env: BTreeMap<&str, String> = specs
        .iter()
        .filter_map(|s| Some((s.env.as_deref()?, s.flag())))
        .collect();
    // flag (without --) -> value; env first, then arguments override it.
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &inv.env {
        let flag = if name == "WALCAST_CONFIG" {
            "--config".to_string()
        } else if let Some(flag) = flag_of_env.get(name.as_str()) {
            flag.clone()
        } else {
            continue;
        };
        let value = value.clone().map_err(|e| format!("{name}: {e}"))?;
        values.insert(flag.trim_start_matches("--").to_string(), value);
    }
    for (flag, value) in flag_pairs(&inv.args[1..])? {
        values.insert(flag, value);
    }
    let config = values.remove("config");
    let flags: Vec<String> = values.iter().map(|(f, v)| format!("--{f}={v}")).collect();
    let cli = OptionFlags::try_parse_from(&flags).map_err(|e| e.render().to_string())?;
    let file = match config {
        Some(path) => {
            let text = inv.files.get(&path).ok_or_else(|| {
                format!(
                    "config file {path} is not mounted into the container (mounted: {:?})",
                    inv.files.keys().collect::<Vec<_>>()
                )
            })?;
            toml::from_str::<Options>(text)
                .map_err(|e| format!("config file {path} is rejected: {}", e.message()))?
        }
        None => Options::default(),
    };
    cli.options
        .merge(file)
        .resolve()
        .map_err(|e| format!("settings do not resolve: {e}"))
}

// ----------------------------------------------------------------------------
// The tests

#[test]
fn env_vars_in_deploy_files_are_real_settings() {
    let real = real_env_vars();
    let mut p = Problems::default();
    let check = |p: &mut Problems, place: String, var: &str| {
        p.check(!var.starts_with("WALCAST_") || real.contains(var), || {
            format!("{place}: {var} is not a walcast setting")
        });
    };
    let compose = compose();
    for (name, service) in services(&compose) {
        for (var, _) in compose_env(service) {
            check(&mut p, format!("{COMPOSE} service {name}"), &var);
        }
    }
    let objects = objects();
    for c in containers(&objects) {
        for e in c.c["env"].as_vec().into_iter().flatten() {
            check(&mut p, c.place(), e["name"].as_str().unwrap_or(""));
        }
        if !c.c["envFrom"].is_badvalue() {
            p.add(format!(
                "{}: envFrom hides which variables are set; list them under env",
                c.place()
            ));
        }
    }
    for (instr, args) in dockerfile() {
        if instr == "ENV" {
            for word in args.split_whitespace() {
                check(
                    &mut p,
                    format!("{DOCKERFILE} ENV"),
                    word.split('=').next().unwrap_or(""),
                );
            }
        }
    }
    // Every variable the example file and the deploy README name, too.
    for file in [EXAMPLE_TOML, "deploy/README.md"] {
        let text = read(file);
        for (i, _) in text.match_indices("WALCAST_") {
            let var: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // `WALCAST_*` is the prefix itself; the service-link variables are
            // named on purpose (to explain enableServiceLinks: false); the
            // default state bucket is named after the default stream.
            if var.len() > "WALCAST_".len()
                && !var.starts_with("WALCAST_SERVICE_")
                && var != "WALCAST_PORT"
                && var != "WALCAST_STATE"
            {
                check(&mut p, file.to_string(), &var);
            }
        }
    }
    if !p.0.is_empty() {
        p.add(format!(
            "(the settings, from the clap arguments under src/: {real:?})"
        ));
    }
    p.assert_none("WALCAST_* variables that walcast does not read");
}

/// A `key = value` line, active or commented out as `# key = value`.
fn setting_line(line: &str) -> Option<(&str, bool)> {
    let (text, active) = match line.strip_prefix("# ") {
        Some(rest) => (rest, false),
        None => (line, true),
    };
    let (key, _) = text.split_once(" = ")?;
    let ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    ok.then_some((key, active))
}

#[test]
fn example_toml_has_every_option_with_its_default() {
    let specs = config_rs_options();
    let mut p = Problems::default();

    // The two views of Options must agree, or the checks below are blind.
    let from_text: BTreeSet<String> = specs.iter().map(|s| s.field.clone()).collect();
    let from_serde = serde_option_fields();
    p.check(from_text == from_serde, || {
        format!(
            "fields read from src/config.rs {from_text:?} differ from the TOML keys serde accepts {from_serde:?}: update tests/deploy_files.rs"
        )
    });

    let text = read(EXAMPLE_TOML);
    let example = match toml::from_str::<Options>(&text) {
        Ok(o) => Some(o),
        Err(e) => {
            p.add(format!(
                "{EXAMPLE_TOML} is rejected by walcast: {}",
                e.message()
            ));
            None
        }
    };

    // Each key exactly once, set to its default or commented out.
    let mut seen: BTreeMap<&str, Vec<bool>> = BTreeMap::new();
    for line in text.lines() {
        if let Some((key, active)) = setting_line(line) {
            seen.entry(key).or_default().push(active);
        }
    }
    for spec in &specs {
        match seen.get(spec.field.as_str()).map(Vec::len) {
            None => p.add(format!(
                "{EXAMPLE_TOML} does not show `{} = ...` (a field of Options in src/config.rs)",
                spec.field
            )),
            Some(1) => {}
            Some(n) => p.add(format!(
                "{EXAMPLE_TOML} sets `{}` {n} times; show it once (as `key = value` or `# key = value`)",
                spec.field
            )),
        }
        // The comments name how else to set it.
        p.check(text.contains(&spec.flag()), || {
            format!(
                "{EXAMPLE_TOML} does not mention the flag {} of `{}`",
                spec.flag(),
                spec.field
            )
        });
        if let Some(env) = &spec.env {
            p.check(text.contains(env.as_str()), || {
                format!(
                    "{EXAMPLE_TOML} does not mention {env}, the variable of `{}`",
                    spec.field
                )
            });
        }
    }
    for key in seen.keys() {
        p.check(from_serde.contains(*key), || {
            format!("{EXAMPLE_TOML} shows `{key}`, which is not a walcast setting")
        });
    }

    // The commented-out examples must be valid too.
    let uncommented: String = text
        .lines()
        .map(|line| match setting_line(line) {
            Some((_, false)) => &line[2..],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    if let Err(e) = toml::from_str::<Options>(&uncommented) {
        p.add(format!(
            "{EXAMPLE_TOML} with its `# key = value` lines uncommented is rejected: {}",
            e.message()
        ));
    }

    if let Some(example) = example {
        // database_url has no default, so the example must show one.
        p.check(example.database_url.is_some(), || {
            format!("{EXAMPLE_TOML} must set database_url to an example value (it has no default)")
        });
        // The values shown are walcast's real defaults.
        let only_url = Options {
            database_url: example.database_url.clone(),
            ..Options::default()
        };
        match (example.resolve(), only_url.resolve()) {
            (Ok(shown), Ok(defaults)) => {
                let (shown, defaults) = (format!("{shown:#?}"), format!("{defaults:#?}"));
                p.check(shown == defaults, || {
                    format!("{EXAMPLE_TOML} shows values that are not the defaults:\nexample:  {shown}\ndefaults: {defaults}")
                });
            }
            (Err(e), _) | (_, Err(e)) => p.add(format!("{EXAMPLE_TOML} does not resolve: {e}")),
        }
    }
    p.assert_none(EXAMPLE_TOML);
}

#[test]
fn configmap_toml_is_accepted_by_walcast() {
    let objects = objects();
    let mut p = Problems::default();
    let mut found = 0;
    for cm in objects.iter().filter(|o| o.kind() == "ConfigMap") {
        for (k, v) in cm.doc["data"].as_hash().into_iter().flatten() {
            let key = scalar(k).unwrap_or_default();
            if !key.ends_with(".toml") {
                continue;
            }
            found += 1;
            let text = scalar(v).unwrap_or_default();
            match toml::from_str::<Options>(&text) {
                Ok(options) => {
                    p.check(options.database_url.is_none(), || {
                        format!(
                            "{} {key}: database_url holds a password; take it from a Secret (WALCAST_DATABASE_URL)",
                            cm.place()
                        )
                    });
                    if let Some(addr) = &options.http_addr {
                        p.check(
                            split_host_port(addr).is_some_and(|(h, port)| {
                                !is_loopback(&h) && port == Some(HTTP_PORT)
                            }),
                            || {
                                format!(
                                    "{} {key}: http_addr {addr:?} must listen on all interfaces on port {HTTP_PORT} (0.0.0.0:{HTTP_PORT}) for probes and Prometheus",
                                    cm.place()
                                )
                            },
                        );
                    }
                }
                Err(e) => p.add(format!(
                    "{} {key} is rejected by walcast: {}",
                    cm.place(),
                    e.message()
                )),
            }
        }
    }
    p.check(found > 0, || {
        "no ConfigMap in deploy/ holds a walcast .toml file".into()
    });
    p.assert_none("walcast.toml in deploy/ ConfigMaps");
}

#[test]
fn walcast_containers_run_real_subcommands_and_resolve() {
    use clap::Parser;
    let specs = config_rs_options();
    let mut p = Problems::default();
    let invocations = invocations(&mut p);
    for origin in [Origin::Dockerfile, Origin::Compose, Origin::Kubernetes] {
        p.check(invocations.iter().any(|i| i.origin == origin), || {
            format!(
                "found no walcast container in {}",
                match origin {
                    Origin::Dockerfile => DOCKERFILE,
                    Origin::Compose => COMPOSE,
                    Origin::Kubernetes => "deploy/",
                }
            )
        });
    }
    for inv in &invocations {
        let Some(sub) = inv.args.first() else {
            p.add(format!(
                "{}: no subcommand (one of {SUBCOMMANDS:?})",
                inv.place
            ));
            continue;
        };
        if !SUBCOMMANDS.contains(&sub.as_str()) {
            p.add(format!(
                "{}: {sub:?} is not a walcast subcommand (one of {SUBCOMMANDS:?})",
                inv.place
            ));
            continue;
        }
        // Only `run` keeps running; the others exit when done.
        p.check(!inv.long_running || sub == "run", || {
            format!(
                "{}: `walcast {sub}` exits when done, but this container is kept running (restarted); only `walcast run` belongs here (one-shot commands go in an init container, a Job or a compose service with restart: \"no\")",
                inv.place
            )
        });
        p.check(!inv.blocks_startup || sub != "run", || {
            format!(
                "{}: `walcast run` never exits, so as an init container it would block the Pod",
                inv.place
            )
        });
        // The real command line parser accepts the arguments.
        let argv = std::iter::once("walcast".to_string()).chain(inv.args.iter().cloned());
        if let Err(e) = walcast::cli::Cli::try_parse_from(argv) {
            p.add(format!(
                "{}: `walcast {}` is rejected by walcast's parser: {}",
                inv.place,
                inv.args.join(" "),
                e.render()
            ));
            continue;
        }
        if inv.resolve
            && matches!(sub.as_str(), "run" | "migrate" | "check")
            && let Err(e) = resolve(inv, &specs)
        {
            p.add(format!("{}: {e}", inv.place));
        }
    }
    p.assert_none("walcast invocations");
}

#[test]
fn ports_are_consistent() {
    let specs = config_rs_options();
    let mut p = Problems::default();
    let compose = compose();
    let services = services(&compose);
    let service = |name: &str| services.iter().find(|(n, _)| n == name).map(|(_, s)| *s);

    // Dockerfile.
    let exposed: Vec<String> = dockerfile()
        .into_iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect();
    p.check(
        exposed.iter().any(|e| e.split('/').next() == Some("9187")),
        || format!("{DOCKERFILE}: EXPOSE {HTTP_PORT} is missing (found {exposed:?})"),
    );

    // What each walcast daemon connects to and listens on.
    let objects = objects();
    for inv in invocations(&mut Problems::default()) {
        if !inv.resolve || inv.args.first().map(String::as_str) != Some("run") {
            continue;
        }
        let Ok(settings) = resolve(&inv, &specs) else {
            continue;
        }; // reported elsewhere
        let place = &inv.place;
        match split_host_port(&settings.http_addr) {
            Some((host, port)) => {
                p.check(port == Some(HTTP_PORT), || {
                    format!(
                        "{place}: http_addr {} is not on port {HTTP_PORT}",
                        settings.http_addr
                    )
                });
                p.check(!is_loopback(&host), || {
                    format!(
                        "{place}: http_addr {} is loopback: probes and Prometheus cannot reach it; use 0.0.0.0:{HTTP_PORT}",
                        settings.http_addr
                    )
                });
            }
            None => p.add(format!(
                "{place}: http_addr {:?} is not host:port",
                settings.http_addr
            )),
        }
        let nats: Vec<Option<Url>> = settings
            .nats_url
            .split(',')
            .map(|u| parse_url(u.trim()))
            .collect();
        let db = parse_url(&settings.database_url);
        for url in &nats {
            p.check(
                url.as_ref()
                    .is_some_and(|u| u.port.unwrap_or(NATS_PORT) == NATS_PORT),
                || {
                    format!(
                        "{place}: WALCAST_NATS_URL / nats_url {} is not on port {NATS_PORT}",
                        settings.nats_url
                    )
                },
            );
        }
        p.check(
            db.as_ref()
                .is_some_and(|u| u.port.unwrap_or(PG_PORT) == PG_PORT),
            || format!("{place}: the database URL is not on port {PG_PORT}"),
        );
        match inv.origin {
            Origin::Compose => {
                let svc_name = place.rsplit(' ').next().unwrap_or("");
                let svc = service(svc_name).expect("the invocation's service");
                p.check(compose_ports(svc).contains(&HTTP_PORT), || {
                    format!(
                        "{place}: port {HTTP_PORT} is not published (ports: {:?})",
                        compose_ports(svc)
                    )
                });
                for url in nats.iter().flatten() {
                    match service(&url.host) {
                        Some(n) => p.check(compose_ports(n).contains(&NATS_PORT), || {
                            format!(
                                "{COMPOSE} service {}: port {NATS_PORT} is not published",
                                url.host
                            )
                        }),
                        None => p.add(format!(
                            "{place}: NATS host {:?} is not a compose service",
                            url.host
                        )),
                    }
                }
                if let Some(db) = &db {
                    match service(&db.host) {
                        Some(pg) => p.check(compose_ports(pg).contains(&PG_PORT), || {
                            format!(
                                "{COMPOSE} service {}: port {PG_PORT} is not published",
                                db.host
                            )
                        }),
                        None => p.add(format!(
                            "{place}: database host {:?} is not a compose service",
                            db.host
                        )),
                    }
                }
            }
            Origin::Kubernetes => {
                // A database on localhost must be a container of the same Pod.
                if let Some(db) = db.as_ref().filter(|u| is_loopback(&u.host)) {
                    let port = db.port.unwrap_or(PG_PORT);
                    let pod_has_it = containers(&objects).iter().any(|c| {
                        place.starts_with(&c.object.place()) && c.container_ports().contains(&port)
                    });
                    p.check(pod_has_it, || {
                        format!("{place}: the database is at {}:{port}, but no container of the Pod listens on {port}", db.host)
                    });
                }
            }
            Origin::Dockerfile => {}
        }
    }

    // Kubernetes: daemons expose 9187, Services and annotations point at it.
    let all = containers(&objects);
    for c in all
        .iter()
        .filter(|c| is_walcast_image(c.image()) && !c.one_shot)
    {
        p.check(c.container_ports().contains(&HTTP_PORT), || {
            format!("{}: containerPort {HTTP_PORT} is not declared", c.place())
        });
    }
    for svc in objects.iter().filter(|o| o.kind() == "Service") {
        let selector = svc.doc["spec"]["selector"].as_hash();
        let selected: Vec<&Container> = all
            .iter()
            .filter(|c| {
                selector.is_some_and(|sel| {
                    sel.iter().all(|(k, v)| {
                        c.object.pod_labels()[k.as_str().unwrap_or("")].as_str() == v.as_str()
                    })
                })
            })
            .collect();
        p.check(!selected.is_empty(), || {
            format!("{}: its selector matches no Pod in deploy/", svc.place())
        });
        let mut service_ports = BTreeMap::new();
        for port in svc.doc["spec"]["ports"].as_vec().into_iter().flatten() {
            let number = port["port"].as_i64().unwrap_or(0);
            let target = if port["targetPort"].is_badvalue() {
                &port["port"]
            } else {
                &port["targetPort"]
            };
            let resolved: BTreeSet<u16> = selected
                .iter()
                .filter_map(|c| {
                    c.resolve_port(target)
                        .filter(|n| c.container_ports().contains(n))
                })
                .collect();
            p.check(!resolved.is_empty(), || {
                format!(
                    "{}: targetPort {:?} of port {number} is no containerPort of the selected Pods",
                    svc.place(),
                    scalar(target)
                )
            });
            service_ports.insert(number, resolved);
        }
        let annotations = &svc.doc["metadata"]["annotations"];
        if annotations["prometheus.io/scrape"].as_str() == Some("true") {
            let port = annotations["prometheus.io/port"].as_str().unwrap_or("");
            p.check(port == HTTP_PORT.to_string(), || {
                format!(
                    "{}: prometheus.io/port is {port:?}, walcast serves /metrics on {HTTP_PORT}",
                    svc.place()
                )
            });
            p.check(
                service_ports.get(&i64::from(HTTP_PORT)).is_some_and(|t| t.contains(&HTTP_PORT)),
                || format!("{}: scraped on {HTTP_PORT}, but no port {HTTP_PORT} reaches containerPort {HTTP_PORT}", svc.place()),
            );
            if let Some(path) = annotations["prometheus.io/path"].as_str() {
                p.check(path == "/metrics", || {
                    format!(
                        "{}: prometheus.io/path is {path:?}, not /metrics",
                        svc.place()
                    )
                });
            }
        }
    }
    p.assert_none("ports");
}

#[test]
fn compose_stack_is_wired() {
    let compose = compose();
    let services = services(&compose);
    let service = |name: &str| services.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
    let mut p = Problems::default();

    // Postgres: 16 or later, logical WAL, a healthcheck that waits for init.
    let pg = services.iter().find(|(_, s)| {
        s["image"]
            .as_str()
            .is_some_and(|i| image_repo(i) == "postgres")
    });
    let nats = services
        .iter()
        .find(|(_, s)| s["image"].as_str().is_some_and(|i| image_repo(i) == "nats"));
    let (Some((pg_name, pg)), Some((nats_name, nats))) = (pg, nats) else {
        panic!("{COMPOSE} needs a postgres and a nats service");
    };
    let pg_image = pg["image"].as_str().unwrap_or("");
    let major: u32 = pg_image
        .rsplit(':')
        .next()
        .and_then(|t| t.split(['.', '-']).next())
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    p.check(major >= 16, || {
        format!(
            "{COMPOSE} {pg_name}: image {pg_image} must be Postgres 16 or later with a version tag"
        )
    });
    let pg_cmd = compose_words(&pg["command"]).unwrap_or_default().join(" ");
    for setting in [
        "wal_level=logical",
        "max_replication_slots=",
        "max_wal_senders=",
    ] {
        p.check(pg_cmd.contains(setting), || {
            format!("{COMPOSE} {pg_name}: command does not set {setting} ({pg_cmd:?})")
        });
    }
    let pg_health = strs(&pg["healthcheck"]["test"]).join(" ");
    p.check(pg_health.contains("pg_isready"), || {
        format!("{COMPOSE} {pg_name}: healthcheck must run pg_isready")
    });
    let pg_env: BTreeMap<String, String> = compose_env(pg).into_iter().collect();
    let pg_db = pg_env
        .get("POSTGRES_DB")
        .cloned()
        .unwrap_or_else(|| "postgres".into());
    let pg_user = pg_env
        .get("POSTGRES_USER")
        .cloned()
        .unwrap_or_else(|| "postgres".into());

    // NATS: the line the full suite runs, JetStream on a volume, monitoring
    // for the healthcheck.
    let nats_image = nats["image"].as_str().unwrap_or("");
    let tag = nats_image.rsplit(':').next().unwrap_or("");
    let tested = tested_nats_line();
    p.check(tag.split('-').next() == Some(tested.as_str()), || {
        format!(
            "{COMPOSE} {nats_name}: image {nats_image} must be NATS {tested} (scripts/install-deps.sh's NATS_VERSION, \
             what the full test suite runs) with a version tag"
        )
    });
    let nats_cmd = compose_words(&nats["command"]).unwrap_or_default();
    p.check(
        nats_cmd.iter().any(|a| a == "-js" || a == "--jetstream"),
        || format!("{COMPOSE} {nats_name}: command does not enable JetStream (-js)"),
    );
    let arg_after = |flags: &[&str]| {
        nats_cmd
            .iter()
            .position(|a| flags.contains(&a.as_str()))
            .and_then(|i| nats_cmd.get(i + 1).cloned())
    };
    match arg_after(&["-sd", "--store_dir"]) {
        Some(dir) => p.check(named_volumes(nats).iter().any(|(_, t)| *t == dir), || {
            format!("{COMPOSE} {nats_name}: the JetStream store {dir} is not a volume")
        }),
        None => p.add(format!(
            "{COMPOSE} {nats_name}: command has no -sd <store dir>"
        )),
    }
    let nats_health = strs(&nats["healthcheck"]["test"]).join(" ");
    match arg_after(&["-m", "--http_port"]) {
        Some(port) => p.check(nats_health.contains(&format!(":{port}/healthz")), || {
            format!("{COMPOSE} {nats_name}: healthcheck {nats_health:?} does not call /healthz on the monitoring port {port}")
        }),
        None => p.add(format!("{COMPOSE} {nats_name}: command has no -m <monitoring port> for the healthcheck")),
    }

    // depends_on: services that exist, healthchecks where health is awaited.
    let declared_volumes: BTreeSet<String> = compose["volumes"]
        .as_hash()
        .map(|h| h.keys().filter_map(scalar).collect())
        .unwrap_or_default();
    for (name, svc) in &services {
        for (dep, cond) in svc["depends_on"].as_hash().into_iter().flatten() {
            let dep = scalar(dep).unwrap_or_default();
            match service(&dep) {
                None => p.add(format!(
                    "{COMPOSE} {name}: depends on {dep}, which is not a service"
                )),
                Some(d) => {
                    if cond["condition"].as_str() == Some("service_healthy") {
                        p.check(!d["healthcheck"].is_badvalue(), || {
                            format!("{COMPOSE} {name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
                        });
                    }
                }
            }
        }
        for (volume, _) in named_volumes(svc) {
            p.check(declared_volumes.contains(&volume), || {
                format!(
                    "{COMPOSE} {name}: volume {volume} is not declared under the top-level volumes:"
                )
            });
        }
    }

    // The walcast services: database and NATS reachable, passwords that match.
    let password_sql = bind_mounts(pg)
        .into_iter()
        .filter(|(s, t, _)| t.starts_with(INITDB_DIR) && !s.starts_with("./migrations/"))
        .filter_map(|(s, _, _)| std::fs::read_to_string(root().join(&s)).ok())
        .collect::<Vec<_>>()
        .join("\n");
    let walcast_services: Vec<&(String, &Yaml)> = services
        .iter()
        .filter(|(_, s)| is_walcast_service(s))
        .collect();
    for (name, svc) in &walcast_services {
        let command = compose_words(&svc["command"]).unwrap_or_else(|| vec!["run".into()]);
        let env: BTreeMap<String, String> = compose_env(svc).into_iter().collect();
        let Some(url) = env.get("WALCAST_DATABASE_URL").and_then(|u| parse_url(u)) else {
            p.add(format!(
                "{COMPOSE} {name}: no parseable WALCAST_DATABASE_URL"
            ));
            continue;
        };
        p.check(url.host == *pg_name, || {
            format!(
                "{COMPOSE} {name}: database host {} is not the {pg_name} service",
                url.host
            )
        });
        p.check(url.path == pg_db, || {
            format!(
                "{COMPOSE} {name}: database {:?} is not POSTGRES_DB {pg_db:?}",
                url.path
            )
        });
        let user = url.user.clone().unwrap_or_default();
        let password = url.password.clone().unwrap_or_default();
        if user == pg_user {
            p.check(pg_env.get("POSTGRES_PASSWORD") == Some(&password), || {
                format!("{COMPOSE} {name}: the {user} password in WALCAST_DATABASE_URL is not POSTGRES_PASSWORD")
            });
        } else {
            p.check(
                password_sql.contains(&format!("ROLE {user} PASSWORD '{password}'")),
                || format!("{COMPOSE} {name}: no init script under {INITDB_DIR} sets the password of role {user} to the one in WALCAST_DATABASE_URL"),
            );
        }
        let deps = &svc["depends_on"];
        p.check(
            deps[pg_name.as_str()]["condition"].as_str() == Some("service_healthy"),
            || format!("{COMPOSE} {name}: must depend on {pg_name} with condition service_healthy"),
        );
        if command.first().map(String::as_str) == Some("run") {
            p.check(deps[nats_name.as_str()]["condition"].as_str() == Some("service_healthy"), || {
                format!("{COMPOSE} {name}: must depend on {nats_name} with condition service_healthy")
            });
            p.check(user == "walcast", || {
                format!("{COMPOSE} {name}: the daemon should connect as the least-privilege walcast role, not {user}")
            });
        }
    }
    p.check(
        walcast_services
            .iter()
            .any(|(_, s)| compose_words(&s["command"]).is_some_and(|c| c[0] == "run")),
        || format!("{COMPOSE}: no service runs `walcast run`"),
    );
    p.assert_none(COMPOSE);
}

#[test]
fn compose_mounts_every_migration_then_the_password() {
    let compose = compose();
    let mut p = Problems::default();
    let mut initdb: Vec<(String, String)> = Vec::new(); // (file name in initdb dir, host path)
    for (name, svc) in services(&compose) {
        for (source, target, ro) in bind_mounts(svc) {
            p.check(root().join(&source).exists(), || {
                format!("{COMPOSE} {name}: mounts {source}, which does not exist")
            });
            if let Some(file) = target.strip_prefix(INITDB_DIR) {
                p.check(ro, || {
                    format!("{COMPOSE} {name}: mount {target} read-only (:ro)")
                });
                p.check(!file.is_empty() && !file.contains('/'), || {
                    format!("{COMPOSE} {name}: {target}: init scripts run only directly inside {INITDB_DIR}; mount each file by name")
                });
                initdb.push((file.to_string(), source));
            }
        }
    }
    let mut migrations: Vec<String> = std::fs::read_dir(root().join("migrations"))
        .expect("migrations/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    migrations.sort();
    assert!(!migrations.is_empty(), "migrations/ has no .sql files");
    for m in &migrations {
        let expected = format!("./migrations/{m}");
        p.check(
            initdb
                .iter()
                .any(|(file, source)| file == m && *source == expected),
            || {
                format!(
                    "{COMPOSE}: migration {m} is not mounted as {INITDB_DIR}{m} (from {expected})"
                )
            },
        );
    }
    // Postgres runs them in name order: every other script after the migrations.
    let last_migration = migrations.last().unwrap();
    for (file, source) in &initdb {
        if !source.starts_with("./migrations/") {
            p.check(file.as_str() > last_migration.as_str(), || {
                format!("{COMPOSE}: init script {file} would run before migration {last_migration} (scripts run in name order)")
            });
            let text = std::fs::read_to_string(root().join(source)).unwrap_or_default();
            p.check(text.contains("ALTER ROLE walcast PASSWORD"), || {
                format!("{COMPOSE}: {source} should give the walcast role its demo password")
            });
        }
    }
    p.assert_none("docker-compose init scripts");
}

#[test]
fn dockerfile_builds_and_starts_the_walcast_binary() {
    let bins = cargo_bins();
    let mut p = Problems::default();
    let stages = dockerfile_stages();
    assert!(
        stages.len() >= 2,
        "{DOCKERFILE} must be multi-stage (build, then a small runtime image)"
    );
    let (build_from, build) = &stages[0];
    let (runtime_from, runtime) = stages.last().unwrap();
    p.check(
        build_from.starts_with("rust:") && build_from.contains("bookworm"),
        || format!("{DOCKERFILE}: build stage is FROM {build_from}, expected rust:1-bookworm"),
    );
    p.check(
        runtime_from.contains("distroless/cc") || runtime_from.contains("debian:bookworm-slim"),
        || format!("{DOCKERFILE}: runtime stage is FROM {runtime_from}, expected gcr.io/distroless/cc-debian12 or debian:bookworm-slim"),
    );

    // cargo build --release --locked, of a real binary.
    let runs: Vec<&String> = build
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a)
        .collect();
    let cargo = runs.iter().find(|r| r.contains("cargo build"));
    match cargo {
        Some(cmd) => {
            for flag in ["--release", "--locked"] {
                p.check(cmd.contains(flag), || {
                    format!("{DOCKERFILE}: `cargo build` without {flag}")
                });
            }
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "--bin") {
                let bin = words.get(i + 1).copied().unwrap_or("");
                p.check(bins.contains(bin), || {
                    format!("{DOCKERFILE}: --bin {bin} is not a Cargo binary ({bins:?})")
                });
            }
            p.check(
                bins.iter().any(|b| cmd.contains(&format!("target/release/{b}"))),
                || format!("{DOCKERFILE}: the build stage does not take target/release/<bin> for any of {bins:?}"),
            );
        }
        None => p.add(format!(
            "{DOCKERFILE}: the build stage has no `cargo build`"
        )),
    }

    // The runtime stage copies the binary to where ENTRYPOINT finds it.
    let copied: Vec<String> = runtime
        .iter()
        .filter(|(i, a)| i == "COPY" && a.contains("--from="))
        .filter_map(|(_, a)| a.split_whitespace().last().map(String::from))
        .collect();
    let entry = runtime.iter().rev().find(|(i, _)| i == "ENTRYPOINT");
    match entry.map(|(_, a)| exec_form(a, "ENTRYPOINT")) {
        Some(Ok(entry)) => {
            let program = entry.first().cloned().unwrap_or_default();
            let base = program.rsplit('/').next().unwrap_or("");
            p.check(entry.len() == 1 && bins.contains(base), || {
                format!(
                    "{DOCKERFILE}: ENTRYPOINT {entry:?} should be just the binary, one of {bins:?}"
                )
            });
            let found = copied.iter().any(|dest| {
                if program.starts_with('/') {
                    *dest == program
                } else {
                    let (dir, file) = dest.rsplit_once('/').unwrap_or(("", dest));
                    file == program && ["/usr/local/bin", "/usr/bin", "/bin"].contains(&dir)
                }
            });
            p.check(found, || {
                format!("{DOCKERFILE}: ENTRYPOINT {program} is not copied into the runtime stage on the PATH (COPY --from destinations: {copied:?})")
            });
        }
        Some(Err(e)) => p.add(e),
        None => p.add(format!("{DOCKERFILE}: the runtime stage has no ENTRYPOINT")),
    }
    p.check(runtime.iter().any(|(i, _)| i == "CMD"), || {
        format!("{DOCKERFILE}: no CMD (expected [\"run\"])")
    });

    // A numeric, non-root user (Kubernetes' runAsNonRoot cannot check a name).
    match runtime.iter().rev().find(|(i, _)| i == "USER") {
        Some((_, user)) => {
            let uid = user.split(':').next().unwrap_or("");
            p.check(uid.parse::<u32>().is_ok_and(|u| u != 0), || {
                format!("{DOCKERFILE}: USER {user} must be a numeric, non-zero uid")
            });
        }
        None => p.add(format!(
            "{DOCKERFILE}: the runtime stage runs as root (no USER)"
        )),
    }

    // The build context has everything cargo reads, and .dockerignore lets it in.
    let mut required: BTreeSet<String> =
        ["Cargo.toml", "Cargo.lock", "src"].map(String::from).into();
    // Every workspace member, path dependency and patch: cargo loads their
    // manifests.
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml parses");
    let members = manifest["workspace"]["members"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let path_deps = manifest["dependencies"]
        .as_table()
        .into_iter()
        .flat_map(|deps| deps.values())
        .filter_map(|dep| dep.get("path").cloned());
    for path in members.into_iter().chain(path_deps) {
        required.insert(path.as_str().unwrap_or_default().to_string());
    }
    // `[patch.crates-io]` replaces a registry crate with a directory
    // (vendor/): without it the image's `cargo build` fails to load it.
    required.extend(patched_crates("Cargo.toml").into_values());
    if root().join("build.rs").exists() {
        required.insert("build.rs".into());
        for lit in quoted_after(&read("build.rs"), "\"") {
            if !lit.is_empty() && !lit.contains(char::is_whitespace) && root().join(lit).exists() {
                required.insert(lit.split('/').next().unwrap_or(lit).to_string());
            }
        }
    }
    // Files the sources embed, e.g. include_str!("../migrations/...").
    for path in source_files() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for marker in ["include_str!(\"", "include_bytes!(\""] {
            for lit in quoted_after(&text, marker) {
                let target = normalize(&path.parent().unwrap().join(lit));
                if let Ok(rel) = target.strip_prefix(root())
                    && let Some(Component::Normal(top)) = rel.components().next()
                {
                    required.insert(top.to_string_lossy().into_owned());
                }
            }
        }
    }
    let copied_sources: BTreeSet<String> = build
        .iter()
        .filter(|(i, _)| i == "COPY")
        .filter_map(|(_, a)| copy_parts(a))
        .flat_map(|(sources, _)| sources)
        .map(|s| s.trim_start_matches("./").trim_end_matches('/').to_string())
        .collect();
    for r in &required {
        p.check(
            copied_sources.contains(r)
                || copied_sources.contains(".")
                || copied_sources.iter().any(|c| {
                    r.strip_prefix(c.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
                }),
            || format!("{DOCKERFILE}: the build stage does not COPY {r}, which the build needs"),
        );
    }
    let ignore = read(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let allow_list = patterns.first() == Some(&"*");
    for source in &copied_sources {
        p.check(root().join(source).exists(), || {
            format!("{DOCKERFILE}: COPY {source}: no such file")
        });
        let top = source.split('/').next().unwrap_or(source);
        let allowed = if allow_list {
            patterns.iter().any(|l| {
                l.strip_prefix('!')
                    .is_some_and(|a| a.trim_matches('/') == top || a.trim_matches('/') == source)
            })
        } else {
            !patterns
                .iter()
                .any(|l| l.trim_matches('/') == top || l.trim_matches('/') == source)
        };
        p.check(allowed, || format!(".dockerignore keeps {source} out of the build context, but the Dockerfile copies it"));
    }
    p.assert_none(DOCKERFILE);
}

/// The fuzz crate is a workspace of its own: a `[patch]` applies only to
/// the workspace that declares it, so without the root's patches it builds
/// walcast against the published crates, which walcast no longer compiles
/// with (vendor/README.md).
#[test]
fn the_fuzz_workspace_repeats_the_roots_patches() {
    let fuzz: BTreeMap<String, String> = patched_crates("fuzz/Cargo.toml")
        .into_iter()
        .map(|(name, path)| match path.strip_prefix("../") {
            Some(from_root) => (name, from_root.to_string()),
            None => (name, path),
        })
        .collect();
    assert_eq!(
        fuzz,
        patched_crates("Cargo.toml"),
        "fuzz/Cargo.toml's [patch.crates-io] must name the root's patched crates, with paths from fuzz/"
    );
}

/// A manifest's `[patch.crates-io]`: crate name -> path, as written.
fn patched_crates(rel: &str) -> BTreeMap<String, String> {
    let manifest: toml::Table = read(rel).parse().expect("manifest parses");
    let table = manifest
        .get("patch")
        .and_then(|p| p.get("crates-io"))
        .and_then(|p| p.as_table())
        .cloned()
        .unwrap_or_default();
    table
        .into_iter()
        .map(|(name, dep)| {
            let path = dep.get("path").and_then(|p| p.as_str()).unwrap_or("");
            (name, path.to_string())
        })
        .collect()
}

#[test]
fn kubernetes_probes_use_healthz_and_readyz() {
    let objects = objects();
    let mut p = Problems::default();
    let mut daemons = 0;
    for c in containers(&objects) {
        if !is_walcast_image(c.image()) || c.one_shot {
            continue;
        }
        daemons += 1;
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c.c[probe]["httpGet"];
            if get.is_badvalue() {
                p.add(format!("{}: no {probe} with httpGet {path}", c.place()));
                continue;
            }
            p.check(get["path"].as_str() == Some(path), || {
                format!(
                    "{}: {probe} path is {:?}, expected {path}",
                    c.place(),
                    scalar(&get["path"])
                )
            });
            p.check(c.resolve_port(&get["port"]) == Some(HTTP_PORT), || {
                format!(
                    "{}: {probe} port {:?} does not resolve to {HTTP_PORT}",
                    c.place(),
                    scalar(&get["port"])
                )
            });
        }
    }
    p.check(daemons > 0, || {
        "no walcast daemon container in deploy/".into()
    });
    p.assert_none("probes");
}

/// Kubernetes quantity of memory in MiB (Mi, Gi, M, G, bytes).
fn mebibytes(q: &str) -> Option<f64> {
    let units = [
        ("Ki", 1.0 / 1024.0),
        ("Mi", 1.0),
        ("Gi", 1024.0),
        ("k", 1e3 / 1048576.0),
        ("M", 1e6 / 1048576.0),
        ("G", 1e9 / 1048576.0),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    q.parse::<f64>().ok().map(|b| b / 1048576.0)
}

#[test]
fn kubernetes_walcast_is_single_hardened_and_secret_backed() {
    let objects = objects();
    let mut p = Problems::default();
    for c in containers(&objects) {
        if !is_walcast_image(c.image()) {
            continue;
        }
        let place = c.place();
        // One active instance per slot.
        let workload = c.object;
        if matches!(workload.kind(), "Deployment" | "StatefulSet") {
            p.check(workload.doc["spec"]["replicas"].as_i64() == Some(1), || {
                format!(
                    "{}: replicas must be 1 (one instance per replication slot)",
                    workload.place()
                )
            });
        }
        if workload.kind() == "Deployment" {
            p.check(workload.doc["spec"]["strategy"]["type"].as_str() == Some("Recreate"), || {
                format!("{}: strategy must be Recreate: a rolling update stalls while the old pod holds the slot", workload.place())
            });
        }
        // Hardening.
        p.check(c.security("runAsNonRoot").as_bool() == Some(true), || {
            format!("{place}: runAsNonRoot: true is not set")
        });
        if let Some(uid) = c.security("runAsUser").as_i64() {
            p.check(uid != 0, || format!("{place}: runAsUser is 0"));
        }
        let sc = &c.c["securityContext"];
        p.check(sc["readOnlyRootFilesystem"].as_bool() == Some(true), || {
            format!("{place}: readOnlyRootFilesystem: true is not set")
        });
        p.check(
            sc["allowPrivilegeEscalation"].as_bool() == Some(false),
            || format!("{place}: allowPrivilegeEscalation: false is not set"),
        );
        let limit = scalar(&c.c["resources"]["limits"]["memory"]);
        match limit.as_deref().and_then(mebibytes) {
            Some(mi) => p.check((128.0..=512.0).contains(&mi), || {
                format!("{place}: memory limit {} is outside 128Mi..512Mi (walcast targets < 100 MB RSS)", limit.clone().unwrap_or_default())
            }),
            None => p.add(format!("{place}: no resources.limits.memory")),
        }
        p.check(
            !c.c["resources"]["requests"]["memory"].is_badvalue(),
            || format!("{place}: no resources.requests.memory"),
        );
        // Service links would put WALCAST_SERVICE_HOST etc. in the environment.
        p.check(c.pod["enableServiceLinks"].as_bool() == Some(false), || {
            format!("{}: set enableServiceLinks: false (a Service named walcast injects WALCAST_* variables)", workload.place())
        });
        // The database URL carries a password: only from a Secret.
        for e in c.c["env"].as_vec().into_iter().flatten() {
            if e["name"].as_str() == Some("WALCAST_DATABASE_URL") {
                p.check(!e["valueFrom"]["secretKeyRef"].is_badvalue(), || {
                    format!("{place}: WALCAST_DATABASE_URL must come from valueFrom.secretKeyRef, not a literal value")
                });
            }
        }
    }
    // Example Secrets hold placeholders, never something that looks real.
    for secret in objects.iter().filter(|o| o.kind() == "Secret") {
        for (k, v) in secret.doc["stringData"].as_hash().into_iter().flatten() {
            let (key, value) = (scalar(k).unwrap_or_default(), scalar(v).unwrap_or_default());
            let password = if key.ends_with("url") {
                parse_url(&value)
                    .and_then(|u| u.password)
                    .unwrap_or_default()
            } else if key.contains("password") {
                value.clone()
            } else {
                continue;
            };
            p.check(
                password.is_empty() || password.to_ascii_uppercase().contains("CHANGE-ME"),
                || {
                    format!(
                        "{} {key}: example passwords must be CHANGE-ME placeholders",
                        secret.place()
                    )
                },
            );
        }
    }
    p.assert_none("Kubernetes walcast workloads");
}

#[test]
fn kubernetes_references_resolve() {
    let objects = objects();
    let mut p = Problems::default();
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o.kind() == kind && o.name() == name)
    };
    for c in containers(&objects) {
        let place = c.place();
        // Volume mounts name a volume of the Pod or a volumeClaimTemplate.
        let mut volumes: BTreeSet<String> = c.pod["volumes"]
            .as_vec()
            .into_iter()
            .flatten()
            .filter_map(|v| scalar(&v["name"]))
            .collect();
        for t in c.object.doc["spec"]["volumeClaimTemplates"]
            .as_vec()
            .into_iter()
            .flatten()
        {
            volumes.extend(scalar(&t["metadata"]["name"]));
        }
        for m in c.c["volumeMounts"].as_vec().into_iter().flatten() {
            let name = scalar(&m["name"]).unwrap_or_default();
            p.check(volumes.contains(&name), || {
                format!("{place}: volumeMount {name} is not a volume of the Pod")
            });
        }
        // Secrets referenced exist in deploy/ (as examples) with that key.
        for e in c.c["env"].as_vec().into_iter().flatten() {
            let r = &e["valueFrom"]["secretKeyRef"];
            if let (Some(name), Some(key)) = (r["name"].as_str(), r["key"].as_str())
                && let Err(e) = secret_value(&objects, name, key)
            {
                p.add(format!("{place}: {e}"));
            }
        }
    }
    for o in &objects {
        let Some(pod) = o.pod_spec() else { continue };
        for v in pod["volumes"].as_vec().into_iter().flatten() {
            if let Some(name) = v["configMap"]["name"].as_str() {
                p.check(find("ConfigMap", name).is_some(), || {
                    format!("{}: ConfigMap {name} is not in deploy/", o.place())
                });
            }
            if let Some(name) = v["secret"]["secretName"].as_str() {
                p.check(find("Secret", name).is_some(), || {
                    format!("{}: Secret {name} is not in deploy/", o.place())
                });
            }
        }
        let selector = o.doc["spec"]["selector"]["matchLabels"].as_hash();
        if let Some(selector) = selector {
            for (k, v) in selector {
                p.check(o.pod_labels()[k.as_str().unwrap_or("")] == *v, || {
                    format!(
                        "{}: selector {:?}={:?} does not match the Pod template labels",
                        o.place(),
                        scalar(k),
                        scalar(v)
                    )
                });
            }
        }
        if o.kind() == "StatefulSet" {
            let svc = o.doc["spec"]["serviceName"].as_str().unwrap_or("");
            p.check(find("Service", svc).is_some(), || {
                format!(
                    "{}: serviceName {svc:?} is not a Service in deploy/",
                    o.place()
                )
            });
        }
    }

    // kustomization.yaml: its resources exist and are complete but for the Secret.
    let kustomization = load_yaml("deploy/kustomization.yaml").remove(0);
    let resources = strs(&kustomization["resources"]);
    p.check(!resources.is_empty(), || {
        "deploy/kustomization.yaml lists no resources".into()
    });
    let mut included = Vec::new();
    for r in &resources {
        let path = format!("deploy/{r}");
        if !root().join(&path).is_file() {
            p.add(format!(
                "deploy/kustomization.yaml: resource {r} does not exist"
            ));
            continue;
        }
        included.extend(objects.iter().filter(|o| o.file == path));
    }
    let kinds: BTreeSet<&str> = included.iter().map(|o| o.kind()).collect();
    for kind in ["Deployment", "Service", "ConfigMap"] {
        p.check(kinds.contains(kind), || {
            format!("deploy/kustomization.yaml includes no {kind}")
        });
    }
    for o in &included {
        let Some(pod) = o.pod_spec() else { continue };
        for v in pod["volumes"].as_vec().into_iter().flatten() {
            if let Some(name) = v["configMap"]["name"].as_str() {
                p.check(included.iter().any(|i| i.kind() == "ConfigMap" && i.name() == name), || {
                    format!("deploy/kustomization.yaml: {} mounts ConfigMap {name}, which it does not include", o.place())
                });
            }
        }
        p.check(o.kind() != "Secret", || {
            format!(
                "deploy/kustomization.yaml must not ship the example Secret {}",
                o.place()
            )
        });
    }
    let images: Vec<String> = kustomization["images"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|i| scalar(&i["name"]))
        .collect();
    let used: BTreeSet<String> = containers(&objects)
        .iter()
        .filter(|c| {
            resources
                .iter()
                .any(|r| c.object.file == format!("deploy/{r}"))
        })
        .map(|c| c.image().split(':').next().unwrap_or("").to_string())
        .collect();
    for image in &images {
        p.check(used.contains(image), || {
            format!("deploy/kustomization.yaml: images entry {image} matches no container image ({used:?})")
        });
    }
    p.assert_none("Kubernetes references");
}

/// The NATS line (`2.15`) of the nats-server the full test suite runs.
fn tested_nats_line() -> String {
    let deps = read("scripts/install-deps.sh");
    let version = deps
        .lines()
        .find_map(|l| l.strip_prefix("NATS_VERSION=\""))
        .and_then(|v| v.split('"').next())
        .expect("scripts/install-deps.sh sets NATS_VERSION=\"x.y.z\"");
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("{major}.{minor}"),
        _ => panic!("NATS_VERSION {version} is not x.y.z"),
    }
}
