//! Headless Chromium for the web-page tests, driven over WebDriver: a
//! `chromedriver` (Debian's `chromium-driver`) on a free loopback port, and one
//! browser session per simulated user. Every session gets its own temporary
//! profile, so sessions have separate cookie jars exactly like two people on
//! two machines. Screenshots go to `target/<profile>/test-artifacts/`.

use crate::eventually;
use crate::process::{free_port, target_dir, Process};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// How long a page may take to reach a state; generous, since two cores run
/// Chromium, the cluster and other tests at once. Nothing asserts speed.
pub const PAGE_WAIT: Duration = Duration::from_secs(30);

/// Set to skip the browser tests on a machine without Chromium (scripts/test.sh
/// installs it, so CI never skips).
pub const SKIP_VAR: &str = "SWITCHBOARD_SKIP_BROWSER_TESTS";

/// Ports chromedriver is started on before a test gives up.
const DRIVER_ATTEMPTS: usize = 3;

/// Waits until chromedriver answers `/status`, for up to 60 s; false as soon
/// as it has exited (its port was taken) or when the time is up.
async fn driver_ready(process: &mut Process, driver_url: &str) -> bool {
    let http = reqwest::Client::new();
    let status = format!("{driver_url}/status");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if http.get(&status).send().await.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
        if process.has_exited() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

pub struct Browser {
    driver_url: String,
    chromium: PathBuf,
    _driver: Process,
}

impl Browser {
    /// Starts chromedriver. Returns `None` only when Chromium is missing and
    /// the skip variable is set; otherwise a missing browser fails the test.
    pub async fn start() -> Option<Self> {
        let driver = find_program(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
        // Debian's /usr/bin/chromium is a shell wrapper; the real binary starts faster.
        let chromium = find_program(&["/usr/lib/chromium/chromium", "/usr/bin/chromium"]);
        let (Some(driver), Some(chromium)) = (driver, chromium) else {
            if std::env::var_os(SKIP_VAR).is_some() {
                eprintln!("SKIPPING browser test: chromium or chromedriver missing and {SKIP_VAR} is set");
                return None;
            }
            panic!(
                "chromium and chromedriver are required (apt-get install chromium chromium-driver; \
                 scripts/test.sh installs them), or set {SKIP_VAR}=1 to skip"
            );
        };
        // A port chosen by `free_port` can be taken (by another test's
        // listener or an outgoing connection's local port) before chromedriver
        // binds it; chromedriver then exits. Try a few ports, and give one
        // that is merely slow (two cores, other Chromiums starting) time.
        let mut failures = Vec::new();
        for _ in 0..DRIVER_ATTEMPTS {
            let port = free_port();
            let args = vec![format!("--port={port}"), "--allowed-ips=127.0.0.1".to_string()];
            let mut process = Process::spawn_program(&driver, "chromedriver", &args);
            let driver_url = format!("http://127.0.0.1:{port}");
            if driver_ready(&mut process, &driver_url).await {
                return Some(Browser { driver_url, chromium, _driver: process });
            }
            failures.push(format!("port {port}: {}", process.log_text().trim()));
        }
        panic!("chromedriver did not start in {DRIVER_ATTEMPTS} attempts:\n{}", failures.join("\n"));
    }

    /// A new browser session (own profile, own cookies) with a window of the
    /// given size in CSS pixels.
    pub async fn session(&self, width: u32, height: u32) -> Client {
        self.session_with(width, height, &[]).await
    }

    /// A session with extra Chromium flags (for example
    /// `--ignore-certificate-errors` for a test certificate).
    pub async fn session_with(&self, width: u32, height: u32, extra: &[&str]) -> Client {
        let mut args = vec![
            "--headless=new".to_string(),
            // The tests run as root in a container: Chromium's sandbox needs
            // user namespaces we may not have, and /dev/shm may be tiny.
            "--no-sandbox".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--disable-gpu".to_string(),
            "--no-first-run".to_string(),
            "--no-default-browser-check".to_string(),
            "--disable-extensions".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--no-proxy-server".to_string(),
            "--hide-scrollbars".to_string(),
            format!("--window-size={width},{height}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": self.chromium, "args": args },
        });
        let Value::Object(caps) = caps else { unreachable!("a JSON object literal") };
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let client = builder.connect(&self.driver_url).await.unwrap_or_else(|e| panic!("new Chromium session: {e}"));
        client.set_window_size(width, height).await.unwrap_or_else(|e| panic!("window size: {e}"));
        client
    }
}

impl Browser {
    /// Sends a Chrome DevTools Protocol command to `client`'s browser through
    /// chromedriver's `goog/cdp/execute` endpoint.
    pub async fn cdp(&self, client: &Client, cmd: &str, params: Value) -> Value {
        let session = client.session_id().await.ok().flatten().expect("a WebDriver session id");
        let url = format!("{}/session/{session}/goog/cdp/execute", self.driver_url);
        let resp = reqwest::Client::new()
            .post(&url)
            .json(&json!({ "cmd": cmd, "params": params }))
            .send()
            .await
            .unwrap_or_else(|e| panic!("CDP {cmd}: {e}"));
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        assert!(status.is_success(), "CDP {cmd} failed: {status} {body}");
        body["value"].clone()
    }

    /// A session whose pages see a `WebSocket` that never connects, as behind
    /// a proxy that drops upgrades: the page must fall back to long polling.
    pub async fn session_without_websockets(&self, width: u32, height: u32) -> Client {
        let client = self.session(width, height).await;
        let source = r#"window.WebSocket = class {
            constructor() { this.readyState = 3; setTimeout(() => this.onclose && this.onclose({ code: 1006, wasClean: false }), 20); }
            send() { throw new Error("WebSocket is closed"); }
            close() {}
        };
        window.WebSocket.OPEN = 1;"#;
        self.cdp(&client, "Page.addScriptToEvaluateOnNewDocument", json!({ "source": source })).await;
        client
    }
}

/// Runs `script` (a function body that `return`s a value) in the page.
pub async fn eval(client: &Client, script: &str) -> Value {
    client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Polls `script` until `accept` returns `Some`, or panics after PAGE_WAIT.
pub async fn eval_until<T>(client: &Client, what: &str, script: &str, accept: impl Fn(&Value) -> Option<T>) -> T {
    eventually(PAGE_WAIT, what, || async {
        let v = client.execute(script, vec![]).await.ok()?;
        accept(&v)
    })
    .await
}

/// Types `text` into the element matching `css` (after clearing it).
pub async fn type_into(client: &Client, css: &str, text: &str) {
    let field = client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no {css}: {e}"));
    field.clear().await.unwrap_or_else(|e| panic!("clear {css}: {e}"));
    field.send_keys(text).await.unwrap_or_else(|e| panic!("type into {css}: {e}"));
}

pub async fn click(client: &Client, css: &str) {
    let el = client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no {css}: {e}"));
    el.click().await.unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Where screenshots are kept after the test run.
pub fn artifacts_dir() -> PathBuf {
    let dir = target_dir().join("test-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Saves a PNG of the session's window under `test-artifacts/<name>.png`.
pub async fn screenshot(client: &Client, name: &str) -> PathBuf {
    let png = client.screenshot().await.unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
    assert!(png.starts_with(b"\x89PNG"), "screenshot {name} is not a PNG");
    let path = artifacts_dir().join(format!("{name}.png"));
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
