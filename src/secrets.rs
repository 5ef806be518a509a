//! Secrets never leave the process: one routine masks every URL and DSN
//! walcast prints ([`redact_url`]), and every line walcast writes — its own
//! logs, its dependencies' debug logs, errors, `check` and `tail` output —
//! passes through [`scrub`], which replaces each registered secret.
//!
//! Invariant owned here: a password, token or seed given to walcast is
//! registered ([`register_url`], [`register`]) before anything can print it,
//! and the log writer ([`ScrubbingStderr`]) and the binary's printing
//! functions scrub every byte they emit.

use std::borrow::Cow;
use std::io::Write;
use std::sync::RwLock;

/// Secrets shorter than this are masked in URLs but not searched for in free
/// text: a one-letter password would otherwise erase that letter from every
/// log line.
const MIN_SCRUBBED_LEN: usize = 4;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers `secret` (and its percent-decoded form) so [`scrub`] masks it.
pub fn register(secret: &str) {
    let decoded = percent_decode(secret);
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for s in [secret.to_string(), decoded] {
        if s.len() >= MIN_SCRUBBED_LEN && !secrets.contains(&s) {
            secrets.push(s);
        }
    }
    // Longest first, so a secret containing another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Registers every secret a URL (or a comma-separated list of URLs) carries:
/// userinfo passwords, NATS tokens, and `password=` / `sslpassword=` values.
pub fn register_url(urls: &str) {
    for url in urls.split(',') {
        let parts = Parts::of(url.trim());
        if let Some(secret) = parts.userinfo_secret() {
            register(secret);
        }
        for (key, value) in parts.query_pairs() {
            if is_secret_key(key) {
                register(value);
            }
        }
    }
}

/// `text` with every registered secret replaced by `***`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), "***"));
        }
    }
    out
}

/// A URL, a DSN or a comma-separated list of them with every secret masked:
/// `user:***@host`, a NATS token as `***@host`, `password=***`,
/// `sslpassword=***`. Postgres user names stay visible (they are not secret).
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| Parts::of(url).redacted())
        .collect::<Vec<_>>()
        .join(",")
}

fn is_secret_key(key: &str) -> bool {
    ["password", "sslpassword", "token", "auth_token"]
        .iter()
        .any(|k| key.eq_ignore_ascii_case(k))
}

/// A URL cut where secrets can be: `scheme://userinfo@host/path?query`.
struct Parts<'a> {
    scheme: Option<&'a str>,
    userinfo: Option<&'a str>,
    host: &'a str,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> Parts<'a> {
    fn of(url: &'a str) -> Parts<'a> {
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, url),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        Parts {
            scheme,
            userinfo,
            host,
            path,
            query,
        }
    }

    /// In `postgres://user@host` the user name is not secret; in
    /// `nats://token@host` the lone userinfo is a token.
    fn lone_user_is_token(&self) -> bool {
        !matches!(self.scheme, Some("postgres" | "postgresql"))
    }

    fn userinfo_secret(&self) -> Option<&'a str> {
        match self.userinfo?.split_once(':') {
            Some((_, password)) => Some(password),
            None if self.lone_user_is_token() => self.userinfo,
            None => None,
        }
    }

    fn query_pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|kv| kv.split_once('='))
    }

    fn redacted(&self) -> String {
        let mut out = String::new();
        if let Some(scheme) = self.scheme {
            out.push_str(scheme);
            out.push_str("://");
        }
        if let Some(userinfo) = self.userinfo {
            match userinfo.split_once(':') {
                Some((user, _)) => out.push_str(&format!("{user}:***")),
                None if self.lone_user_is_token() => out.push_str("***"),
                None => out.push_str(userinfo),
            }
            out.push('@');
        }
        out.push_str(self.host);
        out.push_str(self.path);
        if let Some(query) = self.query {
            let pairs: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push('?');
            out.push_str(&pairs.join("&"));
        }
        out
    }
}

/// `%XX` sequences decoded (invalid ones kept as they are).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard error for the log subscriber, every line scrubbed: this also
/// covers what dependencies log at debug level (async-nats, tokio-postgres).
/// Each event stays on one line, so line-oriented log shippers and greps see
/// all of its fields.
pub struct ScrubbingStderr;

impl Write for ScrubbingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer writes one whole event per call.
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(one_line(&scrub(&text)).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `event` with its inner line breaks turned into spaces. Postgres errors
/// carry `DETAIL:` and `HINT:` on lines of their own; in the middle of a log
/// line they would cut off the fields that follow (`retry_in=`).
fn one_line(event: &str) -> Cow<'_, str> {
    let body = event.strip_suffix('\n').unwrap_or(event);
    if !body.contains(['\n', '\r']) {
        return Cow::Borrowed(event);
    }
    let mut line: String = body
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if body.len() < event.len() {
        line.push('\n');
    }
    Cow::Owned(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_event_stays_on_one_line() {
        let event = "WARN error=db error: FATAL: not yet accepting connections\nDETAIL: recovery\nHINT: wait retry_in=1s\n";
        assert_eq!(
            one_line(event),
            "WARN error=db error: FATAL: not yet accepting connections DETAIL: recovery HINT: wait retry_in=1s\n"
        );
        assert!(matches!(one_line("plain\n"), Cow::Borrowed("plain\n")));
    }

    #[test]
    fn urls_are_redacted_whatever_the_secret_length() {
        let cases = [
            (
                "postgres://walcast:s3cret@db:5432/app",
                "postgres://walcast:***@db:5432/app",
            ),
            (
                "postgres://db/app?user=a&password=s3cret&sslpassword=k3y",
                "postgres://db/app?user=a&password=***&sslpassword=***",
            ),
            ("postgres://walcast@db/app", "postgres://walcast@db/app"),
            ("nats://t@nats:4222", "nats://***@nats:4222"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            (
                "nats://a:pw@n1:4222,nats://tok@n2:4222,n3:4222",
                "nats://a:***@n1:4222,nats://***@n2:4222,n3:4222",
            ),
            ("tok@n3:4222", "***@n3:4222"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
        assert!(!redact_url("nats://user:pa@ss@h:1").contains("pa@ss"));
    }

    #[test]
    fn registered_secrets_are_scrubbed_from_any_text() {
        register_url("nats://ann:hunter2x@h:1,nats://tok3n-of-a-list@h2:2");
        register_url("postgres://u@h/db?sslpassword=keyp%40ss");
        let text = "auth hunter2x tok3n-of-a-list keyp%40ss keyp@ss";
        assert_eq!(scrub(text), "auth *** *** *** ***");
        assert_eq!(scrub("nothing here"), "nothing here");
    }

    #[test]
    fn percent_decoding_keeps_invalid_sequences() {
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
    }
}
