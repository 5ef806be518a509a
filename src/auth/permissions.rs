//! What an issued tenant user may do (SPEC §9), as NATS allow lists.
//!
//! Invariant: every subject a tenant user may publish to or subscribe to
//! names its own tenant in a position the server checks — nothing else is
//! allowed (an allow list without deny entries: anything unlisted is
//! refused). In detail, for tenant `T`, prefix `P`, stream `S`, state
//! bucket `K`:
//!
//! - subscribe `P.T.>` (live events) and `_INBOX_T.>`, its own inboxes:
//!   clients set the inbox prefix `_INBOX_T` (see [`inbox_prefix`]). A
//!   shared `_INBOX.>` would let tenant A subscribe to the replies and
//!   consumer deliveries of tenant B.
//! - request `P-api.v1.catchup.T` (the tenant-scoped catch-up subject).
//! - create ordered consumers on `S` filtered to `P.T.>` through the API
//!   subject that carries the filter (`$JS.API.CONSUMER.CREATE.S.<name>.P.T.>`;
//!   the server refuses a body whose filter differs from the subject's), and
//!   pull from consumers of `S` (`$JS.API.CONSUMER.MSG.NEXT.S.*`).
//! - read its state keys: consumers on `KV_K` filtered to `$KV.K.T.>`,
//!   direct gets of `$KV.K.T.>`, and the backfill marker key
//!   `$KV.K._walcast.backfill` (no tenant data: a loader waits on it).
//!
//! Residual risk, documented in the README: `MSG.NEXT` on `S.*` names no
//! tenant. A user that knew another connection's consumer name (ephemeral,
//! random 22-character NUIDs, never listed to tenant users: `CONSUMER.LIST`,
//! `CONSUMER.NAMES` and `CONSUMER.INFO` are not allowed) could pull from it.
//! Oversized events' objects (`<stream>_OVERSIZED`) are not readable by
//! tenant users: their names are event ids, not tenant-scoped.

use serde::Serialize;

/// One direction's allow (and deny) list, as the user JWT carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Permissions {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// The names the permissions are made of (from the daemon's settings).
#[derive(Debug, Clone)]
pub struct Scope {
    pub prefix: String,
    pub stream: String,
    /// `None`: the state is off, so no state reads are allowed.
    pub state_bucket: Option<String>,
}

/// The key of the state backfill marker (SPEC §8), readable by everyone.
pub const MARKER_KEY: &str = "_walcast.backfill";

/// The inbox prefix a tenant user's client must use: `_INBOX_<tenant>`.
pub fn inbox_prefix(tenant: &str) -> String {
    format!("_INBOX_{tenant}")
}

/// `(publish, subscribe)` for `tenant`, which must be a valid tenant id
/// (`events::tenant::validate`): it is put into subjects as is.
pub fn for_tenant(scope: &Scope, tenant: &str) -> (Permissions, Permissions) {
    let Scope { prefix, stream, .. } = scope;
    let mut publish = vec![
        format!("{prefix}-api.v1.catchup.{tenant}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.*.{prefix}.{tenant}.>"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
    ];
    if let Some(bucket) = &scope.state_bucket {
        let kv = format!("KV_{bucket}");
        for keys in [format!("{tenant}.>"), MARKER_KEY.to_string()] {
            publish.push(format!(
                "$JS.API.CONSUMER.CREATE.{kv}.*.$KV.{bucket}.{keys}"
            ));
            publish.push(format!("$JS.API.DIRECT.GET.{kv}.$KV.{bucket}.{keys}"));
        }
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{kv}.*"));
    }
    let subscribe = vec![
        format!("{prefix}.{tenant}.>"),
        format!("{}.>", inbox_prefix(tenant)),
    ];
    (
        Permissions {
            allow: publish,
            deny: Vec::new(),
        },
        Permissions {
            allow: subscribe,
            deny: Vec::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(state: bool) -> Scope {
        Scope {
            prefix: "walcast".into(),
            stream: "WALCAST".into(),
            state_bucket: state.then(|| "WALCAST_STATE".into()),
        }
    }

    /// Every allowed subject names the tenant, except the pulls (names
    /// are random, see the module docs) and the marker key.
    #[test]
    fn every_subject_is_the_tenants_own() {
        let (publish, subscribe) = for_tenant(&scope(true), "acme");
        for subject in publish.allow.iter().chain(&subscribe.allow) {
            let tenant_scoped = subject.contains(".acme.")
                || subject.ends_with(".acme")
                || subject.starts_with("_INBOX_acme.");
            let exempt = subject.contains("MSG.NEXT") || subject.ends_with(MARKER_KEY);
            assert!(tenant_scoped || exempt, "{subject}");
            assert!(!subject.contains("_INBOX."), "{subject}");
        }
        assert!(publish.deny.is_empty() && subscribe.deny.is_empty());
        assert_eq!(
            subscribe.allow,
            ["walcast.acme.>", "_INBOX_acme.>"].map(String::from)
        );
        assert!(
            publish
                .allow
                .contains(&"$JS.API.DIRECT.GET.KV_WALCAST_STATE.$KV.WALCAST_STATE.acme.>".into())
        );
    }

    #[test]
    fn no_state_reads_when_the_state_is_off() {
        let (publish, _) = for_tenant(&scope(false), "acme");
        assert!(
            publish.allow.iter().all(|s| !s.contains("KV")),
            "{publish:?}"
        );
        assert_eq!(publish.allow.len(), 3);
    }
}
