//! Comparison of secrets (cluster secret, admin and service tokens).
//!
//! Secrets are compared as SHA-256 digests in constant time: the comparison
//! takes the same time whatever the inputs' lengths and contents, so timing
//! reveals neither a prefix nor the length of the expected secret.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 digest of a secret.
pub fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Whether `given` equals `expected`, in time independent of both.
pub fn matches(given: &[u8], expected: &[u8]) -> bool {
    digest(given).ct_eq(&digest(expected)).into()
}

/// Whether `given` is the digest of `expected`.
pub fn matches_digest(given_digest: &[u8], expected: &[u8]) -> bool {
    given_digest.len() == 32 && bool::from(given_digest.ct_eq(&digest(expected)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_secrets_match_and_others_do_not() {
        assert!(matches(b"s3cret", b"s3cret"));
        assert!(!matches(b"s3cre", b"s3cret"));
        assert!(!matches(b"", b"s3cret"));
        assert!(matches_digest(&digest(b"tok"), b"tok"));
        assert!(!matches_digest(&digest(b"tok")[..31], b"tok"));
    }
}
