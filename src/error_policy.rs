//! What to do about an error, decided here and nowhere else: retry the run
//! from the checkpoint (with capped exponential backoff and jitter), wait as
//! a standby while another instance holds the slot, or stop and let the
//! error's text tell the operator what to fix.
//!
//! The stages only say what went wrong (one error enum each); whether that
//! can heal by itself is this module's call, so the supervisor (`app`) and
//! the NATS connection (`broker`) follow one policy.

use std::time::Duration;

use async_nats::ConnectErrorKind;

use crate::database::DbError;
use crate::pipeline::PipelineError;
use crate::publish::PublishError;
use crate::source::SourceError;

/// What the supervisor does after a run ended with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The cause may heal (a server restarting, a cut connection): run again
    /// after a backoff.
    Retry,
    /// Another instance streams the slot: wait for it, indefinitely.
    Standby,
    /// Retrying cannot help; the error says what to fix.
    Stop,
}

/// The decision for a run's error. `started`: some run of this process
/// reached replication, so startup (where a misconfigured server shows) is
/// over.
pub fn decide(error: &PipelineError, started: bool) -> Decision {
    let retry_if = |transient: bool| {
        if transient {
            Decision::Retry
        } else {
            Decision::Stop
        }
    };
    match error {
        PipelineError::Source(SourceError::SlotBusy(_)) => Decision::Standby,
        PipelineError::Db(e) => retry_if(db_may_heal(e)),
        PipelineError::Source(e) => retry_if(matches!(e, SourceError::Replication(_))),
        PipelineError::Publish(e) => retry_if(publish_may_heal(e, started)),
        // Assembly failures come from an interrupted stream, never its content;
        // a service beside the pipeline that stopped is started anew by the
        // next run.
        PipelineError::Assemble(_) | PipelineError::Service(_) => Decision::Retry,
        PipelineError::Decode(_) | PipelineError::Precondition(_) | PipelineError::Fatal(_) => {
            Decision::Stop
        }
    }
}

fn db_may_heal(error: &DbError) -> bool {
    match error {
        DbError::BadUrl { .. } | DbError::Precondition(_) => false,
        DbError::Timeout { .. } | DbError::Fenced(_) | DbError::NoPrimary(_) => true,
        // A certificate the server presents will not change by retrying.
        DbError::Connect { source, .. }
            if crate::telemetry::error_chain(source).contains("certificate") =>
        {
            false
        }
        DbError::Connect { source, .. } | DbError::Query { source, .. } => {
            let code = source
                .code()
                .map(|c| c.code().to_string())
                .unwrap_or_default();
            // 28xxx: authentication; 3D000: no such database; 42xxx: privileges and syntax.
            !(code.starts_with("28") || code == "3D000" || code.starts_with("42"))
        }
    }
}

fn publish_may_heal(error: &PublishError, started: bool) -> bool {
    match error {
        // JetStream can be briefly unavailable while a NATS server restarts:
        // only at startup does "no JetStream" mean a misconfigured server.
        PublishError::NoJetStream(_) => started,
        PublishError::Incompatible(_) => false,
        // Named lost events that were not only tenants' oldest: an operator
        // must re-sync consumers first (`--accept-holes-through`).
        PublishError::LostInHoles(_) => false,
        // A deleted stream is recreated by the next run, which then finds the
        // checkpoint past its end and stops, naming the lost range.
        PublishError::StreamGone { .. } => true,
        // The run restarts from the checkpoint; chaining makes that exact.
        PublishError::Nats(_)
        | PublishError::Ack { .. }
        | PublishError::Chain { .. }
        | PublishError::Downstream
        | PublishError::NoResponders { .. }
        | PublishError::LeaderChange { .. }
        | PublishError::BrokerLoss { .. }
        | PublishError::StreamHoles { .. }
        | PublishError::OldestEventsRemoved { .. } => true,
    }
}

/// The fix for a NATS connection failure that retrying cannot cure, or
/// `None` if the server may still come up (refused, timed out, DNS not
/// ready yet).
pub fn nats_connect_fix(kind: ConnectErrorKind) -> Option<&'static str> {
    match kind {
        ConnectErrorKind::ServerParse => Some(FIX_NATS_URL),
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => Some(
            "authorization failed: check the NATS credentials (user:password@ or token@ in --nats-url, --nats-creds, --nats-nkey) against the server's authorization block",
        ),
        ConnectErrorKind::Tls => Some(
            "check the server's TLS setup and --nats-ca / --nats-client-cert / --nats-client-key",
        ),
        ConnectErrorKind::Dns
        | ConnectErrorKind::TimedOut
        | ConnectErrorKind::Io
        | ConnectErrorKind::MaxReconnects => None,
    }
}

/// The fix for an unusable `--nats-url`.
pub const FIX_NATS_URL: &str =
    "fix --nats-url (nats://HOST:PORT or tls://HOST:PORT, comma-separated for several servers)";

/// Capped exponential backoff with jitter (a half to the whole step), so
/// instances restarting together do not retry in lockstep.
pub fn backoff(attempt: u32, first: Duration, cap: Duration) -> Duration {
    let step = first.saturating_mul(1 << attempt.min(16));
    step.min(cap).mul_f64(rand::random_range(0.5..1.0))
}

/// The supervisor's backoff between runs: 200 ms doubling to 30 s.
pub fn run_backoff(attempt: u32) -> Duration {
    backoff(attempt, Duration::from_millis(200), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_retry_and_stop() {
        let busy = PipelineError::Source(SourceError::SlotBusy("pid 7".into()));
        assert_eq!(decide(&busy, false), Decision::Standby);
        let cut = PipelineError::Source(SourceError::Replication("reset".into()));
        assert_eq!(decide(&cut, false), Decision::Retry);
        let lost = PipelineError::Source(SourceError::SlotLost {
            slot: "w".into(),
            reason: "gone".into(),
        });
        assert_eq!(decide(&lost, true), Decision::Stop);
        let no_js = PipelineError::Publish(PublishError::NoJetStream("x".into()));
        assert_eq!(decide(&no_js, false), Decision::Stop);
        assert_eq!(decide(&no_js, true), Decision::Retry);
        let fatal = PipelineError::Fatal("x".into());
        assert_eq!(decide(&fatal, true), Decision::Stop);
    }

    #[test]
    fn only_unreachable_servers_are_waited_for() {
        assert!(nats_connect_fix(ConnectErrorKind::Io).is_none());
        assert!(nats_connect_fix(ConnectErrorKind::TimedOut).is_none());
        assert!(nats_connect_fix(ConnectErrorKind::ServerParse).is_some());
        let auth = nats_connect_fix(ConnectErrorKind::AuthorizationViolation).unwrap();
        assert!(auth.starts_with("authorization failed"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let first = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        assert!(backoff(0, first, cap) <= first);
        assert!(backoff(0, first, cap) >= first / 2);
        assert!(backoff(40, first, cap) <= cap);
        assert!(run_backoff(u32::MAX) <= Duration::from_secs(30));
    }
}
