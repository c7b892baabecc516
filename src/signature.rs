//! Webhook signatures: [`Secret`]s, and the HMAC-SHA256 signing and checking
//! shared by [`WebhookSink`](crate::webhook::WebhookSink) (sender) and the
//! receiver layer.
//!
//! Two formats, named by [`Scheme`] on both sides:
//!
//! - **Standard Webhooks** (the default): the signed content is
//!   `"{id}.{timestamp}.{body}"` and the header value is `v1,<base64 HMAC>`,
//!   one space-separated entry per secret so that keys can be rotated.
//!   Secrets are written `whsec_<base64>`.
//! - **Go-compatible**: `lowercase hex(HMAC-SHA256(raw secret bytes, body))`
//!   in a `signature` header, what receivers of the Go original check.
//!
//! ```
//! use eventsink::signature::{self, Secret};
//!
//! let secret: Secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".parse()?;
//! let body = br#"{"email":"test@example.com","username":"test_user"}"#;
//! let header = signature::sign(&[secret.clone()], "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body);
//! assert_eq!(header, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
//! assert!(signature::matches(&[secret], "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body, &header));
//! # Ok::<(), eventsink::signature::SecretError>(())
//! ```
//!
//! Comparisons run in constant time, and a [`Secret`] never shows its bytes
//! in `Debug` or in any error; its key bytes and keyed HMAC state are
//! overwritten with zeros when it is dropped ([`zeroize`](https://docs.rs/zeroize)).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

// The keyed HMAC state is two SHA-256 cores (and a block buffer) that
// wipe themselves on drop with feature `zeroize` of hmac and sha2; this
// fails to compile if an upgrade loses that.
const _: fn() = || {
    fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    zeroized_on_drop::<<Sha256 as hmac::EagerHash>::Core>();
};

/// The prefix of Standard Webhooks secrets.
pub const SECRET_PREFIX: &str = "whsec_";

/// Shortest Standard Webhooks secret, in bytes: 24, the spec's minimum.
pub const MIN_SECRET_BYTES: usize = 24;

/// Longest Standard Webhooks secret, in bytes: 64, the spec's maximum.
pub const MAX_SECRET_BYTES: usize = 64;

/// Size of a [`Secret::generate`]d secret: 32 bytes, as Svix generates.
pub const GENERATED_SECRET_BYTES: usize = 32;

/// The signature format, for the sender
/// ([`WebhookSinkBuilder::scheme`](crate::webhook::WebhookSinkBuilder::scheme))
/// and the receiver
/// ([`VerifyConfig::scheme`](crate::verify::VerifyConfig::scheme)) alike.
///
/// ```
/// use eventsink::signature::Scheme;
/// assert_eq!(Scheme::default(), Scheme::Standard);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scheme {
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature: v1,<base64>` (one entry per secret) over
    /// `"{id}.{timestamp}.{body}"`; the body is the event's JSON.
    #[default]
    Standard,
    /// The Go original's format, byte for byte: the body is
    /// `{"kind","id","payload","created_at","now"}` with `now` the send time
    /// (UTC, whole seconds), and `signature: <lowercase hex HMAC-SHA256 of
    /// the body>` keyed with the first secret's bytes (build it with
    /// [`Secret::from_raw`] from the Go application's secret string). The
    /// receiver takes the id and the time to check from the body's `id` and
    /// `now`.
    GoCompatible,
    /// For migrating from one format to the other. The sender sends the
    /// Go-compatible body with both header sets, computed with the same
    /// secrets; the receiver accepts either format, checking Standard when
    /// `webhook-signature` is present and Go-compatible otherwise.
    Both,
}

impl Scheme {
    /// Whether the Standard Webhooks headers are sent.
    #[cfg(feature = "webhook")]
    pub(crate) fn sends_standard(self) -> bool {
        matches!(self, Scheme::Standard | Scheme::Both)
    }

    /// Whether the Go original's body and `signature` header are sent.
    #[cfg(feature = "webhook")]
    pub(crate) fn sends_go(self) -> bool {
        matches!(self, Scheme::GoCompatible | Scheme::Both)
    }
}

/// An HMAC key. Its bytes never appear in `Debug` output or errors, and
/// are overwritten with zeros when the secret is dropped (each clone holds
/// its own copy and wipes it).
///
/// ```
/// use eventsink::signature::Secret;
///
/// let secret = Secret::generate()?;
/// assert!(secret.expose_whsec().starts_with("whsec_"));
/// assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
#[derive(Clone)]
pub struct Secret {
    /// Overwritten with zeros on drop.
    key: Zeroizing<Vec<u8>>,
    /// HMAC state with the key already absorbed, cloned per signature.
    keyed: HmacSha256,
}

impl Secret {
    /// Parses a Standard Webhooks secret, `whsec_<base64>`, of 24 to 64
    /// bytes. The prefix may be left out.
    ///
    /// # Errors
    ///
    /// [`SecretError`] if the text is empty (or only the prefix), not
    /// base64, or the key is too short or too long. The error never
    /// contains the secret.
    ///
    /// ```
    /// use eventsink::signature::Secret;
    ///
    /// assert!(Secret::from_whsec("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").is_ok());
    /// assert!(Secret::from_whsec("whsec_dG9vIHNob3J0").is_err()); // 9 bytes
    /// ```
    pub fn from_whsec(text: &str) -> Result<Self, SecretError> {
        let encoded = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .unwrap_or(text.trim());
        if encoded.is_empty() {
            return Err(SecretError::Empty);
        }
        let key = Zeroizing::new(BASE64.decode(encoded).map_err(|_| SecretError::NotBase64)?);
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Secret::with_key(key))
    }

    /// A secret whose HMAC key is `bytes` as given: the form the Go original
    /// uses (its configured secret string's bytes), for
    /// [`Scheme::GoCompatible`].
    ///
    /// # Errors
    ///
    /// [`SecretError::Empty`] for an empty key.
    ///
    /// ```
    /// let secret = eventsink::signature::Secret::from_raw("the-secret-the-go-app-was-given")?;
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn from_raw(bytes: impl AsRef<[u8]>) -> Result<Self, SecretError> {
        let key = Zeroizing::new(bytes.as_ref().to_vec());
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Secret::with_key(key))
    }

    /// A new random secret of [`GENERATED_SECRET_BYTES`] from the operating
    /// system's random source; give it to the receiver with
    /// [`expose_whsec`](Secret::expose_whsec).
    ///
    /// # Errors
    ///
    /// [`SecretError::Random`] if the operating system has no randomness.
    ///
    /// ```
    /// let a = eventsink::signature::Secret::generate()?;
    /// let b = eventsink::signature::Secret::generate()?;
    /// assert_ne!(a.expose_whsec(), b.expose_whsec());
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn generate() -> Result<Self, SecretError> {
        let mut key = Zeroizing::new(vec![0; GENERATED_SECRET_BYTES]);
        getrandom::fill(&mut key).map_err(|_| SecretError::Random)?;
        Ok(Secret::with_key(key))
    }

    /// The secret as `whsec_<base64>`, to hand to the receiver. The name says
    /// it: this is the one way the key leaves the type.
    ///
    /// ```
    /// use eventsink::signature::Secret;
    /// let text = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    /// assert_eq!(Secret::from_whsec(text)?.expose_whsec(), text);
    /// # Ok::<(), eventsink::signature::SecretError>(())
    /// ```
    pub fn expose_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", BASE64.encode(self.key.as_slice()))
    }

    fn with_key(key: Zeroizing<Vec<u8>>) -> Self {
        // HMAC accepts keys of any length (long keys are hashed first), so
        // `new_from_slice` cannot fail for it.
        let keyed =
            <HmacSha256 as KeyInit>::new_from_slice(&key).expect("HMAC takes any key length");
        Secret { key, keyed }
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }
}

impl FromStr for Secret {
    type Err = SecretError;

    /// Same as [`Secret::from_whsec`].
    fn from_str(text: &str) -> Result<Self, SecretError> {
        Secret::from_whsec(text)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A secret could not be read or made. Never contains the secret itself.
///
/// ```
/// use eventsink::signature::{Secret, SecretError};
/// assert_eq!(Secret::from_whsec("whsec_%%%").unwrap_err(), SecretError::NotBase64);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretError {
    /// The text after `whsec_` is not standard base64.
    NotBase64,
    /// The decoded key has this many bytes, outside 24..=64.
    Length(usize),
    /// The key is empty.
    Empty,
    /// The operating system's random source failed.
    Random,
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::NotBase64 => f.write_str(
                "the webhook secret is not `whsec_` followed by standard base64; copy it again \
                 from where it was generated",
            ),
            SecretError::Length(n) => write!(
                f,
                "the webhook secret decodes to {n} bytes, but Standard Webhooks secrets have \
                 {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}; generate one with Secret::generate"
            ),
            SecretError::Empty => f.write_str("the webhook secret is empty; configure a secret"),
            SecretError::Random => {
                f.write_str("the operating system's random source failed; try again")
            }
        }
    }
}

impl std::error::Error for SecretError {}

/// The `webhook-signature` header value for a Standard Webhooks request:
/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>` for each
/// secret, separated by spaces.
///
/// ```
/// use eventsink::signature::{sign, Secret};
/// let keys = [Secret::generate()?, Secret::generate()?];
/// let header = sign(&keys, "evt_1", 1_700_000_000, b"{}");
/// assert_eq!(header.split(' ').count(), 2);
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
pub fn sign(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut header = String::with_capacity(secrets.len() * 48);
    for secret in secrets {
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str("v1,");
        BASE64.encode_string(standard_mac(secret, id, timestamp, body), &mut header);
    }
    header
}

/// Whether any `v1,` entry of a `webhook-signature` header value matches
/// any of `secrets`, compared in constant time. Entries of other versions
/// (`v1a`, ...) and malformed entries are skipped.
///
/// ```
/// use eventsink::signature::{matches, sign, Secret};
/// let key = Secret::generate()?;
/// let header = format!("v1a,ignored {}", sign(&[key.clone()], "evt_1", 1, b"body"));
/// assert!(matches(&[key.clone()], "evt_1", 1, b"body", &header));
/// assert!(!matches(&[key], "evt_1", 1, b"tampered", &header));
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
pub fn matches(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let candidates: Vec<Vec<u8>> = header
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .collect();
    let mut found = subtle::Choice::from(0);
    for secret in secrets {
        let expected = standard_mac(secret, id, timestamp, body);
        for candidate in &candidates {
            found |= expected.as_slice().ct_eq(candidate.as_slice());
        }
    }
    found.into()
}

/// The Go original's `signature` header value: lowercase hex of
/// HMAC-SHA256 over the body, keyed with the secret's bytes.
///
/// ```
/// use eventsink::signature::{sign_go, Secret};
/// let hex = sign_go(&Secret::from_raw("k")?, b"{}");
/// assert_eq!(hex.len(), 64);
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
pub fn sign_go(secret: &Secret, body: &[u8]) -> String {
    let mut mac = secret.mac();
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// Whether a Go-style `signature` header value matches `body` under any of
/// `secrets`, compared in constant time (hex case is ignored).
///
/// ```
/// use eventsink::signature::{matches_go, sign_go, Secret};
/// let key = Secret::from_raw("k")?;
/// assert!(matches_go(&[key.clone()], b"{}", &sign_go(&key, b"{}")));
/// # Ok::<(), eventsink::signature::SecretError>(())
/// ```
pub fn matches_go(secrets: &[Secret], body: &[u8], header: &str) -> bool {
    let candidate = header.trim().to_ascii_lowercase();
    let mut found = subtle::Choice::from(0);
    for secret in secrets {
        found |= sign_go(secret, body).as_bytes().ct_eq(candidate.as_bytes());
    }
    found.into()
}

fn standard_mac(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut mac = secret.mac();
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const VECTOR_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const VECTOR_TS: i64 = 1649367553;
    const VECTOR_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const VECTOR_SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    #[test]
    fn reference_vector() {
        let secret = Secret::from_whsec(VECTOR_SECRET).unwrap();
        assert_eq!(
            sign(&[secret], VECTOR_ID, VECTOR_TS, VECTOR_BODY),
            VECTOR_SIG
        );
    }

    #[test]
    fn rotation_matches_any_listed_key() {
        let old = Secret::from_whsec(VECTOR_SECRET).unwrap();
        let new = Secret::generate().unwrap();
        let header = format!("garbage v1,%%% {VECTOR_SIG}");
        assert!(matches(
            &[new.clone(), old],
            VECTOR_ID,
            VECTOR_TS,
            VECTOR_BODY,
            &header
        ));
        assert!(!matches(&[new], VECTOR_ID, VECTOR_TS, VECTOR_BODY, &header));
    }

    #[test]
    fn empty_and_other_versions_never_match() {
        let secret = Secret::from_whsec(VECTOR_SECRET).unwrap();
        let sig_only = VECTOR_SIG.trim_start_matches("v1,");
        for header in [
            "",
            "v1,",
            "v1a,".to_owned().as_str(),
            &format!("v2,{sig_only}"),
        ] {
            assert!(
                !matches(
                    std::slice::from_ref(&secret),
                    VECTOR_ID,
                    VECTOR_TS,
                    VECTOR_BODY,
                    header
                ),
                "{header}"
            );
        }
    }

    #[test]
    fn go_signature_is_lowercase_hex_of_the_body_hmac() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), RFC 4231 style known value.
        let secret = Secret::from_raw("key").unwrap();
        assert_eq!(
            sign_go(&secret, b"The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert!(matches_go(
            &[secret],
            b"The quick brown fox jumps over the lazy dog",
            "F7BC83F430538424B13298E6AA6FB143EF4D59A14946175997479DBC2D1A3CD8"
        ));
    }

    #[test]
    fn secrets_are_validated_and_never_printed() {
        assert_eq!(
            Secret::from_whsec("whsec_AAAA").unwrap_err(),
            SecretError::Length(3)
        );
        assert_eq!(
            Secret::from_whsec("whsec_***").unwrap_err(),
            SecretError::NotBase64
        );
        assert_eq!(Secret::from_raw("").unwrap_err(), SecretError::Empty);
        let secret = Secret::from_whsec(VECTOR_SECRET).unwrap();
        assert!(!format!("{secret:?}").contains("C2FV"));
        assert_eq!(secret.expose_whsec(), VECTOR_SECRET);
    }
}
