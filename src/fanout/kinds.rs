//! [`KindPattern`]: which event kinds a destination of a
//! [`FanOut`](super::FanOut) takes: one exact kind, or every kind under a
//! prefix (`order.*`).
//!
//! ```
//! use eventsink::fanout::KindPattern;
//!
//! let orders: KindPattern = "order.*".parse()?;
//! assert!(orders.matches("order.placed"));
//! assert!(orders.matches("order.line.added"));
//! assert!(!orders.matches("order"));
//! assert!(!orders.matches("orders.placed"));
//!
//! let paid = KindPattern::new("invoice.paid")?;
//! assert!(paid.matches("invoice.paid"));
//! assert!(!paid.matches("invoice.paid.late"));
//! # Ok::<(), eventsink::fanout::InvalidPattern>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// One subscription of a destination: an exact kind (`invoice.paid`), or
/// a prefix pattern (`order.*`) that takes every kind starting with
/// `order.` followed by at least one more character.
///
/// `*` may appear only as the last segment of a pattern, after a `.`; the
/// rest follows the crate's rule for kinds ([`wire::check_kind`](crate::wire::check_kind)).
/// A destination that takes every kind is added with
/// [`FanOutBuilder::to`](super::FanOutBuilder::to), not with `*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KindPattern {
    /// The pattern as written.
    pattern: Arc<str>,
    /// Whether it ends in `.*`.
    prefix: bool,
}

impl KindPattern {
    /// Parses `pattern`.
    ///
    /// # Errors
    ///
    /// [`InvalidPattern`] if it is empty, is `*` alone, has a `*` anywhere
    /// but in a final `.*`, or is not a valid kind
    /// ([`wire::check_kind`](crate::wire::check_kind)).
    ///
    /// ```
    /// use eventsink::fanout::KindPattern;
    /// assert!(KindPattern::new("order.*").is_ok());
    /// let err = KindPattern::new("order.*.paid").unwrap_err();
    /// assert!(err.to_string().contains("\"order.*.paid\""));
    /// ```
    pub fn new(pattern: &str) -> Result<Self, InvalidPattern> {
        let invalid = |problem| InvalidPattern {
            pattern: pattern.into(),
            problem,
        };
        let (literal, prefix) = match pattern.strip_suffix(".*") {
            Some(prefix) => (prefix, true),
            None => (pattern, false),
        };
        if pattern == "*" {
            return Err(invalid(
                "'*' alone would take every kind; add the destination with `to` instead of `to_kinds`",
            ));
        }
        if literal.contains('*') {
            return Err(invalid(
                "'*' may only end a pattern, after a '.', as in \"order.*\"",
            ));
        }
        if prefix && literal.is_empty() {
            return Err(invalid("nothing comes before '.*'"));
        }
        crate::wire::check_kind(literal).map_err(|e| invalid(e.problem()))?;
        Ok(KindPattern {
            pattern: pattern.into(),
            prefix,
        })
    }

    /// Whether an event of `kind` is taken by this pattern.
    ///
    /// ```
    /// let p = eventsink::fanout::KindPattern::new("user.*").unwrap();
    /// assert!(p.matches("user.signed_up"));
    /// assert!(!p.matches("user."));
    /// ```
    #[inline]
    pub fn matches(&self, kind: &str) -> bool {
        if self.prefix {
            // The pattern minus its '*': "user.".
            let head = &self.pattern[..self.pattern.len() - 1];
            kind.len() > head.len() && kind.starts_with(head)
        } else {
            kind == &*self.pattern
        }
    }

    /// The pattern as written.
    ///
    /// ```
    /// assert_eq!(eventsink::fanout::KindPattern::new("a.*").unwrap().as_str(), "a.*");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

impl FromStr for KindPattern {
    type Err = InvalidPattern;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KindPattern::new(s)
    }
}

impl fmt::Display for KindPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// A kind pattern that [`KindPattern::new`] refused, and why.
///
/// ```
/// let err = eventsink::fanout::KindPattern::new("").unwrap_err();
/// assert_eq!(err.pattern(), "");
/// assert_eq!(err.problem(), "it is empty");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPattern {
    pattern: String,
    problem: &'static str,
}

impl InvalidPattern {
    /// The pattern as given.
    ///
    /// ```
    /// assert_eq!(eventsink::fanout::KindPattern::new("*").unwrap_err().pattern(), "*");
    /// ```
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// What is wrong with it.
    ///
    /// ```
    /// let err = eventsink::fanout::KindPattern::new(".*").unwrap_err();
    /// assert_eq!(err.problem(), "nothing comes before '.*'");
    /// ```
    pub fn problem(&self) -> &'static str {
        self.problem
    }
}

impl fmt::Display for InvalidPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kind pattern {:?} is invalid: {}; write an exact kind (\"invoice.paid\") \
             or a prefix ending in \".*\" (\"order.*\")",
            self.pattern, self.problem
        )
    }
}

impl std::error::Error for InvalidPattern {}

/// Which events a destination takes.
#[derive(Debug, Clone)]
pub(super) enum Subscription {
    /// Every event.
    All,
    /// Events whose kind one of the patterns takes.
    Kinds(Box<[KindPattern]>),
    /// Events no other destination takes.
    Unmatched,
}

impl Subscription {
    /// Whether this destination takes `kind` (an `Unmatched` one answers
    /// `false`: it is decided after the others).
    #[inline]
    pub(super) fn takes(&self, kind: &str) -> bool {
        match self {
            Subscription::All => true,
            Subscription::Kinds(patterns) => patterns.iter().any(|p| p.matches(kind)),
            Subscription::Unmatched => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_patterns_take_only_their_kind() {
        let p = KindPattern::new("invoice.paid").unwrap();
        assert!(p.matches("invoice.paid"));
        for other in [
            "invoice.paid2",
            "invoice",
            "invoice.paid.x",
            "Invoice.paid",
            "",
        ] {
            assert!(!p.matches(other), "{other:?}");
        }
    }

    #[test]
    fn prefix_patterns_take_the_prefix_and_more() {
        let p = KindPattern::new("order.*").unwrap();
        for taken in ["order.placed", "order.a.b", "order.x"] {
            assert!(p.matches(taken), "{taken:?}");
        }
        for other in ["order", "order.", "orders.placed", "xorder.placed", ""] {
            assert!(!p.matches(other), "{other:?}");
        }
    }

    #[test]
    fn nested_prefixes_and_unicode_work() {
        assert!(KindPattern::new("a.b.*").unwrap().matches("a.b.c"));
        assert!(!KindPattern::new("a.b.*").unwrap().matches("a.bc"));
        assert!(
            KindPattern::new("commande.*")
                .unwrap()
                .matches("commande.passée")
        );
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        for (bad, problem) in [
            ("", "it is empty"),
            ("*", "'*' alone"),
            ("order*", "may only end a pattern"),
            ("order.*.paid", "may only end a pattern"),
            ("*.paid", "may only end a pattern"),
            ("order.**", "may only end a pattern"),
            ("a*b", "may only end a pattern"),
            (".*", "nothing comes before"),
            ("line\nbreak.*", "control character"),
        ] {
            let err = KindPattern::new(bad).expect_err(bad);
            assert!(err.problem().contains(problem), "{bad:?}: {err}");
            assert!(err.to_string().contains("\"order.*\""), "{err}");
        }
        let long = format!("{}.*", "x".repeat(300));
        assert!(KindPattern::new(&long).is_err());
    }
}
