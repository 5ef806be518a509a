//! A TCP proxy between walcast and a server, for fault tests: cut every
//! connection, stall traffic (a network partition that later heals), or
//! swallow everything (a server that accepts but never answers).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy currently does with traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mode {
    paused: bool,
    blackhole: bool,
}

/// Why a direction of a connection stopped.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The source half-closed; the other direction may go on.
    Eof,
    /// An error, a blackhole or a proxy shutdown: drop the whole connection.
    Abort,
}

/// A TCP proxy on `127.0.0.1:<port()>` forwarding to `127.0.0.1:<target>`.
/// Must be created inside a Tokio runtime; stops (closing every connection)
/// on drop.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    mode: watch::Sender<Mode>,
    /// Bumped by `cut()`; every connection closes when it changes.
    generation: watch::Sender<u64>,
    accept_task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding new connections to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> TcpProxy {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy listener on 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("set proxy listener non-blocking");
        let port = std_listener
            .local_addr()
            .expect("proxy listener address")
            .port();
        let listener = TcpListener::from_std(std_listener)
            .expect("register proxy listener (TcpProxy::start must run inside a Tokio runtime)");
        let (mode, mode_rx) = watch::channel(Mode::default());
        let (generation, generation_rx) = watch::channel(0u64);
        let accept_task = tokio::spawn(accept_loop(listener, target_port, mode_rx, generation_rx));
        TcpProxy {
            port,
            mode,
            generation,
            accept_task,
        }
    }

    /// The port clients should connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every current connection at once (TCP reset); new connections
    /// are accepted and forwarded as usual.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stops forwarding bytes (both directions) but keeps connections open;
    /// new connections are accepted but not connected upstream until `resume`.
    /// Like a network partition: nothing is lost, it just stalls.
    pub fn pause(&self) {
        self.mode.send_modify(|m| m.paused = true);
    }

    /// Ends a `pause`: held bytes and connections flow again.
    pub fn resume(&self) {
        self.mode.send_modify(|m| m.paused = false);
    }

    /// `true`: accept connections and swallow every byte, never forwarding or
    /// answering (a hung server). Connections open while it is on never
    /// recover (their byte streams lost data); `false` makes new connections
    /// forward normally again.
    pub fn blackhole(&self, on: bool) {
        self.mode.send_modify(|m| m.blackhole = on);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        // Connection tasks see their receivers closed and end.
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target_port: u16,
    mode: watch::Receiver<Mode>,
    generation: watch::Receiver<u64>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut generation = generation.clone();
        // Only cuts from now on concern this connection.
        generation.borrow_and_update();
        tokio::spawn(handle(client, target_port, mode.clone(), generation));
    }
}

/// One proxied connection, until EOF on both sides, an error, or a cut.
async fn handle(
    mut client: TcpStream,
    target_port: u16,
    mut mode: watch::Receiver<Mode>,
    mut generation: watch::Receiver<u64>,
) {
    let _ = client.set_nodelay(true);
    let cut = tokio::select! {
        // Checked first, so bytes sent after `cut()` returned never get through.
        biased;
        _ = generation.changed() => true,
        cut = serve(&mut client, target_port, &mut mode) => cut,
    };
    if cut {
        // RST instead of FIN: the peer sees "connection reset" at once.
        let _ = client.set_zero_linger();
    }
}

/// Forwards (or swallows) traffic; returns whether the connection should be
/// reset rather than closed.
async fn serve(client: &mut TcpStream, target_port: u16, mode: &mut watch::Receiver<Mode>) -> bool {
    let Some(now) = wait_unpaused(mode).await else {
        return true;
    };
    if now.blackhole {
        swallow(client).await;
        return false;
    }
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", target_port)).await else {
        return true;
    };
    let _ = upstream.set_nodelay(true);
    let aborted = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let to_upstream = pump(cr, uw, mode.clone());
        let to_client = pump(ur, cw, mode.clone());
        tokio::pin!(to_upstream, to_client);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let end = tokio::select! {
                end = &mut to_upstream, if !up_done => { up_done = true; end }
                end = &mut to_client, if !down_done => { down_done = true; end }
            };
            if end == End::Abort {
                break true;
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if aborted {
        let _ = upstream.set_zero_linger();
    }
    aborted
}

/// Copies `from` to `to`, holding bytes while paused.
async fn pump<R, W>(mut from: R, mut to: W, mut mode: watch::Receiver<Mode>) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match wait_unpaused(&mut mode).await {
            None => return End::Abort,
            Some(m) if m.blackhole => return swallow(&mut from).await,
            Some(_) => {}
        }
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return End::Eof;
            }
            Ok(n) => n,
            Err(_) => return End::Abort,
        };
        // A pause that started during the read holds these bytes too.
        match wait_unpaused(&mut mode).await {
            None => return End::Abort,
            Some(m) if m.blackhole => return swallow(&mut from).await,
            Some(_) => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return End::Abort;
        }
    }
}

/// Reads and discards until EOF or error; the connection then ends.
async fn swallow<R: AsyncRead + Unpin>(from: &mut R) -> End {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
    End::Abort
}

/// Waits until not paused; `None` when the proxy is gone.
async fn wait_unpaused(mode: &mut watch::Receiver<Mode>) -> Option<Mode> {
    mode.wait_for(|m| !m.paused).await.ok().map(|m| *m)
}
