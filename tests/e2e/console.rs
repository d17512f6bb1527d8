//! The key console (contract section 15): its files' headers over plain HTTP, and the page
//! itself in a real headless Chromium against the real gateway and upstream: signing in,
//! creating (the key shown once), using the key through the proxy, rotating, revoking,
//! the audit log, a `keys:manage` key's narrower view, and owner-written text that stays
//! text. Screenshots of the key list and the create dialog are written under `target/`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::browser::Browser;
use crate::common::management::*;
use crate::common::*;

const CSP: &str = "default-src 'self'; frame-ancestors 'none'";
/// Owner-written text that would run script if it were ever parsed as HTML.
const XSS: &str = "<img src=x onerror=alert(1)>";

fn console_url(env: &Env) -> String {
    format!("{}/_keygate/console/", env.config.base_url())
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn fetch(http: &reqwest::Client, url: &str, etag: Option<&str>) -> Reply {
    let mut req = http.get(url);
    if let Some(etag) = etag {
        req = req.header("if-none-match", etag);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    Reply::read(url, resp).await
}

fn assert_security_headers(reply: &Reply) {
    let what = &reply.what;
    assert_eq!(reply.header("content-security-policy"), Some(CSP), "{what}");
    assert_eq!(
        reply.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(
        reply.header("referrer-policy"),
        Some("no-referrer"),
        "{what}"
    );
    assert!(
        reply.header("x-request-id").is_some(),
        "{what}: x-request-id"
    );
}

#[tokio::test]
async fn console_files_need_no_credentials_and_carry_the_security_headers() {
    let env = Env::start(GENEROUS).await;
    let http = no_redirects();
    let base = console_url(&env);
    let files = [
        ("", "text/html; charset=utf-8", "no-store"),
        ("console.js", "text/javascript; charset=utf-8", "no-cache"),
        ("console.css", "text/css; charset=utf-8", "no-cache"),
        ("favicon.svg", "image/svg+xml", "no-cache"),
    ];
    for (file, content_type, cache) in files {
        let url = format!("{base}{file}");
        let reply = fetch(&http, &url, None).await;
        assert_eq!(reply.status, 200, "{url}: {}", reply.text);
        assert_security_headers(&reply);
        assert_eq!(reply.header("content-type"), Some(content_type), "{url}");
        assert_eq!(reply.header("cache-control"), Some(cache), "{url}");
        assert_eq!(
            reply.header("content-length"),
            Some(reply.bytes.len().to_string().as_str())
        );
        // Revalidation: the same ETag answers 304 with no body, on the same connection.
        let etag = reply.header("etag").expect("etag").to_string();
        let again = fetch(&http, &url, Some(&etag)).await;
        assert_eq!(again.status, 304, "{url}");
        assert!(again.bytes.is_empty());
        assert_security_headers(&again);
        assert_eq!(fetch(&http, &url, Some("\"stale\"")).await.status, 200);
    }
    let page = fetch(&http, &base, None).await.text;
    assert!(page.contains("<script type=\"module\" src=\"console.js\"></script>"));

    // Without its slash the mount redirects, so that the page's relative URLs resolve.
    let bare = fetch(&http, base.trim_end_matches('/'), None).await;
    assert_eq!(bare.status, 308);
    assert_eq!(bare.header("location"), Some("/_keygate/console/"));
    assert_security_headers(&bare);

    // Unknown files and other methods: the API's JSON errors, still without credentials.
    let missing = fetch(&http, &format!("{base}index.html"), None).await;
    missing.err(404, "not_found");
    assert_security_headers(&missing);
    assert_eq!(missing.header("cache-control"), Some("no-store"));
    let post = http.post(&base).body("{}").send().await.expect("POST");
    let post = Reply::read("POST console/", post).await;
    post.err(405, "method_not_allowed");
    assert_eq!(post.header("allow"), Some("GET"));

    // API answers keep theirs, and console loads are counted apart from API calls.
    let list = env.get("/keys", Cred::Admin).await;
    assert_eq!(list.header("content-security-policy"), None);
    let metrics = scrape_metrics(&env.config.admin_url()).await;
    let series = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let console = "keygate_management_requests_total{operation=\"console\",status=";
    assert_eq!(series(&format!("{console}\"200\"}}")), 9.0, "{metrics}");
    assert_eq!(series(&format!("{console}\"304\"}}")), 4.0);
    assert_eq!(series(&format!("{console}\"308\"}}")), 1.0);
    assert_eq!(series(&format!("{console}\"404\"}}")), 1.0);
    assert_eq!(
        series("keygate_management_requests_total{operation=\"list\",status=\"200\"}"),
        1.0
    );
    let public = "keygate_requests_total{outcome=\"public\",route=\"_management\"}";
    assert_eq!(series(public), 14.0, "{metrics}");
}

#[tokio::test]
async fn switched_off_the_console_is_404_to_everyone() {
    let env = Env::start(&format!("{GENEROUS}\n[console]\nenabled = false\n")).await;
    let http = no_redirects();
    let base = console_url(&env);
    for url in [
        base.clone(),
        format!("{base}console.js"),
        base.trim_end_matches('/').into(),
    ] {
        fetch(&http, &url, None).await.err(404, "not_found");
        let with_admin = http.get(&url).bearer_auth(ADMIN).send().await.expect("GET");
        Reply::read(&url, with_admin).await.err(404, "not_found");
    }
    let post = http.post(&base).send().await.expect("POST");
    Reply::read("POST console/", post)
        .await
        .err(404, "not_found");
    env.get("/keys", Cred::Admin).await.ok(200);

    // An unknown field under [console] is a config error, like any other.
    let mut config = GatewayConfig::single_route(&[env.upstream.addr]);
    config.extra = format!("[console]\nenable = false\n{}", config.extra);
    let path = config.write();
    let out = keygate(&["check", "--config", path.to_str().expect("utf-8")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        format!("{stdout}{stderr}")
            .contains("console.enable: unknown field; did you mean \"enabled\"?"),
        "{stdout}{stderr}"
    );
}

// ---------------------------------------------------------------- in the browser

/// Listens for CSP violations and replaces `alert`, so that anything that tries to run
/// is seen (call again after each load).
const TRIPWIRE: &str = "window.__csp = []; window.__alerts = 0; \
    document.addEventListener('securitypolicyviolation', e => window.__csp.push(e.violatedDirective)); \
    window.alert = () => { window.__alerts += 1; };";

async fn open_console(browser: &Browser, env: &Env) {
    browser.goto(&console_url(env)).await;
    browser
        .wait_until(
            "document.documentElement.dataset.ready === 'true'",
            "the script",
        )
        .await;
    browser.js(TRIPWIRE, vec![]).await;
}

/// Signs in with `token` and waits for the first page of keys.
async fn sign_in(browser: &Browser, token: &str) {
    browser.fill("#token", token).await;
    browser.click("#sign-in").await;
    wait_for_list(browser, 0).await;
}

/// Waits until the key list has rendered a load later than `after`; returns its number.
async fn wait_for_list(browser: &Browser, after: u64) -> u64 {
    let condition = format!(
        "!document.getElementById('keys-view').hidden && \
         Number(document.getElementById('keys-view').dataset.loaded || 0) > {after}"
    );
    browser.wait_until(&condition, "the key list").await;
    let loaded = browser
        .js(
            "return document.getElementById('keys-view').dataset.loaded;",
            vec![],
        )
        .await;
    loaded
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("load number")
}

async fn refresh_list(browser: &Browser) {
    let before = wait_for_list(browser, 0).await;
    browser.click("#refresh").await;
    wait_for_list(browser, before).await;
}

async fn dialog_open(browser: &Browser, id: &str, open: bool) {
    let condition = format!("document.getElementById('{id}').open === {open}");
    browser.wait_until(&condition, id).await;
}

/// The key the secret dialog shows; closes it with its button, and checks it is gone.
async fn take_secret(browser: &Browser) -> String {
    dialog_open(browser, "secret-dialog", true).await;
    let warning = browser.text_of("#secret-warning").await;
    assert!(warning.contains("it will not be shown again"), "{warning}");
    let key = browser
        .js(
            "return document.getElementById('secret-value').value;",
            vec![],
        )
        .await;
    let key = key.as_str().expect("key").to_string();
    assert!(key.starts_with("kg_") && key.len() == 52, "{key}");
    browser.click("#secret-done").await;
    dialog_open(browser, "secret-dialog", false).await;
    let source = browser.client.source().await.expect("page source");
    assert!(
        !source.contains(&key),
        "the key stays on the page after its dialog closed"
    );
    key
}

fn row(id: &str) -> String {
    format!("tr[data-key-id=\"{id}\"]")
}

async fn state_of(browser: &Browser, id: &str) -> String {
    let script =
        "const r = document.querySelector(arguments[0]); return r ? r.dataset.state : null;";
    let state = browser.js(script, vec![json!(row(id))]).await;
    state.as_str().unwrap_or_default().to_string()
}

async fn assert_nothing_ran(browser: &Browser) {
    let ran = browser
        .js("return [window.__csp, window.__alerts, document.querySelectorAll('img[src=\"x\"]').length];", vec![])
        .await;
    assert_eq!(
        ran,
        json!([[], 0, 0]),
        "[CSP violations, alerts, injected images]"
    );
    assert!(
        browser.client.get_alert_text().await.is_err(),
        "an alert is open"
    );
}

/// The one record of `owner` the admin sees, or the one rotated from `from`.
async fn records_of(env: &Env, owner: &str) -> Vec<Value> {
    let page = env.get(&format!("/keys?owner={owner}"), Cred::Admin).await;
    page.ok(200)["data"].as_array().expect("data").clone()
}

#[tokio::test]
async fn the_admin_manages_keys_in_a_real_browser() {
    let env = Env::start(GENEROUS).await;
    env.admin_create("bob", &["read"]).await;
    let (carol, _) = env
        .create(
            Cred::Admin,
            json!({"owner": "carol", "name": "ci deploy", "scopes": ["deploy"],
                   "ttl_seconds": 86400 * 30, "rate_limit": {"requests": 10, "window_seconds": 1}}),
        )
        .await;
    let browser = Browser::start(1360, 1000).await;
    open_console(&browser, &env).await;
    sign_in_after_a_wrong_token(&browser).await;
    let key = create_in_the_dialog(&browser).await;
    let id = use_the_key_and_see_its_usage(&browser, &env, &key).await;
    owner_text_stays_text(&browser, &id).await;
    reload_keeps_the_sign_in_not_the_key(&browser, &key).await;
    edit_in_place(&browser, &env, &id, &key).await;
    let (new_id, new_key) = rotate_with_grace(&browser, &env, &id, &key).await;
    revoke_after_confirming(&browser, &env, &new_id, &new_key).await;
    filter_and_audit(&browser).await;

    browser.click("#tab-keys").await;
    wait_for_list(&browser, 0).await;
    let carol_row = format!("{} td[data-col=rate_limit]", row(&id_of(&carol)));
    assert_eq!(browser.text_of(&carol_row).await, "10 / 1 s");
    browser
        .click("#keys-head button[data-sort=usage_count]")
        .await;
    let sorted =
        "document.querySelector('#keys-head th[aria-sort]')?.textContent.startsWith('Usage')";
    browser.wait_until(sorted, "sort").await;
    browser.click("#notice-close").await;
    let list_shot = browser.screenshot("key-list").await;
    assert_nothing_ran(&browser).await;
    browser.close().await;
    let create_shot = crate::common::browser::screenshot_dir().join("create-dialog.png");
    for shot in [create_shot, list_shot] {
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
            "{shot:?}"
        );
    }
}

/// A wrong token is refused in words, with the code; then the admin token signs in.
async fn sign_in_after_a_wrong_token(browser: &Browser) {
    browser
        .fill("#token", "not-the-admin-token-but-long-enough-0000")
        .await;
    browser.click("#sign-in").await;
    browser
        .wait_until("!document.getElementById('notice').hidden", "the error")
        .await;
    let notice = browser.text_of("#notice").await;
    assert!(
        notice.contains("not valid") && notice.contains("code: invalid_key"),
        "{notice}"
    );
    sign_in(browser, ADMIN).await;
    assert!(browser.text_of("#whoami").await.contains("admin"));
    let stored = "return [sessionStorage.getItem('keygate.console.token'), localStorage.length, document.cookie];";
    assert_eq!(browser.js(stored, vec![]).await, json!([ADMIN, 0, ""]));
}

/// Create: first with a scope the API refuses (its 422 shown in words), then right; the
/// key is shown once.
async fn create_in_the_dialog(browser: &Browser) -> String {
    browser.click("#new-key").await;
    dialog_open(browser, "create-dialog", true).await;
    browser.fill("#create-owner", "alice").await;
    browser.fill("#create-name", XSS).await;
    browser.fill("#create-scopes", "read Bad!Scope").await;
    browser.fill("#create-requests", "100").await;
    browser.fill("#create-window", "60").await;
    browser.fill("#create-quota", "1000").await;
    let metadata = json!({"note": XSS, "team": "payments"}).to_string();
    browser.fill("#create-metadata", &metadata).await;
    browser.click("#create-submit").await;
    let error_shown = "!document.getElementById('create-error').hidden";
    browser.wait_until(error_shown, "the 422").await;
    let error = browser.text_of("#create-error").await;
    assert!(
        error.contains("code: validation_failed") && error.contains("scopes"),
        "{error}"
    );
    browser.fill("#create-scopes", "read write").await;
    // A change of the form clears the error about what was sent.
    let shown = browser.js(&format!("return {error_shown};"), vec![]).await;
    assert_eq!(shown, json!(false));
    browser.screenshot("create-dialog").await;
    browser.click("#create-submit").await;
    dialog_open(browser, "secret-dialog", true).await;
    browser.screenshot("new-key-dialog").await;
    browser.click("#secret-copy").await;
    let copied = "document.getElementById('secret-copied').textContent !== ''";
    browser.wait_until(copied, "copy").await;
    take_secret(browser).await
}

/// The key works through the proxy, and its usage shows once the list is refreshed;
/// returns its id.
async fn use_the_key_and_see_its_usage(browser: &Browser, env: &Env, key: &str) -> String {
    env.assert_admitted(key, "the console's key").await;
    env.assert_admitted(key, "the console's key, again").await;
    let alice = records_of(env, "alice").await;
    let (id, record) = (id_of(&alice[0]), &alice[0]);
    assert_eq!(record["name"], XSS);
    assert_eq!(record["metadata"]["note"], XSS);
    assert_eq!(
        record["rate_limit"],
        json!({"requests": 100, "window_seconds": 60})
    );
    refresh_list(browser).await;
    let usage = format!("{} td[data-col=usage_count]", row(&id));
    assert_eq!(browser.text_of(&usage).await, "2");
    let quota = format!("{} td[data-col=quota]", row(&id));
    assert_eq!(browser.text_of(&quota).await, "1000 a day, 998 left");
    assert_eq!(state_of(browser, &id).await, "active");
    id
}

/// What the owner wrote is text, in the list and in the details, and nothing ran;
/// Escape closes a dialog and gives the focus back to the button that opened it.
async fn owner_text_stays_text(browser: &Browser, id: &str) {
    let name = format!("{} td[data-col=name] .name", row(id));
    assert_eq!(browser.text_of(&name).await, XSS);
    let details = format!("{} button[data-action=details]", row(id));
    browser.click(&details).await;
    dialog_open(browser, "details-dialog", true).await;
    assert!(browser.text_of("#details-metadata").await.contains(XSS));
    assert_nothing_ran(browser).await;
    let escape = char::from(fantoccini::key::Key::Escape).to_string();
    let active = browser.client.active_element().await.expect("focus");
    active.send_keys(&escape).await.expect("Escape");
    dialog_open(browser, "details-dialog", false).await;
    let focus = "document.activeElement.dataset.action === 'details'";
    browser.wait_until(focus, "focus back").await;
}

async fn reload_keeps_the_sign_in_not_the_key(browser: &Browser, key: &str) {
    browser.client.refresh().await.expect("reload");
    let ready = "document.documentElement.dataset.ready === 'true'";
    browser.wait_until(ready, "reload").await;
    wait_for_list(browser, 0).await;
    browser.js(TRIPWIRE, vec![]).await;
    let source = browser.client.source().await.expect("source");
    assert!(
        !source.contains(key),
        "the key is on the page after a reload"
    );
    assert!(
        !source.contains(&key[3..]),
        "part of the key after a reload"
    );
    let open = "return document.getElementById('secret-dialog').open;";
    assert_eq!(browser.js(open, vec![]).await, json!(false));
}

/// Edit in place (PATCH): name, scopes, rate limit, allowlist and metadata change, the
/// quota is topped up, the key itself stays the same and keeps working.
async fn edit_in_place(browser: &Browser, env: &Env, id: &str, key: &str) {
    browser
        .click(&format!("{} button[data-action=edit]", row(id)))
        .await;
    dialog_open(browser, "edit-dialog", true).await;
    browser.fill("#edit-name", "edited in place").await;
    browser.fill("#edit-scopes", "read write").await;
    browser.fill("#edit-requests", "100").await;
    browser.fill("#edit-window", "60").await;
    browser.fill("#edit-ips", "127.0.0.1/32").await;
    browser.fill("#edit-metadata", r#"{"plan": "gold"}"#).await;
    browser.click("#edit-quota-refill").await;
    browser.click("#edit-submit").await;
    dialog_open(browser, "edit-dialog", false).await;
    let record = env.record(id).await;
    assert_eq!(record["name"], "edited in place", "{record}");
    assert_eq!(record["quota_remaining"], 1000, "topped up");
    assert_eq!(record["scopes"], json!(["read", "write"]));
    assert_eq!(
        record["rate_limit"],
        json!({"requests": 100, "window_seconds": 60})
    );
    assert_eq!(record["allowed_ips"], json!(["127.0.0.1/32"]));
    assert_eq!(record["metadata"], json!({"plan": "gold"}));
    env.assert_admitted(key, "the key after its edit").await;
    refresh_list(browser).await;
    let name = browser
        .text_of(&format!("{} td[data-col=name] .name", row(id)))
        .await;
    assert_eq!(name, "edited in place");

    // Emptied fields remove what they held; nothing changed is said, not sent.
    browser
        .click(&format!("{} button[data-action=edit]", row(id)))
        .await;
    dialog_open(browser, "edit-dialog", true).await;
    browser.fill("#edit-ips", "").await;
    browser.fill("#edit-metadata", "").await;
    browser.click("#edit-submit").await;
    dialog_open(browser, "edit-dialog", false).await;
    let record = env.record(id).await;
    assert!(record["metadata"].is_null(), "{record}");
    assert_eq!(record["allowed_ips"], json!([]));
    browser
        .click(&format!("{} button[data-action=edit]", row(id)))
        .await;
    dialog_open(browser, "edit-dialog", true).await;
    browser.click("#edit-submit").await;
    browser
        .wait_until(
            "document.getElementById('edit-error').textContent === 'Nothing changed.'",
            "the nothing-changed note",
        )
        .await;
    browser.click("#edit-dialog [data-close]").await;
    dialog_open(browser, "edit-dialog", false).await;
}

/// Rotate with a grace period: both keys work, the old one shows as rotated; returns the
/// new key's id and key.
async fn rotate_with_grace(browser: &Browser, env: &Env, id: &str, key: &str) -> (String, String) {
    browser
        .click(&format!("{} button[data-action=rotate]", row(id)))
        .await;
    dialog_open(browser, "rotate-dialog", true).await;
    browser.fill("#rotate-grace", "600").await;
    browser.click("#rotate-submit").await;
    let new_key = take_secret(browser).await;
    assert_ne!(new_key, key);
    env.assert_admitted(key, "the old key in its grace period")
        .await;
    env.assert_admitted(&new_key, "the rotated key").await;
    let successor = records_of(env, "alice")
        .await
        .into_iter()
        .find(|r| r["rotated_from"] == json!(id))
        .expect("the successor's record");
    let new_id = id_of(&successor);
    refresh_list(browser).await;
    assert_eq!(state_of(browser, id).await, "rotated");
    assert_eq!(state_of(browser, &new_id).await, "active");
    (new_id, new_key)
}

/// Revoke, after a confirmation whose safe choice has the focus: refused from then on.
async fn revoke_after_confirming(browser: &Browser, env: &Env, id: &str, key: &str) {
    browser
        .click(&format!("{} button[data-action=revoke]", row(id)))
        .await;
    dialog_open(browser, "revoke-dialog", true).await;
    let focus = "document.activeElement.textContent === 'Cancel'";
    browser.wait_until(focus, "focus on Cancel").await;
    assert!(browser.text_of("#revoke-about").await.contains("alice"));
    browser.click("#revoke-submit").await;
    let revoked = format!(
        "document.querySelector('{}')?.dataset.state === 'revoked'",
        row(id)
    );
    browser.wait_until(&revoked, "the revoked state").await;
    assert_eq!(env.proxied(key).await, (401, "invalid_key".to_string()));
    assert!(browser.text_of("#notice").await.contains("Revoked"));
}

/// The state filter (the API's for revoked, the page's own for rotated); the audit log
/// shows what was done.
async fn filter_and_audit(browser: &Browser) {
    let filter = browser.find("#state-filter").await;
    let only = |state: &str| {
        format!(
            "(() => {{ const rows = document.querySelectorAll('#keys-body tr[data-key-id]'); \
             return rows.length === 1 && rows[0].dataset.state === '{state}'; }})()"
        )
    };
    for state in ["revoked", "rotated"] {
        filter.select_by_value(state).await.expect("select");
        browser.wait_until(&only(state), "filter").await;
    }
    filter.select_by_value("").await.expect("select");
    browser.click("#tab-audit").await;
    let cells = "document.querySelectorAll('#audit-body td[data-col=action]')";
    browser
        .wait_until(&format!("{cells}.length >= 5"), "audit")
        .await;
    let script = format!("return [...{cells}].map(e => e.textContent);");
    let actions = browser.js(&script, vec![]).await;
    assert_eq!(
        actions,
        json!([
            "revoke",
            "rotate",
            "update",
            "refill_quota",
            "update",
            "create",
            "create",
            "create"
        ])
    );
}

#[tokio::test]
async fn a_keys_manage_key_sees_only_its_owners_keys_at_phone_width() {
    let env = Env::start(GENEROUS).await;
    let (manager, manager_key) = env.admin_create("bob", &["keys:manage", "read"]).await;
    let (other_bob, _) = env.admin_create("bob", &["read"]).await;
    let (alice, _) = env.admin_create("alice", &["read"]).await;
    let browser = Browser::start(390, 844).await;
    open_console(&browser, &env).await;
    sign_in(&browser, &manager_key).await;
    assert!(browser.text_of("#whoami").await.contains("bob"));
    let owners =
        "[...document.querySelectorAll('#keys-body td[data-col=owner]')].map(e => e.textContent)";
    assert_eq!(
        browser.js(&format!("return {owners};"), vec![]).await,
        json!(["bob", "bob"])
    );
    assert_eq!(state_of(&browser, &id_of(&other_bob)).await, "active");
    assert_eq!(state_of(&browser, &id_of(&alice)).await, "");
    // The admin's tools are not offered.
    let hidden = "return ['tab-audit', 'owner-filter-field', 'create-owner-field'].map(id => document.getElementById(id).hidden);";
    assert_eq!(browser.js(hidden, vec![]).await, json!([true, true, true]));

    // A key made here inherits the manager's owner and scopes.
    browser.click("#new-key").await;
    dialog_open(&browser, "create-dialog", true).await;
    browser.fill("#create-name", "from my phone").await;
    browser.click("#create-submit").await;
    let key = take_secret(&browser).await;
    env.assert_admitted(&key, "a key made by a keys:manage key")
        .await;
    wait_for_list(&browser, 0).await;
    browser
        .wait_until(&format!("{owners}.length === 3"), "the new key in the list")
        .await;
    browser.screenshot("key-list-phone").await;
    assert_nothing_ran(&browser).await;

    // Signing out forgets the credential, also across a reload.
    browser.click("#sign-out").await;
    browser
        .wait_until(
            "!document.getElementById('sign-in-view').hidden",
            "the sign-in form",
        )
        .await;
    let stored = "return sessionStorage.getItem('keygate.console.token');";
    assert_eq!(browser.js(stored, vec![]).await, Value::Null);
    browser.client.refresh().await.expect("reload");
    browser
        .wait_until(
            "document.documentElement.dataset.ready === 'true'",
            "reload",
        )
        .await;
    assert!(browser.text_of("#keys-view").await.is_empty());

    // A revoked manager key cannot sign in again.
    env.delete(&format!("/keys/{}", id_of(&manager)), Cred::Admin)
        .await
        .ok(200);
    browser.fill("#token", &manager_key).await;
    browser.click("#sign-in").await;
    browser
        .wait_until("!document.getElementById('notice').hidden", "the refusal")
        .await;
    assert!(
        browser
            .text_of("#notice")
            .await
            .contains("code: invalid_key")
    );
    browser.close().await;
}
