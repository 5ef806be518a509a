//! Gateway settings from the environment, validated before anything starts.
//!
//! The token → tenant map is the whole authentication of this example: a
//! connection's tenant is looked up from its token and from nothing else,
//! so a browser can never choose (or change) the tenant it receives.

use std::collections::HashMap;
use std::net::SocketAddr;

/// Everything the gateway needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen: `GATEWAY_LISTEN`, default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// NATS server(s): `GATEWAY_NATS_URL`, default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// Token → tenant: `GATEWAY_TOKENS=tokA:acme,tokB:globex` (required).
    pub tokens: HashMap<String, String>,
    /// How to reach walcast: `prefix` from `GATEWAY_SUBJECT_PREFIX` (walcast's
    /// `--subject-prefix`, default `walcast`), `stream` from `GATEWAY_STREAM`
    /// (walcast's `--stream`, default `WALCAST`), `state_bucket` from
    /// `GATEWAY_STATE_BUCKET` (walcast's `--state-bucket`, default
    /// `<stream>_STATE`); the rest are the client's defaults.
    pub walcast: walcast_client::Options,
}

impl Config {
    /// Reads the `GATEWAY_*` variables; the error says which one to fix.
    pub fn from_env() -> Result<Config, String> {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let listen = var("GATEWAY_LISTEN", "127.0.0.1:8080");
        let tokens = std::env::var("GATEWAY_TOKENS").map_err(|_| {
            "set GATEWAY_TOKENS, e.g. GATEWAY_TOKENS=tokA:acme,tokB:globex".to_string()
        })?;
        Ok(Config {
            listen: listen
                .parse()
                .map_err(|e| format!("GATEWAY_LISTEN={listen:?}: {e}"))?,
            nats_url: var("GATEWAY_NATS_URL", "nats://127.0.0.1:4222"),
            tokens: parse_tokens(&tokens)?,
            walcast: walcast_client::Options {
                prefix: var("GATEWAY_SUBJECT_PREFIX", "walcast"),
                stream: var("GATEWAY_STREAM", "WALCAST"),
                state_bucket: std::env::var("GATEWAY_STATE_BUCKET")
                    .ok()
                    .filter(|b| !b.is_empty()),
                ..Default::default()
            },
        })
    }
}

/// `tokA:acme,tokB:globex` → {tokA: acme, tokB: globex}. Tenant ids must be
/// ones walcast publishes (`[A-Za-z0-9_-]{1,128}`); tokens must be unique.
pub fn parse_tokens(text: &str) -> Result<HashMap<String, String>, String> {
    let mut tokens = HashMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (token, tenant) = pair
            .split_once(':')
            .ok_or_else(|| format!("GATEWAY_TOKENS: {pair:?} is not token:tenant"))?;
        let valid_tenant = (1..=128).contains(&tenant.len())
            && tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if token.is_empty() || !valid_tenant {
            return Err(format!(
                "GATEWAY_TOKENS: {pair:?} needs a non-empty token and a tenant id matching [A-Za-z0-9_-]{{1,128}}"
            ));
        }
        if tokens
            .insert(token.to_string(), tenant.to_string())
            .is_some()
        {
            return Err("GATEWAY_TOKENS: a token appears twice".to_string());
        }
    }
    if tokens.is_empty() {
        return Err("GATEWAY_TOKENS is empty".to_string());
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::parse_tokens;

    #[test]
    fn tokens_map_to_tenants() {
        let t = parse_tokens("tokA:acme, tokB:globex,").unwrap();
        assert_eq!(t["tokA"], "acme");
        assert_eq!(t["tokB"], "globex");
        for bad in [
            "",
            "tokA",
            ":acme",
            "tokA:",
            "tokA:a.b",
            "tokA:acme,tokA:globex",
        ] {
            assert!(parse_tokens(bad).is_err(), "{bad:?}");
        }
    }
}
