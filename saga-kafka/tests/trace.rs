//! Trace context on a real broker: the runtime writes the `traceparent`
//! header on every record of a traced saga, and the participants' spans
//! and handlers run in the saga's trace.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use saga_core::{Envelope, Runtime, SagaStatus, TraceContext};

/// Collects the formatted log lines of this test binary.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn every_record_of_a_traced_saga_has_the_traceparent_header_and_participants_run_in_its_trace(
) {
    // Logs with their span fields, as an operator would search them.
    let lines = Lines::default();
    let sink = lines.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish(),
    )
    .expect("the only subscriber of this test binary");

    let bed = TestBed::new().await;
    let t = &bed.t;
    let rt = bed.runtime("a");
    let (inventory, payments) = bed.run_participants(&rt).await;
    let orders = bed.orders(&rt, Duration::from_millis(100)).await;
    let parent: TraceContext = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        .parse()
        .unwrap();
    let id = orders
        .start_traced("order-traced", Order::new(500), parent)
        .await
        .unwrap();
    let done = orders
        .wait_settled(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed, "{:#?}", done.history);
    assert_eq!(done.trace.map(|c| c.trace_id()), Some(parent.trace_id()));
    rt.shutdown().await;

    // Commands, replies and events: each has the header, it parses, it is
    // in the caller's trace, and it says what the envelope says.
    let mut seen = 0;
    for topic in [&t.inventory, &t.payments, &t.replies(), &t.events] {
        for r in bed.fx.read_committed_records(topic) {
            if r.key != "order-traced" || r.kind.is_some() {
                continue;
            }
            seen += 1;
            let header = r
                .traceparent
                .as_deref()
                .unwrap_or_else(|| panic!("a record on {topic} without traceparent"));
            let ctx = TraceContext::parse(header).unwrap();
            assert_eq!(ctx.trace_id(), parent.trace_id(), "{topic}: {header}");
            let env = Envelope::from_bytes(&r.value).unwrap();
            assert_eq!(env.traceparent, Some(ctx), "{topic}");
        }
    }
    // reserve, pay: two commands and two replies; two events.
    assert!(seen >= 6, "only {seen} records of the saga");
    // The saga's state record keeps its trace (in the JSON; no header:
    // not a message), and goes without the kind header (restored by key).
    let state = bed.fx.read_committed_records(&t.state());
    let last = state
        .iter()
        .rev()
        .find(|r| r.key == "order-traced")
        .expect("the saga's state record");
    assert_eq!((&last.kind, &last.traceparent), (&None, &None));
    let inst: serde_json::Value = serde_json::from_slice(&last.value).unwrap();
    let kept: TraceContext = inst["trace"].as_str().unwrap().parse().unwrap();
    assert_eq!(kept.trace_id(), parent.trace_id());

    // The handlers ran in the trace.
    for traces in [inventory.traces(), payments.traces()] {
        assert!(!traces.is_empty());
        for tr in traces {
            assert_eq!(tr.map(|c| c.trace_id()), Some(parent.trace_id()));
        }
    }
    // And a log search for the trace id finds the participants' lines
    // (their span fields).
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let trace_id = parent.trace_id().to_string();
    let handled: Vec<&str> = text.lines().filter(|l| l.contains("handler ran")).collect();
    assert!(handled.len() >= 2, "{text}");
    for line in &handled {
        assert!(line.contains("saga_kafka.participant"), "{line}");
        assert!(line.contains(&format!("trace_id={trace_id}")), "{line}");
    }
}
