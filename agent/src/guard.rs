//! The SSRF guard: decides which IP addresses an agent may send a webhook to.
//!
//! Pure: no IO, no resolver. `deliver` calls [`Guard::check`] on IP-literal hosts before sending
//! and on every address its resolver returns, so a connection only ever goes to a checked address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use url::{Host, Url};

/// Decides whether an address may be contacted: special-purpose ranges are refused unless an
/// operator allowed them (`HERALD_ALLOW_DESTINATIONS`).
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow: Vec<IpNet>,
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ip} is {range}")]
pub struct Refused {
    /// The address as it was checked (an IPv4-mapped address keeps its IPv6 form).
    pub ip: IpAddr,
    /// A short name of the special range it is in, such as `loopback`.
    pub range: &'static str,
}

/// IPv4 special-purpose ranges (RFC 6890 and the IANA registry), as (network, prefix, name).
/// The first match names the range, so `255.255.255.255` comes before `240.0.0.0/4`.
const V4_SPECIAL: &[(u32, u8, &str)] = &[
    (0x0000_0000, 8, "in 0.0.0.0/8 (this network)"),
    (0x0a00_0000, 8, "private (10.0.0.0/8)"),
    (
        0x6440_0000,
        10,
        "shared address space (100.64.0.0/10, CGNAT)",
    ),
    (0x7f00_0000, 8, "loopback"),
    (0xa9fe_0000, 16, "link-local"),
    (0xac10_0000, 12, "private (172.16.0.0/12)"),
    (
        0xc000_0000,
        24,
        "reserved for IETF protocol assignments (192.0.0.0/24)",
    ),
    (0xc000_0200, 24, "documentation (192.0.2.0/24)"),
    (0xc058_6300, 24, "the deprecated 6to4 relay anycast range"),
    (0xc0a8_0000, 16, "private (192.168.0.0/16)"),
    (0xc612_0000, 15, "reserved for benchmarking (198.18.0.0/15)"),
    (0xc633_6400, 24, "documentation (198.51.100.0/24)"),
    (0xcb00_7100, 24, "documentation (203.0.113.0/24)"),
    (0xe000_0000, 4, "multicast"),
    (0xffff_ffff, 32, "broadcast"),
    (0xf000_0000, 4, "reserved (240.0.0.0/4)"),
];

/// IPv6 special-purpose ranges inside or outside global unicast (`2000::/3`); anything outside
/// `2000::/3` that is not listed is refused as "not global unicast" as well.
const V6_SPECIAL: &[(u128, u8, &str)] = &[
    (0, 128, "unspecified"),
    (1, 128, "loopback"),
    (
        0x0064_ff9b_0001_0000_0000_0000_0000_0000,
        48,
        "local-use NAT64 (64:ff9b:1::/48)",
    ),
    (
        0x0100_0000_0000_0000_0000_0000_0000_0000,
        64,
        "discard-only (100::/64)",
    ),
    (
        0x2001_0db8_0000_0000_0000_0000_0000_0000,
        32,
        "documentation (2001:db8::/32)",
    ),
    (
        0x2001_0000_0000_0000_0000_0000_0000_0000,
        23,
        "reserved for IETF protocol assignments (2001::/23, Teredo included)",
    ),
    (
        0x3fff_0000_0000_0000_0000_0000_0000_0000,
        20,
        "documentation (3fff::/20)",
    ),
    (
        0xfc00_0000_0000_0000_0000_0000_0000_0000,
        7,
        "unique local (fc00::/7)",
    ),
    (0xfe80_0000_0000_0000_0000_0000_0000_0000, 10, "link-local"),
    (
        0xfec0_0000_0000_0000_0000_0000_0000_0000,
        10,
        "site-local (deprecated)",
    ),
    (0xff00_0000_0000_0000_0000_0000_0000_0000, 8, "multicast"),
];

impl Guard {
    /// Returns a guard that refuses every special range except those in `allow`.
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// Returns `Ok` when `ip` may be contacted: it is in an allowed network, or in no special
    /// range. An IPv4-mapped IPv6 address is the same destination as its IPv4 address, so an
    /// allowed IPv4 network allows its mapped form too.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allowed(ip) {
            return Ok(());
        }
        if let IpAddr::V6(v6) = ip
            && let Some(v4) = v6.to_ipv4_mapped()
            && self.allowed(IpAddr::V4(v4))
        {
            return Ok(());
        }
        match special_range(ip) {
            Some(range) => Err(Refused { ip, range }),
            None => Ok(()),
        }
    }

    /// Checks the host of `url` when it is an IP literal; domain names are checked after
    /// resolution. Returns the literal address that was checked, if any.
    pub fn check_literal_host(&self, url: &Url) -> Result<Option<IpAddr>, Refused> {
        match literal_host(url) {
            Some(ip) => self.check(ip).map(|()| Some(ip)),
            None => Ok(None),
        }
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// Returns the address of an IP-literal host. The `url` crate parses http(s) hosts the WHATWG
/// way, as browsers and curl do, so `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1` and
/// `%31%32%37.0.0.1` are already `127.0.0.1` here, and `[::ffff:127.0.0.1]` is an IPv6 address.
pub fn literal_host(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        Host::Domain(_) => None,
    }
}

/// Returns the name of the special-purpose range `ip` is in, or `None` for an ordinary public
/// address. IPv6 forms that embed an IPv4 address (IPv4-mapped `::ffff:0:0/96`, IPv4-compatible
/// `::/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that IPv4 address.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let bits = u32::from(ip);
    V4_SPECIAL
        .iter()
        .find(|(net, len, _)| prefix_matches_v4(bits, *net, *len))
        .map(|(_, _, name)| *name)
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let bits = u128::from(ip);
    // `::` and `::1` sit inside the IPv4-compatible range: name them first.
    if bits <= 1 {
        return V6_SPECIAL
            .iter()
            .find(|(net, len, _)| prefix_matches_v6(bits, *net, *len))
            .map(|(_, _, name)| *name);
    }
    if let Some((v4, form)) = embedded_v4(ip) {
        return special_v4(v4).map(|_| form);
    }
    if let Some(name) = V6_SPECIAL
        .iter()
        .find(|(net, len, _)| prefix_matches_v6(bits, *net, *len))
        .map(|(_, _, name)| *name)
    {
        return Some(name);
    }
    if !prefix_matches_v6(bits, 0x2000 << 112, 3) {
        return Some("not global unicast (outside 2000::/3)");
    }
    None
}

/// Returns the IPv4 address embedded in an IPv6 address that reaches (or names) it, with a
/// description of the form used when that IPv4 address is special.
fn embedded_v4(ip: Ipv6Addr) -> Option<(Ipv4Addr, &'static str)> {
    let bits = u128::from(ip);
    // The low 32 bits carry the address in the three /96 forms.
    let low = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some((v4, "an IPv4-mapped special address"));
    }
    if prefix_matches_v6(bits, 0, 96) {
        return Some((low, "an IPv4-compatible special address"));
    }
    if prefix_matches_v6(bits, 0x0064_ff9b << 96, 96) {
        return Some((low, "a NAT64 form of a special address"));
    }
    if prefix_matches_v6(bits, 0x2002 << 112, 16) {
        let v4 = Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32);
        return Some((v4, "a 6to4 form of a special address"));
    }
    None
}

fn prefix_matches_v4(bits: u32, net: u32, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    bits & mask == net & mask
}

fn prefix_matches_v6(bits: u128, net: u128, len: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    bits & mask == net & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str) -> bool {
        Guard::default().check(ip.parse().unwrap()).is_err()
    }

    #[track_caller]
    fn check(ip: &str, expect_refused: bool) {
        assert_eq!(refused(ip), expect_refused, "{ip}");
    }

    #[test]
    fn refuses_special_ipv4_ranges() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.1",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.0.1",
            "192.168.255.255",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            check(ip, true);
        }
    }

    #[test]
    fn allows_public_ipv4_next_to_special_ranges() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
        ] {
            check(ip, false);
        }
    }

    #[test]
    fn refuses_special_ipv6_ranges() {
        for ip in [
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "2001:db8::1",
            "2001::1",
            "2001:2::1",
            "3fff::1",
            "64:ff9b:1::1",
            "5f00::1",
            "4000::1",
            "::ffff:0:7f00:1",
        ] {
            check(ip, true);
        }
    }

    #[test]
    fn allows_global_ipv6() {
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "2001:4860::1",
        ] {
            check(ip, false);
        }
    }

    #[test]
    fn judges_ipv6_forms_of_ipv4_by_their_ipv4_address() {
        for (ip, expect_refused) in [
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.1.2.3", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:8.8.8.8", false),
            ("::127.0.0.1", true),
            ("::10.0.0.1", true),
            ("::8.8.8.8", false),
            ("64:ff9b::127.0.0.1", true),
            ("64:ff9b::192.168.1.1", true),
            ("64:ff9b::8.8.8.8", false),
            ("2002:7f00:1::", true),
            ("2002:c0a8:101::1", true),
            ("2002:808:808::1", false),
        ] {
            check(ip, expect_refused);
        }
    }

    #[test]
    fn names_the_range_of_a_refusal() {
        let refusal = Guard::default().check("127.0.0.1".parse().unwrap());
        assert_eq!(refusal.unwrap_err().to_string(), "127.0.0.1 is loopback");
        let refusal = Guard::default().check("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(
            refusal.unwrap_err().to_string(),
            "::ffff:10.0.0.1 is an IPv4-mapped special address"
        );
    }

    #[test]
    fn allow_list_overrides_special_ranges() {
        let guard = Guard::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]);
        for (ip, allowed) in [
            ("127.0.0.1", true),
            ("127.9.9.9", true),
            ("::ffff:127.0.0.1", true),
            ("fd00::1", true),
            ("::1", false),
            ("10.0.0.1", false),
            ("fc00::1", false),
            ("8.8.8.8", true),
        ] {
            assert_eq!(guard.check(ip.parse().unwrap()).is_ok(), allowed, "{ip}");
        }
        let single = Guard::new(vec!["10.1.2.3/32".parse().unwrap()]);
        assert!(single.check("10.1.2.3".parse().unwrap()).is_ok());
        assert!(single.check("10.1.2.4".parse().unwrap()).is_err());
    }

    fn host_of(url: &str) -> Option<IpAddr> {
        literal_host(&Url::parse(url).unwrap())
    }

    #[test]
    fn parses_every_spelling_of_an_ipv4_literal() {
        let loopback = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://127.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0X7F000001/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://0177.1/",
            "http://017700000001/",
            "http://127.0.0.1./",
            "http://%31%32%37.0.0.1/",
            "https://127.1:8443/path?q=1",
            "http://user:pass@127.1/",
        ] {
            assert_eq!(host_of(url), loopback, "{url}");
            assert!(
                Guard::default()
                    .check_literal_host(&Url::parse(url).unwrap())
                    .is_err(),
                "{url}"
            );
        }
    }

    #[test]
    fn parses_ipv6_literals_including_mapped_ipv4() {
        assert_eq!(
            host_of("http://[::ffff:127.0.0.1]/"),
            Some("::ffff:7f00:1".parse().unwrap())
        );
        assert_eq!(host_of("http://[::1]:8080/"), Some("::1".parse().unwrap()));
        assert_eq!(
            host_of("http://[0:0:0:0:0:ffff:7f00:0001]/"),
            Some("::ffff:127.0.0.1".parse().unwrap())
        );
        for url in [
            "http://[::ffff:127.0.0.1]/",
            "http://[::1]/",
            "http://[::127.0.0.1]/",
            "http://[fe80::1]/",
        ] {
            assert!(
                Guard::default()
                    .check_literal_host(&Url::parse(url).unwrap())
                    .is_err(),
                "{url}"
            );
        }
    }

    #[test]
    fn domain_names_are_left_to_the_resolver() {
        for url in [
            "http://localhost/",
            "http://example.com/",
            "http://127.0.0.1.nip.io/",
        ] {
            assert_eq!(host_of(url), None, "{url}");
        }
    }

    #[test]
    fn unparsable_numeric_hosts_are_rejected_by_the_url_parser() {
        // A last label that looks numeric but is not a valid IPv4 number is an error rather than
        // a domain name, so it cannot slip past the literal check.
        for url in [
            "http://127.0.0.256/",
            "http://1.2.3.4.5/",
            "http://0x1ffffffff/",
        ] {
            assert!(Url::parse(url).is_err(), "{url}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::net::{Ipv4Addr, Ipv6Addr};

        /// Ranges a receiver must never reach without an allow-list, written here independently
        /// of the guard's own table: (network, prefix length).
        const BLOCKED_V4: &[([u8; 4], u8)] = &[
            ([0, 0, 0, 0], 8),
            ([10, 0, 0, 0], 8),
            ([100, 64, 0, 0], 10),
            ([127, 0, 0, 0], 8),
            ([169, 254, 0, 0], 16),
            ([172, 16, 0, 0], 12),
            ([192, 168, 0, 0], 16),
            ([224, 0, 0, 0], 4),
            ([240, 0, 0, 0], 4),
        ];

        fn blocked_v4() -> impl Strategy<Value = Ipv4Addr> {
            (0..BLOCKED_V4.len(), any::<u32>()).prop_map(|(i, host)| {
                let (net, len) = BLOCKED_V4[i];
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                Ipv4Addr::from((u32::from(Ipv4Addr::from(net)) & mask) | (host & !mask))
            })
        }

        /// The spellings a URL host can take for one IPv4 address.
        fn spellings(ip: Ipv4Addr) -> Vec<String> {
            let [a, b, c, d] = ip.octets();
            let n = u32::from(ip);
            vec![
                ip.to_string(),
                n.to_string(),
                format!("0x{n:x}"),
                format!("0{a:o}.0{b:o}.0{c:o}.0{d:o}"),
                format!(
                    "{a}.{}",
                    (u32::from(b) << 16) | (u32::from(c) << 8) | u32::from(d)
                ),
                format!("[::ffff:{ip}]"),
                format!("[::ffff:{:x}:{:x}]", n >> 16, n & 0xffff),
                format!("[64:ff9b::{ip}]"),
            ]
        }

        proptest! {
            /// Every address of a blocked range, in every spelling, is refused; none panics.
            #[test]
            fn blocked_ranges_are_refused_in_every_spelling(ip in blocked_v4()) {
                let guard = Guard::new(Vec::new());
                prop_assert!(guard.check(IpAddr::V4(ip)).is_err(), "{ip}");
                for host in spellings(ip) {
                    let url = Url::parse(&format!("http://{host}/hook")).unwrap();
                    prop_assert!(guard.check_literal_host(&url).is_err(), "{host} ({ip})");
                }
            }

            /// IPv6 loopback, unique-local and link-local addresses are refused.
            #[test]
            fn blocked_v6_ranges_are_refused(low in any::<u128>(), which in 0usize..3) {
                let (net, len): (u128, u32) = [(1, 128), (0xfc00 << 112, 7), (0xfe80 << 112, 10)][which];
                let mask = if len == 128 { u128::MAX } else { !(u128::MAX >> len) };
                let ip = Ipv6Addr::from((net & mask) | (low & !mask));
                prop_assert!(Guard::new(Vec::new()).check(IpAddr::V6(ip)).is_err(), "{ip}");
            }

            /// Any URL text: an answer, never a panic.
            #[test]
            fn any_url_is_judged_without_a_panic(text in ".{0,80}") {
                if let Ok(url) = Url::parse(&format!("http://{text}/")) {
                    let _ = Guard::new(Vec::new()).check_literal_host(&url);
                }
            }
        }
    }
}
