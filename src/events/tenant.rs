//! Tenant id validation: the only gate between row data and NATS subjects.
//!
//! Invariant: a tenant id that reaches a subject matches `[A-Za-z0-9_-]{1,128}`
//! (SPEC §3), so it can never add a token (`.`), a wildcard (`*`, `>`) or
//! whitespace to a subject.

/// Why a row cannot be routed to a tenant subject; sent as `Walcast-Reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidTenant {
    Null,
    Empty,
    TooLong,
    BadCharacter,
}

impl InvalidTenant {
    /// The `Walcast-Reason` header value.
    pub fn reason(self) -> &'static str {
        match self {
            InvalidTenant::Null => "tenant_id is NULL",
            InvalidTenant::Empty => "tenant_id is empty",
            InvalidTenant::TooLong => "tenant_id is longer than 128 bytes",
            InvalidTenant::BadCharacter => "tenant_id has a character outside [A-Za-z0-9_-]",
        }
    }
}

/// Checks a tenant id against SPEC §3.
pub fn validate(tenant: Option<&str>) -> Result<&str, InvalidTenant> {
    let tenant = tenant.ok_or(InvalidTenant::Null)?;
    if tenant.is_empty() {
        return Err(InvalidTenant::Empty);
    }
    if tenant.len() > 128 {
        return Err(InvalidTenant::TooLong);
    }
    if !tenant
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(InvalidTenant::BadCharacter);
    }
    Ok(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_spec_alphabet() {
        for ok in ["acme", "A-b_9", "_", &"x".repeat(128)] {
            assert_eq!(validate(Some(ok)), Ok(ok));
        }
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(validate(None), Err(InvalidTenant::Null));
        assert_eq!(validate(Some("")), Err(InvalidTenant::Empty));
        assert_eq!(
            validate(Some(&"x".repeat(129))),
            Err(InvalidTenant::TooLong)
        );
        for bad in ["a.b", "*", ">", "a b", "tab\t", "é", "line\n", "a/b"] {
            assert_eq!(
                validate(Some(bad)),
                Err(InvalidTenant::BadCharacter),
                "{bad:?}"
            );
        }
    }
}
