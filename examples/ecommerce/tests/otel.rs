//! With the feature `otel`: one order through the HTTP API (in memory)
//! exports spans from the API handler, the saga, the participants and the
//! notification attempt, all in one trace: the caller's.
#![cfg(feature = "otel")]

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

use ecommerce::auth::ApiTokens;
use ecommerce::system::{Config, System};

const TOKEN: &str = "operator-alice-token-0001";
const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[tokio::test(start_paused = true)]
async fn one_order_exports_the_api_saga_participant_and_notification_spans_in_one_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test"))),
    )
    .expect("the only subscriber of this test binary");

    let system = Arc::new(System::start(Config::default()).await.unwrap());
    let tokens = ApiTokens::parse(&format!("operator alice {TOKEN}\n")).unwrap();
    let api = ecommerce::http::router(system.clone(), tokens);
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/orders")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .header("traceparent", PARENT)
        .body(axum::body::Body::from(
            json!({"customer_id": "c-42", "items": [
                {"sku": "LAPTOP-001", "quantity": 1, "unit_price": "999.99"}
            ]})
            .to_string(),
        ))
        .unwrap();
    let res = tower::ServiceExt::oneshot(api.clone(), req).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(system.wait_idle(Duration::from_secs(60)).await);
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let of = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    for name in [
        "api.create_order",
        "saga.start",
        "saga.step",
        "saga.reply",
        "participant.attempt",
        "notification.send",
    ] {
        let found = of(name);
        assert!(
            !found.is_empty(),
            "no `{name}` span among {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        for s in found {
            assert_eq!(
                s.span_context.trace_id().to_string(),
                trace_id,
                "`{name}` is in another trace"
            );
        }
    }
    // The tree: caller → API → saga.start; each participant attempt's
    // parent is a span of the trace that was exported (or the caller's).
    let api_span = of("api.create_order")[0];
    assert_eq!(
        api_span.parent_span_id.to_string(),
        "b7ad6b7169203331",
        "the API span's parent is the caller's span"
    );
    // (The driver's `saga.start`; the engine's, inside it, has the same name.)
    assert!(
        of("saga.start")
            .iter()
            .any(|s| s.parent_span_id == api_span.span_context.span_id()),
        "no saga.start under the API span"
    );
    let ids: Vec<_> = spans.iter().map(|s| s.span_context.span_id()).collect();
    for s in of("participant.attempt")
        .into_iter()
        .chain(of("saga.reply"))
    {
        assert!(
            ids.contains(&s.parent_span_id),
            "`{}`'s parent {} was not exported",
            s.name,
            s.parent_span_id
        );
    }
    // One trace for the whole order: every span of the run is in it.
    for s in &spans {
        assert_eq!(
            s.span_context.trace_id().to_string(),
            trace_id,
            "`{}` is in another trace",
            s.name
        );
    }
}
