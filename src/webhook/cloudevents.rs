//! [`CloudEvents`]: events sent as [CloudEvents 1.0] over HTTP, in binary or
//! structured mode, still signed with the Standard Webhooks headers.
//!
//! [CloudEvents 1.0]: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/bindings/http-protocol-binding.md

use chrono::SecondsFormat;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use super::BuildError;
use crate::Event;
use crate::signature::Scheme;

/// The CloudEvents version sent: `1.0`.
const SPEC_VERSION: &str = "1.0";

/// The content type of a structured-mode body.
const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
const CE_ID: HeaderName = HeaderName::from_static("ce-id");
const CE_TYPE: HeaderName = HeaderName::from_static("ce-type");
const CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
const CE_TIME: HeaderName = HeaderName::from_static("ce-time");

/// How a [`WebhookSink`](super::WebhookSink) sends events as CloudEvents
/// (feature `cloudevents`); give it to
/// [`WebhookSinkBuilder::cloudevents`](super::WebhookSinkBuilder::cloudevents).
///
/// The event maps onto the CloudEvents attributes as `id` = [`Event::id`],
/// `type` = [`Event::kind`], `time` = [`Event::created_at`] (RFC 3339),
/// `source` = the configured URI-reference, and the data is the payload's
/// JSON (`datacontenttype: application/json`).
///
/// - [`binary`](Self::binary): the attributes travel as `ce-*` headers
///   (percent-encoded where the binding asks: space, `"`, `%` and anything
///   beyond visible ASCII) and the body is the payload's JSON.
/// - [`structured`](Self::structured): the body is the whole event as JSON,
///   `content-type: application/cloudevents+json`.
///
/// Either way the request also carries `webhook-id`, `webhook-timestamp`
/// and `webhook-signature` over the exact bytes sent, so
/// [`VerifyWebhookLayer`](crate::verify::VerifyWebhookLayer) verifies it
/// as any other webhook and gives the handler the verified body and
/// headers; parse them as a CloudEvent there (the `cloudevents-sdk` crate's
/// `binding::http::to_event(&headers, body)` reads both modes). The
/// [`Verified`](crate::verify::Verified) extractor reads only the crate's
/// own event JSON, not a CloudEvent.
///
/// ```
/// use eventsink::webhook::{BuildError, CloudEvents, WebhookSink};
///
/// let sink = WebhookSink::builder("https://example.com/hook")
///     .cloudevents(CloudEvents::structured("/shop/orders"))
///     .build()?;
/// let err = WebhookSink::builder("https://example.com/hook")
///     .cloudevents(CloudEvents::binary("not a uri"))
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, BuildError::InvalidCloudEventsSource { .. }));
/// # Ok::<(), BuildError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvents {
    mode: Mode,
    source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Binary,
    Structured,
}

impl CloudEvents {
    /// Binary mode, with `source` as every event's `source` attribute: a
    /// non-empty URI-reference (`https://shop.example.com/orders`,
    /// `/shop/orders`, `urn:shop:orders`), checked when the sink is built.
    pub fn binary(source: impl Into<String>) -> Self {
        CloudEvents {
            mode: Mode::Binary,
            source: source.into(),
        }
    }

    /// Structured mode, with `source` as in [`binary`](Self::binary).
    pub fn structured(source: impl Into<String>) -> Self {
        CloudEvents {
            mode: Mode::Structured,
            source: source.into(),
        }
    }

    /// Checks the configuration and adds the headers every request carries
    /// to `headers` (the custom ones already in it).
    pub(super) fn format(
        &self,
        scheme: Scheme,
        headers: &mut HeaderMap,
    ) -> Result<Format, BuildError> {
        if scheme != Scheme::Standard {
            return Err(BuildError::CloudEventsScheme { scheme });
        }
        let invalid = |problem| BuildError::InvalidCloudEventsSource {
            value: self.source.clone(),
            problem,
        };
        check_uri_reference(&self.source).map_err(invalid)?;
        for name in [CE_SPECVERSION, CE_ID, CE_TYPE, CE_SOURCE, CE_TIME] {
            if headers.contains_key(&name) {
                return Err(BuildError::ReservedHeader {
                    name: name.to_string(),
                });
            }
        }
        match self.mode {
            Mode::Binary => {
                headers.insert(CE_SPECVERSION, HeaderValue::from_static(SPEC_VERSION));
                let source = HeaderValue::from_str(&percent_encode(&self.source))
                    .map_err(|_| invalid("it is not a valid header value"))?;
                headers.insert(CE_SOURCE, source);
            }
            Mode::Structured => {
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(STRUCTURED_CONTENT_TYPE),
                );
            }
        }
        Ok(Format {
            mode: self.mode,
            source: self.source.clone(),
        })
    }
}

/// The checked configuration, in the sink's.
#[derive(Debug)]
pub(super) struct Format {
    mode: Mode,
    source: String,
}

impl Format {
    /// The per-event `ce-*` headers of binary mode.
    pub(super) fn insert_headers<P>(&self, event: &Event<P>, headers: &mut HeaderMap) {
        if self.mode == Mode::Binary {
            headers.insert(CE_ID, header_value(&event.id));
            headers.insert(CE_TYPE, header_value(&event.kind));
            headers.insert(CE_TIME, header_value(&time(event)));
        }
    }

    /// The body: the payload's JSON in binary mode, the whole CloudEvent in
    /// structured mode.
    pub(super) fn write_body<P: Serialize>(
        &self,
        event: &Event<P>,
        body: &mut Vec<u8>,
    ) -> serde_json::Result<()> {
        match self.mode {
            Mode::Binary => serde_json::to_writer(body, &event.payload),
            Mode::Structured => serde_json::to_writer(
                body,
                &Structured {
                    specversion: SPEC_VERSION,
                    id: &event.id,
                    source: &self.source,
                    r#type: &event.kind,
                    time: time(event),
                    datacontenttype: "application/json",
                    data: &event.payload,
                },
            ),
        }
    }
}

/// A structured-mode body, attributes first.
#[derive(Serialize)]
struct Structured<'a, P> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    r#type: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: &'a P,
}

/// `created_at` in RFC 3339, UTC with `Z`.
fn time<P>(event: &Event<P>) -> String {
    event
        .created_at
        .to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A percent-encoded value is visible ASCII, always a valid header value.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::try_from(percent_encode(text)).expect("percent-encoded text is visible ASCII")
}

/// Percent-encodes, as the HTTP binding asks of `ce-*` header values, the
/// bytes of space, `"`, `%` and everything outside visible ASCII.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'!'..=b'~' if byte != b'"' && byte != b'%' => encoded.push(byte as char),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

/// A URI-reference (RFC 3986): an absolute URI or a relative reference, in
/// its characters (no spaces, quotes, `<>\^`{|}` or non-ASCII).
fn check_uri_reference(source: &str) -> Result<(), &'static str> {
    if source.is_empty() {
        return Err("it is empty");
    }
    if !source
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b))
    {
        return Err("it has characters a URI cannot hold (spaces, quotes, <>\\^`{|} or non-ASCII)");
    }
    let base = url::Url::parse("http://base.invalid/").expect("a valid URL");
    match url::Url::parse(source) {
        Ok(_) => Ok(()),
        Err(url::ParseError::RelativeUrlWithoutBase) => base
            .join(source)
            .map(|_| ())
            .map_err(|_| "it is not a URI-reference"),
        Err(_) => Err("it is not a URI-reference"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_percent_encoded_where_the_binding_asks() {
        assert_eq!(percent_encode("order.placed"), "order.placed");
        assert_eq!(percent_encode("order placed é"), "order%20placed%20%C3%A9");
        assert_eq!(percent_encode("100%\"x\""), "100%25%22x%22");
    }

    #[test]
    fn sources_must_be_uri_references() {
        for ok in [
            "https://shop.example.com/orders",
            "/shop/orders",
            "urn:shop:orders",
            "orders",
            "#frag",
        ] {
            assert_eq!(check_uri_reference(ok), Ok(()), "{ok}");
        }
        for bad in ["", "has space", "é", "http://[::1", "a\"b"] {
            assert!(check_uri_reference(bad).is_err(), "{bad}");
        }
    }
}
