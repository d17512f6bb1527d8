//! The I/O half of validation: what checking a configuration reads from outside the file
//! itself, the DNS for upstream names and the CA files for TLS routes.

use std::net::{SocketAddr, ToSocketAddrs};

/// Upstream addresses are resolved once, at load: Pingora's peers resolve with blocking DNS
/// and unwrap the result, which must never happen on the request path.
pub(super) fn resolve(name: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = name.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !name.contains(':') {
        return Err(format!("`{name}` needs a port, e.g. 127.0.0.1:3000"));
    }
    match name.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{name}` resolves to no address")),
        Err(e) => Err(format!("`{name}` cannot be resolved: {e}")),
    }
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
