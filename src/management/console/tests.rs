use http::{HeaderMap, HeaderValue, Method};

use super::{ASSETS, CSP, Console};
use crate::management::error::ApiError;
use crate::session::respond::Reply;

fn get(console: &Console, file: &str, headers: &HeaderMap) -> Reply {
    match console.answer(file, &Method::GET, headers) {
        Ok(reply) => reply,
        Err(e) => panic!("{file}: {e:?}"),
    }
}

fn header<'r>(reply: &'r Reply, name: &str) -> Option<&'r str> {
    reply.headers.get(name).and_then(|v| v.to_str().ok())
}

#[test]
fn every_file_is_served_with_its_type_and_the_security_headers() {
    let console = Console::new(true, "/_keygate");
    for (file, content_type, cache) in [
        ("/", "text/html; charset=utf-8", "no-store"),
        ("/console.js", "text/javascript; charset=utf-8", "no-cache"),
        ("/console.css", "text/css; charset=utf-8", "no-cache"),
        ("/favicon.svg", "image/svg+xml", "no-cache"),
    ] {
        let reply = get(&console, file, &HeaderMap::new());
        assert_eq!(reply.status, 200, "{file}");
        assert_eq!(reply.content_type, content_type, "{file}");
        assert!(!reply.body.is_empty(), "{file}");
        assert_eq!(header(&reply, "content-security-policy"), Some(CSP));
        assert_eq!(header(&reply, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&reply, "referrer-policy"), Some("no-referrer"));
        assert_eq!(header(&reply, "cache-control"), Some(cache), "{file}");
        assert!(header(&reply, "etag").is_some_and(|e| e.starts_with('"')));
    }
}

#[test]
fn a_matching_etag_answers_304_without_a_body() {
    let console = Console::new(true, "/_keygate");
    let first = get(&console, "/console.js", &HeaderMap::new());
    let etag = header(&first, "etag").expect("etag").to_string();
    for sent in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"x\", {etag}"),
        "*".into(),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(
            "if-none-match",
            HeaderValue::try_from(sent.as_str()).expect("value"),
        );
        let again = get(&console, "/console.js", &headers);
        assert_eq!(again.status, 304, "{sent}");
        assert!(again.body.is_empty());
        assert_eq!(header(&again, "etag"), Some(etag.as_str()));
    }
    let mut stale = HeaderMap::new();
    stale.insert("if-none-match", HeaderValue::from_static("\"old\""));
    assert_eq!(get(&console, "/console.js", &stale).status, 200);
}

#[test]
fn the_mount_without_its_slash_redirects_and_unknown_files_are_404() {
    let console = Console::new(true, "/gw/_keygate");
    let reply = get(&console, "", &HeaderMap::new());
    assert_eq!(reply.status, 308);
    assert_eq!(header(&reply, "location"), Some("/gw/_keygate/console/"));
    for file in ["/index.html", "/nope.js", "/console.js/x", "//console.js"] {
        let answer = console.answer(file, &Method::GET, &HeaderMap::new());
        assert!(matches!(answer, Err(ApiError::NotFound)), "{file}");
    }
    let post = console.answer("/", &Method::POST, &HeaderMap::new());
    assert!(matches!(post, Err(ApiError::MethodNotAllowed("GET"))));
}

#[test]
fn switched_off_every_path_and_method_is_404() {
    let console = Console::new(false, "/_keygate");
    for file in ["", "/", "/console.js", "/nope"] {
        for method in [Method::GET, Method::POST] {
            let answer = console.answer(file, &method, &HeaderMap::new());
            assert!(matches!(answer, Err(ApiError::NotFound)), "{method} {file}");
        }
    }
}

/// The CSP forbids inline script and style: the page must need neither, and the script
/// must never hand API data to the HTML parser.
#[test]
fn the_files_need_no_inline_script_or_style_and_never_parse_data_as_html() {
    let text = |name: &str| {
        let asset = ASSETS.iter().find(|a| a.name == name).expect("asset");
        String::from_utf8_lossy(asset.body).into_owned()
    };
    let page = text("").to_ascii_lowercase();
    for tag in page.split("<script").skip(1) {
        let open = tag.split('>').next().unwrap_or_default();
        assert!(open.contains("src="), "inline script: <script{open}>");
        assert!(
            tag.split('>')
                .nth(1)
                .is_some_and(|rest| rest.starts_with("</script"))
        );
    }
    for forbidden in [
        " style=",
        "<style",
        " onclick=",
        " onload=",
        " onerror=",
        "javascript:",
    ] {
        assert!(!page.contains(forbidden), "the page contains {forbidden:?}");
    }
    let script = text("console.js");
    for forbidden in [
        ".innerHTML",
        ".outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "localStorage",
    ] {
        assert!(!script.contains(forbidden), "console.js uses {forbidden}");
    }
}
