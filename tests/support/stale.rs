//! A replica that lags, on a single server. On a cluster every replica of a
//! stream answers direct gets, and a follower that has not applied the
//! newest writes answers "404 Message Not Found" for them. The server is
//! started with [`StaleReplica::mappings`]: half of a stream's direct-get
//! requests are mapped (weighted subject mapping) to `stale.<stream>…`,
//! where this answers each that way.
//!
//! It speaks the NATS protocol itself: the clients cannot publish a status
//! line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

pub struct StaleReplica {
    answered: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl StaleReplica {
    /// Server config: half of each stream's direct gets go to the stale
    /// replica (the other half to the stream, as usual).
    pub fn mappings(streams: &[&str]) -> String {
        let mut conf = String::from("mappings = {\n");
        for stream in streams {
            for tail in ["", ".>"] {
                let api = format!("$JS.API.DIRECT.GET.{stream}{tail}");
                conf.push_str(&format!(
                    "  \"{api}\": [{{destination: \"{api}\", weight: 50%}}, {{destination: \"stale.{stream}{tail}\", weight: 50%}}]\n"
                ));
            }
        }
        conf.push_str("}\n");
        conf
    }

    /// Answers the share of `stream`'s direct gets mapped to it on the
    /// server at `nats_url` (`nats://host:port`) until dropped.
    pub async fn start(nats_url: &str, stream: &str) -> StaleReplica {
        let addr = nats_url.trim_start_matches("nats://");
        let socket = TcpStream::connect(addr).await.expect("connect to nats");
        let (read, mut write) = socket.into_split();
        let mut read = BufReader::new(read);
        let mut info = String::new();
        read.read_line(&mut info).await.expect("the server's INFO");
        write
            .write_all(
                format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\n\
                     SUB stale.{stream} 1\r\nSUB stale.{stream}.> 2\r\nPING\r\n"
                )
                .as_bytes(),
            )
            .await
            .expect("subscribe");
        let mut pong = String::new();
        while pong.is_empty() || pong.starts_with("INFO") {
            pong.clear();
            read.read_line(&mut pong).await.expect("PONG");
        }
        assert_eq!(pong.trim(), "PONG", "the server accepted the subscriptions");
        let answered = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(read, write, answered.clone()));
        StaleReplica { answered, task }
    }

    /// Requests answered "not found" so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for StaleReplica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers every request delivered (`MSG` or `HMSG` with a reply subject).
async fn serve(
    mut read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    mut write: tokio::net::tcp::OwnedWriteHalf,
    answered: Arc<AtomicU64>,
) {
    const NOT_FOUND: &str = "NATS/1.0 404 Message Not Found\r\n\r\n";
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["PING"] => {
                let _ = write.write_all(b"PONG\r\n").await;
                continue;
            }
            // MSG <subject> <sid> <reply> <bytes> / HMSG <subject> <sid> <reply> <hdr> <total>
            ["MSG", _, _, reply, bytes] | ["HMSG", _, _, reply, _, bytes] => {
                let mut body = vec![0; bytes.parse::<usize>().unwrap_or(0) + 2];
                if read.read_exact(&mut body).await.is_err() {
                    return;
                }
                reply.to_string()
            }
            ["MSG", _, _, bytes] | ["HMSG", _, _, _, bytes] => {
                let mut body = vec![0; bytes.parse::<usize>().unwrap_or(0) + 2];
                if read.read_exact(&mut body).await.is_err() {
                    return;
                }
                continue;
            }
            _ => continue,
        };
        let n = NOT_FOUND.len();
        let answer = format!("HPUB {reply} {n} {n}\r\n{NOT_FOUND}\r\n");
        if write.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        answered.fetch_add(1, Ordering::SeqCst);
    }
}
