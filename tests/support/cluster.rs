//! A throwaway 3-node nats-server cluster (JetStream, routes on loopback)
//! per test: each node is a [`Nats`] with its own port, store dir and
//! config, so a node can be killed (`kill9`) and started again on the same
//! port and store. Readiness is asked of the cluster itself: a JetStream
//! meta leader answers on every running node, and a stream's leader and
//! replicas come from its stream info (`cluster.leader`, `cluster.replicas`).

use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use futures::TryStreamExt;

use super::free_port;
use super::nats::{ClusterMember, Nats, NatsOptions};
use super::postgres::Postgres;

/// Nodes in a test cluster.
pub const NODES: usize = 3;

/// How long one request to a node may take before it counts as unanswered
/// (a leaderless group may stay silent).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Three JetStream servers routed to each other. Dropping it kills them all.
pub struct Cluster {
    nodes: Vec<Nats>,
}

impl Cluster {
    /// walcast's settings for `pg` and this cluster (migrations, checks).
    pub fn settings(&self, pg: &Postgres) -> walcast::config::Settings {
        walcast::config::Options {
            database_url: Some(pg.url()),
            nats_url: Some(self.any_url()),
            ..Default::default()
        }
        .resolve()
        .expect("valid settings")
    }

    /// A walcast process's environment: `pg`, every node (node `first`
    /// listed first), an R3 stream (and so state bucket), no confirm delay.
    pub fn walcast_env(&self, pg: &Postgres, first: usize) -> Vec<(String, String)> {
        vec![
            ("WALCAST_DATABASE_URL".to_string(), pg.url()),
            ("WALCAST_NATS_URL".to_string(), self.url_list(first)),
            ("WALCAST_CONFIRM_DELAY".to_string(), "0".to_string()),
            ("WALCAST_STREAM_REPLICAS".to_string(), "3".to_string()),
            (
                "WALCAST_HTTP_ADDR".to_string(),
                format!("127.0.0.1:{}", free_port()),
            ),
        ]
    }

    /// Starts three nodes and waits until the cluster has elected its
    /// JetStream meta leader.
    pub async fn start() -> anyhow::Result<Cluster> {
        // A route port that was free a moment ago may be taken by a parallel
        // test: start the whole cluster again on other ports.
        let mut attempt = 0;
        let cluster = loop {
            attempt += 1;
            match tokio::task::spawn_blocking(Self::spawn_nodes).await? {
                Ok(cluster) => break cluster,
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("nats cluster: a port was taken, retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        };
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    fn spawn_nodes() -> anyhow::Result<Cluster> {
        let route_ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
        let mut nodes = Vec::with_capacity(NODES);
        for (i, &route_port) in route_ports.iter().enumerate() {
            let member = ClusterMember {
                server_name: node_name(i),
                cluster_name: "walcast-test".into(),
                route_port,
                peers: route_ports
                    .iter()
                    .copied()
                    .filter(|&p| p != route_port)
                    .collect(),
            };
            let node = Nats::start_with(NatsOptions {
                cluster: Some(member),
                ..NatsOptions::default()
            })
            .with_context(|| format!("start cluster node {}", node_name(i)))?;
            nodes.push(node);
        }
        Ok(Cluster { nodes })
    }

    /// Node `i` (0, 1 or 2).
    pub fn node(&self, i: usize) -> &Nats {
        &self.nodes[i]
    }

    /// Node `i`'s `server_name` (what stream info calls it).
    pub fn name(&self, i: usize) -> String {
        node_name(i)
    }

    /// `nats://127.0.0.1:<port>` of every node, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Nats::url).collect()
    }

    /// The three URLs, comma-separated (`--nats-url` server list), starting
    /// with node `first`.
    pub fn url_list(&self, first: usize) -> String {
        let urls = self.urls();
        (0..NODES)
            .map(|k| urls[(first + k) % NODES].clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of a running node (the lowest-numbered one), for test clients.
    pub fn any_url(&self) -> String {
        self.running()
            .first()
            .map(|&i| self.nodes[i].url())
            .expect("no cluster node is running")
    }

    /// Indices of the running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..NODES).filter(|&i| self.nodes[i].is_running()).collect()
    }

    /// kill -9 of node `i`.
    pub fn kill9(&self, i: usize) -> anyhow::Result<()> {
        self.nodes[i]
            .kill9()
            .with_context(|| format!("kill -9 {}", node_name(i)))
    }

    /// Starts node `i` again (same port, store and routes) and waits until it
    /// is back in the cluster (needs a multi-thread test runtime).
    pub async fn start_again(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        tokio::task::block_in_place(|| node.start_again())
            .with_context(|| format!("start {} again", node_name(i)))?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Waits until the JetStream meta leader answers through every running
    /// node (the cluster formed and elected it).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let urls: Vec<String> = self
            .running()
            .iter()
            .map(|&i| self.nodes[i].url())
            .collect();
        super::wait_until(timeout, || {
            let urls = urls.clone();
            async move {
                for url in &urls {
                    let Some(js) = connect(url).await else {
                        return false;
                    };
                    // Only the meta leader answers $JS.API.INFO in a cluster.
                    match tokio::time::timeout(REQUEST_TIMEOUT, js.query_account()).await {
                        Ok(Ok(_)) => {}
                        _ => return false,
                    }
                }
                true
            }
        })
        .await
        .with_context(|| format!("the cluster's JetStream meta leader never answered on {urls:?}"))
    }

    /// Stream info of `stream`, asked of any running node (`None` if no
    /// node answers with it, e.g. during an election).
    pub async fn stream_info(&self, stream: &str) -> Option<jetstream::stream::Info> {
        for i in self.running() {
            let Some(js) = connect(&self.nodes[i].url()).await else {
                continue;
            };
            let info = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut handle = js.get_stream(stream).await.ok()?;
                handle.info().await.ok().cloned()
            })
            .await;
            if let Ok(Some(info)) = info {
                return Some(info);
            }
        }
        None
    }

    /// The node that leads `stream` now, if it has a leader.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let leader = self.stream_info(stream).await?.cluster?.leader?;
        (0..NODES).find(|&i| node_name(i) == leader)
    }

    /// Waits until `stream` has a leader and every running node holds a
    /// current replica of it (so one more node can fail without losing
    /// quorum or data); returns the leader.
    pub async fn wait_stream_healthy(
        &self,
        stream: &str,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let running: Vec<String> = self.running().into_iter().map(node_name).collect();
        let result = super::wait_for(timeout, || async {
            let cluster = self.stream_info(stream).await?.cluster?;
            let leader = cluster.leader?;
            let current = running.iter().all(|name| {
                *name == leader
                    || cluster
                        .replicas
                        .iter()
                        .any(|p| p.name == *name && p.current && !p.offline)
            });
            if !current {
                return None;
            }
            (0..NODES).find(|&i| node_name(i) == leader)
        })
        .await;
        match result {
            Ok(leader) => Ok(leader),
            Err(e) => bail!(
                "stream {stream} never had a leader with current replicas on {running:?}: {e}; last info: {:?}",
                self.stream_info(stream).await.map(|i| i.cluster)
            ),
        }
    }
}

/// A consumer of a stream and the node that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub name: String,
    pub node: usize,
    /// Pulled (no deliver subject), not pushed.
    pub pull: bool,
}

impl Cluster {
    /// Every consumer of `stream` with its node, asked of any running node
    /// (empty if none answers).
    pub async fn consumers(&self, stream: &str) -> Vec<Placed> {
        for i in self.running() {
            let Some(js) = connect(&self.nodes[i].url()).await else {
                continue;
            };
            let listed = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let stream = js.get_stream(stream).await.ok()?;
                stream.consumers().try_collect::<Vec<_>>().await.ok()
            })
            .await;
            if let Ok(Some(infos)) = listed {
                return infos.into_iter().filter_map(placed).collect();
            }
        }
        Vec::new()
    }

    /// Moves `stream`'s leader off node `avoid`: asks the leader to step
    /// down until another node leads, with every replica current.
    pub async fn lead_elsewhere(&self, stream: &str, avoid: usize) -> anyhow::Result<()> {
        for _ in 0..10 {
            let leader = self
                .wait_stream_healthy(stream, Duration::from_secs(30))
                .await?;
            if leader != avoid {
                return Ok(());
            }
            let js = connect(&self.nodes[leader].url())
                .await
                .context("connect to the stream's leader")?;
            let answer: serde_json::Value = js
                .request(
                    format!("STREAM.LEADER.STEPDOWN.{stream}"),
                    &serde_json::json!({}),
                )
                .await
                .with_context(|| format!("step down {stream}'s leader"))?;
            if answer.get("success") != Some(&serde_json::Value::Bool(true)) {
                bail!("{stream}'s leader did not step down: {answer}");
            }
        }
        bail!("{stream} kept its leader on {}", node_name(avoid))
    }
}

fn placed(info: jetstream::consumer::Info) -> Option<Placed> {
    let leader = info.cluster?.leader?;
    Some(Placed {
        node: (0..NODES).find(|&i| node_name(i) == leader)?,
        pull: info.config.deliver_subject.is_none(),
        name: info.name,
    })
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// A JetStream context on one node, without reconnecting elsewhere.
async fn connect(url: &str) -> Option<jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .ignore_discovered_servers()
        .connection_timeout(REQUEST_TIMEOUT)
        .connect(url);
    let client = tokio::time::timeout(REQUEST_TIMEOUT, client)
        .await
        .ok()?
        .ok()?;
    Some(jetstream::new(client))
}
