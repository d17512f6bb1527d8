//! The I/O half of validation: the CA files for TLS routes, and the upstream host names,
//! which are only checked for form here: they are resolved by the routes (at start and
//! every `server.dns_refresh_seconds`), and `keygate check` warns about names that do not
//! resolve now.

use std::net::SocketAddr;

use super::UpstreamHost;

/// An upstream as written: `ip:port`, `[v6]:port` or `host.name:port`.
pub(super) fn upstream_host(name: &str) -> Result<UpstreamHost, String> {
    if let Ok(addr) = name.parse::<SocketAddr>() {
        return Ok(UpstreamHost::Addr(addr));
    }
    let Some((host, port)) = name.rsplit_once(':') else {
        return Err(format!("`{name}` needs a port, e.g. 127.0.0.1:3000"));
    };
    let port = match port.parse::<u16>() {
        Ok(port) if port > 0 => port,
        _ => {
            return Err(format!(
                "`{name}` has no valid port (1-65535) after the `:`"
            ));
        }
    };
    if !is_host_name(host) {
        return Err(format!(
            "`{name}` is neither an address nor a host name with a port, e.g. api.internal:8080"
        ));
    }
    Ok(UpstreamHost::Name {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// RFC 1123 labels: letters, digits and inner hyphens, 1 to 63 characters each.
fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Reads PEM certificates and checks each parses as X.509 (Pingora's TLS layer would panic
/// on one that does not).
pub(super) fn load_ca_file(path: &str) -> Result<Vec<Vec<u8>>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut reader = std::io::BufReader::new(file);
    let mut certs = Vec::new();
    for cert in rustls_pemfile::certs(&mut reader) {
        let der = cert.map_err(|e| format!("{path} is not valid PEM: {e}"))?;
        x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("{path} holds a certificate that does not parse: {e}"))?;
        certs.push(der.as_ref().to_vec());
    }
    if certs.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    Ok(certs)
}
