//! The in-memory runtime on tokio's paused (virtual) clock: crash and
//! restart with sagas waiting on timers, redelivered commands, participant
//! retries and dead letters, projections.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::driver::TimerKind;
use saga_core::testing::{eventually, Scripted, ScriptedParticipant};
use saga_core::*;
use serde_json::{json, Value};

fn call_saga(backoff: Duration) -> SagaDefinition<Value> {
    SagaDefinition::<Value>::builder("job")
        .step(
            Step::remote("call", "svc.requests")
                .command(|d: &Value| d.clone())
                .on_reply(|ctx, r: Value| {
                    ctx.data_mut()["reply"] = r;
                    ctx.emit("job.events", &json!({"type": "CALLED"}));
                    Ok(())
                })
                .retry(RetryPolicy::fixed(backoff).with_max_attempts(5))
                .timeout(Duration::from_secs(60)),
        )
        .build()
        .unwrap()
}

/// Runs `participant` on `svc.requests` and the `job` saga (retried every
/// `backoff`) on `runtime`.
async fn serve<P: Participant>(
    runtime: &InMemoryRuntime,
    participant: P,
    backoff: Duration,
) -> SagaHandle<Value> {
    runtime
        .participant("svc.requests", ParticipantPolicy::new("svc"), participant)
        .await
        .unwrap();
    runtime.saga(call_saga(backoff)).await.unwrap()
}

/// Waits (in tokio time) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    eventually(what, Duration::from_secs(600), || std::future::ready(f())).await
}

#[tokio::test(start_paused = true)]
async fn sagas_waiting_on_backoff_timers_resume_after_a_crash() {
    let backend = MemoryBackend::new();
    let clock = Clock::system();
    // The participant is busy: every first attempt fails retryably and each
    // saga then waits 30 s on a persisted backoff timer.
    let busy = ScriptedParticipant::new(Scripted::Retryable("busy".into()));
    let runtime = InMemoryRuntime::with_clock(backend.clone(), clock);
    runtime
        .participant("svc.requests", ParticipantPolicy::new("svc"), busy.clone())
        .await
        .unwrap();
    let jobs = runtime
        .saga(call_saga(Duration::from_secs(30)))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            jobs.start(format!("job-{i}"), json!({"n": i}))
                .await
                .unwrap(),
        );
    }
    eventually(
        "every saga waiting on a backoff",
        Duration::from_secs(600),
        || async {
            let mut all = true;
            for id in &ids {
                let inst = jobs.get(id).await.unwrap().unwrap();
                all &= inst
                    .timers
                    .iter()
                    .any(|t| matches!(t.kind, TimerKind::Backoff { .. }));
            }
            all
        },
    )
    .await;
    let crash_at = clock.now();
    drop(runtime); // crash: workers stop between two atomic sections

    assert_eq!(busy.received().len(), 20, "each first attempt ran once");
    // A new runtime over the same backend, the participant back in shape.
    let participant = ScriptedParticipant::new(Scripted::Reply(json!("ok")));
    let runtime = InMemoryRuntime::with_clock(backend.clone(), clock);
    let jobs = serve(&runtime, participant.clone(), Duration::from_secs(30)).await;
    for id in &ids {
        let done = jobs
            .wait_settled(id, Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(done.status, SagaStatus::Completed, "{id}");
        assert_eq!(done.data["reply"], json!("ok"));
        assert_eq!(
            done.steps[0].attempts, 2,
            "{id}: one busy attempt, one retry"
        );
    }
    // The retries fired at their persisted times, not at restart.
    let elapsed = clock.now().saturating_since(crash_at);
    assert!(
        elapsed >= Duration::from_secs(25),
        "timers fired early: {elapsed:?} after the crash"
    );
    // The retry of each saga reached the participant as a new command (the
    // busy attempt's id, already answered, would not have run again).
    assert_eq!(backend.messages("svc.requests").len(), 40);
    let first: std::collections::HashSet<String> = busy
        .received()
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    let second: std::collections::HashSet<String> = participant
        .received()
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(second.len(), 20, "each retry ran once");
    assert!(
        first.is_disjoint(&second),
        "every attempt is a distinct command"
    );
    assert_eq!(
        backend.messages("job.events").len(),
        20,
        "one event per saga"
    );
    runtime.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn redelivered_commands_and_replies_are_applied_once() {
    let backend = MemoryBackend::new();
    backend.duplicate_deliveries("svc.requests", true);
    backend.duplicate_deliveries("job.replies", true);
    let participant = ScriptedParticipant::new(Scripted::Reply(json!("ok")));
    let runtime = InMemoryRuntime::new(backend.clone());
    let jobs = serve(&runtime, participant.clone(), Duration::from_secs(1)).await;
    for i in 0..10 {
        let id = jobs.start(format!("dup-{i}"), json!({})).await.unwrap();
        assert_eq!(
            jobs.wait_settled(&id, Duration::from_secs(60))
                .await
                .unwrap()
                .status,
            SagaStatus::Completed
        );
    }
    until("all duplicates consumed", || {
        backend.lag("svc", "svc.requests") == 0 && backend.lag("job", "job.replies") == 0
    })
    .await;
    assert_eq!(
        backend.messages("svc.requests").len(),
        20,
        "every command was delivered twice"
    );
    assert_eq!(participant.received().len(), 10, "but handled once");
    assert_eq!(
        backend.messages("job.events").len(),
        10,
        "and every saga moved on once"
    );
    runtime.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn participant_retries_with_backoff_then_dead_letters_with_metadata() {
    let backend = MemoryBackend::new();
    let clock = Clock::system();
    let email = ScriptedParticipant::new(Scripted::Retryable("500 Internal Server Error".into()))
        .then(Scripted::Hang)
        .then(Scripted::Retryable("503 Service Unavailable".into()));
    let runtime = InMemoryRuntime::with_clock(backend.clone(), clock);
    let policy = ParticipantPolicy::new("notifications")
        .retry(RetryPolicy::exponential(Duration::from_secs(2), 2.0).with_max_attempts(3))
        .timeout(Duration::from_secs(5))
        .dead_letter_channel("notifications.dlq");
    runtime
        .participant("notifications.requests", policy, email.clone())
        .await
        .unwrap();
    let start = clock.now();
    backend.publish(Envelope::command(
        MessageId::new("mail-1"),
        "notifications.requests",
        SagaId::new("order-3"),
        "order",
        json!({"to": "c-42"}),
        start,
    ));
    until("the dead letter", || {
        !backend.dead_letters("notifications.dlq").is_empty()
    })
    .await;
    let dead = &backend.dead_letters("notifications.dlq")[0];
    assert_eq!(dead.retry_count, 3);
    assert_eq!(dead.original.id.as_str(), "mail-1");
    assert_eq!(dead.original.payload, json!({"to": "c-42"}));
    assert_eq!(dead.last_error, "500 Internal Server Error");
    assert!(dead.reason.contains("max retries"), "{}", dead.reason);
    assert_eq!(dead.source, "notifications");
    // 5 s timeout + 2 s + fail + 4 s + fail = 11 s of virtual time.
    let took = dead.failure_timestamp.saturating_since(start);
    assert!(
        took >= Duration::from_secs(11) && took < Duration::from_secs(12),
        "{took:?}"
    );
    assert_eq!(email.received().len(), 3);
    runtime.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_poison_command_is_dead_lettered_and_does_not_block_the_partition() {
    #[derive(serde::Deserialize)]
    struct Strict {
        #[allow(dead_code)]
        amount: u64,
    }
    struct Typed(Arc<Mutex<u32>>);
    #[async_trait::async_trait]
    impl Participant for Typed {
        type Command = Strict;
        type Reply = ();
        type Error = StepError;
        async fn handle(&self, _: Strict, _: &mut ParticipantContext) -> Result<(), StepError> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
    }
    let backend = MemoryBackend::with_partitions(1);
    let runtime = InMemoryRuntime::new(backend.clone());
    let count = Arc::new(Mutex::new(0));
    runtime
        .participant("pay", ParticipantPolicy::new("pay"), Typed(count.clone()))
        .await
        .unwrap();
    for (id, payload) in [("bad", json!("garbage")), ("good", json!({"amount": 5}))] {
        backend.publish(Envelope::event(
            MessageId::new(id),
            "pay",
            SagaId::new(id),
            "x",
            payload,
            Timestamp::EPOCH,
        ))
    }
    // Events on a command channel are not commands: both are dead-lettered.
    until("both handled", || backend.lag("pay", "pay") == 0).await;
    assert_eq!(backend.dead_letters("pay.dlq").len(), 2);
    let mut cmd = Envelope::command(
        MessageId::new("c-bad"),
        "pay",
        SagaId::new("a"),
        "x",
        json!("garbage"),
        Timestamp::EPOCH,
    );
    backend.publish(cmd.clone());
    cmd.id = MessageId::new("c-good");
    cmd.payload = json!({"amount": 5});
    backend.publish(cmd);
    until("the good command", || *count.lock().unwrap() == 1).await;
    let dead = backend.dead_letters("pay.dlq");
    assert_eq!(dead.len(), 3);
    assert!(
        dead[2].last_error.contains("cannot decode command `c-bad`"),
        "{}",
        dead[2].last_error
    );
    assert_eq!(dead[2].reason, "permanent error");
    runtime.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn projections_see_every_event_in_order_per_saga() {
    let backend = MemoryBackend::new();
    let runtime = InMemoryRuntime::new(backend.clone());
    runtime
        .participant(
            "svc.requests",
            ParticipantPolicy::new("svc"),
            ScriptedParticipant::new(Scripted::Reply(json!(1))),
        )
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    runtime
        .projection("audit", &["job.events"], move |e| {
            sink.lock().unwrap().push(e.saga_id.clone())
        })
        .await
        .unwrap();
    let jobs = runtime
        .saga(call_saga(Duration::from_secs(1)))
        .await
        .unwrap();
    for i in 0..30 {
        jobs.start(format!("p-{i}"), json!({})).await.unwrap();
    }
    until("30 events projected", || seen.lock().unwrap().len() == 30).await;
    let mut ids = seen.lock().unwrap().clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30);
    assert_eq!(backend.lag("audit", "job.events"), 0);
    runtime.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn starting_the_same_saga_twice_returns_the_first_one() {
    let runtime = InMemoryRuntime::new(MemoryBackend::new());
    let jobs = runtime
        .saga(call_saga(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(
        jobs.start("once", json!({"n": 1})).await.unwrap().as_str(),
        "once"
    );
    let again = jobs.start("once", json!({"n": 2})).await.unwrap();
    assert_eq!(again.as_str(), "once");
    assert_eq!(
        runtime.backend().messages("svc.requests").len(),
        1,
        "the second start sent nothing"
    );
    let saga = jobs.get(&SagaId::new("once")).await.unwrap().unwrap();
    assert_eq!(saga.data, json!({"n": 1}), "the first start's data stays");
    runtime.shutdown().await;
}

/// A participant with per-partition state: how many commands each partition served.
#[derive(Default)]
struct Counter(Mutex<std::collections::HashMap<u32, u64>>);

#[async_trait::async_trait]
impl Participant for Counter {
    type Command = Value;
    type Reply = u64;
    type Error = StepError;
    async fn handle(&self, _: Value, ctx: &mut ParticipantContext) -> Result<u64, StepError> {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(ctx.partition()).or_default();
        *n += 1;
        Ok(*n)
    }
    fn snapshot(&self, partition: u32) -> Option<Value> {
        self.0.lock().unwrap().get(&partition).map(|n| json!(n))
    }
    fn restore(
        &self,
        partition: u32,
        snapshot: Option<Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let n = snapshot.and_then(|v| v.as_u64()).unwrap_or(0);
        self.0.lock().unwrap().insert(partition, n);
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn participant_partition_state_survives_a_crash() {
    let backend = MemoryBackend::new();
    let clock = Clock::system();
    let runtime = InMemoryRuntime::with_clock(backend.clone(), clock);
    let jobs = serve(&runtime, Counter::default(), Duration::from_secs(1)).await;
    for i in 0..12 {
        let id = jobs.start(format!("c-{i}"), json!({})).await.unwrap();
        jobs.wait_settled(&id, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let before: u64 = (0..backend.partitions())
        .map(|p| {
            backend
                .participant_state("svc", p)
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(before, 12);
    drop(runtime);

    let runtime = InMemoryRuntime::with_clock(backend.clone(), clock);
    let jobs = serve(&runtime, Counter::default(), Duration::from_secs(1)).await;
    let id = jobs.start("c-12", json!({})).await.unwrap();
    let done = jobs
        .wait_settled(&id, Duration::from_secs(60))
        .await
        .unwrap();
    let p = backend.partition_for("c-12");
    let served_before = (0..12)
        .filter(|i| backend.partition_for(&format!("c-{i}")) == p)
        .count() as u64;
    assert_eq!(
        done.data["reply"],
        json!(served_before + 1),
        "the count continued from the snapshot"
    );
    runtime.shutdown().await;
}
