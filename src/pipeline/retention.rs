//! Holes that are not a loss. A purge by subject (an operator trimming a
//! tenant's oldest events to test or enforce retention, an erasure) leaves
//! holes in the middle of the stream just as a broker that lost messages
//! does. What matters to consumers tells them apart: when each tenant lost
//! only its oldest events, what is left of it is still gap-free from its
//! oldest event on, exactly as after the stream's own limits removed them —
//! catch-up answers `too_old` below it (SPEC §7) and a follower never meets
//! a seq jump. Such holes do not stop walcast (a WARN); any other hole the
//! replay names does (`reader::Skip`, `--accept-holes-through`).

use super::{Context, PipelineError};
use crate::catchup::LeaderGet;
use crate::catchup::lookup::Probe;
use crate::position::StreamSeq;
use crate::publish::PublishError;
use crate::publish::holes::HoleLoss;

/// Tenants checked at most (one read of the stream's leader each): a loss
/// across more is no operator's purge.
const TENANTS_CHECKED: usize = 100;

/// The error a run ends with after its replay named events lost in holes:
/// a retry that goes on past them if each tenant lost only its oldest
/// events, else the loss (fatal), or a retry if the check itself failed.
pub(super) async fn judge(ctx: &Context, loss: HoleLoss) -> PipelineError {
    let stream = ctx.settings.stream.clone();
    match only_oldest(ctx, &loss).await {
        Ok(true) => {
            (ctx.oldest_removed.lock().unwrap_or_else(|e| e.into_inner()))
                .extend_from_slice(&loss.ranges);
            tracing::warn!(
                stream = %stream,
                missing = %loss.holes,
                lost = %loss.lost.describe(),
                "messages are missing from the middle of the stream, but each tenant lost only its oldest events \
                 (a purge by subject, say): catch-up answers too_old below what is left, as after the stream's \
                 limits; going on"
            );
            PublishError::OldestEventsRemoved {
                stream,
                holes: loss.holes,
            }
            .into()
        }
        Ok(false) => PipelineError::Fatal(loss.message),
        Err(e) => PublishError::Nats(format!(
            "cannot check stream {stream}'s holes {}: {e}",
            loss.holes
        ))
        .into(),
    }
}

/// Whether every tenant that lost events still has none older than the
/// newest it lost. Dead letters have no seq: losing them breaks no order.
async fn only_oldest(ctx: &Context, loss: &HoleLoss) -> Result<bool, String> {
    let tenants = loss.lost.highest_per_tenant();
    if tenants.is_empty() || tenants.len() > TENANTS_CHECKED {
        return Ok(tenants.is_empty() && loss.lost.untenanted > 0);
    }
    let stream = (ctx.js.get_stream(&ctx.settings.stream).await).map_err(|e| e.to_string())?;
    for (tenant, newest_lost) in tenants {
        let filter = format!("{}.{tenant}.>", ctx.settings.subject_prefix);
        let leader = LeaderGet {
            stream: &stream,
            filter: &filter,
        };
        match leader.next_at(StreamSeq(1)).await? {
            Some((_, oldest_left)) if oldest_left <= newest_lost => return Ok(false),
            _ => {}
        }
    }
    Ok(true)
}
