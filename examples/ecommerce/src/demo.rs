//! The embedded demo: the whole system in this process on the in-memory
//! runtime, playing the seed's three flows through the HTTP API (in
//! process, no socket), then printing each order's timeline, the stock,
//! the analytics and the dead-letter queue.
//!
//! Like `serve` without configured tokens, it generates API tokens for an
//! operator and its customers, prints them, and calls the API with them:
//! each order with its customer's token, the DLQ action with the
//! operator's.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::auth::{ApiTokens, Role};
use crate::notification::FakeOutcome;
use crate::system::{Config, System};

/// Calls the API in process with bearer `token` (none: no
/// `Authorization` header): `(status, JSON body)`. The body, if any, is
/// sent as `application/json`; so is an empty `POST`.
pub async fn call(
    router: &Router,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if body.is_some() || method == "POST" {
        req = req.header("content-type", "application/json");
    }
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(match body {
        Some(b) => Body::from(b.to_string()),
        None => Body::empty(),
    });
    let req = match req {
        Ok(req) => req,
        // A method, path or token that cannot be in a request.
        Err(e) => return (StatusCode::BAD_REQUEST, Value::String(e.to_string())),
    };
    let res = router
        .clone()
        .oneshot(req)
        .await
        .expect("the router is infallible");
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

/// What the demo ended with (for tests).
#[derive(Debug, Default)]
pub struct Outcome {
    /// The three order ids, in flow order.
    pub orders: Vec<String>,
}

struct Flow {
    title: &'static str,
    explain: &'static str,
    customer: &'static str,
    items: Value,
}

fn flows() -> Vec<Flow> {
    vec![
        Flow {
            title: "Flow 1: a successful order",
            explain: "1 laptop and 2 mice, at the catalogue's prices (999.99 and 29.99): stock is \
                      reserved, the order is CONFIRMED, the email goes out.",
            customer: "c-ana",
            items: json!([
                {"sku": "LAPTOP-001", "quantity": 1},
                {"sku": "MOUSE-001", "quantity": 2}
            ]),
        },
        Flow {
            title: "Flow 2: not enough stock",
            explain: "100 laptops (50 on hand, 1 already reserved by flow 1): the inventory refuses and changes \
                      nothing; the order is CANCELLED with the reason and the customer is told.",
            customer: "c-ben",
            items: json!([{"sku": "LAPTOP-001", "quantity": 100}]),
        },
        Flow {
            title: "Flow 3: the email provider fails -> dead-letter queue",
            explain: "The order is CONFIRMED, but the email API times out, then answers 503, then 500. \
                      After 3 attempts (5 s timeout each, 2 s then 4 s apart: about 11 s) the request \
                      goes to notifications.dlq. The order stays CONFIRMED.",
            customer: "c-eva",
            items: json!([
                {"sku": "KEYBOARD-001", "quantity": 1},
                {"sku": "MOUSE-001", "quantity": 1}
            ]),
        },
    ]
}

/// The operator the demo acts as.
pub const DEMO_OPERATOR: &str = "demo-operator";

/// Runs the demo, writing to `out`. Takes about 11 s of (tokio) time,
/// almost all of it the notification retries of flow 3.
pub async fn run(out: &mut dyn Write) -> Result<Outcome, String> {
    let io = |e: std::io::Error| e.to_string();
    let system = Arc::new(System::start(Config::default()).await?);
    let customers: Vec<&str> = flows().iter().map(|f| f.customer).collect();
    let tokens = ApiTokens::generate(DEMO_OPERATOR, &customers);
    // Who got which token (the router takes the tokens).
    let issued: Vec<(Role, String, String)> = tokens
        .callers()
        .filter_map(|c| {
            let t = tokens.token_of(c.role, &c.name)?;
            Some((c.role, c.name.clone(), t.to_owned()))
        })
        .collect();
    let token = |role: Role, name: &str| {
        issued
            .iter()
            .find(|(r, n, _)| *r == role && n == name)
            .map(|(_, _, t)| t.clone())
            .ok_or_else(|| format!("no demo token for {} `{name}`", role.as_str()))
    };
    let operator = token(Role::Operator, DEMO_OPERATOR)?;
    let mut outcome = Outcome::default();

    writeln!(
        out,
        "E-commerce saga demo: order, inventory, notification, analytics and DLQ services"
    )
    .map_err(io)?;
    writeln!(
        out,
        "on the in-memory runtime, driven through the HTTP API in this process.\n"
    )
    .map_err(io)?;
    writeln!(
        out,
        "API tokens generated for this run (`serve` does the same when none are configured):"
    )
    .map_err(io)?;
    for (role, name, t) in &issued {
        writeln!(out, "  {:<8} {name:<13} {t}", role.as_str()).map_err(io)?;
    }
    writeln!(
        out,
        "(every request carries `Authorization: Bearer <token>`; against `serve`, e.g.\n  \
         curl -s -H 'Authorization: Bearer {operator}' http://127.0.0.1:8080/dlq)\n"
    )
    .map_err(io)?;
    let api = crate::http::router(system.clone(), tokens);

    for (n, flow) in flows().into_iter().enumerate() {
        writeln!(out, "=== {} ===", flow.title).map_err(io)?;
        writeln!(out, "{}", flow.explain).map_err(io)?;
        if n == 2 {
            // The third order's email: timeout, 503, 500 (the seed's flow 3).
            system.email.script([
                FakeOutcome::Timeout,
                FakeOutcome::Status(503),
                FakeOutcome::Status(500),
            ]);
        }
        let body = json!({"customer_id": flow.customer, "items": flow.items});
        let customer = token(Role::Customer, flow.customer)?;
        writeln!(out, "POST /orders {body}  (as customer {})", flow.customer).map_err(io)?;
        let (status, created) = call(&api, Some(&customer), "POST", "/orders", Some(body)).await;
        writeln!(out, "  -> {} {created}", status.as_u16()).map_err(io)?;
        if status != StatusCode::ACCEPTED {
            return Err(format!("POST /orders answered {status}: {created}"));
        }
        let id = created["order_id"].as_str().unwrap_or_default().to_owned();
        if !system.wait_idle(Duration::from_secs(60)).await {
            return Err(format!("order {id} did not settle within 60 s"));
        }
        let path = format!("/orders/{id}");
        let (_, order) = call(&api, Some(&customer), "GET", &path, None).await;
        writeln!(out, "GET /orders/{id}").map_err(io)?;
        let mut summary = format!(
            "  -> status {}, total {}",
            order["status"].as_str().unwrap_or("?"),
            order["total"].as_str().unwrap_or("?")
        );
        if let Some(reason) = order["reason"].as_str() {
            summary.push_str(&format!(", reason \"{reason}\""));
        }
        if let Some(n) = order.get("notification") {
            summary.push_str(&format!(
                ", email {} after {} attempt(s)",
                n["status"].as_str().unwrap_or("?"),
                n["attempts"]
            ));
        }
        writeln!(out, "{summary}").map_err(io)?;
        writeln!(out, "Timeline of {id}:").map_err(io)?;
        write!(
            out,
            "{}",
            crate::timeline::render(&crate::timeline::of(&system, &id).await)
        )
        .map_err(io)?;
        writeln!(out).map_err(io)?;
        outcome.orders.push(id);
    }

    writeln!(out, "=== Orders ===").map_err(io)?;
    for id in &outcome.orders {
        let path = format!("/orders/{id}");
        let (_, o) = call(&api, Some(&operator), "GET", &path, None).await;
        let mut line = format!(
            "{id}  {:<9}  total {:>9}",
            o["status"].as_str().unwrap_or("?"),
            o["total"].as_str().unwrap_or("?")
        );
        if let Some(r) = o["reason"].as_str() {
            line.push_str(&format!("  reason: {r}"));
        }
        if let Some(n) = o.get("notification") {
            line.push_str(&format!(
                "  email: {} ({} attempt(s))",
                n["status"].as_str().unwrap_or("?"),
                n["attempts"]
            ));
            if n["status"] == "FAILED" {
                line.push_str(" -> notifications.dlq; order stays CONFIRMED");
            }
        }
        writeln!(out, "{line}").map_err(io)?;
    }

    writeln!(out, "\n=== Inventory (GET /inventory) ===").map_err(io)?;
    for l in system.inventory().levels() {
        writeln!(
            out,
            "{:<13} on hand {:>4}  reserved {:>3}  available {:>4}",
            l.sku, l.on_hand, l.reserved, l.available
        )
        .map_err(io)?;
    }

    writeln!(out, "\n=== Analytics (GET /analytics) ===").map_err(io)?;
    let a = system.analytics().summary();
    let reasons: Vec<String> = a
        .cancellation_reasons
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for (k, v) in [
        ("orders.created", a.orders_created.to_string()),
        ("orders.confirmed", a.orders_confirmed.to_string()),
        ("orders.cancelled", a.orders_cancelled.to_string()),
        ("revenue.confirmed", a.revenue_confirmed.to_string()),
        ("revenue.lost", a.revenue_lost.to_string()),
        ("notifications.sent", a.notifications_sent.to_string()),
        ("notifications.failed", a.notifications_failed.to_string()),
        ("cancellation_reasons", reasons.join(", ")),
    ] {
        writeln!(out, "{k:<22} {v}").map_err(io)?;
    }

    writeln!(
        out,
        "(the fake email API delivered {} email(s))",
        system.email.sent().len()
    )
    .map_err(io)?;

    writeln!(out, "\n=== Dead-letter queue (GET /dlq) ===").map_err(io)?;
    let entries = system.dlq().list();
    for e in &entries {
        let d = &e.dead_letter;
        writeln!(
            out,
            "{} [{}] order {} from `{}` on {}\n    reason: {}\n    retry_count: {}  last_error: {}  failure_timestamp: {}\n    original: {} {}",
            e.dlq_id,
            e.status,
            e.order_id,
            d.source,
            d.channel,
            d.reason,
            d.retry_count,
            d.last_error,
            d.failure_timestamp,
            d.original.channel,
            d.original.payload
        )
        .map_err(io)?;
    }
    if let Some(first) = entries.first() {
        let path = format!("/dlq/{}/sms", first.dlq_id);
        writeln!(
            out,
            "\nThe operator ({DEMO_OPERATOR}, by its token) uses the fallback channel: POST {path}"
        )
        .map_err(io)?;
        let (status, entry) = call(&api, Some(&operator), "POST", &path, None).await;
        writeln!(out, "  -> {} {entry}", status.as_u16()).map_err(io)?;
        for sms in system.dlq().sms_gateway().sent() {
            writeln!(out, "  SMS to {}: \"{}\"", sms.to, sms.text).map_err(io)?;
        }
        writeln!(out, "(other actions: POST /dlq/{{id}}/retry with an optional corrected payload, /discard, /alert;").map_err(io)?;
        writeln!(out, " or `cargo run --example ecommerce -- dlq list|show|retry|discard|alert|sms` against `serve`)").map_err(io)?;
    }
    system.shutdown().await;
    Ok(outcome)
}
