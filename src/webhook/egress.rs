//! The egress guard: refuses webhook destinations on loopback, private,
//! link-local and other non-public addresses (server-side request forgery).
//!
//! When the URLs you deliver to come from your users, a URL such as
//! `http://169.254.169.254/latest/meta-data/` or `http://localhost:6379/`
//! would make your server send requests into its own network. With
//! [`EgressPolicy::public_only`] the sink refuses such destinations: an
//! IP-literal URL when the sink is built, and a host name at every attempt,
//! by checking every address DNS returns and connecting only to the checked
//! ones (no second lookup that an attacker's DNS could answer differently).
//! Redirects are never followed, so they cannot lead around the guard.
//!
//! ```
//! use std::net::IpAddr;
//! use eventsink::webhook::EgressPolicy;
//!
//! let policy = EgressPolicy::public_only().allow("10.1.2.0/24".parse().unwrap());
//! assert!(policy.check("93.184.215.14".parse::<IpAddr>().unwrap()).is_ok());
//! assert!(policy.check("10.1.2.3".parse::<IpAddr>().unwrap()).is_ok()); // allowed explicitly
//! assert!(policy.check("10.9.9.9".parse::<IpAddr>().unwrap()).is_err());
//! assert!(policy.check("::ffff:127.0.0.1".parse::<IpAddr>().unwrap()).is_err());
//! ```
//!
//! [`EgressPolicy::deny`] adds ranges of your own (your NAT64 prefix, an
//! internal range routed as public); a denied address is refused whatever
//! else the policy says, [`allow`](EgressPolicy::allow) included.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Which destination addresses a [`WebhookSink`](super::WebhookSink) may
/// connect to. The default allows any address.
///
/// An address is refused when it is in a [`deny`](EgressPolicy::deny)ed
/// range; otherwise accepted when it is in an
/// [`allow`](EgressPolicy::allow)ed range; otherwise, with
/// [`public_only`](EgressPolicy::public_only), refused when it is not
/// public. Deny wins over allow, so that allowing a broad range
/// (`10.0.0.0/8`) cannot reopen a narrow one you denied (`10.0.0.0/24`).
/// IPv4-mapped forms (`::ffff:a.b.c.d`) match the IPv4 ranges of both lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct EgressPolicy {
    public_only: bool,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl EgressPolicy {
    /// Any address (the default): for URLs that you configure yourself.
    ///
    /// ```
    /// let policy = eventsink::webhook::EgressPolicy::any();
    /// assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
    /// ```
    pub fn any() -> Self {
        Self::default()
    }

    /// Public addresses only: refuses loopback, private (RFC 1918),
    /// link-local, CGNAT, multicast, documentation (RFC 5737, RFC 3849 and
    /// RFC 9637's `3fff::/20`), benchmarking, reserved, unique-local,
    /// site-local and segment-routing (`5f00::/16`, RFC 9602) addresses,
    /// IPv4-translated addresses (`::ffff:0:0:0/96`, RFC 2765), and
    /// IPv4-mapped, 6to4 and NAT64 forms of non-public IPv4 addresses.
    /// Recommended whenever URLs come from end users.
    ///
    /// ```
    /// let policy = eventsink::webhook::EgressPolicy::public_only();
    /// assert!(policy.check("127.0.0.1".parse().unwrap()).is_err());
    /// ```
    pub fn public_only() -> Self {
        EgressPolicy {
            public_only: true,
            ..Self::default()
        }
    }

    /// Allows the addresses in `net` even when they are not public: an
    /// internal receiver you trust, or `127.0.0.0/8` in tests. A
    /// [`deny`](EgressPolicy::deny)ed range still wins.
    ///
    /// ```
    /// let policy = eventsink::webhook::EgressPolicy::public_only().allow("127.0.0.0/8".parse().unwrap());
    /// assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
    /// ```
    pub fn allow(mut self, net: IpNet) -> Self {
        self.allow.push(net);
        self
    }

    /// Refuses the addresses in `net`, whatever else the policy says: your
    /// own NAT64 prefix (which would reach IPv4 hosts behind it), or
    /// internal ranges that are routed as public addresses. Works with
    /// [`any`](EgressPolicy::any) too.
    ///
    /// ```
    /// use eventsink::webhook::EgressPolicy;
    /// let policy = EgressPolicy::public_only()
    ///     .allow("10.0.0.0/8".parse().unwrap())
    ///     .deny("10.0.0.0/24".parse().unwrap())
    ///     .deny("2001:db9:64::/96".parse().unwrap()); // an operator's NAT64 prefix
    /// assert!(policy.check("10.1.0.1".parse().unwrap()).is_ok());
    /// assert_eq!(policy.check("10.0.0.1".parse().unwrap()), Err("deny-listed"));
    /// assert!(policy.check("2001:db9:64::a00:1".parse().unwrap()).is_err());
    /// assert!(EgressPolicy::any().deny("192.0.2.0/24".parse().unwrap()).check("192.0.2.1".parse().unwrap()).is_err());
    /// ```
    pub fn deny(mut self, net: IpNet) -> Self {
        self.deny.push(net);
        self
    }

    /// Whether this policy restricts anything.
    ///
    /// ```
    /// assert!(!eventsink::webhook::EgressPolicy::any().is_restricted());
    /// ```
    pub fn is_restricted(&self) -> bool {
        self.public_only || !self.deny.is_empty()
    }

    /// Checks one address; `Err` says why it is refused.
    ///
    /// ```
    /// let policy = eventsink::webhook::EgressPolicy::public_only();
    /// let why = policy.check("169.254.169.254".parse().unwrap()).unwrap_err();
    /// assert_eq!(why, "link-local");
    /// ```
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        if listed(&self.deny, ip) {
            return Err("deny-listed");
        }
        if !self.public_only || listed(&self.allow, ip) {
            return Ok(());
        }
        match non_public_reason(ip) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

/// Whether `ip`, or the IPv4 address it maps, is in one of `nets`.
fn listed(nets: &[IpNet], ip: IpAddr) -> bool {
    let mapped = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    nets.iter()
        .any(|net| net.contains(&ip) || mapped.is_some_and(|v4| net.contains(&v4)))
}

/// Why `ip` is not a public address, or `None` if it is one.
///
/// ```
/// use eventsink::webhook::egress::non_public_reason;
/// assert_eq!(non_public_reason("10.0.0.1".parse().unwrap()), Some("private"));
/// assert_eq!(non_public_reason("2002:7f00:1::".parse().unwrap()), Some("6to4 form of a loopback address"));
/// assert_eq!(non_public_reason("1.1.1.1".parse().unwrap()), None);
/// ```
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let reason = match (a, b, c) {
        (0, ..) => "unspecified",
        (127, ..) => "loopback",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "private",
        (100, 64..=127, _) => "shared (CGNAT)",
        (169, 254, _) => "link-local",
        (192, 0, 0) => "IETF protocol assignment",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (192, 88, 99) => "6to4 relay",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved",
        _ => return None,
    };
    Some(reason)
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_reason(v4).map(|_| "IPv4-mapped form of a non-public address");
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let reason = match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => "unspecified",
        [0, 0, 0, 0, 0, 0, 0, 1] => "loopback",
        [0, 0, 0, 0, 0, 0, _, _] => "IPv4-compatible (deprecated)",
        [0, 0, 0, 0, 0xffff, 0, _, _] => "IPv4-translated",
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
            return v4_reason(embedded(hi, lo)).map(|_| "NAT64 form of a non-public address");
        }
        [0x64, 0xff9b, 1, ..] => "local-use NAT64",
        [0x2002, hi, lo, ..] => {
            return v4_reason(embedded(hi, lo)).map(|reason| match reason {
                "loopback" => "6to4 form of a loopback address",
                _ => "6to4 form of a non-public address",
            });
        }
        [0x2001, 0xdb8, ..] => "documentation",
        [0x3fff, second, ..] if second & 0xf000 == 0 => "documentation",
        [0x5f00, ..] => "segment-routing (SRv6)",
        [0x2001, 0..=0x1ff, ..] => "IETF protocol assignment",
        [0x100, 0, 0, 0, ..] => "discard-only",
        [first, ..] if first & 0xfe00 == 0xfc00 => "unique-local",
        [first, ..] if first & 0xffc0 == 0xfe80 => "link-local",
        [first, ..] if first & 0xffc0 == 0xfec0 => "site-local (deprecated)",
        [first, ..] if first & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    };
    Some(reason)
}

/// The egress policy refused every address a host name resolved to.
///
/// ```
/// use eventsink::webhook::egress::EgressRefused;
/// let refused = EgressRefused { host: "localhost".into(), addr: "127.0.0.1".parse().unwrap(), reason: "loopback" };
/// assert_eq!(refused.to_string(), "localhost resolves to 127.0.0.1, a loopback address");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRefused {
    /// The host name (or address) of the URL.
    pub host: String,
    /// The first refused address.
    pub addr: IpAddr,
    /// Why it was refused.
    pub reason: &'static str,
}

impl fmt::Display for EgressRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host == self.addr.to_string() {
            write!(f, "{} is a {} address", self.addr, self.reason)
        } else {
            write!(
                f,
                "{} resolves to {}, a {} address",
                self.host, self.addr, self.reason
            )
        }
    }
}

impl std::error::Error for EgressRefused {}

/// A DNS resolver for reqwest that drops refused addresses, so that the
/// connection goes only to an address that was checked.
#[derive(Debug, Clone)]
pub(crate) struct GuardedResolver {
    pub(crate) policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(reason) => {
                        refused.get_or_insert((addr.ip(), reason));
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some((addr, reason))) => {
                    Err(Box::new(EgressRefused { host, addr, reason }) as _)
                }
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str) -> bool {
        EgressPolicy::public_only()
            .check(ip.parse().unwrap())
            .is_err()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:a00:1::",
            "2001:db8::1",
            "3fff::1",
            "3fff:fff:ffff::1",
            "5f00::1",
            "5f00:ffff::1",
            "::ffff:0:808:808",
            "::ffff:0:0:1",
            "2001::1",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.215.14",
            "172.32.0.1",
            "2606:4700::1111",
            "2002:808:808::",
            "64:ff9b::808:808",
            "::ffff:8.8.8.8",
            "3fff:1000::1",
            "5f01::1",
            "5eff::1",
        ] {
            assert!(!refused(ip), "{ip} should pass");
        }
    }

    #[test]
    fn the_allow_list_wins_also_for_mapped_forms() {
        let policy = EgressPolicy::public_only().allow("127.0.0.0/8".parse().unwrap());
        assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(policy.check("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(policy.check("::1".parse().unwrap()).is_err());
    }

    #[test]
    fn the_deny_list_wins_over_allow_and_public() {
        let policy = EgressPolicy::public_only()
            .allow("127.0.0.0/8".parse().unwrap())
            .deny("127.0.0.2/32".parse().unwrap())
            .deny("8.8.8.0/24".parse().unwrap())
            .deny("2001:db9:64::/96".parse().unwrap());
        assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
        for ip in [
            "127.0.0.2",
            "::ffff:127.0.0.2",
            "8.8.8.8",
            "::ffff:8.8.8.8",
            "2001:db9:64::808:808",
        ] {
            assert_eq!(
                policy.check(ip.parse().unwrap()),
                Err("deny-listed"),
                "{ip}"
            );
        }
        assert!(policy.check("8.8.4.4".parse().unwrap()).is_ok());
    }

    #[test]
    fn a_deny_list_restricts_the_any_policy() {
        let policy = EgressPolicy::any().deny("10.0.0.0/8".parse().unwrap());
        assert!(policy.is_restricted());
        assert!(policy.check("10.0.0.1".parse().unwrap()).is_err());
        assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
    }
}
