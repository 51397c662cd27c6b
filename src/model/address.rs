//! Addresses: one rule for each direction, and one way to write and read `host:port`
//! (docs/architecture.md, "Addresses").
//!
//! - **Export**: an endpoint is exported at an IP address only ([`export_address`]); the
//!   endpoints of EndpointSlices of type FQDN are not exported.
//! - **Import**: a catalog entry's host is imported when an EndpointSlice can hold it
//!   ([`import_host`]): an IP address the API server takes (not loopback, link-local,
//!   unspecified or multicast), or a fully qualified host name, lower-cased. Anything else is
//!   skipped with why, and the other entries still import.

use std::fmt::Display;
use std::net::{IpAddr, Ipv6Addr};

/// The address an endpoint of an EndpointSlice is exported at: an IP address, else nothing.
pub fn export_address(address: &str) -> Option<IpAddr> {
    address.parse().ok()
}

/// Why the API server refuses `ip` in an EndpointSlice (its validation since CVE-2021-25740,
/// plus multicast, which no endpoint is), in its words; None when it takes it.
fn refused_ip(ip: IpAddr) -> Option<&'static str> {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if ip.is_unspecified() {
        Some("may not be unspecified (0.0.0.0, ::)")
    } else if ip.is_loopback() {
        Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
    } else if link_local {
        Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
    } else if ip.is_multicast() {
        Some("may not be a multicast address (224.0.0.0/4, ff00::/8)")
    } else {
        None
    }
}

/// A host a catalog reports, as an imported EndpointSlice holds it: an IP address in canonical
/// form (IPv6 with or without brackets, an IPv4-mapped one as IPv4) that the API server takes
/// (not loopback, link-local, unspecified or multicast: [`refused_ip`]), or a host name,
/// lower-cased (DNS ignores case, the API server does not), of at least two labels of letters,
/// digits and `-` (a name of one label, `vm1`, or with `_`, is refused by Kubernetes in an
/// EndpointSlice). Otherwise, why not.
pub fn import_host(host: &str) -> Result<String, String> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let ip = ip.to_canonical();
        if let Some(why) = refused_ip(ip) {
            return Err(format!("{ip} cannot go in an EndpointSlice: it {why}"));
        }
        return Ok(ip.to_string());
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let neither = || format!("{host:?} is neither an IP address nor a host name");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        || name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Err(neither());
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "host name {host:?} cannot go in an EndpointSlice: Kubernetes takes lower-case \
             letters, digits, '-' and '.' only"
        ));
    }
    if !name.contains('.') {
        return Err(format!(
            "host name {host:?} is not fully qualified: an EndpointSlice takes a host name with \
             its domain only (like {name}.example.internal); register the full name"
        ));
    }
    Ok(name)
}

/// `host:port` as clients dial it: an IPv6 address in brackets (`[fd00::1]:8080`), anything
/// else as it is.
pub fn host_port(host: &str, port: impl Display) -> String {
    if host.contains(':') && !host.starts_with('[') {
        match host.parse::<Ipv6Addr>() {
            Ok(ip) => format!("[{ip}]:{port}"),
            Err(_) => format!("[{host}]:{port}"),
        }
    } else {
        format!("{host}:{port}")
    }
}

/// A port as text: 1 to 65535.
pub fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
}

/// A port as a number (of JSON): 1 to 65535.
pub fn port_number(n: u64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{n} is not a port (1-65535)"))
}

/// `ip:port`, `[ipv6]:port` or `host:port`, with the host as [`import_host`] takes it.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty, not host:port".into());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?} is not [IPv6]:port"))?;
        let ip: Ipv6Addr = h
            .parse()
            .map_err(|_| format!("{h:?} in {s:?} is not an IPv6 address"))?;
        return Ok((import_host(&ip.to_string())?, parse_port(p)?));
    }
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    if h.contains(':') {
        return Err(format!(
            "{s:?}: an IPv6 address needs brackets ([addr]:port)"
        ));
    }
    Ok((import_host(h)?, parse_port(p)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imported_hosts_are_what_an_endpoint_slice_takes() {
        for (host, want) in [
            ("10.0.0.1", "10.0.0.1"),
            ("fd00:0::1", "fd00::1"),
            ("[fd00::1]", "fd00::1"),
            ("DB-1.Example.", "db-1.example"),
            ("db.example.org", "db.example.org"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
            ("198.18.0.9", "198.18.0.9"),
        ] {
            assert_eq!(import_host(host).as_deref(), Ok(want), "{host}");
        }
        for (host, why) in [
            ("vm1", "not fully qualified"),
            ("db_2.example", "lower-case letters"),
            ("-db.example", "lower-case letters"),
            ("not an address", "neither an IP address nor a host name"),
            ("1.2.3", "neither an IP address nor a host name"),
            ("", "neither an IP address nor a host name"),
            ("169.254.169.254", "link-local range"),
            ("[fe80::1]", "link-local range"),
            ("127.0.0.1", "loopback range"),
            ("::1", "loopback range"),
            ("::ffff:127.0.0.1", "loopback range"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.251", "multicast"),
            ("ff02::fb", "multicast"),
        ] {
            let err = import_host(host).expect_err(host);
            assert!(err.contains(why), "{host}: {err}");
        }
    }

    #[test]
    fn host_port_brackets_ipv6_only() {
        assert_eq!(host_port("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(host_port("fd00::1", 80u64), "[fd00::1]:80");
        assert_eq!(host_port("[fd00::1]", 80), "[fd00::1]:80");
        assert_eq!(host_port("db.example", 5432), "db.example:5432");
    }

    #[test]
    fn ports_and_host_ports_parse() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert!(parse_port("0").is_err());
        assert!(parse_port("65536").is_err());
        assert_eq!(port_number(443), Ok(443));
        assert!(port_number(70000).is_err());
        assert_eq!(
            parse_host_port("[fd00::1]:80"),
            Ok(("fd00::1".to_string(), 80))
        );
        assert_eq!(
            parse_host_port("DB.example:5432"),
            Ok(("db.example".to_string(), 5432))
        );
        assert!(parse_host_port("fd00::1:80").is_err());
        assert!(parse_host_port("[fe80::1]:80").is_err());
        assert!(parse_host_port("169.254.169.254:80").is_err());
        assert!(parse_host_port("10.0.0.1").is_err());
    }
}
