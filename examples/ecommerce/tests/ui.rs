//! The operators' page (`GET /ui`) in a real headless Chromium, driven over
//! the DevTools protocol (`headless_chrome`): the in-memory system serves
//! the API on a local port, an order is parked by a warehouse fault, and
//! the operator signs in, finds it, opens it, retries it once the fault is
//! fixed and sees it complete, as a browser shows it.
//!
//! Needs Chromium: Debian's `chromium` (scripts/test.sh installs it when
//! missing), or the binary named by the `CHROME` environment variable.
//! Plain `cargo test` skips it; `scripts/test.sh` runs it
//! (`--include-ignored`). `UI_SCREENSHOTS=DIR` saves what the page showed
//! (the parked saga, then the completed one) as PNG files there.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use headless_chrome::protocol::cdp::types::Event;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use serde_json::{json, Value};

use ecommerce::auth::ApiTokens;
use ecommerce::order::OrderPolicy;
use ecommerce::system::{Config, System};

const OPERATOR: &str = "alice";
const OPERATOR_TOKEN: &str = "operator-alice-token-0001";
const CUSTOMER_TOKEN: &str = "customer-c-42-token-0001";
const NOTE: &str = "the warehouse is back";

/// Chromium's binary: `$CHROME`, else the first of the usual names on the
/// `PATH`.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROME").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let names = [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ];
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no Chromium found: install Debian's `chromium` package \
                 (scripts/test.sh does) or set CHROME to its binary"
            )
        })
}

/// The system in memory, its API on 127.0.0.1 at a free port; the base URL.
async fn serve() -> (Arc<System>, String) {
    // The reservation's attempts give up after 1 s each instead of 10 s, so
    // the faulty order parks in a few seconds of real time.
    let config = Config {
        order: OrderPolicy {
            reserve_timeout: Duration::from_secs(1),
            ..OrderPolicy::default()
        },
        ..Config::default().fast()
    };
    let system = Arc::new(System::start(config).await.expect("the system starts"));
    let tokens = ApiTokens::parse(&format!(
        "operator {OPERATOR} {OPERATOR_TOKEN}\ncustomer c-42 {CUSTOMER_TOKEN}\n"
    ))
    .expect("the test tokens parse");
    let api = ecommerce::http::router(system.clone(), tokens);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a local port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, api).await });
    (system, format!("http://{addr}"))
}

/// `GET base + path` with `token` (if any): the status, headers and body.
async fn get(
    base: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.expect("the API answers");
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    (status, headers, res.text().await.expect("a body"))
}

async fn get_json(base: &str, path: &str) -> Value {
    let (status, _, body) = get(base, path, Some(OPERATOR_TOKEN)).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Polls `cond` every 100 ms for at most `timeout`.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of JavaScript `expression` in the page (`Null` if it has none).
fn eval(tab: &Tab, expression: &str) -> Value {
    tab.evaluate(expression, false)
        .unwrap_or_else(|e| panic!("evaluating {expression}: {e}"))
        .value
        .unwrap_or(Value::Null)
}

/// The text of the element `selector` (empty if there is none).
fn text(tab: &Tab, selector: &str) -> String {
    let js = format!(
        "(document.querySelector({}) || {{}}).textContent || ''",
        json!(selector)
    );
    eval(tab, &js).as_str().unwrap_or_default().to_owned()
}

/// Clicks the element `selector` (waiting for it), as a user would.
fn click(tab: &Tab, selector: &str, what: &str) {
    tab.wait_for_element(selector)
        .and_then(|e| e.click().map(|_| ()))
        .unwrap_or_else(|e| panic!("{what} ({selector}): {e}"));
}

/// With `UI_SCREENSHOTS=DIR`, saves what the page shows as `DIR/NAME.png`
/// (to look at it; nothing is checked).
fn screenshot(tab: &Tab, name: &str) {
    let Some(dir) = std::env::var_os("UI_SCREENSHOTS") else {
        return;
    };
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("a screenshot");
    let path = PathBuf::from(dir).join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn launch() -> Browser {
    let args: Vec<&OsStr> = ["--headless=new", "--no-sandbox", "--disable-gpu"]
        .iter()
        .map(OsStr::new)
        .collect();
    let options = LaunchOptions::default_builder()
        .path(Some(chromium()))
        // --headless=new comes with the args (the crate's own flag is the
        // bare --headless).
        .headless(false)
        .sandbox(false)
        .window_size(Some((1280, 1000)))
        .args(args)
        .idle_browser_timeout(Duration::from_secs(300))
        .build()
        .expect("launch options");
    Browser::new(options).expect("Chromium starts")
}

#[test]
#[ignore = "needs Chromium: scripts/test.sh"]
fn an_operator_retries_a_parked_order_from_the_page_and_sees_it_complete() {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (system, base) = rt.block_on(serve());

    // The page loads without a token, with a strict policy; the API it
    // calls does not.
    let (status, headers, html) = rt.block_on(get(&base, "/ui", None));
    assert_eq!(status, 200, "{html}");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(html.contains("/ui/app.js"), "{html}");
    for (path, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let (status, headers, _) = rt.block_on(get(&base, path, None));
        assert_eq!(status, 200, "{path}");
        assert!(headers["content-type"].to_str().unwrap().starts_with(kind));
        assert_eq!(headers["x-content-type-options"], "nosniff");
    }
    assert_eq!(rt.block_on(get(&base, "/sagas", None)).0, 401);
    assert_eq!(
        rt.block_on(get(&base, "/sagas", Some(CUSTOMER_TOKEN))).0,
        403
    );
    assert_eq!(
        rt.block_on(get(&base, "/sagas/definition", Some(CUSTOMER_TOKEN)))
            .0,
        403
    );

    // The warehouse is down: the order's reservation parks it.
    let inventory = system.inventory.clone().expect("the inventory runs");
    inventory.set_down(Some("the warehouse system is down"));
    let id = rt.block_on(async {
        let res = reqwest::Client::new()
            .post(format!("{base}/orders"))
            .bearer_auth(OPERATOR_TOKEN)
            .json(&json!({"customer_id": "c-42", "items": [{"sku": "MOUSE-001", "quantity": 1}]}))
            .send()
            .await
            .expect("POST /orders");
        assert_eq!(res.status().as_u16(), 202);
        let created: Value = res.json().await.expect("JSON");
        created["order_id"]
            .as_str()
            .expect("an order id")
            .to_owned()
    });
    let parked_at = Instant::now();
    wait_for("the order to park", Duration::from_secs(60), || {
        let page = rt.block_on(get_json(&base, "/sagas?status=parked"));
        page["sagas"][0]["id"] == id.as_str()
    });
    eprintln!("parked after {:?}", parked_at.elapsed());

    eprintln!("{:>6.1?} launching Chromium", started.elapsed());
    let browser = launch();
    let tab = browser.new_tab().expect("a tab");
    tab.set_default_timeout(Duration::from_secs(20));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = errors.clone();
    tab.enable_runtime().expect("Runtime.enable");
    tab.enable_log().expect("Log.enable");
    tab.add_event_listener(Arc::new(move |event: &Event| {
        let error = match event {
            Event::RuntimeExceptionThrown(e) => Some(format!("{:?}", e.params.exception_details)),
            Event::LogEntryAdded(e) => {
                // A refused script or style (CSP), a failed load, …
                let entry = &e.params.entry;
                (format!("{:?}", entry.level).to_lowercase() == "error").then(|| entry.text.clone())
            }
            _ => None,
        };
        if let Some(error) = error {
            seen.lock().unwrap().push(error);
        }
    }))
    .expect("an event listener");

    eprintln!("{:>6.1?} Chromium up", started.elapsed());
    // The page asks for the token, once.
    tab.navigate_to(&format!("{base}/ui"))
        .and_then(|t| t.wait_until_navigated())
        .expect("the page loads");
    tab.wait_for_element("#token").expect("the token prompt");
    assert_eq!(eval(&tab, "document.getElementById('login').hidden"), false);
    assert_eq!(text(&tab, "#login-error"), "", "no error before a token");
    assert_eq!(
        eval(
            &tab,
            "getComputedStyle(document.querySelector('header')).display"
        ),
        "flex",
        "the style sheet applies"
    );
    click(&tab, "#token", "the token field");
    // Typed in one input event, as a paste (key by key takes a quarter of a
    // second a character over the protocol).
    tab.send_character(OPERATOR_TOKEN)
        .expect("typing the token");
    click(&tab, "#login-submit", "signing in");
    wait_for("the page to sign in", Duration::from_secs(20), || {
        eval(&tab, "document.body.dataset.ready") == "true"
    });
    assert_eq!(text(&tab, "#login-error"), "");
    assert_eq!(
        eval(&tab, "sessionStorage.length"),
        1,
        "the token is kept for the tab"
    );
    assert_eq!(text(&tab, "#stat-parked"), "1");

    eprintln!("{:>6.1?} signed in", started.elapsed());
    // Only the parked sagas: the order is there, at the reservation.
    let status = tab.find_element("#filter-status").expect("the filter");
    status
        .call_js_fn("function () { this.value = 'parked'; }", vec![], false)
        .expect("choosing parked");
    click(&tab, "#filter-apply", "filtering");
    let row = format!("tr[data-saga-id={}][data-status=parked]", json!(id));
    tab.wait_for_element(&row).expect("the parked order listed");
    assert!(text(&tab, &row).contains("reserve-inventory"));
    assert!(text(&tab, &row).contains("warehouse system is down"));

    // Its detail: the reservation is the current step.
    click(&tab, &format!("{row} [data-open-saga]"), "opening the saga");
    tab.wait_for_element("#detail-status[data-status=parked]")
        .expect("the parked saga shown");
    assert_eq!(text(&tab, "#detail-id"), id);
    assert_eq!(
        eval(
            &tab,
            "[...document.querySelectorAll('#flow [data-step]')].map(e => e.dataset.step).join(' ')"
        ),
        "create-order reserve-inventory confirm-order notify-confirmation"
    );
    assert_eq!(
        eval(
            &tab,
            "document.querySelector('#flow [aria-current=step]').dataset.step"
        ),
        "reserve-inventory"
    );
    assert!(text(&tab, "#mermaid").starts_with("stateDiagram-v2"));
    assert_eq!(
        eval(&tab, "document.getElementById('saga-actions').hidden"),
        false
    );

    eprintln!("{:>6.1?} the parked saga shown", started.elapsed());
    screenshot(&tab, "parked");
    // The fault is fixed; the operator retries with a note and watches the
    // saga complete.
    inventory.set_down(None);
    click(&tab, "#action-note", "the note field");
    tab.send_character(NOTE).expect("typing the note");
    click(&tab, "#saga-actions [data-action=retry]", "retrying");
    wait_for(
        "the saga to complete in the page",
        Duration::from_secs(30),
        || {
            eval(
                &tab,
                "document.getElementById('detail-status').dataset.status",
            ) == "completed"
        },
    );
    eprintln!("{:>6.1?} completed in the page", started.elapsed());
    assert_eq!(
        eval(&tab, "document.getElementById('saga-actions').hidden"),
        true
    );
    assert_eq!(
        eval(
            &tab,
            "document.querySelectorAll('#flow [aria-current=step]').length"
        ),
        0,
        "a completed saga has no current step"
    );
    screenshot(&tab, "completed");
    let history = text(&tab, "#history");
    assert!(history.contains(OPERATOR), "{history}");
    assert!(history.contains(NOTE), "{history}");
    assert_eq!(text(&tab, "#error"), "");
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "the browser reported errors: {errors:?}");
    drop(tab);
    drop(browser);

    // The API tells the same: the retry is recorded with the operator and
    // the note, and the order is confirmed.
    let saga = rt.block_on(get_json(&base, &format!("/sagas/{id}")));
    let retry = saga["history"]
        .as_array()
        .expect("a history")
        .iter()
        .find(|h| {
            h["what"]
                .as_str()
                .unwrap_or_default()
                .contains("operator: retry")
        })
        .unwrap_or_else(|| panic!("no retry in {saga}"));
    assert_eq!(retry["operator"], OPERATOR);
    assert_eq!(retry["note"], NOTE);
    let order = rt.block_on(get_json(&base, &format!("/orders/{id}")));
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    rt.block_on(system.shutdown());
    eprintln!("the browser test took {:?}", started.elapsed());
}
