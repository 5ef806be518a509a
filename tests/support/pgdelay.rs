//! A Postgres-aware TCP proxy that holds back *replication* connections (the
//! startup packet has `replication=database`) for a fixed time before
//! connecting them upstream, while ordinary SQL connections pass at once.
//! Like a slow network path for one connection, it widens the window between
//! walcast reading its checkpoint (SQL) and acquiring the slot
//! (START_REPLICATION), so a test can make something happen exactly there.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// SSLRequest and GSSENCRequest codes: answered "N" (not supported) here.
const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

pub struct ReplicationDelayProxy {
    port: u16,
    held: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl ReplicationDelayProxy {
    /// Forwards `127.0.0.1:<port()>` to `127.0.0.1:<target_port>`, holding
    /// each replication connection for `delay` first.
    pub fn start(target_port: u16, delay: Duration) -> ReplicationDelayProxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind delay proxy");
        std_listener.set_nonblocking(true).expect("non-blocking");
        let port = std_listener.local_addr().expect("proxy address").port();
        let listener = TcpListener::from_std(std_listener).expect("register delay proxy");
        let (held_tx, held) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let held_tx = held_tx.clone();
                connections.spawn(async move {
                    let _ = forward(client, target_port, delay, held_tx).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        ReplicationDelayProxy { port, held, task }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many replication connections have been held so far.
    pub fn held(&self) -> u64 {
        *self.held.borrow()
    }

    /// Waits until the `n`-th replication connection is being held.
    pub async fn wait_held(&self, n: u64, timeout: Duration) {
        let mut held = self.held.clone();
        tokio::time::timeout(timeout, held.wait_for(|h| *h >= n))
            .await
            .unwrap_or_else(|_| panic!("no replication connection #{n} within {timeout:?}"))
            .expect("delay proxy running");
    }
}

impl Drop for ReplicationDelayProxy {
    fn drop(&mut self) {
        // Dropping the JoinSet inside aborts every connection.
        self.task.abort();
    }
}

async fn forward(
    mut client: TcpStream,
    target_port: u16,
    delay: Duration,
    held: watch::Sender<u64>,
) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let startup = loop {
        let len = client.read_u32().await? as usize;
        if !(8..=10_000).contains(&len) {
            return Ok(());
        }
        let mut body = vec![0u8; len - 4];
        client.read_exact(&mut body).await?;
        let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        if code == SSL_REQUEST || code == GSSENC_REQUEST {
            client.write_all(b"N").await?;
            continue;
        }
        let mut packet = (len as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        break packet;
    };
    let replication = startup
        .windows(b"replication\0".len())
        .any(|w| w == b"replication\0");
    if replication {
        held.send_modify(|n| *n += 1);
        tokio::time::sleep(delay).await;
    }
    let mut upstream = TcpStream::connect(("127.0.0.1", target_port)).await?;
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&startup).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
