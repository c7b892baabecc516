//! [`BuildError`]: why a [`WebhookSink`](super::WebhookSink) could not be
//! built.

use std::fmt;

use super::egress::EgressRefused;

/// The configuration of a [`WebhookSink`](super::WebhookSink) is not usable.
///
/// ```
/// let err = eventsink::webhook::WebhookSink::builder("gopher://example.com").build().unwrap_err();
/// assert_eq!(err.to_string(), "webhook URLs must be http:// or https://, not gopher://");
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// The URL does not parse.
    InvalidUrl {
        /// What is wrong with it.
        reason: String,
    },
    /// The URL's scheme is neither `http` nor `https`.
    UnsupportedScheme {
        /// The scheme given.
        scheme: String,
    },
    /// The URL is `http://` but
    /// [`WebhookSinkBuilder::https_only`](super::WebhookSinkBuilder::https_only)
    /// is set.
    HttpsRequired,
    /// The URL is an IP address the egress policy refuses.
    Refused(EgressRefused),
    /// A custom header's name or value is not valid in HTTP.
    InvalidHeader {
        /// The header's name.
        name: String,
    },
    /// A custom header would replace one the sink sets itself.
    ReservedHeader {
        /// The header's name.
        name: String,
    },
    /// A custom client, or a service given to
    /// [`build_with`](super::WebhookSinkBuilder::build_with), together with
    /// a restricting egress policy.
    ClientWithEgress,
    /// A reqwest client was given to
    /// [`client`](super::WebhookSinkBuilder::client) and a service to
    /// [`build_with`](super::WebhookSinkBuilder::build_with).
    ClientWithService,
    /// The CloudEvents `source` is not a non-empty URI-reference.
    #[cfg(feature = "cloudevents")]
    InvalidCloudEventsSource {
        /// The source given.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// CloudEvents were asked for with a [`Scheme`](crate::signature::Scheme)
    /// other than `Standard`.
    #[cfg(feature = "cloudevents")]
    CloudEventsScheme {
        /// The scheme given.
        scheme: crate::signature::Scheme,
    },
    /// The HTTP client could not be built (TLS set-up failed); the cause is
    /// the [`source`](std::error::Error::source).
    Client(crate::BoxError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::InvalidUrl { reason } => write!(
                f,
                "the webhook URL is not valid ({reason}); give an absolute http:// or https:// URL"
            ),
            BuildError::UnsupportedScheme { scheme } => write!(
                f,
                "webhook URLs must be http:// or https://, not {scheme}://"
            ),
            BuildError::HttpsRequired => {
                f.write_str("the webhook URL is http:// but https_only is set; use https://")
            }
            BuildError::Refused(refused) => write!(
                f,
                "the egress policy refuses the webhook URL: {refused}; allow that address \
                 explicitly if the receiver is trusted"
            ),
            BuildError::InvalidHeader { name } => write!(
                f,
                "the custom header {name:?} has an invalid name or value; use visible ASCII"
            ),
            BuildError::ReservedHeader { name } => write!(
                f,
                "the custom header {name:?} is set by the sink itself; remove it"
            ),
            BuildError::ClientWithEgress => f.write_str(
                "a custom reqwest client or HTTP service cannot enforce the egress policy; let \
                 the sink build its own client (with build()), or drop the policy",
            ),
            BuildError::ClientWithService => f.write_str(
                "a reqwest client was given to client() and an HTTP service to build_with(); \
                 give one of them",
            ),
            #[cfg(feature = "cloudevents")]
            BuildError::InvalidCloudEventsSource { value, problem } => write!(
                f,
                "the CloudEvents source {value:?} is not usable: {problem}; give a URI-reference \
                 such as https://example.com/orders or /orders"
            ),
            #[cfg(feature = "cloudevents")]
            BuildError::CloudEventsScheme { scheme } => write!(
                f,
                "CloudEvents are signed with the Standard Webhooks headers, not scheme \
                 {scheme:?}; use Scheme::Standard"
            ),
            BuildError::Client(_) => {
                f.write_str("the HTTP client could not be built; check the system's TLS set-up")
            }
        }
    }
}

impl std::error::Error for BuildError {
    /// The cause of [`BuildError::Client`]. [`BuildError::Refused`] has no
    /// source: its message already names the refused address.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Client(e) => Some(&**e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_does_not_repeat_the_source() {
        let cause = "invalid certificate store";
        let err = BuildError::Client(cause.into());
        assert!(!err.to_string().contains(cause), "{err}");
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some(cause));
    }
}
