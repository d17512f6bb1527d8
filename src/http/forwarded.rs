//! Forwarding headers: which of the client's are dropped, who the client is when a
//! trusted proxy stands in front, and the `X-Forwarded-For` keygate sends on.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// Headers a client may not set for the upstream: proxy-set addresses and URLs that some
/// frameworks believe (`X-Original-URL` routes a Symfony or IIS app to another path).
const STRIPPED: [&str; 8] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
];

/// Whether keygate removes the client's header `name` before forwarding: the forwarding
/// headers, and every header that reads as `x-keygate-*` once `_` is read as `-` (WSGI,
/// Rack and PHP servers turn `x_keygate_owner` into `X-Keygate-Owner`).
pub(crate) fn is_stripped(name: &str) -> bool {
    const IDENTITY: &[u8] = b"x-keygate-";
    let bytes = name.as_bytes();
    let identity = bytes.len() >= IDENTITY.len()
        && bytes[..IDENTITY.len()]
            .iter()
            .zip(IDENTITY)
            .all(|(&b, &want)| b == want || (b == b'_' && want == b'-'));
    identity || STRIPPED.contains(&name)
}

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|net| net.contains(&ip))
}

/// The addresses of `X-Forwarded-For` (every such header, in order); entries that are not
/// IP addresses (`unknown`, obfuscated names) are skipped.
fn chain(headers: &HeaderMap) -> impl Iterator<Item = IpAddr> + '_ {
    headers
        .get_all(super::names::X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|entry| entry.trim().parse::<IpAddr>().ok())
}

/// The client: the peer, unless the peer is a trusted proxy; then the nearest address of
/// the chain it sent that is not itself a trusted proxy.
pub(crate) fn client_address(peer: IpAddr, headers: &HeaderMap, proxies: &[IpNet]) -> IpAddr {
    if !trusted(peer, proxies) {
        return peer;
    }
    let sent: Vec<IpAddr> = chain(headers).collect();
    sent.iter()
        .rev()
        .find(|ip| !trusted(**ip, proxies))
        .or(sent.first())
        .copied()
        .unwrap_or(peer)
}

/// The `X-Forwarded-For` keygate sends: the chain a trusted peer sent followed by the
/// peer; from any other peer, the peer alone.
pub(crate) fn forwarded_for(peer: IpAddr, headers: &HeaderMap, proxies: &[IpNet]) -> String {
    let mut value = String::with_capacity(16);
    if trusted(peer, proxies) {
        for ip in chain(headers) {
            push_ip(&mut value, ip);
            value.push_str(", ");
        }
    }
    push_ip(&mut value, peer);
    value
}

/// Appends `ip` as text. Every proxied request formats its peer: the IPv4 case skips the
/// formatting machinery, which cost about a thousand instructions a request (callgrind).
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in xff {
            map.append("x-forwarded-for", value.parse().expect("value"));
        }
        map
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "100.199.255.9",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = text.parse().expect("ip");
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn underscored_identity_headers_and_forwarding_headers_are_stripped() {
        for name in [
            "x-keygate-owner",
            "x_keygate_owner",
            "x-keygate_key-id",
            "x_keygate_",
            "forwarded",
            "x-original-url",
            "x-real-ip",
        ] {
            assert!(is_stripped(name), "{name}");
        }
        for name in [
            "x-keygate",
            "x-keygateowner",
            "content-type",
            "x-request-id",
        ] {
            assert!(!is_stripped(name), "{name}");
        }
    }

    #[test]
    fn forwarding_headers_are_believed_from_trusted_proxies_only() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let sent = headers(&["203.0.113.9, 10.1.1.1"]);
        let proxy: IpAddr = "10.2.2.2".parse().expect("ip");
        let stranger: IpAddr = "198.51.100.4".parse().expect("ip");
        assert_eq!(
            client_address(proxy, &sent, &proxies),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            forwarded_for(proxy, &sent, &proxies),
            "203.0.113.9, 10.1.1.1, 10.2.2.2"
        );
        assert_eq!(client_address(stranger, &sent, &proxies), stranger);
        assert_eq!(forwarded_for(stranger, &sent, &proxies), "198.51.100.4");
        // A trusted proxy that sent nothing is the client itself.
        assert_eq!(client_address(proxy, &HeaderMap::new(), &proxies), proxy);
        assert_eq!(
            forwarded_for(proxy, &headers(&["junk, unknown"]), &proxies),
            "10.2.2.2"
        );
    }
}
