//! A real, headless Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`, through fantoccini), for the key console's tests. The driver runs in
//! a process group of its own on a free loopback port, and the guard kills that group, the
//! browser included, however the test ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use super::{eventually, free_port};

const CHROMIUM: &[&str] = &[
    "/usr/lib/chromium/chromium",
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
];
const DRIVER: &[&str] = &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"];
/// How long any one wait for the page may take.
const WAIT: Duration = Duration::from_secs(10);

/// One browser at a time: a Chromium takes a core while it starts and renders, and the
/// rest of the suite (timing tests among it) runs beside it on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn first_existing(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

pub(crate) struct Browser {
    pub client: Client,
    /// Dropped before the profile directory it writes into.
    driver: DriverGuard,
    _profile: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Browser {
    /// A headless Chromium with a fresh profile and a `width` × `height` window. A missing
    /// browser fails the test: it never passes without having run.
    pub(crate) async fn start(width: u32, height: u32) -> Browser {
        let (Some(chromium), Some(driver)) = (first_existing(CHROMIUM), first_existing(DRIVER))
        else {
            panic!(
                "the console tests need Chromium and its WebDriver: run `bash .ci/setup`, or \
                 `apt-get install chromium chromium-driver` (looked for {CHROMIUM:?} and {DRIVER:?})"
            );
        };
        let turn = ONE_AT_A_TIME.lock().await;
        let profile = tempfile::tempdir().expect("profile dir");
        let port = free_port();
        let driver = DriverGuard(Some(spawn_driver(&driver, port, profile.path())));
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        let up = eventually(WAIT, || async {
            let resp = reqwest::get(&status).await;
            resp.is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(up, "chromedriver did not come up on port {port}");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // CI runs as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    // DevTools over a pipe, not a port: a listening browser could take a port
                    // another test picked and has not bound yet (or a restarting gateway's).
                    "--remote-debugging-pipe",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().join("chrome").display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!("a JSON object literal")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("no WebDriver session from chromedriver: {e}"));
        Browser {
            client,
            driver,
            _profile: profile,
            _turn: turn,
        }
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// The element `css` once it is on the page.
    pub(crate) async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    /// Runs `script` (a function body) in the page and returns its result.
    pub(crate) async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits until the expression `condition` is true in the page.
    pub(crate) async fn wait_until(&self, condition: &str, what: &str) {
        let script = format!("return Boolean({condition});");
        let deadline = Instant::now() + WAIT;
        loop {
            if self.js(&script, vec![]).await == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                let notice = self.text_of("#notice").await;
                panic!("waited {WAIT:?} for {what} ({condition}); notice on the page: {notice:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The rendered text of `css` ("" when it is absent or hidden).
    pub(crate) async fn text_of(&self, css: &str) -> String {
        let script = "const e = document.querySelector(arguments[0]); \
                      return e && !e.closest('[hidden]') ? e.innerText : '';";
        match self.js(script, vec![json!(css)]).await {
            Value::String(text) => text,
            _ => String::new(),
        }
    }

    pub(crate) async fn click(&self, css: &str) {
        let element = self.find(css).await;
        element
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Types `value` into the empty field `css`.
    pub(crate) async fn fill(&self, css: &str, value: &str) {
        let element = self.find(css).await;
        element
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        element
            .send_keys(value)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Saves a PNG of the window as `<target>/console-screenshots/<name>.png`.
    pub(crate) async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Ends the WebDriver session (the browser quits), then the driver.
    pub(crate) async fn close(self) {
        let Browser {
            client,
            driver,
            _profile,
            _turn,
        } = self;
        let _ = client.close().await;
        drop(driver);
    }
}

/// Where the screenshots go: `$CARGO_TARGET_DIR`, else the crate's `target/`.
pub(crate) fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-screenshots")
}

fn spawn_driver(driver: &Path, port: u16, profile: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(profile.join("chromedriver.log")).expect("driver log");
    Command::new(driver)
        // Without --allowed-ips chromedriver listens on loopback only.
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // A group of its own, so that the guard can end the browser it starts too.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", driver.display()))
}

/// Kills the driver's process group (driver and browser) when dropped.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Ok(pgid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) with the negated id of the group this test created.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
