//! Connecting to PostgreSQL: the options keygate adds to the connection string, the
//! connection string's `sslmode` honoured as libpq does, and TLS by rustls. The pool and
//! the invalidation listener connect through the same `Connector`.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;
use super::postgres::describe;

/// What a statement gets before PostgreSQL cancels it, unless the config says otherwise.
pub(super) const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How keygate connects to PostgreSQL beyond what the connection string says (`[store]`).
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub pool_size: usize,
    /// Bounds connecting and waiting for a free pooled connection.
    pub connect_timeout: Duration,
    /// Sent as `-c statement_timeout=<ms>` at connection start-up: every statement of every
    /// connection (pool and listener) is cancelled by the server past it.
    pub statement_timeout: Duration,
    /// DER certificates of the database's CA for `verify-ca`/`verify-full`; None = the
    /// system's roots.
    pub ca_certificates: Option<Vec<Vec<u8>>>,
}

impl PgOptions {
    /// The default statement timeout and the system's CA roots.
    pub fn new(pool_size: usize, connect_timeout: Duration) -> PgOptions {
        PgOptions {
            pool_size,
            connect_timeout,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            ca_certificates: None,
        }
    }
}

/// The defaults of `[store]`: 8 connections, 5 s to connect, 5 s per statement.
impl Default for PgOptions {
    fn default() -> Self {
        PgOptions::new(8, Duration::from_secs(5))
    }
}

/// The connection string's `sslmode`, with libpq's meanings (libpq's `allow` is not
/// supported). tokio-postgres knows only the first three and leaves certificate checks to
/// the TLS connector: keygate reads the mode itself, gives tokio-postgres the matching one
/// of its three, and checks certificates in its rustls verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, else plain; no certificate check (libpq's default).
    Prefer,
    /// TLS or no connection, but no certificate check: it encrypts, yet does not stop a man
    /// in the middle, who can present any certificate.
    Require,
    /// TLS, and the certificate chain must lead to the CA; the host name is not checked.
    VerifyCa,
    /// TLS, the chain must lead to the CA and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<SslMode, StoreError> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.name() == value)
            .ok_or_else(|| {
                StoreError::Io(format!(
                    "PostgreSQL connection URL: sslmode `{value}` is not supported (use \
                     disable, prefer, require, verify-ca or verify-full)"
                ))
            })
    }

    pub fn checks_certificates(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    fn transport(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Transport;
        match self {
            SslMode::Disable => Transport::Disable,
            SslMode::Prefer => Transport::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Transport::Require,
        }
    }
}

/// A refused certificate is most often the wrong `store.ca_file` or host name: say so.
pub(super) fn with_tls_hint(error: StoreError, mode: SslMode) -> StoreError {
    match error {
        StoreError::Io(text) if mode.checks_certificates() && text.contains("certificate") => {
            StoreError::Io(format!(
                "{text} (sslmode={}: store.ca_file must hold the CA that signed the database's \
                 certificate{})",
                mode.name(),
                if mode == SslMode::VerifyFull {
                    ", and the certificate must name the host of the connection string"
                } else {
                    ""
                }
            ))
        }
        other => other,
    }
}

/// A parsed connection string with keygate's options applied, and the TLS connector its
/// `sslmode` asks for.
pub(super) struct Connector {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: MakeRustlsConnect,
    pub(super) mode: SslMode,
}

impl Connector {
    /// `application_name` is used unless the connection string names one.
    pub(super) fn new(
        url: &str,
        options: &PgOptions,
        application_name: &str,
    ) -> Result<Connector, StoreError> {
        let (rest, mode) = take_sslmode(url);
        let mode = mode
            .as_deref()
            .map_or(Ok(SslMode::Prefer), SslMode::parse)?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| StoreError::Io(format!("PostgreSQL connection URL: {}", describe(&e))))?;
        config.ssl_mode(mode.transport());
        if config.get_application_name().is_none() {
            config.application_name(application_name);
        }
        // After any `options` of the connection string, so that the configured bound wins.
        let timeout = format!(
            "-c statement_timeout={}",
            options.statement_timeout.as_millis()
        );
        let startup_options = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {timeout}"),
            _ => timeout,
        };
        config.options(&startup_options);
        let tls = MakeRustlsConnect::new(tls_config(mode, options.ca_certificates.as_deref())?);
        Ok(Connector { config, tls, mode })
    }
}

/// Removes `sslmode` from a connection string (URL or `key=value` form) and returns the
/// rest and the last value given. Splits exactly where tokio-postgres's parsers do; a
/// string they would reject is returned whole, for them to report.
fn take_sslmode(url: &str) -> (String, Option<String>) {
    let split = match ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
    {
        Some(rest) => take_url_sslmode(url, rest),
        None => take_keyword_sslmode(url),
    };
    split.unwrap_or_else(|| (url.to_string(), None))
}

/// URL form: the query starts at the first `?` after the credentials (up to the first
/// `@`) and the host (up to the next `/` or `?`); parameters are `key=value` joined by `&`.
fn take_url_sslmode(url: &str, rest: &str) -> Option<(String, Option<String>)> {
    let after_credentials = rest.find('@').map_or(0, |at| at + 1);
    let tail = &rest[after_credentials..];
    let Some(question) = tail.find('?') else {
        return Some((url.to_string(), None));
    };
    let query_start = url.len() - tail.len() + question;
    let mut query = &url[query_start + 1..];
    let mut kept = Vec::new();
    let mut mode = None;
    while !query.is_empty() {
        let equals = query.find('=')?;
        let value_end = query[equals..]
            .find('&')
            .map_or(query.len(), |i| equals + i);
        if percent_decoded(&query[..equals]) == "sslmode" {
            mode = Some(percent_decoded(&query[equals + 1..value_end]));
        } else {
            kept.push(&query[..value_end]);
        }
        query = query.get(value_end + 1..).unwrap_or_default();
    }
    let mut out = url[..query_start].to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Some((out, mode))
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key = value` form, values bare or in single quotes, `\` escaping the next character.
fn take_keyword_sslmode(text: &str) -> Option<(String, Option<String>)> {
    let mut chars = text.char_indices().peekable();
    let mut out = String::new();
    let mut mode = None;
    let mut kept_until = 0;
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        while chars
            .next_if(|(_, c)| !c.is_whitespace() && *c != '=')
            .is_some()
        {}
        let keyword_end = chars.peek().map_or(text.len(), |(i, _)| *i);
        if keyword_end == start {
            return None;
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|(_, c)| *c == '=')?;
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        loop {
            match chars.peek().map(|(_, c)| *c) {
                None if quoted => return None,
                None => break,
                Some('\'') if quoted => {
                    chars.next();
                    break;
                }
                Some(c) if c.is_whitespace() && !quoted => break,
                Some('\\') => {
                    chars.next();
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                Some(c) => {
                    chars.next();
                    value.push(c);
                }
            }
        }
        if value.is_empty() && !quoted {
            return None;
        }
        let end = chars.peek().map_or(text.len(), |(i, _)| *i);
        if &text[start..keyword_end] == "sslmode" {
            out.push_str(&text[kept_until..start]);
            kept_until = end;
            mode = Some(value);
        }
    }
    out.push_str(&text[kept_until..]);
    Some((out, mode))
}

/// rustls on ring (as Pingora's), with the verifier `mode` needs. Only `verify-ca` and
/// `verify-full` read roots: `ca_certificates`, else the system's.
fn tls_config(
    mode: SslMode,
    ca_certificates: Option<&[Vec<u8>]>,
) -> Result<rustls::ClientConfig, StoreError> {
    let tls_error = |e: rustls::Error| StoreError::Io(format!("PostgreSQL TLS set-up: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(LenientVerifier {
            roots: None,
            algorithms,
        }),
        SslMode::VerifyCa => Arc::new(LenientVerifier {
            roots: Some(root_store(ca_certificates)?),
            algorithms,
        }),
        SslMode::VerifyFull => {
            WebPkiServerVerifier::builder_with_provider(root_store(ca_certificates)?, provider)
                .build()
                .map_err(|e| StoreError::Io(format!("PostgreSQL TLS set-up: {e}")))?
        }
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What PostgreSQL 17 requires for `sslnegotiation=direct`; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

fn root_store(ca_certificates: Option<&[Vec<u8>]>) -> Result<Arc<RootCertStore>, StoreError> {
    let mut roots = RootCertStore::empty();
    match ca_certificates {
        Some(certificates) => {
            for der in certificates {
                roots
                    .add(CertificateDer::from(der.clone()))
                    .map_err(|e| StoreError::Io(format!("store.ca_file: {e}")))?;
            }
        }
        None => {
            let system = rustls_native_certs::load_native_certs().map_err(|e| {
                StoreError::Io(format!("cannot read the system's CA certificates: {e}"))
            })?;
            let (_added, _ignored) = roots.add_parsable_certificates(system);
        }
    }
    if roots.is_empty() {
        return Err(StoreError::Io(
            "sslmode verify-ca/verify-full needs CA certificates: none found on the system; \
             set store.ca_file"
                .to_string(),
        ));
    }
    Ok(Arc::new(roots))
}

/// `prefer` and `require` (no roots: any certificate is accepted) and `verify-ca` (the chain
/// must lead to a root; the name is not checked). Either way the server must prove it holds
/// the key of the certificate it shows.
#[derive(Debug)]
struct LenientVerifier {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for LenientVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_taken_out_of_both_forms_of_connection_string() {
        let cases = [
            ("postgres://u:p@h:5/db", "postgres://u:p@h:5/db", None),
            (
                "postgres://u:p@h:5/db?sslmode=verify-full",
                "postgres://u:p@h:5/db",
                Some("verify-full"),
            ),
            (
                "postgresql://h/db?application_name=a&sslmode=verify%2Dca&connect_timeout=3",
                "postgresql://h/db?application_name=a&connect_timeout=3",
                Some("verify-ca"),
            ),
            // A `?` or `sslmode=` inside the password is not the query.
            (
                "postgres://u:a?sslmode=x@h?sslmode=require",
                "postgres://u:a?sslmode=x@h",
                Some("require"),
            ),
            (
                "host=h sslmode=verify-full dbname=db",
                "host=h  dbname=db",
                Some("verify-full"),
            ),
            (
                "host=h password='a sslmode=x \\' b' sslmode = 'disable'",
                "host=h password='a sslmode=x \\' b' ",
                Some("disable"),
            ),
            ("host=h dbname=db", "host=h dbname=db", None),
            // Malformed: left whole for tokio-postgres to report.
            (
                "host=h sslmode='verify-full",
                "host=h sslmode='verify-full",
                None,
            ),
        ];
        for (url, rest, mode) in cases {
            assert_eq!(
                take_sslmode(url),
                (rest.to_string(), mode.map(str::to_string)),
                "{url}"
            );
        }
    }

    #[test]
    fn every_connection_gets_the_mode_and_the_statement_timeout() {
        use tokio_postgres::config::SslMode as Transport;
        let mut options = PgOptions::new(1, Duration::from_secs(1));
        options.statement_timeout = Duration::from_millis(1234);
        for (query, mode, transport) in [
            ("", SslMode::Prefer, Transport::Prefer),
            ("&sslmode=disable", SslMode::Disable, Transport::Disable),
            ("&sslmode=prefer", SslMode::Prefer, Transport::Prefer),
            ("&sslmode=require", SslMode::Require, Transport::Require),
            ("&sslmode=verify-ca", SslMode::VerifyCa, Transport::Require),
            (
                "&sslmode=verify-full",
                SslMode::VerifyFull,
                Transport::Require,
            ),
        ] {
            let url = format!("postgres://u@h/db?options=-c%20work_mem%3D4MB{query}");
            let connector = Connector::new(&url, &options, "test").expect("valid");
            assert_eq!(connector.mode, mode, "{url}");
            assert_eq!(connector.config.get_ssl_mode(), transport, "{url}");
            assert_eq!(
                connector.config.get_options(),
                Some("-c work_mem=4MB -c statement_timeout=1234"),
                "{url}"
            );
            assert_eq!(connector.config.get_application_name(), Some("test"));
        }
    }

    #[test]
    fn unsupported_sslmodes_are_refused_by_name() {
        let options = PgOptions::default();
        for mode in ["allow", "verify_full", ""] {
            let url = format!("postgres://u:sup3rs3cret@h/db?sslmode={mode}");
            let Err(error) = Connector::new(&url, &options, "test") else {
                panic!("accepted sslmode={mode}");
            };
            let text = error.to_string();
            assert!(text.contains("sslmode"), "{text}");
            assert!(!text.contains("sup3rs3cret"), "{text}");
        }
    }
}
