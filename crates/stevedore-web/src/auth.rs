//! The admin token: kept only as a digest, compared in constant time, never logged.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The admin token, held as its SHA-256 digest.
///
/// Comparing digests rather than the tokens themselves makes both sides 32 bytes long, so neither the
/// comparison's time nor an early length check tells an attacker anything about the token's length;
/// `subtle`'s `ct_eq` then compares all 32 bytes whatever they hold. The digest also keeps the
/// plaintext out of memory dumps and out of any `Debug` output.
#[derive(Clone)]
pub(crate) struct AdminToken([u8; 32]);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// A token, or `None` for an empty (or blank) one: a blank token would let anyone act.
    pub(crate) fn new(token: &str) -> Option<Self> {
        let token = token.trim();
        (!token.is_empty()).then(|| AdminToken(Sha256::digest(token.as_bytes()).into()))
    }

    /// Reads the token from `var`; unset, blank or not UTF-8 means none.
    pub(crate) fn from_env(var: &str) -> Option<Self> {
        match std::env::var(var) {
            Ok(v) => Self::new(&v),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                tracing::warn!("{var} is not valid UTF-8: ignored, the dashboard is read-only");
                None
            }
        }
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub(crate) fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        self.0.ct_eq(&digest).into()
    }
}

/// How a request fared against the admin token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// The bearer token matches.
    Granted,
    /// No token is configured: the dashboard is read-only.
    ReadOnly,
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that does not match.
    Wrong,
}

pub(crate) fn check(token: Option<&AdminToken>, headers: &HeaderMap) -> Access {
    let Some(token) = token else { return Access::ReadOnly };
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    match presented {
        None => Access::Missing,
        Some(p) if token.matches(p) => Access::Granted,
        Some(_) => Access::Wrong,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, value.parse().expect("a header value"));
        h
    }

    #[test]
    fn only_the_exact_token_is_granted() {
        let token = AdminToken::new("s3cret").expect("a token");
        assert_eq!(check(Some(&token), &headers("Bearer s3cret")), Access::Granted);
        assert_eq!(check(Some(&token), &headers("Bearer s3cre")), Access::Wrong);
        assert_eq!(check(Some(&token), &headers("Bearer s3cret!")), Access::Wrong);
        assert_eq!(check(Some(&token), &headers("Basic s3cret")), Access::Missing);
        assert_eq!(check(Some(&token), &HeaderMap::new()), Access::Missing);
        assert_eq!(check(None, &headers("Bearer s3cret")), Access::ReadOnly);
    }

    #[test]
    fn blank_tokens_are_refused_and_never_printed() {
        assert!(AdminToken::new("  ").is_none());
        let token = AdminToken::new("s3cret").expect("a token");
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
