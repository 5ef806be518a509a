//! `--nats-url` as operators write it: one URL or a comma-separated list
//! (`nats://a:4222,nats://b:4222`), with `user:password@` or `token@` in the
//! URLs. async-nats ignores URL userinfo, so it is taken out here and given
//! to the client as user/password or token auth; the addresses handed on
//! carry no secret, so nothing downstream (its debug logs included) sees one.

use async_nats::ServerAddr;

use crate::secrets::percent_decode;

/// Credentials found in the URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlAuth {
    None,
    UserPassword { user: String, password: String },
    Token(String),
}

/// The parsed server list.
#[derive(Debug)]
pub struct Servers {
    /// Addresses without userinfo, in the order given.
    pub addrs: Vec<ServerAddr>,
    pub auth: UrlAuth,
}

/// Parses a comma-separated list of NATS URLs. Every URL that carries
/// credentials must carry the same ones (a cluster has one account).
pub fn parse(list: &str) -> Result<Servers, String> {
    let mut addrs = Vec::new();
    let mut auth = UrlAuth::None;
    for (n, member) in list.split(',').map(str::trim).enumerate() {
        let position = n + 1;
        if member.is_empty() {
            return Err(format!("server {position} of the list is empty"));
        }
        let addr: ServerAddr = member.parse().map_err(|e| {
            format!(
                "server {position} ({}) is not a NATS URL: {e}",
                crate::secrets::redact_url(member)
            )
        })?;
        let found = url_auth(&addr);
        match (&auth, &found) {
            (_, UrlAuth::None) => {}
            (UrlAuth::None, _) => auth = found.clone(),
            (known, found) if known == found => {}
            _ => {
                return Err(format!(
                    "server {position} has other credentials than an earlier one: give every server the same user:password@ or token@ (or none)"
                ));
            }
        }
        addrs.push(without_userinfo(addr)?);
    }
    Ok(Servers { addrs, auth })
}

fn url_auth(addr: &ServerAddr) -> UrlAuth {
    match (addr.username(), addr.password()) {
        (Some(user), Some(password)) => UrlAuth::UserPassword {
            user: percent_decode(user),
            password: percent_decode(password),
        },
        (Some(token), None) => UrlAuth::Token(percent_decode(token)),
        (None, _) => UrlAuth::None,
    }
}

fn without_userinfo(addr: ServerAddr) -> Result<ServerAddr, String> {
    let mut url = addr.into_inner();
    // Both only fail for URLs that cannot have a host, which ServerAddr refused already.
    let _ = url.set_password(None);
    let _ = url.set_username("");
    ServerAddr::from_url(url).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_keeps_order_and_loses_userinfo() {
        let servers = parse("nats://ann:s%40cret@a:4222, nats://b:4223,c:4224").unwrap();
        let urls: Vec<&str> = servers.addrs.iter().map(|a| a.as_url_str()).collect();
        assert_eq!(urls, ["nats://a:4222", "nats://b:4223", "nats://c:4224"]);
        assert_eq!(
            servers.auth,
            UrlAuth::UserPassword {
                user: "ann".into(),
                password: "s@cret".into()
            }
        );
    }

    #[test]
    fn a_lone_userinfo_is_a_token() {
        let servers = parse("nats://t0k@a:4222,nats://t0k@b:4222").unwrap();
        assert_eq!(servers.auth, UrlAuth::Token("t0k".into()));
        assert!(!servers.addrs[1].as_url_str().contains("t0k"));
    }

    #[test]
    fn bad_lists_are_refused_without_echoing_secrets() {
        for (list, expect) in [
            ("nats://a:1,", "server 2 of the list is empty"),
            ("nats://x:pw1@a:1,nats://x:pw2@b:1", "other credentials"),
            ("nats://t0ken@a:port", "server 1 (nats://***@a:port)"),
        ] {
            let error = parse(list).unwrap_err();
            assert!(error.contains(expect), "{error}");
            assert!(
                !error.contains("pw1") && !error.contains("t0ken"),
                "{error}"
            );
        }
    }
}
