//! Trace context on the in-memory runtime: one saga's commands, replies
//! and events share the trace it was started in, a start with a parent
//! continues the caller's trace, and records written before traces were
//! kept still read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::driver::{decode_state, encode_state, Incoming};
use saga_core::*;
use serde_json::{json, Value};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn job() -> SagaDefinition<Value> {
    SagaDefinition::<Value>::builder("job")
        .step(
            Step::remote("call", "svc.requests")
                .command(|d: &Value| d.clone())
                .on_reply(|ctx, r: Value| {
                    ctx.data_mut()["reply"] = r;
                    ctx.emit("job.events", &json!({"type": "CALLED"}));
                    Ok(())
                })
                .timeout(Duration::from_secs(60)),
        )
        .build()
        .unwrap()
}

/// Answers every command, emits one event, and remembers the trace each
/// attempt ran in.
#[derive(Clone, Default)]
struct Recording {
    seen: Arc<Mutex<Vec<Option<TraceContext>>>>,
}

#[async_trait]
impl Participant for Recording {
    type Command = Value;
    type Reply = Value;
    type Error = StepError;

    async fn handle(&self, _: Value, ctx: &mut ParticipantContext) -> Result<Value, StepError> {
        self.seen.lock().unwrap().push(ctx.trace());
        ctx.emit("svc.events", &json!({"type": "SERVED"}));
        Ok(json!("done"))
    }
}

async fn run(parent: Option<TraceContext>) -> (SagaInstance<Value>, MemoryBackend, Recording) {
    let backend = MemoryBackend::new();
    let runtime = InMemoryRuntime::new(backend.clone());
    let recording = Recording::default();
    runtime
        .participant(
            "svc.requests",
            ParticipantPolicy::new("svc"),
            recording.clone(),
        )
        .await
        .unwrap();
    let jobs = runtime.saga(job()).await.unwrap();
    let id = match parent {
        Some(p) => jobs.start_traced("job-1", json!({"n": 1}), p).await,
        None => jobs.start("job-1", json!({"n": 1})).await,
    }
    .unwrap();
    let done = jobs
        .wait_settled(&id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    runtime.shutdown().await;
    (done, backend, recording)
}

/// Every message of the run, by channel.
fn messages(backend: &MemoryBackend) -> Vec<(&'static str, Envelope)> {
    ["svc.requests", "job.replies", "job.events", "svc.events"]
        .into_iter()
        .flat_map(|ch| backend.messages(ch).into_iter().map(move |e| (ch, e)))
        .collect()
}

#[tokio::test]
async fn a_saga_started_with_a_parent_continues_its_trace_in_every_command_reply_and_event() {
    let parent = TraceContext::parse(PARENT).unwrap();
    let (done, backend, recording) = run(Some(parent)).await;

    let trace = done.trace.expect("the saga keeps its trace");
    assert_eq!(trace.trace_id(), parent.trace_id());
    // The saga's own span (saga.start) is a child of the caller's.
    assert_ne!(trace.span_id(), parent.span_id());

    let all = messages(&backend);
    let channels: Vec<_> = all.iter().map(|(ch, _)| *ch).collect();
    for ch in ["svc.requests", "job.replies", "job.events", "svc.events"] {
        assert!(channels.contains(&ch), "no message on {ch}: {channels:?}");
    }
    for (ch, env) in &all {
        let tp = env
            .traceparent
            .unwrap_or_else(|| panic!("{ch} `{}` has no traceparent", env.id));
        assert_eq!(tp.trace_id(), parent.trace_id(), "{ch} `{}`", env.id);
    }
    let command = &backend.messages("svc.requests")[0];
    let reply = &backend.messages("job.replies")[0];
    // The command comes from the saga's span, the reply from the
    // participant's attempt span: neither is the caller's.
    assert_eq!(command.traceparent, Some(trace));
    assert_ne!(reply.traceparent.unwrap().span_id(), trace.span_id());
    assert_ne!(reply.traceparent.unwrap().span_id(), parent.span_id());
    // The participant's event comes from the same attempt as its reply.
    let served = &backend.messages("svc.events")[0];
    assert_eq!(served.traceparent, reply.traceparent);

    // The handler saw the trace: the attempt's span, in the saga's trace.
    let seen = recording.seen.lock().unwrap().clone();
    assert_eq!(seen, vec![reply.traceparent]);
}

#[tokio::test]
async fn a_saga_started_without_a_parent_begins_a_new_trace_that_all_its_messages_share() {
    let (done, backend, recording) = run(None).await;
    let trace = done.trace.expect("a new trace");
    assert_ne!(
        trace.trace_id(),
        TraceContext::parse(PARENT).unwrap().trace_id()
    );
    for (ch, env) in messages(&backend) {
        assert_eq!(
            env.traceparent.map(|t| t.trace_id()),
            Some(trace.trace_id()),
            "{ch} `{}`",
            env.id
        );
    }
    let seen = recording.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].map(|t| t.trace_id()), Some(trace.trace_id()));

    // Another saga, another trace.
    let (other, _, _) = run(None).await;
    assert_ne!(other.trace.unwrap().trace_id(), trace.trace_id());
}

#[test]
fn a_state_record_written_before_traces_were_kept_still_decodes_without_one() {
    let def = job();
    let t = def
        .start_traced(
            SagaId::new("job-1"),
            json!({"n": 1}),
            Timestamp::from_millis(1_000),
            Some(TraceContext::parse(PARENT).unwrap()),
        )
        .unwrap();
    let bytes = encode_state(&t.instance).unwrap();
    let mut old: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(old["trace"], json!(PARENT), "{old}");
    old.as_object_mut().unwrap().remove("trace");
    let old_bytes = serde_json::to_vec(&old).unwrap();
    let back = decode_state::<Value>("job-1", &old_bytes).unwrap();
    assert_eq!(back.trace, None);
    // Written again, it stays small: no field at all.
    let again: Value = serde_json::from_slice(&encode_state(&back).unwrap()).unwrap();
    assert!(again.get("trace").is_none(), "{again}");
    // A malformed trace does not make the record unreadable.
    old["trace"] = json!("00-garbage");
    let bad = decode_state::<Value>("job-1", &serde_json::to_vec(&old).unwrap()).unwrap();
    assert_eq!(bad.trace, None);
    // The untraced engine start keeps no trace and sends none.
    let plain = def
        .start(SagaId::new("job-2"), json!({}), Timestamp::from_millis(1))
        .unwrap();
    assert_eq!(plain.instance.trace, None);
}

#[test]
fn an_envelope_without_traceparent_decodes_and_leaves_the_field_out() {
    let env = Envelope::event(
        MessageId::new("m-1"),
        "ch",
        SagaId::new("s-1"),
        "job",
        json!({}),
        Timestamp::from_millis(1),
    );
    let json: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
    assert!(json.get("traceparent").is_none(), "{json}");
    assert_eq!(Envelope::from_bytes(&env.to_bytes()).unwrap(), env);
    let traced = env.with_traceparent(Some(TraceContext::parse(PARENT).unwrap()));
    let json: Value = serde_json::from_slice(&traced.to_bytes()).unwrap();
    assert_eq!(json["traceparent"], json!(PARENT));
}

#[test]
fn a_traceparent_header_wins_over_the_field_and_a_malformed_one_falls_back_to_it() {
    let field = TraceContext::parse(PARENT).unwrap();
    let env = Envelope::event(
        MessageId::new("m-1"),
        "ch",
        SagaId::new("s-1"),
        "job",
        json!({}),
        Timestamp::from_millis(1),
    )
    .with_traceparent(Some(field));
    let bytes = env.to_bytes();
    let header = TraceContext::root().to_header();
    let rec = |traceparent: Option<&'static [u8]>| Incoming {
        topic: "ch",
        partition: 0,
        offset: 0,
        key: Some(b"s-1"),
        value: Some(Box::leak(bytes.clone().into_boxed_slice())),
        kind: None,
        traceparent,
    };
    let header: &'static [u8] = Box::leak(Box::new(header));
    let from_header = rec(Some(header)).envelope().unwrap();
    assert_eq!(
        from_header.traceparent,
        Some(TraceContext::from_bytes(header).unwrap())
    );
    let malformed = rec(Some(b"00-not-a-trace")).envelope().unwrap();
    assert_eq!(malformed.traceparent, Some(field));
    let none = rec(None).envelope().unwrap();
    assert_eq!(none.traceparent, Some(field));
}
