//! The hostile-requests table: raw requests, each with its exact expected answer, by
//! category (`table_rows`), and how an answer is judged against its row.

use super::*;

use Expect::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Expect {
    /// keygate's own JSON error with this status and `error.code`; not forwarded.
    Refused(u16, &'static str),
    /// 405 `method_not_allowed` with an `Allow` header (exactly this one, when given); not
    /// forwarded.
    NotAllowed(Option<&'static str>),
    /// A management answer with this (2xx) status; not forwarded.
    Answered(u16),
    /// Admitted: exactly one request reached the upstream, 200 came back, and the upstream
    /// saw no key.
    Forwarded,
    /// Not valid HTTP/1.1: a bare 400 or a closed connection (contract section 7); not
    /// forwarded.
    HttpLayer,
}

pub(super) struct Row {
    pub(super) name: String,
    pub(super) bytes: Vec<u8>,
    pub(super) expect: Expect,
    pub(super) half_close: bool,
}

fn row(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Row {
    Row {
        name: name.into(),
        bytes,
        expect,
        half_close: false,
    }
}

/// Checks one answer against its row; Err describes the mismatch.
fn judge(
    row: &Row,
    answer: &Answer,
    forwarded: usize,
    secrets: &[String],
    upstream: &Upstream,
) -> Result<(), String> {
    if let Answer::Response(r) = answer
        && r.status >= 500
    {
        return Err(format!("5xx: {}", answer.describe()));
    }
    let expected_forwards = usize::from(row.expect == Expect::Forwarded);
    if forwarded != expected_forwards {
        return Err(format!(
            "the upstream received {forwarded} request(s), expected {expected_forwards}; answer {}",
            answer.describe()
        ));
    }
    let response = match (answer, row.expect) {
        (Answer::Response(r), _) => r,
        (Answer::Closed(_), Expect::HttpLayer) => return Ok(()),
        (other, _) => return Err(format!("no response: {}", other.describe())),
    };
    judge_response(row.expect, response, answer, secrets, upstream)
}

/// `judge` for a row that got a whole response.
fn judge_response(
    expect: Expect,
    response: &RawResponse,
    answer: &Answer,
    secrets: &[String],
    upstream: &Upstream,
) -> Result<(), String> {
    let keygate_error = |status: u16, code: &str| {
        check_error(response, status, code)
            .map(drop)
            .map_err(|why| format!("{why}; {}", answer.describe()))
    };
    match expect {
        Expect::Refused(status, code) => keygate_error(status, code)?,
        Expect::NotAllowed(allow) => {
            keygate_error(405, "method_not_allowed")?;
            let got = response.header("allow");
            if got.is_none_or(str::is_empty) || allow.is_some_and(|a| got != Some(a)) {
                return Err(format!(
                    "Allow is {:?}, expected {allow:?}",
                    response.header("allow")
                ));
            }
        }
        Expect::Answered(status) => {
            if response.status != status || response.json().is_none() {
                return Err(format!(
                    "expected a JSON {status}, got {}",
                    answer.describe()
                ));
            }
        }
        Expect::Forwarded => {
            if response.status != 200 || response.header("x-upstream") != Some("u") {
                return Err(format!(
                    "expected the upstream's 200, got {}",
                    answer.describe()
                ));
            }
            let seen = upstream.seen().pop().expect("the upstream saw it");
            if find_secret(seen.all_header_text().as_bytes(), secrets).is_some() {
                return Err(format!("a key was forwarded: {}", seen.all_header_text()));
            }
        }
        Expect::HttpLayer => {
            if response.status != 400 {
                return Err(format!(
                    "expected a bare 400 or a close, got {}",
                    answer.describe()
                ));
            }
        }
    }
    Ok(())
}

/// Sends every row on its own connection; returns the failures and every response body.
pub(super) async fn run_rows(
    port: u16,
    rows: &[Row],
    upstream: &Upstream,
    secrets: &[String],
) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut failures = Vec::new();
    let mut bodies = Vec::new();
    for row in rows {
        let before = upstream.count();
        let answer = exchange(port, &row.bytes, row.half_close).await;
        // A forwarded request is recorded before the upstream answers; a wrongly forwarded
        // one without an answer (the gateway gave up on it) may land a moment later.
        if !matches!(answer, Answer::Response(ref r) if r.header("x-upstream").is_some()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let forwarded = upstream.count() - before;
        eprintln!("{:<70} -> {}", row.name, answer.describe());
        if let Err(why) = judge(row, &answer, forwarded, secrets, upstream) {
            failures.push(format!("{}: {why}", row.name));
        }
        if let Answer::Response(r) = answer {
            bodies.push(r.body);
        }
    }
    (failures, bodies)
}

/// Key A and key B: two valid keys of one owner.
pub(super) struct TableKeys {
    pub(super) a: String,
    pub(super) b: String,
}

/// The table: every row, category by category, in a fixed order (some rows create keys
/// that later checks count).
pub(super) fn table_rows(keys: &TableKeys, unknown: &str) -> Vec<Row> {
    let k = Keys {
        a: &keys.a,
        b: &keys.b,
        unknown,
    };
    let categories: [fn(&Keys<'_>) -> Vec<Row>; 20] = [
        request_lines,
        header_blocks,
        connect,
        conflicting_credentials,
        repeated_credentials,
        credential_bytes,
        sizes,
        wrong_lengths,
        near_misses,
        authorization_schemes,
        management_paths,
        management_routing,
        management_queries,
        methods,
        body_types,
        body_sizes,
        body_values,
        chunked_framing,
        length_framing,
        proxied_framing,
    ];
    categories
        .iter()
        .flat_map(|category| category(&k))
        .collect()
}

/// The keys a row may use: A and B, two valid keys of one owner, and a well-formed key no
/// store knows.
struct Keys<'a> {
    a: &'a str,
    b: &'a str,
    unknown: &'a str,
}

/// `GET /resource` with `headers`.
fn get(headers: &[(&str, Vec<u8>)]) -> Vec<u8> {
    request("GET", "/resource", headers, None)
}

/// `POST /_keygate/keys` as the admin, with `headers` and `body`.
fn create(headers: &[(&str, Vec<u8>)], body: &[u8]) -> Vec<u8> {
    let mut all = vec![admin_auth()];
    all.extend_from_slice(headers);
    request("POST", "/_keygate/keys", &all, Some(body))
}

/// `GET target` as the admin.
fn admin_get(target: &str) -> Vec<u8> {
    request("GET", target, &[admin_auth()], None)
}

/// A create body of exactly `total` bytes, padded in its metadata.
fn padded(total: usize) -> Vec<u8> {
    let head = br#"{"owner": "table", "metadata": {"pad": ""#;
    let tail = br#""}}"#;
    let mut body = head.to_vec();
    body.resize(total - tail.len(), b'x');
    body.extend_from_slice(tail);
    assert_eq!(body.len(), total);
    body
}

/// The body of the framing rows.
const CHUNKED_JSON: &str = r#"{"owner": "table", "name": "chunked"}"#;

/// The admin's `Authorization` line.
fn admin_line() -> String {
    format!("Authorization: Bearer {ADMIN}\r\n")
}

/// The head of a `POST /_keygate/keys` as the admin, with `extra` header lines.
fn post_head(extra: &str) -> String {
    format!(
        "POST /_keygate/keys HTTP/1.1\r\nHost: gateway.test\r\n{}{extra}Connection: close\r\n\r\n",
        admin_line()
    )
}

/// Request lines that are not HTTP/1.1, and odd methods.
fn request_lines(k: &Keys<'_>) -> Vec<Row> {
    let a = k.a;
    let mut rows = Vec::new();
    rows.push(row("garbage line", b"GARBAGE\r\n\r\n".to_vec(), HttpLayer));
    rows.push(row(
        "binary junk",
        b"\x00\x01\x02\x03\xff\xfe junk \x7f\r\n\r\n".to_vec(),
        HttpLayer,
    ));
    rows.push(row(
        "TLS client hello on the plain listener",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03kg_not_http\r\n\r\n".to_vec(),
        HttpLayer,
    ));
    rows.push(row(
        "missing version",
        format!("GET /resource\r\nHost: gateway.test\r\nx-api-key: {a}\r\n\r\n").into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "HTTP/9.9",
        format!("GET /resource HTTP/9.9\r\nHost: gateway.test\r\nx-api-key: {a}\r\n\r\n")
            .into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "HTTP/2.0 on an HTTP/1 line",
        format!("GET /resource HTTP/2.0\r\nHost: gateway.test\r\nx-api-key: {a}\r\n\r\n")
            .into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "method with illegal characters",
        format!("G@T(/) /resource HTTP/1.1\r\nHost: gateway.test\r\nx-api-key: {a}\r\n\r\n")
            .into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "absurd but well-formed method, no key",
        request("FROBNICATE", "/resource", &[], None),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "4 KiB method name, no key",
        request(&"X".repeat(4096), "/resource", &[], None),
        Refused(401, "missing_credentials"),
    ));
    rows
}

/// Header blocks that are not HTTP/1.1.
fn header_blocks(k: &Keys<'_>) -> Vec<Row> {
    let (a, b) = (k.a, k.b);
    let mut rows = Vec::new();
    rows.push(row(
        "header line without a colon",
        format!("GET /resource HTTP/1.1\r\nHost gateway.test\r\nx-api-key: {a}\r\n\r\n")
            .into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "space in a header name",
        format!("GET /resource HTTP/1.1\r\nHost: gateway.test\r\nx api-key: {a}\r\n\r\n")
            .into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "obs-fold continuation of a credential header",
        format!("GET /resource HTTP/1.1\r\nHost: gateway.test\r\nx-api-key: {a}\r\n  {b}\r\n\r\n")
            .into_bytes(),
        HttpLayer,
    ));
    rows.push(Row {
        half_close: true,
        ..row(
            "only blank lines, then EOF",
            b"\r\n\r\n\r\n".to_vec(),
            HttpLayer,
        )
    });
    rows.push(Row {
        half_close: true,
        ..row(
            "header block cut off, then EOF",
            format!("GET /resource HTTP/1.1\r\nHost: gateway.test\r\nx-api-key: {a}\r\n")
                .into_bytes(),
            HttpLayer,
        )
    });
    rows
}

/// CONNECT: valid HTTP/1.1, refused with keygate's JSON 405, never a tunnel.
fn connect(k: &Keys<'_>) -> Vec<Row> {
    let a = k.a;
    let mut rows = Vec::new();
    rows.push(row(
        "CONNECT to another host",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n".to_vec(),
        NotAllowed(None),
    ));
    rows.push(row(
        "CONNECT with a valid key, tunnel bytes following",
        format!(
            "CONNECT gateway.test:443 HTTP/1.1\r\nHost: gateway.test:443\r\nx-api-key: {a}\r\n\r\n\x16\x03\x01\x00\x05hello"
        )
        .into_bytes(),
        NotAllowed(None),
    ));
    rows.push(row(
        "CONNECT with the admin token",
        format!("CONNECT 127.0.0.1:9180 HTTP/1.1\r\nHost: 127.0.0.1:9180\r\nAuthorization: Bearer {ADMIN}\r\n\r\n").into_bytes(),
        NotAllowed(None),
    ));
    rows.push(row(
        "CONNECT whose Host differs from its target",
        request("CONNECT", "127.0.0.1:9180", &[admin_auth()], None),
        HttpLayer,
    ));
    rows
}

/// No credential, or two that differ.
fn conflicting_credentials(k: &Keys<'_>) -> Vec<Row> {
    let (a, b) = (k.a, k.b);
    let mut rows = Vec::new();
    rows.push(row(
        "no credentials",
        get(&[]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "x-api-key twice, different keys",
        get(&[h("x-api-key", a), h("x-api-key", b)]),
        Refused(400, "conflicting_credentials"),
    ));
    rows.push(row(
        "key twice, different keys",
        get(&[h("key", a), h("key", b)]),
        Refused(400, "conflicting_credentials"),
    ));
    rows.push(row(
        "Authorization twice, different keys",
        get(&[
            h("authorization", format!("Bearer {a}")),
            h("authorization", format!("Bearer {b}")),
        ]),
        Refused(400, "conflicting_credentials"),
    ));
    rows.push(row(
        "key + x-api-key differing",
        get(&[h("key", a), h("x-api-key", b)]),
        Refused(400, "conflicting_credentials"),
    ));
    rows.push(row(
        "Authorization + x-api-key differing",
        get(&[h("authorization", format!("Bearer {a}")), h("x-api-key", b)]),
        Refused(400, "conflicting_credentials"),
    ));
    rows.push(row(
        "valid key + malformed key",
        get(&[h("x-api-key", a), h("key", "kg_nope")]),
        Refused(400, "conflicting_credentials"),
    ));
    rows
}

/// The same credential more than once, and several in one value.
fn repeated_credentials(k: &Keys<'_>) -> Vec<Row> {
    let (a, b) = (k.a, k.b);
    let mut rows = Vec::new();
    rows.push(row(
        "x-api-key twice, same key",
        get(&[h("x-api-key", a), h("x-api-key", a)]),
        Forwarded,
    ));
    rows.push(row(
        "same key in all three headers",
        get(&[
            h("key", a),
            h("x-api-key", a),
            h("authorization", format!("Bearer {a}")),
        ]),
        Forwarded,
    ));
    rows.push(row(
        "key next to a foreign Basic Authorization",
        get(&[h("x-api-key", a), h("authorization", "Basic dXNlcjpwYXNz")]),
        Forwarded,
    ));
    rows.push(row(
        "two keys comma-joined in one value",
        get(&[h("x-api-key", format!("{a}, {b}"))]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "the same key comma-joined in one value",
        get(&[h("x-api-key", format!("{a},{a}"))]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "key then a space and another key",
        get(&[h("x-api-key", format!("{a} {b}"))]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "key surrounded by tabs and spaces",
        get(&[h("x-api-key", format!("\t {a} \t"))]),
        Forwarded,
    ));
    rows
}

/// Non-UTF-8 and control characters in credential headers.
fn credential_bytes(k: &Keys<'_>) -> Vec<Row> {
    let a = k.a;
    let mut rows = Vec::new();
    rows.push(row(
        "non-UTF-8 after the prefix",
        get(&[h("x-api-key", b"kg_\xff\xfe\xfd\x80abc")]),
        Refused(401, "invalid_key"),
    ));
    let mut a_latin1 = a.as_bytes().to_vec();
    a_latin1[20] = 0xe9;
    rows.push(row(
        "a key with one byte made Latin-1",
        get(&[h("x-api-key", a_latin1)]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "valid key followed by 0xff",
        get(&[h("key", [a.as_bytes(), b"\xff"].concat())]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "non-UTF-8 without the prefix",
        get(&[h("x-api-key", b"\xff\xfe\xfd")]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "non-UTF-8 Bearer token",
        get(&[h("authorization", b"Bearer \xc3\x28kg_")]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "NUL inside a credential",
        get(&[h(
            "x-api-key",
            [b"kg_\x00".as_slice(), &a.as_bytes()[4..]].concat(),
        )]),
        HttpLayer,
    ));
    rows.push(row(
        "control character 0x01 in a credential",
        get(&[h("x-api-key", [a.as_bytes(), b"\x01"].concat())]),
        HttpLayer,
    ));
    rows.push(row(
        "DEL in a credential",
        get(&[h(
            "key",
            [b"kg_\x7f".as_slice(), &a.as_bytes()[4..]].concat(),
        )]),
        HttpLayer,
    ));
    rows.push(row(
        "bare CR inside a credential",
        get(&[h("x-api-key", format!("{}\r{}", &a[..20], &a[20..]))]),
        HttpLayer,
    ));
    rows.push(row(
        "ESC sequence in a Bearer token",
        get(&[h("authorization", format!("Bearer \x1b[2J{a}"))]),
        HttpLayer,
    ));
    rows
}

/// Oversized headers, credentials and header blocks.
fn sizes(_k: &Keys<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    rows.push(row(
        "200 KiB header, no key (over max_header_bytes, 64 KiB by default)",
        get(&[h("x-padding", "p".repeat(200 * 1024))]),
        Refused(431, "header_too_large"),
    ));
    rows.push(row(
        "10 KiB x-api-key starting with kg_",
        get(&[h("x-api-key", format!("kg_{}", "A".repeat(10 * 1024)))]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "10 KiB Bearer token starting with kg_",
        get(&[h(
            "authorization",
            format!("Bearer kg_{}", "z9".repeat(5 * 1024)),
        )]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "1.2 MiB header block",
        get(&[h("x-padding", "p".repeat(1200 * 1024))]),
        HttpLayer,
    ));
    let many: Vec<(&str, Vec<u8>)> = (0..300).map(|_| h("x-many", "1")).collect();
    rows.push(row("300 headers", get(&many), HttpLayer));
    rows
}

/// Every wrong length after kg_ (0 to 60).
fn wrong_lengths(k: &Keys<'_>) -> Vec<Row> {
    let a = k.a;
    let mut rows = Vec::new();
    let pool = format!("{}{}", &a[3..], &a[3..]);
    for len in (0..=60).filter(|n| *n != 49) {
        let header = ["x-api-key", "key", "authorization"][len % 3];
        let value = if header == "authorization" {
            format!("Bearer kg_{}", &pool[..len])
        } else {
            format!("kg_{}", &pool[..len])
        };
        rows.push(row(
            format!("body of {len} characters in {header}"),
            get(&[h(header, value)]),
            Refused(401, "invalid_key"),
        ));
    }
    rows
}

/// Keys one step away from a valid one.
fn near_misses(k: &Keys<'_>) -> Vec<Row> {
    let (a, unknown) = (k.a, k.unknown);
    let mut rows = Vec::new();
    rows.push(row(
        "one body character changed",
        get(&[h("x-api-key", with_char_changed(a, 10))]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "one checksum character changed",
        get(&[h("x-api-key", with_char_changed(a, a.len() - 1))]),
        Refused(401, "invalid_key"),
    ));
    let flipped: String = a
        .char_indices()
        .map(|(i, c)| {
            if i == 30 && c.is_ascii_alphabetic() {
                (c as u8 ^ 0x20) as char
            } else if i == 30 {
                if c == '0' { '1' } else { '0' }
            } else {
                c
            }
        })
        .collect();
    rows.push(row(
        "one character's case flipped",
        get(&[h("x-api-key", flipped)]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "two characters swapped",
        get(&[h(
            "x-api-key",
            format!("{}{}{}{}", &a[..20], &a[21..22], &a[20..21], &a[22..]),
        )]),
        if a.as_bytes()[20] == a.as_bytes()[21] {
            Forwarded
        } else {
            Refused(401, "invalid_key")
        },
    ));
    rows.push(row(
        "well-formed key no store knows",
        get(&[h("x-api-key", unknown)]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "uppercase prefix KG_",
        get(&[h("x-api-key", format!("KG_{}", &a[3..]))]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "prefix with a dash",
        get(&[h("x-api-key", format!("kg-{}", &a[3..]))]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "key in the query string only",
        request("GET", &format!("/resource?api_key={a}&key={a}"), &[], None),
        Refused(401, "missing_credentials"),
    ));
    rows
}

/// Authorization schemes other than Bearer, and Bearer done wrong.
fn authorization_schemes(k: &Keys<'_>) -> Vec<Row> {
    let a = k.a;
    let mut rows = Vec::new();
    rows.push(row(
        "Bearer with no token",
        get(&[h("authorization", "Bearer")]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "Bearer and spaces",
        get(&[h("authorization", "Bearer   ")]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "Basic carrying the key",
        get(&[h("authorization", format!("Basic {a}"))]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "Digest naming the key",
        get(&[h(
            "authorization",
            format!("Digest username=\"{a}\", realm=\"x\", nonce=\"1\", uri=\"/\", response=\"0\""),
        )]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "Bearer glued to the key",
        get(&[h("authorization", format!("Bearer{a}"))]),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "lowercase bearer, valid key",
        get(&[h("authorization", format!("bearer {a}"))]),
        Forwarded,
    ));
    rows.push(row(
        "BEARER and a tab, valid key",
        get(&[h("authorization", format!("BEARER\t{a}"))]),
        Forwarded,
    ));
    rows.push(row(
        "Bearer key plus trailing parameters",
        get(&[h("authorization", format!("Bearer {a} realm=x"))]),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "the admin token is no API key on a proxied route",
        get(&[admin_auth()]),
        Refused(401, "missing_credentials"),
    ));
    rows
}

/// Paths around the management API that must not reach it.
fn management_paths(_k: &Keys<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for target in [
        "/_keygate/../x",
        "/_keygate/../_keygate/keys",
        "/_keygate/%2e%2e/keys",
        "/_keygate/%2E%2e/audit",
        "/_keygate/keys/../audit",
        "/_keygate/keys/%2e%2e/audit",
        "/_keygate/./keys",
        "/_keygate/keys%2f..%2faudit",
        "/_keygate/keys/.",
        "/resource/../_keygate/keys",
        "/_keygate\\keys",
        "/_keygate/keys\\..\\audit",
        "//_keygate/keys",
        "/_keygate%2Fkeys",
        "/_keygate;x/keys",
        "/_keygate/keys/..;/audit",
        "/%5Fkeygate/keys/%2E%2E/audit",
        "/_keygate/keys/%zz",
    ] {
        rows.push(row(
            format!("path {target}"),
            admin_get(target),
            Refused(400, "invalid_path"),
        ));
    }
    for target in ["/_KEYGATE/keys", "/%5FKEYGATE/keys", "/_Keygate/keys"] {
        rows.push(row(
            format!("path {target} (the management path in other case)"),
            admin_get(target),
            Refused(400, "invalid_path"),
        ));
    }
    rows.push(row(
        "path /_keygatex/keys is no management path",
        admin_get("/_keygatex/keys"),
        Refused(401, "missing_credentials"),
    ));
    rows
}

/// How the management API is found, and which credentials it takes.
fn management_routing(k: &Keys<'_>) -> Vec<Row> {
    let (a, b) = (k.a, k.b);
    let mut rows = Vec::new();
    rows.push(row(
        "absolute-form target naming the management API",
        request(
            "GET",
            "http://gateway.test/_keygate/keys?limit=1",
            &[admin_auth()],
            None,
        ),
        Answered(200),
    ));
    rows.push(row(
        "the management API under a percent-encoded name",
        admin_get("/%5F%6Beygate/keys?limit=1"),
        Answered(200),
    ));
    rows.push(row(
        "unknown management path",
        admin_get("/_keygate/nope"),
        Refused(404, "not_found"),
    ));
    rows.push(row(
        "the management mount itself",
        admin_get("/_keygate"),
        Refused(404, "not_found"),
    ));
    rows.push(row(
        "unknown management path without credentials",
        request("GET", "/_keygate/nope", &[], None),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "keys without credentials",
        request("GET", "/_keygate/keys", &[], None),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "wrong admin token",
        request(
            "GET",
            "/_keygate/keys",
            &[h("authorization", format!("Bearer {ADMIN}x"))],
            None,
        ),
        Refused(401, "invalid_key"),
    ));
    rows.push(row(
        "admin token in x-api-key",
        request("GET", "/_keygate/keys", &[h("x-api-key", ADMIN)], None),
        Refused(401, "missing_credentials"),
    ));
    rows.push(row(
        "admin token with a lowercase scheme",
        request(
            "GET",
            "/_keygate/keys?limit=1",
            &[h("authorization", format!("bearer {ADMIN}"))],
            None,
        ),
        Answered(200),
    ));
    rows.push(row(
        "conflicting keys on the management API",
        request(
            "GET",
            "/_keygate/keys",
            &[h("x-api-key", a), h("key", b)],
            None,
        ),
        Refused(400, "conflicting_credentials"),
    ));
    rows
}

/// Management requests refused for their parameters or scope.
fn management_queries(k: &Keys<'_>) -> Vec<Row> {
    let a = k.a;
    vec![
        row(
            "audit with a key lacking keys:manage",
            request("GET", "/_keygate/audit", &[h("x-api-key", a)], None),
            Refused(403, "insufficient_scope"),
        ),
        row(
            "limit=0",
            admin_get("/_keygate/keys?limit=0"),
            Refused(422, "validation_failed"),
        ),
        row(
            "limit=99999999999999999999",
            admin_get("/_keygate/keys?limit=99999999999999999999"),
            Refused(422, "validation_failed"),
        ),
        row(
            "forged cursor",
            admin_get("/_keygate/keys?cursor=%00%ff'--"),
            Refused(422, "validation_failed"),
        ),
        row(
            "unknown key id",
            admin_get("/_keygate/keys/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
            Refused(404, "not_found"),
        ),
        row(
            "key id with percent-encoded junk",
            admin_get("/_keygate/keys/%00%ff%0d%0a"),
            Refused(404, "not_found"),
        ),
    ]
}

/// Methods the API does not serve.
fn methods(_k: &Keys<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (method, target, allow) in [
        ("PUT", "/_keygate/keys", "GET, POST"),
        ("PATCH", "/_keygate/keys", "GET, POST"),
        ("DELETE", "/_keygate/keys", "GET, POST"),
        ("OPTIONS", "/_keygate/keys", "GET, POST"),
        ("FROBNICATE", "/_keygate/keys", "GET, POST"),
        (
            "PUT",
            "/_keygate/keys/01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "GET, DELETE, PATCH",
        ),
        ("GET", "/_keygate/keys/revoke", "POST"),
        (
            "GET",
            "/_keygate/keys/01ARZ3NDEKTSV4RRFFQ69G5FAV/rotate",
            "POST",
        ),
        ("POST", "/_keygate/audit", "GET"),
    ] {
        let body: &[u8] = b"{}";
        rows.push(row(
            format!("{method} {target}"),
            request(method, target, &[admin_auth()], Some(body)),
            NotAllowed(Some(allow)),
        ));
    }
    rows.push(row(
        "POST openapi.json (no credentials needed)",
        request("POST", "/_keygate/openapi.json", &[], Some(b"{}")),
        NotAllowed(Some("GET")),
    ));
    rows
}

/// Bodies read as JSON whatever their Content-Type; empty and truncated ones.
fn body_types(_k: &Keys<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "image/png",
        "application/json; charset=latin1",
    ] {
        rows.push(row(
            format!("valid JSON as {content_type}"),
            create(&[h("content-type", content_type)], br#"{"owner": "table"}"#),
            Answered(201),
        ));
    }
    rows.push(row(
        "valid JSON without a Content-Type",
        create(&[], br#"{"owner": "table", "name": "no-ct"}"#),
        Answered(201),
    ));
    rows.push(row(
        "Expect: 100-continue",
        create(&[h("expect", "100-continue")], br#"{"owner": "table"}"#),
        Answered(201),
    ));
    rows.push(row(
        "truncated JSON",
        create(&[], br#"{"owner": "table""#),
        Refused(400, "invalid_json"),
    ));
    rows.push(row(
        "empty body",
        create(&[], b""),
        Refused(422, "validation_failed"),
    ));
    rows
}

/// Body sizes and nesting depths.
fn body_sizes(_k: &Keys<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    rows.push(row(
        "exactly 64 KiB (metadata too big)",
        create(&[], &padded(64 * 1024)),
        Refused(422, "validation_failed"),
    ));
    rows.push(row(
        "64 KiB + 1 byte",
        create(&[], &padded(64 * 1024 + 1)),
        Refused(413, "payload_too_large"),
    ));
    rows.push(row(
        "70 KiB JSON",
        create(&[], &padded(70 * 1024)),
        Refused(413, "payload_too_large"),
    ));
    rows.push(row(
        "10,000 nested arrays",
        create(&[], "[".repeat(10_000).as_bytes()),
        Refused(400, "invalid_json"),
    ));
    rows.push(row(
        "10,000 nested objects",
        create(&[], "{\"a\":".repeat(10_000).as_bytes()),
        Refused(400, "invalid_json"),
    ));
    rows.push(row(
        "deep nesting inside metadata",
        create(
            &[],
            format!(
                "{{\"owner\":\"table\",\"metadata\":{}1{}}}",
                "{\"a\":".repeat(3000),
                "}".repeat(3000)
            )
            .as_bytes(),
        ),
        Refused(400, "invalid_json"),
    ));
    rows
}

/// Bodies that are no JSON object, or one with bad fields.
fn body_values(_k: &Keys<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (what, body) in [
        ("a JSON string", br#""owner""#.as_slice()),
        ("a JSON number", b"42"),
        ("a JSON array", br#"[{"owner": "table"}]"#),
        ("JSON null", b"null"),
        ("JSON true", b"true"),
        ("invalid UTF-8 in a string", b"{\"owner\": \"\xff\xfe\"}"),
        ("a lone surrogate escape", br#"{"owner": "\ud800"}"#),
        ("trailing garbage", br#"{"owner": "table"} {}"#),
        ("a trailing NUL byte", b"{\"owner\": \"table\"}\x00"),
        (
            "a number out of range",
            br#"{"owner": "table", "ttl_seconds": 1e999}"#,
        ),
    ] {
        rows.push(row(
            format!("body: {what}"),
            create(&[], body),
            Refused(400, "invalid_json"),
        ));
    }
    rows.push(row(
        "owner of the wrong type",
        create(&[], br#"{"owner": 5}"#),
        Refused(422, "validation_failed"),
    ));
    rows.push(row(
        "unknown field",
        create(&[], br#"{"owner": "table", "admin": true}"#),
        Refused(422, "validation_failed"),
    ));
    rows.push(row(
        "owner with a newline",
        create(&[], br#"{"owner": "ta\nble"}"#),
        Refused(422, "validation_failed"),
    ));
    rows
}

/// Chunked management bodies, well and badly framed.
fn chunked_framing(_k: &Keys<'_>) -> Vec<Row> {
    let json = CHUNKED_JSON;
    let mut rows = Vec::new();
    rows.push(row(
        "chunked body",
        format!(
            "{}{:x}\r\n{json}\r\n0\r\n\r\n",
            post_head("Transfer-Encoding: chunked\r\n"),
            json.len()
        )
        .into_bytes(),
        Answered(201),
    ));
    rows.push(row(
        "chunked body in one-byte chunks with extensions and a trailer",
        {
            let mut text = post_head("Transfer-Encoding: chunked\r\n");
            for c in json.chars() {
                text.push_str(&format!("1;ext=\"v\"\r\n{c}\r\n"));
            }
            text.push_str("0\r\nx-trailer: t\r\n\r\n");
            text.into_bytes()
        },
        Answered(201),
    ));
    rows.push(row(
        "chunked body with a bad chunk size",
        format!(
            "{}zz\r\n{json}\r\n0\r\n\r\n",
            post_head("Transfer-Encoding: chunked\r\n")
        )
        .into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "chunk size overflowing 64 bits",
        format!(
            "{}fffffffffffffffffffff\r\n{json}\r\n0\r\n\r\n",
            post_head("Transfer-Encoding: chunked\r\n")
        )
        .into_bytes(),
        HttpLayer,
    ));
    rows.push(Row {
        half_close: true,
        ..row(
            "chunked body cut off, then EOF",
            format!(
                "{}{:x}\r\n{}",
                post_head("Transfer-Encoding: chunked\r\n"),
                json.len(),
                &json[..10]
            )
            .into_bytes(),
            HttpLayer,
        )
    });
    rows
}

/// Transfer-Encoding and Content-Length mismatches on the management API.
fn length_framing(_k: &Keys<'_>) -> Vec<Row> {
    let json = CHUNKED_JSON;
    let admin_line = admin_line();
    let mut rows = Vec::new();
    rows.push(row(
        "Transfer-Encoding gzip (not chunked last)",
        format!("{}{json}", post_head("Transfer-Encoding: gzip\r\n")).into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "Transfer-Encoding on HTTP/1.0",
        format!(
            "POST /_keygate/keys HTTP/1.0\r\nHost: gateway.test\r\n{admin_line}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{json}\r\n0\r\n\r\n",
            json.len()
        )
        .into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "two different Content-Lengths",
        format!(
            "{}{json}",
            post_head(&format!(
                "Content-Length: {}\r\nContent-Length: 5\r\n",
                json.len()
            ))
        )
        .into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "negative Content-Length",
        format!("{}{json}", post_head("Content-Length: -1\r\n")).into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "Content-Length that is not a number",
        format!("{}{json}", post_head("Content-Length: ten\r\n")).into_bytes(),
        HttpLayer,
    ));
    rows.push(row(
        "Content-Length shorter than the body",
        format!("{}{json}", post_head("Content-Length: 5\r\n")).into_bytes(),
        Refused(400, "invalid_json"),
    ));
    rows.push(Row {
        half_close: true,
        ..row(
            "Content-Length longer than the body, then EOF",
            format!("{}{json}", post_head("Content-Length: 500\r\n")).into_bytes(),
            HttpLayer,
        )
    });
    rows
}

/// Framing on a proxied route, smuggling attempts included.
fn proxied_framing(k: &Keys<'_>) -> Vec<Row> {
    let a = k.a;
    let json = CHUNKED_JSON;
    let mut rows = Vec::new();
    rows.push(row(
        "Content-Length and chunked together (chunked wins)",
        format!(
            "{}{:x}\r\n{json}\r\n0\r\n\r\n",
            post_head("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
            json.len()
        )
        .into_bytes(),
        Answered(201),
    ));
    rows.push(row(
        "smuggling: CL + chunked with a request hidden after the chunks (contract 9: refused)",
        format!(
            "POST /resource HTTP/1.1\r\nHost: gateway.test\r\nx-api-key: {a}\r\nContent-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
        )
        .into_bytes(),
        Refused(400, "bad_request"),
    ));
    for (name, codings) in [
        ("gzip, chunked", "Transfer-Encoding: gzip, chunked\r\n"),
        (
            "chunked, chunked",
            "Transfer-Encoding: chunked, chunked\r\n",
        ),
        (
            "two Transfer-Encoding headers",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ),
    ] {
        rows.push(row(
            format!("{name} on a proxied route, valid key"),
            format!(
                "POST /resource HTTP/1.1\r\nHost: gateway.test\r\nx-api-key: {a}\r\n{codings}Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .into_bytes(),
            Refused(400, "bad_request"),
        ));
    }
    rows.push(row(
        "bad chunk size on a proxied route, valid key",
        format!(
            "POST /resource HTTP/1.1\r\nHost: gateway.test\r\nx-api-key: {a}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n"
        )
        .into_bytes(),
        Refused(400, "bad_request"),
    ));
    rows.push(row(
        "chunked body over 64 KiB on a proxied route, valid key",
        format!(
            "POST /resource HTTP/1.1\r\nHost: gateway.test\r\nx-api-key: {a}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n10001\r\n{}\r\n0\r\n\r\n",
            "z".repeat(0x10001)
        )
        .into_bytes(),
        Refused(413, "payload_too_large"),
    ));
    rows.push(row(
        "chunked body on a proxied route",
        format!(
            "POST /resource HTTP/1.1\r\nHost: gateway.test\r\nx-api-key: {a}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .into_bytes(),
        Forwarded,
    ));
    rows
}
