//! Property tests of the sender's parsers and guards: `Retry-After` parsing
//! on arbitrary strings, and the egress check on arbitrary addresses
//! against a reference written from the IANA special-purpose address
//! registries.
#![cfg(feature = "webhook")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use eventsink::webhook::EgressPolicy;
use eventsink::webhook::classify::parse_retry_after;
use eventsink::webhook::egress::non_public_reason;
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// Cases per property: parsing and address checks take microseconds, so
/// more cases cost CI nothing noticeable.
const CASES: u32 = 2048;

/// Bounded cases for CI, and failures saved in
/// `proptest-regressions/webhook_props.txt` (committed; replayed first on every run).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/webhook_props.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// Seconds since the epoch up to the end of year 9999, the last an HTTP
/// date can write.
const LAST_HTTP_DATE: u64 = 253_402_300_799;

/// Strings that look like `Retry-After` values, and strings that do not.
fn retry_after_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        "[ \t]{0,2}[+-]?[0-9]{0,25}[ \t]{0,2}",
        "(Mon|Tue|Sun|Foo), [0-9]{1,2} (Jan|Feb|Dec|Xyz) [0-9]{1,5} [0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2} (GMT|UTC|)",
        "[A-Za-z]{6,9}, [0-9]{2}-[A-Za-z]{3}-[0-9]{2} [0-9:]{8} GMT",
        "[A-Za-z]{3} [A-Za-z]{3} [ 0-9]{2} [0-9:]{8} [0-9]{4}",
    ]
}

/// IPv4 special-purpose ranges that are not globally reachable (RFC 6890,
/// IANA IPv4 Special-Purpose Address Registry, plus multicast and the
/// reserved 240/4 and broadcast).
const V4_NOT_PUBLIC: &[&str] = &[
    "0.0.0.0/8",       // "this network", RFC 791
    "10.0.0.0/8",      // private, RFC 1918
    "100.64.0.0/10",   // shared address space (CGNAT), RFC 6598
    "127.0.0.0/8",     // loopback, RFC 1122
    "169.254.0.0/16",  // link-local, RFC 3927
    "172.16.0.0/12",   // private, RFC 1918
    "192.0.0.0/24",    // IETF protocol assignments, RFC 6890
    "192.0.2.0/24",    // documentation TEST-NET-1, RFC 5737
    "192.88.99.0/24",  // 6to4 relay anycast, RFC 7526
    "192.168.0.0/16",  // private, RFC 1918
    "198.18.0.0/15",   // benchmarking, RFC 2544
    "198.51.100.0/24", // documentation TEST-NET-2, RFC 5737
    "203.0.113.0/24",  // documentation TEST-NET-3, RFC 5737
    "224.0.0.0/4",     // multicast, RFC 5771
    "240.0.0.0/4",     // reserved, RFC 1112 (255.255.255.255 included)
];

/// IPv6 ranges refused whatever they carry (IANA IPv6 Special-Purpose
/// Address Registry, RFC 4291 and the newer documentation and SRv6 blocks).
const V6_NOT_PUBLIC: &[&str] = &[
    "::/96",           // unspecified, loopback, IPv4-compatible, RFC 4291
    "::ffff:0:0:0/96", // IPv4-translated, RFC 2765
    "64:ff9b:1::/48",  // local-use NAT64, RFC 8215
    "100::/64",        // discard-only, RFC 6666
    "2001::/23",       // IETF protocol assignments, RFC 2928
    "2001:db8::/32",   // documentation, RFC 3849
    "3fff::/20",       // documentation, RFC 9637
    "5f00::/16",       // segment routing SIDs, RFC 9602
    "fc00::/7",        // unique-local, RFC 4193
    "fe80::/10",       // link-local, RFC 4291
    "fec0::/10",       // site-local, deprecated by RFC 3879
    "ff00::/8",        // multicast, RFC 4291
];

/// IPv6 ranges that carry an IPv4 address, and where: refused when the
/// IPv4 address is.
const V6_EMBEDDING_V4: &[(&str, u32)] = &[
    ("::ffff:0:0/96", 0), // IPv4-mapped, RFC 4291: the last 32 bits
    ("64:ff9b::/96", 0),  // NAT64 well-known prefix, RFC 6052: the last 32 bits
    ("2002::/16", 80),    // 6to4, RFC 3056: bits 16..48
];

fn nets(table: &[&str]) -> Vec<IpNet> {
    table.iter().map(|net| net.parse().unwrap()).collect()
}

fn within(table: &[&str], ip: IpAddr) -> bool {
    nets(table).iter().any(|net| net.contains(&ip))
}

/// The reference: whether `ip` is non-public, from the tables above.
fn reference_not_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => within(V4_NOT_PUBLIC, ip),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            for (net, shift) in V6_EMBEDDING_V4 {
                if net.parse::<IpNet>().unwrap().contains(&ip) {
                    let v4 = Ipv4Addr::from((bits >> shift) as u32);
                    return within(V4_NOT_PUBLIC, IpAddr::V4(v4));
                }
            }
            within(V6_NOT_PUBLIC, ip)
        }
    }
}

/// An address somewhere in `net`: its first, its last, or a random one.
fn in_net(net: IpNet, pick: u8, random: u128) -> IpAddr {
    match (pick % 4, net.network(), net.hostmask()) {
        (0, first, _) => first,
        (1, ..) => net.broadcast(),
        (_, IpAddr::V4(first), IpAddr::V4(host)) => IpAddr::V4(Ipv4Addr::from(
            u32::from(first) | (random as u32 & u32::from(host)),
        )),
        (_, IpAddr::V6(first), IpAddr::V6(host)) => IpAddr::V6(Ipv6Addr::from(
            u128::from(first) | (random & u128::from(host)),
        )),
        _ => unreachable!("a network and its host mask are the same family"),
    }
}

/// A neighbour just outside a range, to probe its edges.
fn step(ip: IpAddr, down: bool) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let n = u32::from(v4);
            IpAddr::V4(Ipv4Addr::from(if down {
                n.wrapping_sub(1)
            } else {
                n.wrapping_add(1)
            }))
        }
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            IpAddr::V6(Ipv6Addr::from(if down {
                n.wrapping_sub(1)
            } else {
                n.wrapping_add(1)
            }))
        }
    }
}

/// Addresses: uniformly random ones (nearly all public), ones inside and at
/// the edges of every listed range, and IPv4 addresses of every class in
/// every embedding form.
fn address() -> impl Strategy<Value = IpAddr> {
    let all: Vec<IpNet> = nets(V4_NOT_PUBLIC)
        .into_iter()
        .chain(nets(V6_NOT_PUBLIC))
        .chain(V6_EMBEDDING_V4.iter().map(|(net, _)| net.parse().unwrap()))
        .collect();
    let v4_ranges = nets(V4_NOT_PUBLIC);
    prop_oneof![
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
        (
            prop::sample::select(all),
            any::<u8>(),
            any::<u128>(),
            any::<Option<bool>>()
        )
            .prop_map(|(net, pick, random, edge)| {
                let ip = in_net(net, pick, random);
                match edge {
                    Some(down) => step(ip, down),
                    None => ip,
                }
            }),
        (
            prop::sample::select(v4_ranges),
            any::<u8>(),
            any::<u128>(),
            0_usize..3,
            any::<u128>(),
        )
            .prop_map(|(net, pick, random, form, rest)| {
                let IpAddr::V4(v4) = in_net(net, pick, random) else {
                    unreachable!("an IPv4 range")
                };
                let (prefix, shift) = V6_EMBEDDING_V4[form];
                let prefix: IpNet = prefix.parse().unwrap();
                let IpAddr::V6(base) = prefix.network() else {
                    unreachable!("an IPv6 range")
                };
                // 6to4 leaves 80 bits of subnet and host after the address.
                let low = if shift > 0 {
                    rest & ((1 << shift) - 1)
                } else {
                    0
                };
                IpAddr::V6(Ipv6Addr::from(
                    u128::from(base) | (u128::from(u32::from(v4)) << shift) | low,
                ))
            }),
    ]
}

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn retry_after_never_panics_on_any_text(text in retry_after_text(), now in 0_u64..LAST_HTTP_DATE) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
        let _ = parse_retry_after(&text, now);
    }

    #[test]
    fn retry_after_seconds_round_trip(seconds in any::<u64>(), pad in "[ \t]{0,2}", now in 0_u64..LAST_HTTP_DATE) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now);
        let text = format!("{pad}{seconds}{pad}");
        prop_assert_eq!(parse_retry_after(&text, now), Some(Duration::from_secs(seconds)));
    }

    #[test]
    fn retry_after_dates_round_trip_to_the_second(
        now_secs in 0_u64..LAST_HTTP_DATE - 20 * 365 * 86_400,
        now_nanos in 0_u32..1_000_000_000,
        ahead in 0_u64..20 * 365 * 86_400,
        past in any::<bool>(),
    ) {
        let now = SystemTime::UNIX_EPOCH + Duration::new(now_secs, now_nanos);
        if past {
            // A date in the past means "now".
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now_secs.saturating_sub(ahead));
            prop_assert_eq!(parse_retry_after(&httpdate::fmt_http_date(at), now), Some(Duration::ZERO));
        } else {
            // An HTTP date has whole seconds: the wait is short of the exact
            // one by less than a second.
            let ahead = Duration::from_secs(ahead);
            let parsed = parse_retry_after(&httpdate::fmt_http_date(now + ahead), now).unwrap();
            prop_assert!(parsed <= ahead && ahead - parsed < Duration::from_secs(1), "{parsed:?} for {ahead:?}");
        }
    }

    #[test]
    fn the_egress_check_agrees_with_the_reference(ip in address()) {
        let refused = non_public_reason(ip).is_some();
        prop_assert_eq!(refused, reference_not_public(ip), "{} refused: {:?}", ip, non_public_reason(ip));
        prop_assert_eq!(EgressPolicy::public_only().check(ip).is_err(), refused);
        prop_assert!(EgressPolicy::any().check(ip).is_ok());
    }

    #[test]
    fn deny_wins_and_allow_reopens_only_what_it_lists(
        ip in address(),
        allow_len in 0_u8..=32,
        deny_len in 0_u8..=32,
    ) {
        // Ranges around the address itself, of random widths (IPv6 ranges
        // scale the width to 128 bits).
        let net = |len: u8| match ip {
            IpAddr::V4(_) => IpNet::new(ip, len).unwrap().trunc(),
            IpAddr::V6(_) => IpNet::new(ip, len * 4).unwrap().trunc(),
        };
        let allowed = EgressPolicy::public_only().allow(net(allow_len));
        prop_assert!(allowed.check(ip).is_ok(), "allowed explicitly");
        let denied = allowed.clone().deny(net(deny_len));
        prop_assert_eq!(denied.check(ip), Err("deny-listed"));
        prop_assert_eq!(EgressPolicy::any().deny(net(deny_len)).check(ip), Err("deny-listed"));
    }
}
