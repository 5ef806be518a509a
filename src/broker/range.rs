//! Reading the headers of a stretch of a stream, as fast as the server
//! sends them: an ordered push consumer (flow control, headers only) from a
//! start sequence up to a bound. The foreign-message scan
//! (`Sink::probes`) and the catch-up index's read-back
//! (`catchup::rebuild`) read this way.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::push::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::{Consumer, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;

/// Silence this long ends a read with an error.
const STALL: Duration = Duration::from_secs(30);

/// The messages of `from..=through`, in order.
pub struct HeadersRead {
    messages: Ordered,
    from: u64,
    through: u64,
    done: bool,
}

impl HeadersRead {
    /// Starts reading at `from` (nothing if `through < from`).
    pub async fn open<I>(
        client: &async_nats::Client,
        stream: &Stream<I>,
        from: u64,
        through: u64,
    ) -> Result<HeadersRead, String> {
        let consumer: Consumer<OrderedConfig> = stream
            .create_consumer(OrderedConfig {
                // Pushed with flow control: several times faster than pulling.
                deliver_subject: client.new_inbox(),
                headers_only: true,
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create a consumer: {e}"))?;
        let messages: Ordered = consumer
            .messages()
            .await
            .map_err(|e| format!("read the stream: {e}"))?;
        Ok(HeadersRead {
            messages,
            from,
            through,
            done: through < from,
        })
    }

    /// The next message's stream sequence and headers; `None` once the
    /// range is read (positions without a message are left out).
    pub async fn next(&mut self) -> Result<Option<(u64, Option<HeaderMap>)>, String> {
        while !self.done {
            let msg = match tokio::time::timeout(STALL, self.messages.next()).await {
                Ok(Some(msg)) => msg.map_err(|e| format!("read the stream: {e}"))?,
                Ok(None) => return Err("the stream's consumer ended early".into()),
                Err(_) => return Err(format!("no message from the stream for {STALL:?}")),
            };
            let info = msg.info().map_err(|e| e.to_string())?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > self.through {
                break; // `through` itself was removed from the stream
            }
            // The last one, or nothing after it yet (messages stored after
            // the consumer's creation are past `through` anyway).
            self.done = seq == self.through || pending == 0;
            if seq >= self.from {
                return Ok(Some((seq, msg.message.headers)));
            }
            // else: a consumer recreated earlier than asked (vendor/README.md)
        }
        self.done = true;
        Ok(None)
    }
}
