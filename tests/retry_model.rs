//! The retry model, the same on every runtime: each scenario is one test
//! body written against saga-core's `Runtime` API, run on the in-memory
//! runtime (under tokio's paused clock) and on a real Kafka broker.
//!
//! Each asserts the saga's final status, how many times the participant
//! ran the command, and the failure recorded:
//! 1. a retry the step asks for (a "busy" reply) runs at the participant
//!    again, and a saga whose step keeps failing compensates with the
//!    participant's reason;
//! 2. a participant's retryable error follows the step's retry policy (and
//!    composes with the participant's own retries);
//! 3. an operator's retry of a parked step runs it again, recorded with who
//!    and why;
//! 4. a late reply to a parked pivot resumes the saga;
//! 5. a retryable step can give up with one dead letter and let the saga
//!    continue.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use saga_core::testing::{eventually, Scripted, ScriptedParticipant};
use saga_core::*;
use saga_kafka::testing::KafkaFixture;
use saga_kafka::KafkaRuntime;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Trip {
    held: bool,
    released: bool,
    booked: bool,
}

/// A step's per-attempt deadline: long enough for a broker round trip.
const TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF: Duration = Duration::from_millis(100);
/// How long a test waits for an outcome (tokio time: virtual in memory).
const PATIENCE: Duration = Duration::from_secs(60);

/// Names under a namespace, so runs on a shared broker do not meet.
struct Ns(String);

impl Ns {
    fn name(&self, base: &str) -> String {
        format!("{}.{base}", self.0)
    }
}

async fn settled<D: SagaData>(handle: &SagaHandle<D>, id: &SagaId) -> SagaInstance<D> {
    handle
        .wait_settled(id, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{id} did not settle: {e}"))
}

fn history<D>(inst: &SagaInstance<D>) -> String {
    inst.history
        .iter()
        .map(|h| &*h.what)
        .collect::<Vec<_>>()
        .join("\n")
}

/// hold (local, compensated by a release) → book (remote: a "busy" reply
/// is retried by the step).
fn booking_saga(ns: &Ns, name: &str, channel: &str) -> SagaDefinition<Trip> {
    SagaDefinition::<Trip>::builder(ns.name(name))
        .step(
            Step::<Trip>::local("hold", |ctx| {
                ctx.data_mut().held = true;
                Ok(())
            })
            .compensate_local(|ctx| {
                ctx.data_mut().released = true;
                Ok(())
            }),
        )
        .step(
            Step::remote("book", ns.name(channel))
                .command(|_: &Trip| json!({"room": "double"}))
                .on_reply(|ctx, reply: Value| {
                    if reply["busy"] == true {
                        return Err(StepError::retryable("hotel busy"));
                    }
                    ctx.data_mut().booked = true;
                    Ok(())
                })
                .retry(RetryPolicy::fixed(BACKOFF).with_max_attempts(3))
                .timeout(TIMEOUT),
        )
        .build()
        .unwrap()
}

async fn a_busy_reply_is_retried_and_each_retry_runs_again<R: Runtime>(rt: &R, ns: &Ns) {
    let hotels = ScriptedParticipant::new(Scripted::Reply(json!({"ok": true})))
        .then(Scripted::Reply(json!({"busy": true})));
    rt.participant(
        &ns.name("hotels"),
        ParticipantPolicy::new(ns.name("hotels")),
        hotels.clone(),
    )
    .await
    .unwrap();
    let full = ScriptedParticipant::new(Scripted::Reply(json!({"busy": true})));
    rt.participant(
        &ns.name("full"),
        ParticipantPolicy::new(ns.name("full")),
        full.clone(),
    )
    .await
    .unwrap();
    let trips = rt.saga(booking_saga(ns, "trip", "hotels")).await.unwrap();
    let full_trips = rt
        .saga(booking_saga(ns, "full-trip", "full"))
        .await
        .unwrap();

    // Busy once: the step's retry reaches the participant, which answers.
    let id = trips.start("trip-1", Trip::default()).await.unwrap();
    let done = settled(&trips, &id).await;
    assert_eq!(done.status, SagaStatus::Completed, "{}", history(&done));
    assert!(done.data.booked);
    let ids: Vec<MessageId> = hotels.received().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 2, "the retry ran at the participant: {ids:?}");
    assert_ne!(ids[0], ids[1], "each attempt is a new command");

    // Busy every time: after 3 attempts the saga compensates, with the
    // participant's reason (not a timeout).
    let id = full_trips.start("trip-2", Trip::default()).await.unwrap();
    let done = settled(&full_trips, &id).await;
    assert_eq!(done.status, SagaStatus::Compensated, "{}", history(&done));
    assert!(
        done.data.held && done.data.released,
        "the hold was released"
    );
    assert_eq!(full.received().len(), 3);
    assert_eq!(done.failure.as_deref(), Some("hotel busy"));
    rt.shutdown().await;
}

/// One remote step (nothing to compensate) whose participant always fails
/// with a retryable error; `step_attempts` by the step, `local_attempts`
/// by the participant.
async fn retryable_errors_follow_the_steps_policy<R: Runtime>(
    rt: &R,
    ns: &Ns,
    step_attempts: u32,
    local_attempts: u32,
) {
    let flaky = ScriptedParticipant::new(Scripted::Retryable("503 Service Unavailable".into()));
    let policy = ParticipantPolicy::new(ns.name("cards"))
        .retry(RetryPolicy::fixed(BACKOFF).with_max_attempts(local_attempts));
    rt.participant(&ns.name("cards"), policy, flaky.clone())
        .await
        .unwrap();
    let saga = SagaDefinition::<Trip>::builder(ns.name("card"))
        .step(
            Step::remote("authorize", ns.name("cards"))
                .command(|_: &Trip| json!({"cents": 100}))
                .retry(RetryPolicy::fixed(BACKOFF).with_max_attempts(step_attempts))
                .timeout(TIMEOUT),
        )
        .build()
        .unwrap();
    let cards = rt.saga(saga).await.unwrap();
    let id = cards.start("card-1", Trip::default()).await.unwrap();
    let done = settled(&cards, &id).await;
    assert_eq!(done.status, SagaStatus::Compensated, "{}", history(&done));
    assert_eq!(
        flaky.received().len() as u32,
        step_attempts * local_attempts,
        "{step_attempts} step attempts of {local_attempts} participant attempts each"
    );
    assert_eq!(done.steps[0].attempts, step_attempts);
    assert_eq!(done.failure.as_deref(), Some("503 Service Unavailable"));
    rt.shutdown().await;
}

/// A warehouse that refuses until it opens; counts what it runs.
#[derive(Clone, Default)]
struct Warehouse {
    open: Arc<AtomicBool>,
    runs: Arc<AtomicU32>,
}

#[async_trait]
impl Participant for Warehouse {
    type Command = Value;
    type Reply = Value;
    type Error = StepError;
    async fn handle(&self, _: Value, _: &mut ParticipantContext) -> Result<Value, StepError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) {
            Ok(json!({"shipped": true}))
        } else {
            Err(StepError::permanent("warehouse closed"))
        }
    }
}

async fn an_operator_retry_runs_a_parked_step_again<R: Runtime>(rt: &R, ns: &Ns) {
    let warehouse = Warehouse::default();
    rt.participant(
        &ns.name("shipping"),
        ParticipantPolicy::new(ns.name("shipping")),
        warehouse.clone(),
    )
    .await
    .unwrap();
    let saga = SagaDefinition::<Trip>::builder(ns.name("ship"))
        .dead_letter_channel(ns.name("ship.dlq"))
        .step(Step::<Trip>::local("charge", |_| Ok(())).pivot())
        .step(
            Step::remote("ship", ns.name("shipping"))
                .command(|_: &Trip| json!({"parcel": 1}))
                .retry(RetryPolicy::fixed(BACKOFF).with_max_attempts(2))
                .timeout(TIMEOUT)
                .retryable(),
        )
        .build()
        .unwrap();
    let orders = rt.saga(saga).await.unwrap();
    let id = orders.start("ship-1", Trip::default()).await.unwrap();
    let parked = settled(&orders, &id).await;
    assert!(parked.status.is_parked(), "{}", history(&parked));
    assert_eq!(
        warehouse.runs.load(Ordering::SeqCst),
        1,
        "a permanent error is not retried"
    );
    let dead = rt.dead_letters(&ns.name("ship.dlq")).await.unwrap();
    assert_eq!(dead.len(), 1, "one dead letter for the parked step");
    assert_eq!(dead[0].last_error, "warehouse closed");
    assert!(
        rt.dead_letters(&ns.name("shipping.dlq"))
            .await
            .unwrap()
            .is_empty(),
        "the participant dead-letters nothing a saga waits on"
    );

    // The cause is fixed; the operator retries the step.
    warehouse.open.store(true, Ordering::SeqCst);
    orders
        .operate(&id, Operation::retry("alice").note("warehouse reopened"))
        .await
        .unwrap();
    let patience = PATIENCE;
    eventually("the retried saga completes", patience, || async {
        let inst = orders.get(&id).await.unwrap().unwrap();
        inst.status == SagaStatus::Completed
    })
    .await;
    let done = orders.get(&id).await.unwrap().unwrap();
    assert_eq!(
        warehouse.runs.load(Ordering::SeqCst),
        2,
        "the retry ran again"
    );
    let entry = done
        .history
        .iter()
        .find(|h| h.operator.is_some())
        .expect("the operator's action is in the history");
    assert_eq!(entry.operator.as_deref(), Some("alice"));
    assert_eq!(entry.note.as_deref(), Some("warehouse reopened"));
    rt.shutdown().await;
}

async fn a_late_reply_resumes_a_parked_pivot<R: Runtime>(rt: &R, ns: &Ns) {
    // The payment provider answers only after the step's deadline.
    let slow = ScriptedParticipant::new(Scripted::ReplyAfter(TIMEOUT * 2, json!({"ok": true})));
    rt.participant(
        &ns.name("payments"),
        ParticipantPolicy::new(ns.name("payments")),
        slow.clone(),
    )
    .await
    .unwrap();
    let saga = SagaDefinition::<Trip>::builder(ns.name("pay"))
        .step(
            Step::remote("pay", ns.name("payments"))
                .command(|_: &Trip| json!({"cents": 100}))
                .on_reply(|ctx, _: Value| {
                    ctx.data_mut().booked = true;
                    Ok(())
                })
                .retry(RetryPolicy::no_retry())
                .timeout(TIMEOUT)
                .pivot(),
        )
        .build()
        .unwrap();
    let payments = rt.saga(saga).await.unwrap();
    let id = payments.start("pay-1", Trip::default()).await.unwrap();
    let parked = settled(&payments, &id).await;
    match &parked.status {
        SagaStatus::Parked { reason } => assert!(
            reason.contains("outcome of pivot step `pay` unknown"),
            "{reason}"
        ),
        other => panic!("expected parked, got {other}: {}", history(&parked)),
    }
    eventually("the late reply resumes the saga", PATIENCE, || async {
        payments.get(&id).await.unwrap().unwrap().status == SagaStatus::Completed
    })
    .await;
    let done = payments.get(&id).await.unwrap().unwrap();
    assert!(done.data.booked);
    assert_eq!(slow.received().len(), 1, "one attempt, answered late");
    assert!(
        history(&done).contains("late reply to command 1 resumes the parked saga"),
        "{}",
        history(&done)
    );
    rt.shutdown().await;
}

async fn a_retryable_step_gives_up_dead_letters_and_the_saga_goes_on<R: Runtime>(rt: &R, ns: &Ns) {
    let mail = ScriptedParticipant::new(Scripted::Retryable("smtp down".into()));
    rt.participant(
        &ns.name("mail"),
        ParticipantPolicy::new(ns.name("mail")),
        mail.clone(),
    )
    .await
    .unwrap();
    let saga = SagaDefinition::<Trip>::builder(ns.name("itinerary"))
        .step(Step::<Trip>::local("charge", |_| Ok(())).pivot())
        .step(
            Step::remote("email", ns.name("mail"))
                .command(|_: &Trip| json!({"to": "c-1"}))
                .retry(RetryPolicy::fixed(BACKOFF).with_max_attempts(3))
                .timeout(TIMEOUT)
                .retryable()
                .on_exhausted(Exhausted::DeadLetterAndContinue)
                .dead_letter_channel(ns.name("mail.failed")),
        )
        .step(
            Step::<Trip>::local("archive", |ctx| {
                ctx.data_mut().booked = true;
                Ok(())
            })
            .retryable(),
        )
        .build()
        .unwrap();
    let trips = rt.saga(saga).await.unwrap();
    let id = trips.start("mail-1", Trip::default()).await.unwrap();
    let done = settled(&trips, &id).await;
    assert_eq!(done.status, SagaStatus::Completed, "{}", history(&done));
    assert!(done.data.booked, "the saga went on past the failed email");
    assert_eq!(mail.received().len(), 3);
    assert_eq!(done.step("email").unwrap().state, StepState::Failed);
    let dead = rt.dead_letters(&ns.name("mail.failed")).await.unwrap();
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(dead[0].retry_count, 3);
    assert_eq!(dead[0].last_error, "smtp down");
    assert!(rt
        .dead_letters(&ns.name("mail.dlq"))
        .await
        .unwrap()
        .is_empty());
    rt.shutdown().await;
}

fn memory() -> (InMemoryRuntime, Ns) {
    (InMemoryRuntime::new(MemoryBackend::new()), Ns("mem".into()))
}

fn kafka() -> (KafkaRuntime, Ns) {
    let fx = KafkaFixture::new();
    let rt = KafkaRuntime::new(fx.config("0")).unwrap();
    (rt, Ns(fx.ns().to_owned()))
}

macro_rules! on_both_runtimes {
    ($($name:ident => |$rt:ident, $ns:ident| $body:expr;)*) => {
        mod in_memory {
            use super::*;
            $(
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    let ($rt, $ns) = memory();
                    let ($rt, $ns) = (&$rt, &$ns);
                    $body.await
                }
            )*
        }
        mod on_kafka {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                #[ignore = "needs Kafka: scripts/test.sh"]
                async fn $name() {
                    let ($rt, $ns) = kafka();
                    let ($rt, $ns) = (&$rt, &$ns);
                    $body.await
                }
            )*
        }
    };
}

on_both_runtimes! {
    a_busy_reply_is_retried_and_a_saga_that_keeps_failing_compensates => |rt, ns|
        a_busy_reply_is_retried_and_each_retry_runs_again(rt, ns);
    a_retryable_error_is_retried_by_the_step => |rt, ns|
        retryable_errors_follow_the_steps_policy(rt, ns, 4, 1);
    participant_retries_compose_with_the_steps => |rt, ns|
        retryable_errors_follow_the_steps_policy(rt, ns, 2, 2);
    an_operator_retry_unparks_a_step_and_records_who_and_why => |rt, ns|
        an_operator_retry_runs_a_parked_step_again(rt, ns);
    a_late_reply_resumes_a_parked_pivot_saga => |rt, ns|
        a_late_reply_resumes_a_parked_pivot(rt, ns);
    a_retryable_step_dead_letters_once_and_the_saga_completes => |rt, ns|
        a_retryable_step_gives_up_dead_letters_and_the_saga_goes_on(rt, ns);
}
