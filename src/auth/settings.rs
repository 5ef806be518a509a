//! The auth callout's settings (SPEC §9), resolved with the others in
//! `config.rs`: the callout is on when any of its files or its account is
//! given, and then it must be complete (issuer seed, account, exactly one
//! token key) — a half-configured callout is refused before anything
//! connects, with a one-line error naming what is missing.

use std::path::PathBuf;

use crate::config::ConfigError;

/// The `auth_*` options as given (flags > env > TOML, merged already).
#[derive(Debug, Default)]
pub struct AuthOptions {
    pub issuer_seed_file: Option<PathBuf>,
    pub xkey_seed_file: Option<PathBuf>,
    pub token_secret_file: Option<PathBuf>,
    pub token_public_key_file: Option<PathBuf>,
    pub tenant_claim: Option<String>,
    pub account: Option<String>,
    pub token_audience: Option<String>,
    pub token_issuer: Option<String>,
}

/// How the application's tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKey {
    /// HS256 with the shared secret in this file.
    SecretFile(PathBuf),
    /// RS256 or EdDSA with the PEM public key in this file.
    PublicKeyFile(PathBuf),
}

/// A complete auth callout configuration. Only paths and names: the keys
/// are read when the service starts (`keys.rs`), so a `Settings` never
/// holds key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    pub issuer_seed_file: PathBuf,
    pub xkey_seed_file: Option<PathBuf>,
    pub token_key: TokenKey,
    /// The token claim with the tenant id. Default `tenant_id`.
    pub tenant_claim: String,
    /// The account the issued users join (the user JWT's `aud`).
    pub account: String,
    /// When set, a token's `aud` must contain it.
    pub token_audience: Option<String>,
    /// When set, a token's `iss` must equal it.
    pub token_issuer: Option<String>,
}

impl AuthSettings {
    /// `None` when nothing of the callout is configured; else the complete
    /// settings or what is missing.
    pub fn resolve(o: AuthOptions) -> Result<Option<AuthSettings>, ConfigError> {
        let given = o.issuer_seed_file.is_some()
            || o.xkey_seed_file.is_some()
            || o.token_secret_file.is_some()
            || o.token_public_key_file.is_some()
            || o.account.is_some()
            || o.token_audience.is_some()
            || o.token_issuer.is_some();
        if !given {
            return Ok(None);
        }
        let invalid = |m: &str| ConfigError::Invalid(m.to_string());
        let issuer_seed_file = o.issuer_seed_file.ok_or_else(|| {
            invalid("the auth callout needs auth_issuer_seed_file (--auth-issuer-seed-file): the issuer nkey seed named in the server's auth_callout { issuer }")
        })?;
        let account = o.account.ok_or_else(|| {
            invalid("the auth callout needs auth_account (--auth-account): the account the tenant users join")
        })?;
        if account.is_empty() || account.contains(|c: char| c.is_whitespace() || c == '.') {
            return Err(ConfigError::Invalid(format!(
                "auth_account {account:?} is not an account name (no spaces or dots)"
            )));
        }
        let token_key = match (o.token_secret_file, o.token_public_key_file) {
            (Some(secret), None) => TokenKey::SecretFile(secret),
            (None, Some(public)) => TokenKey::PublicKeyFile(public),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "auth_token_secret_file and auth_token_public_key_file are both set: keep the one that verifies the application's tokens",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "the auth callout needs auth_token_secret_file (HS256) or auth_token_public_key_file (RS256/EdDSA) to verify tokens",
                ));
            }
        };
        let tenant_claim = o.tenant_claim.unwrap_or_else(|| "tenant_id".into());
        if tenant_claim.is_empty() {
            return Err(invalid("auth_tenant_claim must not be empty"));
        }
        Ok(Some(AuthSettings {
            issuer_seed_file,
            xkey_seed_file: o.xkey_seed_file,
            token_key,
            tenant_claim,
            account,
            token_audience: o.token_audience,
            token_issuer: o.token_issuer,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete() -> AuthOptions {
        AuthOptions {
            issuer_seed_file: Some("/s/issuer".into()),
            token_secret_file: Some("/s/secret".into()),
            account: Some("APP".into()),
            ..Default::default()
        }
    }

    #[test]
    fn off_unless_given_and_defaults_the_claim() {
        assert_eq!(AuthSettings::resolve(AuthOptions::default()).unwrap(), None);
        let s = AuthSettings::resolve(complete()).unwrap().unwrap();
        assert_eq!(s.tenant_claim, "tenant_id");
        assert_eq!(s.token_key, TokenKey::SecretFile("/s/secret".into()));
    }

    #[test]
    fn incomplete_settings_name_what_is_missing() {
        let cases = [
            (
                AuthOptions {
                    issuer_seed_file: None,
                    ..complete()
                },
                "auth_issuer_seed_file",
            ),
            (
                AuthOptions {
                    account: None,
                    ..complete()
                },
                "auth_account",
            ),
            (
                AuthOptions {
                    token_secret_file: None,
                    ..complete()
                },
                "auth_token_public_key_file",
            ),
            (
                AuthOptions {
                    token_public_key_file: Some("/s/pub.pem".into()),
                    ..complete()
                },
                "both set",
            ),
            (
                AuthOptions {
                    account: Some("A B".into()),
                    ..complete()
                },
                "not an account name",
            ),
        ];
        for (options, expected) in cases {
            let error = AuthSettings::resolve(options).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
