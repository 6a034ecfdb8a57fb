//! The operators' web page: `GET /ui`.
//!
//! One static page, its script and its style sheet, embedded in the binary
//! (`include_str!`: no build step, nothing fetched from the network at run
//! time). Loading the page needs no token; it asks the operator for their
//! API token once (kept in the tab's `sessionStorage`) and its script calls
//! the JSON API with `Authorization: Bearer`, like any other client: the
//! page itself grants nothing, and since the browser never attaches the
//! token by itself, another site cannot make it act (no cookies, so no
//! CSRF).
//!
//! What it shows: the key numbers (orders by status, open dead letters,
//! sagas finished per second and the p99 of their duration, from
//! `/metrics`), the sagas by status and age with filters, one saga's steps
//! drawn as a flow with its current step highlighted
//! (`GET /sagas/definition`) and its history, the operator's actions on a
//! parked saga (retry, skip, abort, with a note), and the dead-letter
//! queue with its actions.
//!
//! Every answer carries `X-Content-Type-Options: nosniff`; the page a strict
//! `Content-Security-Policy` ([`CONTENT_SECURITY_POLICY`]: its own origin
//! only, no inline script or style, no framing).

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The page.
const INDEX_HTML: &str = include_str!("../ui/index.html");
/// Its script.
const APP_JS: &str = include_str!("../ui/app.js");
/// Its style sheet.
const APP_CSS: &str = include_str!("../ui/app.css");

/// The `Content-Security-Policy` of the page: scripts, styles and API
/// calls from its own origin only, nothing inline, no plugins, no forms
/// posted anywhere, not framed by another page.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file with its type and the headers every one carries.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui`: the page (no token needed to load it).
pub async fn page() -> Response {
    let mut res = asset("text/html; charset=utf-8", INDEX_HTML);
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    res
}

/// `GET /ui/app.js`: the page's script.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/app.css`: the page's style sheet.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
