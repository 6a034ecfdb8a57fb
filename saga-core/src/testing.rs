//! Test support for your own sagas (feature `testing`).
//!
//! Three tools:
//!
//! - [`SagaHarness`]: given/when/then on the pure core. A virtual clock you
//!   advance by hand fires due timers; replies, failures and duplicates are
//!   injected one call at a time; [`SagaHarness::restart`] round-trips the
//!   instance through JSON as a crash and recovery would; the `then_…`
//!   assertions check what was sent and where the saga stands. Nothing
//!   sleeps.
//! - [`ScriptedParticipant`]: a participant for the [`InMemoryRuntime`]
//!   whose outcomes you script (reply, fail retryably or permanently,
//!   hang past the timeout). Run the runtime under
//!   `#[tokio::test(start_paused = true)]` and its [`Clock`] follows tokio's
//!   virtual time, so backoffs and timeouts take no real time. Use
//!   [`MemoryBackend::duplicate_deliveries`] to inject redeliveries.
//! - [`eventually`]: waits for a condition in an async test, and says
//!   which one when it does not come.
//!
//! ```
//! use std::time::Duration;
//! use saga_core::*;
//! use saga_core::testing::SagaHarness;
//!
//! #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! struct Trip { hotel: Option<String> }
//!
//! let saga = SagaDefinition::<Trip>::builder("trip")
//!     .step(Step::remote("book-hotel", "hotels")
//!         .command(|_: &Trip| serde_json::json!({"nights": 2}))
//!         .on_reply(|ctx, booking: String| { ctx.data_mut().hotel = Some(booking); Ok(()) })
//!         .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2))
//!         .timeout(Duration::from_secs(10)))
//!     .build()
//!     .unwrap();
//!
//! let mut t = SagaHarness::new(saga);
//! t.start("trip-1", Trip { hotel: None }).unwrap();                  // given
//! t.then_expect_commands(&[("hotels", serde_json::json!({"nights": 2}))]);
//! t.reply_failure("book-hotel", ErrorClass::Retryable, "busy").unwrap(); // when
//! t.then_expect_commands(&[]);                                        // no retry yet…
//! t.advance(Duration::from_secs(1)).unwrap();                          // …until the backoff ends
//! t.then_expect_commands(&[("hotels", serde_json::json!({"nights": 2}))]);
//! t.reply_ok("book-hotel", &"H-42").unwrap();
//! t.then_status(&SagaStatus::Completed);                              // then
//! assert_eq!(t.data().hotel.as_deref(), Some("H-42"));
//! ```
//!
//! [`InMemoryRuntime`]: crate::InMemoryRuntime
//! [`Clock`]: crate::Clock
//! [`MemoryBackend::duplicate_deliveries`]: crate::MemoryBackend::duplicate_deliveries

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::definition::{SagaData, SagaDefinition, StepError};
use crate::engine::{Effect, Handled, Input, Operation};
use crate::error::SagaError;
use crate::ids::{SagaId, Timestamp};
use crate::instance::{SagaInstance, SagaStatus};
use crate::message::{DeadLetter, Envelope, MessageKind, ReplyOutcome};
use crate::participant::{Participant, ParticipantContext};
use crate::retry::ErrorClass;

/// The harness's clock starts here: 2025-01-01T00:00:00Z.
pub const HARNESS_EPOCH: Timestamp = Timestamp::from_millis(1_735_689_600_000);

/// Given/when/then on the pure core, with a virtual clock.
pub struct SagaHarness<D> {
    def: SagaDefinition<D>,
    now: Timestamp,
    instance: Option<SagaInstance<D>>,
    sent: Vec<Envelope>,
    dead_letters: Vec<DeadLetter>,
    last_reply: Option<Envelope>,
    /// How many commands and events the `then_expect_…` assertions checked.
    checked_commands: usize,
    checked_events: usize,
}

impl<D: SagaData> SagaHarness<D> {
    /// A harness for `def`, its clock at [`HARNESS_EPOCH`].
    pub fn new(def: SagaDefinition<D>) -> Self {
        Self {
            def,
            now: HARNESS_EPOCH,
            instance: None,
            sent: Vec::new(),
            dead_letters: Vec::new(),
            last_reply: None,
            checked_commands: 0,
            checked_events: 0,
        }
    }

    fn collect(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send(env) => self.sent.push(env),
                Effect::DeadLetter(d) => self.dead_letters.push(*d),
                Effect::ScheduleTimer(_) | Effect::CancelTimer(_) => {}
            }
        }
    }

    fn current(&self) -> Result<&SagaInstance<D>, SagaError> {
        self.instance
            .as_ref()
            .ok_or_else(|| SagaError::UnknownSaga {
                saga_id: SagaId::new("<not started>"),
                message_id: crate::MessageId::new("<harness>"),
            })
    }

    /// Given: the saga started as `id` with `data`.
    ///
    /// # Errors
    /// As [`SagaDefinition::start`].
    pub fn start(&mut self, id: impl Into<SagaId>, data: D) -> Result<(), SagaError> {
        let t = self.def.start(id.into(), data, self.now)?;
        self.collect(t.effects);
        self.instance = Some(t.instance);
        Ok(())
    }

    /// Given: an existing instance (e.g. loaded from a fixture).
    pub fn given_instance(&mut self, instance: SagaInstance<D>) {
        self.instance = Some(instance);
    }

    /// When: `input` arrives now.
    ///
    /// # Errors
    /// As [`SagaDefinition::handle`], or [`SagaError::UnknownSaga`] before
    /// the saga is started.
    pub fn input(&mut self, input: Input) -> Result<Handled, SagaError> {
        let inst = self.current()?;
        let t = self.def.handle(inst, input, self.now)?;
        self.collect(t.effects);
        self.instance = Some(t.instance);
        Ok(t.handled)
    }

    fn reply(
        &mut self,
        step: &str,
        outcome: ReplyOutcome,
        payload: Value,
    ) -> Result<Handled, SagaError> {
        let inst = self.current()?;
        let command = self
            .sent
            .iter()
            .rev()
            .find(|e| e.kind == MessageKind::Command && e.step.as_deref() == Some(step))
            .cloned()
            .unwrap_or_else(|| {
                let mut c = Envelope::command(
                    crate::MessageId::new(format!("{}/{step}/forward/1", inst.id)),
                    "",
                    inst.id.clone(),
                    inst.saga.to_string(),
                    Value::Null,
                    self.now,
                );
                c.step = Some(step.to_owned());
                c
            });
        let mut command = command;
        command.reply_to.get_or_insert_with(String::new);
        let Some(reply) = command.reply(outcome, payload, self.now) else {
            unreachable!("the command has a reply channel");
        };
        self.last_reply = Some(reply.clone());
        self.input(Input::Reply(reply))
    }

    /// When: the participant of `step` replies with success and `reply`
    /// (to the latest command of that step).
    ///
    /// # Errors
    /// As [`SagaHarness::input`]; [`SagaError::Encode`] if `reply` does not
    /// serialize.
    pub fn reply_ok<R: Serialize>(&mut self, step: &str, reply: &R) -> Result<Handled, SagaError> {
        let payload = serde_json::to_value(reply).map_err(|source| SagaError::Encode {
            saga_id: self
                .current()
                .map(|i| i.id.clone())
                .unwrap_or_else(|_| SagaId::new("?")),
            what: "reply".into(),
            source,
        })?;
        self.reply(step, ReplyOutcome::Success, payload)
    }

    /// When: the participant of `step` answers (its latest command) with a
    /// failure.
    ///
    /// # Errors
    /// As [`SagaHarness::input`].
    pub fn reply_failure(
        &mut self,
        step: &str,
        class: ErrorClass,
        error: &str,
    ) -> Result<Handled, SagaError> {
        self.reply(step, ReplyOutcome::failure(class, error), Value::Null)
    }

    /// When: the last reply is delivered again (a redelivery). Without a
    /// reply delivered before, nothing happens.
    ///
    /// # Errors
    /// As [`SagaHarness::input`].
    pub fn redeliver_last_reply(&mut self) -> Result<Handled, SagaError> {
        match self.last_reply.clone() {
            Some(reply) => self.input(Input::Reply(reply)),
            None => Ok(Handled::Ignored(crate::engine::Ignored::NothingAwaited)),
        }
    }

    /// When: a reply to command number `attempt` of `step` arrives (a late
    /// reply to an earlier attempt, say).
    ///
    /// # Errors
    /// As [`SagaHarness::input`]; [`SagaError::UnknownStep`] if no such
    /// command was sent.
    pub fn reply_to_attempt<R: Serialize>(
        &mut self,
        step: &str,
        attempt: u32,
        reply: &R,
    ) -> Result<Handled, SagaError> {
        let inst = self.current()?;
        let command = self
            .sent
            .iter()
            .find(|e| {
                e.kind == MessageKind::Command
                    && e.step.as_deref() == Some(step)
                    && e.attempt == attempt
            })
            .cloned()
            .ok_or_else(|| SagaError::UnknownStep {
                saga_id: inst.id.clone(),
                step: step.to_owned(),
                message_id: crate::MessageId::new(format!("{}/{step}/?/{attempt}", inst.id)),
            })?;
        let payload = serde_json::to_value(reply).map_err(|source| SagaError::Encode {
            saga_id: inst.id.clone(),
            what: "reply".into(),
            source,
        })?;
        let Some(reply) = command.reply(ReplyOutcome::Success, payload, self.now) else {
            return Ok(Handled::Ignored(crate::engine::Ignored::NothingAwaited));
        };
        self.last_reply = Some(reply.clone());
        self.input(Input::Reply(reply))
    }

    /// When: an operator acts on the parked saga.
    ///
    /// # Errors
    /// As [`SagaHarness::input`] ([`SagaError::InvalidAction`] if the saga
    /// is not parked).
    pub fn operator(&mut self, operation: Operation) -> Result<Handled, SagaError> {
        self.input(Input::Operator(operation))
    }

    /// When: time passes by `d`; every timer due on the way fires in order.
    /// Returns how many fired.
    ///
    /// # Errors
    /// As [`SagaHarness::input`].
    pub fn advance(&mut self, d: Duration) -> Result<usize, SagaError> {
        let until = self.now.saturating_add(d);
        let mut fired = 0;
        loop {
            let next = self.current()?.next_timer().cloned();
            match next {
                Some(t) if t.fire_at <= until => {
                    self.now = self.now.max(t.fire_at);
                    self.input(Input::Timer(t.id))?;
                    fired += 1;
                }
                _ => break,
            }
        }
        self.now = until;
        Ok(fired)
    }

    /// When: the process crashes and recovers: the instance goes through
    /// JSON, as a store would keep it.
    ///
    /// # Errors
    /// [`SagaError::Encode`] or [`SagaError::CorruptState`] if the instance
    /// does not survive the round trip.
    pub fn restart(&mut self) -> Result<(), SagaError> {
        let inst = self.current()?;
        let id = inst.id.clone();
        let json = serde_json::to_vec(inst).map_err(|source| SagaError::Encode {
            saga_id: id.clone(),
            what: "saga instance".into(),
            source,
        })?;
        // Read back as a runtime's restore reads it.
        let back = crate::driver::decode_state(id.as_str(), &json)?;
        self.instance = Some(back);
        Ok(())
    }

    /// Then: the instance.
    ///
    /// # Panics
    /// If the saga was not started (a harness misuse in a test).
    pub fn instance(&self) -> &SagaInstance<D> {
        self.instance
            .as_ref()
            .expect("SagaHarness: start the saga first")
    }

    /// Then: its status.
    pub fn status(&self) -> &SagaStatus {
        &self.instance().status
    }

    /// Then: its data.
    pub fn data(&self) -> &D {
        &self.instance().data
    }

    /// Then: every command sent so far, in order.
    pub fn commands(&self) -> Vec<&Envelope> {
        self.sent
            .iter()
            .filter(|e| e.kind == MessageKind::Command)
            .collect()
    }

    /// Then: every event published so far, in order.
    pub fn events(&self) -> Vec<&Envelope> {
        self.sent
            .iter()
            .filter(|e| e.kind == MessageKind::Event)
            .collect()
    }

    /// Then: every dead letter written so far.
    pub fn dead_letters(&self) -> &[DeadLetter] {
        &self.dead_letters
    }

    /// The virtual time now.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Then: the saga is in `expected` status.
    ///
    /// # Panics
    /// If it is not (with its history), or was not started.
    #[track_caller]
    pub fn then_status(&self, expected: &SagaStatus) -> &Self {
        let inst = self.instance();
        assert!(
            &inst.status == expected,
            "saga `{}`: expected status {expected}, found {}\nhistory:\n{}",
            inst.id,
            inst.status,
            history(inst)
        );
        self
    }

    /// Then: the commands sent since the last `then_expect_commands` are
    /// exactly `expected`, as (channel, payload), in order.
    ///
    /// # Panics
    /// If they are not (with what was sent).
    #[track_caller]
    pub fn then_expect_commands(&mut self, expected: &[(&str, Value)]) -> &mut Self {
        let new: Vec<(String, Value)> = self
            .commands()
            .into_iter()
            .skip(self.checked_commands)
            .map(|e| (e.channel.clone(), e.payload.clone()))
            .collect();
        self.checked_commands += new.len();
        assert_sent("commands", &new, expected);
        self
    }

    /// Then: the events published since the last `then_expect_events` are
    /// exactly `expected`, as (channel, payload), in order.
    ///
    /// # Panics
    /// If they are not (with what was published).
    #[track_caller]
    pub fn then_expect_events(&mut self, expected: &[(&str, Value)]) -> &mut Self {
        let new: Vec<(String, Value)> = self
            .events()
            .into_iter()
            .skip(self.checked_events)
            .map(|e| (e.channel.clone(), e.payload.clone()))
            .collect();
        self.checked_events += new.len();
        assert_sent("events", &new, expected);
        self
    }
}

fn history<D>(inst: &SagaInstance<D>) -> String {
    inst.history
        .iter()
        .map(|h| format!("  {} [{}] {}", h.at, h.status, h.what))
        .collect::<Vec<_>>()
        .join("\n")
}

#[track_caller]
fn assert_sent(what: &str, found: &[(String, Value)], expected: &[(&str, Value)]) {
    let same = found.len() == expected.len()
        && found
            .iter()
            .zip(expected)
            .all(|((c, p), (ec, ep))| c == ec && p == ep);
    assert!(same, "expected {what} {expected:?}\n   but found {found:?}");
}

/// Waits until `check` answers `true`, trying every 10 ms of tokio time
/// (virtual under a paused clock), for at most `timeout`.
///
/// # Panics
/// After `timeout`, naming `what` (a test helper: the panic fails the test
/// with the reason).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use saga_core::testing::eventually;
/// let ready = std::sync::atomic::AtomicBool::new(true);
/// eventually("the flag", Duration::from_secs(1), || async {
///     ready.load(std::sync::atomic::Ordering::SeqCst)
/// })
/// .await;
/// # }
/// ```
#[track_caller]
pub fn eventually<'a, F, Fut>(
    what: &'a str,
    timeout: Duration,
    mut check: F,
) -> impl Future<Output = ()> + 'a
where
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = bool> + 'a,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if check().await {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("{caller}: timed out after {timeout:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One scripted outcome of a [`ScriptedParticipant`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Scripted {
    /// Reply with this payload.
    Reply(Value),
    /// Fail with a retryable error.
    Retryable(String),
    /// Fail with a permanent error.
    Permanent(String),
    /// Never answer within the attempt (sleeps an hour of tokio time, so the
    /// policy's timeout ends it).
    Hang,
    /// Reply with this payload after this long (tokio time): a slow
    /// participant whose answer may arrive after the step's deadline.
    ReplyAfter(Duration, Value),
}

/// A participant whose outcomes are scripted, for the in-memory runtime.
///
/// Takes JSON commands, replies with JSON. Outcomes are used in order; when
/// the script runs out it repeats `default`. Every received command is
/// recorded.
#[derive(Clone)]
pub struct ScriptedParticipant {
    script: Arc<Mutex<VecDeque<Scripted>>>,
    default: Scripted,
    received: Arc<Mutex<Vec<(crate::MessageId, Value)>>>,
}

impl ScriptedParticipant {
    /// A participant that answers `default` once its script runs out.
    pub fn new(default: Scripted) -> Self {
        Self {
            script: Arc::default(),
            default,
            received: Arc::default(),
        }
    }

    /// Appends an outcome to the script.
    pub fn then(self, outcome: Scripted) -> Self {
        self.script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(outcome);
        self
    }

    /// Every (message id, command) received, in order, retries included.
    pub fn received(&self) -> Vec<(crate::MessageId, Value)> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl Participant for ScriptedParticipant {
    type Command = Value;
    type Reply = Value;
    type Error = StepError;

    async fn handle(
        &self,
        command: Value,
        ctx: &mut ParticipantContext,
    ) -> Result<Value, StepError> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((ctx.message_id().clone(), command));
        let next = self
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or_else(|| self.default.clone());
        match next {
            Scripted::Reply(v) => Ok(v),
            Scripted::Retryable(e) => Err(StepError::retryable(e)),
            Scripted::Permanent(e) => Err(StepError::permanent(e)),
            Scripted::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(StepError::retryable("hung"))
            }
            Scripted::ReplyAfter(delay, v) => {
                tokio::time::sleep(delay).await;
                Ok(v)
            }
        }
    }
}
