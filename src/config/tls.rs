//! The listener's certificate and key (`[server.tls]`): read, parsed and matched here, so
//! that `keygate check`, the start and a reload all refuse the same files for the same
//! reasons. Pingora's own loader panics on a bad file and never checks that the key belongs
//! to the certificate (the handshake would then fail for every client).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::ConfigProblem;
use super::raw::RawTls;
use super::validate::Problems;

/// `[server.tls]` as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The leaf certificate's validity (Unix seconds), as read at load, for the warnings.
    pub not_before: i64,
    pub not_after: i64,
}

/// A certificate chain and its key, ready for rustls, and the leaf's validity.
#[derive(Debug)]
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    pub not_before: i64,
    pub not_after: i64,
}

/// Which of the two files a problem lies in, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateProblem {
    pub field: &'static str,
    pub reason: String,
}

impl std::fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server.tls.{}: {}", self.field, self.reason)
    }
}

fn problem(field: &'static str, reason: String) -> CertificateProblem {
    CertificateProblem { field, reason }
}

/// Reads the PEM chain (leaf first, served whole) and the PEM key, and checks that the key
/// is the certificate's.
pub fn load_certificate(
    cert_file: &Path,
    key_file: &Path,
) -> Result<LoadedCertificate, CertificateProblem> {
    let chain = read_chain(cert_file)?;
    let key = read_key(key_file)?;
    let (not_before, not_after) = validity(&chain[0], cert_file)?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => problem(
            "key_file",
            format!(
                "{} is not the key of the certificate in {}",
                key_file.display(),
                cert_file.display()
            ),
        ),
        other => problem(
            "key_file",
            format!("{} cannot be used: {other}", key_file.display()),
        ),
    })?;
    Ok(LoadedCertificate {
        key: Arc::new(key),
        not_before,
        not_after,
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertificateProblem> {
    let shown = path.display();
    let file = std::fs::File::open(path)
        .map_err(|e| problem("cert_file", format!("cannot read {shown}: {e}")))?;
    let mut reader = std::io::BufReader::new(file);
    let chain = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem("cert_file", format!("{shown} is not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(problem(
            "cert_file",
            format!("{shown} holds no PEM certificate"),
        ));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertificateProblem> {
    let shown = path.display();
    let file = std::fs::File::open(path)
        .map_err(|e| problem("key_file", format!("cannot read {shown}: {e}")))?;
    let mut reader = std::io::BufReader::new(file);
    match rustls_pemfile::private_key(&mut reader) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(problem(
            "key_file",
            format!("{shown} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"),
        )),
        Err(e) => Err(problem(
            "key_file",
            format!("{shown} is not valid PEM: {e}"),
        )),
    }
}

fn validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<(i64, i64), CertificateProblem> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        problem(
            "cert_file",
            format!(
                "{} holds a certificate that does not parse: {e}",
                path.display()
            ),
        )
    })?;
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// `[server.tls]` validated: both files named, readable and matching.
pub(super) fn validate_tls(raw: Option<RawTls>, p: &mut Problems) -> Option<TlsConfig> {
    let raw = raw?;
    let (Some(cert_file), Some(key_file)) = (&raw.cert_file, &raw.key_file) else {
        for (field, value) in [("cert_file", &raw.cert_file), ("key_file", &raw.key_file)] {
            if value.is_none() {
                p.add(
                    format!("server.tls.{field}"),
                    "required in [server.tls] (a PEM file)",
                );
            }
        }
        return None;
    };
    let (cert_file, key_file) = (PathBuf::from(cert_file), PathBuf::from(key_file));
    match load_certificate(&cert_file, &key_file) {
        Ok(loaded) => Some(TlsConfig {
            cert_file,
            key_file,
            not_before: loaded.not_before,
            not_after: loaded.not_after,
        }),
        Err(e) => {
            p.add(format!("server.tls.{}", e.field), e.reason);
            None
        }
    }
}

/// What is wrong with a certificate that still loads: it has expired, or is not valid yet.
/// Clients will refuse it, but the gateway starts (a renewal may be on its way).
pub(super) fn validity_warnings(tls: &TlsConfig, now: i64) -> Vec<ConfigProblem> {
    let at = crate::clock::rfc3339;
    let shown = tls.cert_file.display();
    let mut warnings = Vec::new();
    if tls.not_after < now {
        warnings.push(ConfigProblem {
            path: "server.tls.cert_file".into(),
            reason: format!(
                "the certificate in {shown} expired at {}; clients will refuse it",
                at(tls.not_after)
            ),
        });
    } else if tls.not_before > now {
        warnings.push(ConfigProblem {
            path: "server.tls.cert_file".into(),
            reason: format!(
                "the certificate in {shown} is not valid before {}; clients will refuse it until then",
                at(tls.not_before)
            ),
        });
    }
    warnings
}
