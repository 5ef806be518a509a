//! The stream's state for catch-up answers: one `STREAM.INFO` for all the
//! requests that wait at once, instead of one each.
//!
//! Why: every answer needs the stream's state (first and last sequence,
//! message count) read after its request arrived. Read once per request, a
//! flood of requests made `STREAM.INFO` the flood's main cost, in the
//! nats-server (a JetStream API request and a JSON document of the whole
//! stream's config and state each) and in walcast (parsing it) — CPU the
//! pipeline and its nats-server need.
//!
//! Invariant: a read answers only requests that began before it started,
//! so every answer still uses a state read during its own request, as when
//! each request read its own. Nothing is cached: a request that arrives
//! while a read is in flight waits for the next one.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::stream::Stream;
use tokio::sync::{Notify, watch};

/// What an answer needs of the stream's state.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub first_seq: u64,
    pub last_seq: u64,
    pub messages: u64,
}

/// The result of read number `.0` (reads are numbered from 1).
type Read = (u64, Result<Counts, String>);

/// Shares stream state reads among the requests waiting at the same time.
pub struct Infos {
    /// Reads started so far.
    started: Arc<AtomicU64>,
    wake: Arc<Notify>,
    results: watch::Receiver<Read>,
}

impl Infos {
    /// Starts the reading task on the current runtime (it ends with it).
    pub fn spawn(stream: Stream) -> Infos {
        Infos::spawn_with(move || {
            let mut stream = stream.clone();
            async move {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| format!("stream info: {e}"))?;
                Ok(Counts {
                    first_seq: info.state.first_sequence,
                    last_seq: info.state.last_sequence,
                    messages: info.state.messages,
                })
            }
        })
    }

    /// Like [`Infos::spawn`], reading with `read`.
    fn spawn_with<F, Fut>(read: F) -> Infos
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Counts, String>> + Send + 'static,
    {
        let (tx, results) = watch::channel((0, Err("not read yet".to_string())));
        let started = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        tokio::spawn(reads(read, started.clone(), wake.clone(), tx));
        Infos {
            started,
            wake,
            results,
        }
    }

    /// The stream's state, read after this call began.
    pub async fn read(&self) -> Result<Counts, String> {
        let before = self.started.load(Ordering::SeqCst);
        self.wake.notify_one();
        let mut results = self.results.clone();
        let read = results
            .wait_for(|(n, _)| *n > before)
            .await
            .map_err(|_| "the stream state reader stopped".to_string())?;
        read.1.clone()
    }
}

/// Reads the stream's state whenever a request waits for it: one read at a
/// time; the requests that arrive meanwhile share the next one.
async fn reads<F, Fut>(
    mut read: F,
    started: Arc<AtomicU64>,
    wake: Arc<Notify>,
    tx: watch::Sender<Read>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Counts, String>>,
{
    loop {
        wake.notified().await;
        let n = started.fetch_add(1, Ordering::SeqCst) + 1;
        let counts = read().await;
        if tx.send((n, counts)).is_err() {
            return; // no request can wait any more
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests that wait together share a read, and each gets a state read
    /// after it began: a message appended before a request began is in the
    /// state it gets.
    #[tokio::test]
    async fn requests_share_reads_that_began_after_them() {
        let last = Arc::new(AtomicU64::new(0));
        let reads_done = Arc::new(AtomicU64::new(0));
        let infos = {
            let (last, reads_done) = (last.clone(), reads_done.clone());
            Arc::new(Infos::spawn_with(move || {
                let (last, reads_done) = (last.clone(), reads_done.clone());
                async move {
                    let last_seq = last.load(Ordering::SeqCst);
                    tokio::task::yield_now().await; // a round trip
                    reads_done.fetch_add(1, Ordering::SeqCst);
                    Ok(Counts {
                        first_seq: 1,
                        last_seq,
                        messages: last_seq,
                    })
                }
            }))
        };
        for round in 0..3 {
            let requests: Vec<_> = (0..100)
                .map(|_| {
                    let (infos, last) = (infos.clone(), last.clone());
                    tokio::spawn(async move {
                        let appended = last.fetch_add(1, Ordering::SeqCst) + 1;
                        let counts = infos.read().await.unwrap();
                        assert!(counts.last_seq >= appended, "{counts:?} before {appended}");
                    })
                })
                .collect();
            for r in requests {
                r.await.unwrap();
            }
            let reads = reads_done.load(Ordering::SeqCst);
            assert!(
                reads <= 2 * (round + 1),
                "{reads} reads for {} requests",
                100 * (round + 1)
            );
        }
    }
}
