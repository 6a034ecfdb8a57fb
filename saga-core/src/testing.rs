//! Test support for your own sagas (feature `testing`).
//!
//! Two levels:
//!
//! - [`SagaHarness`]: given/when/then on the pure core. A virtual clock you
//!   advance by hand fires due timers; replies, failures and duplicates are
//!   injected one call at a time; [`SagaHarness::restart`] round-trips the
//!   instance through JSON as a crash and recovery would. Nothing sleeps.
//! - [`ScriptedParticipant`]: a participant for the [`InMemoryRuntime`]
//!   whose outcomes you script (reply, fail retryably or permanently,
//!   hang past the timeout). Run the runtime under
//!   `#[tokio::test(start_paused = true)]` and its [`Clock`] follows tokio's
//!   virtual time, so backoffs and timeouts take no real time. Use
//!   [`MemoryBackend::duplicate_deliveries`] to inject redeliveries.
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
//! t.reply_failure("book-hotel", ErrorClass::Retryable, "busy").unwrap(); // when
//! assert_eq!(t.commands().len(), 1);                                  // no retry yet…
//! t.advance(Duration::from_secs(1)).unwrap();                          // …until the backoff ends
//! assert_eq!(t.commands().len(), 2);
//! t.reply_ok("book-hotel", &"H-42").unwrap();
//! assert_eq!(t.status(), &SagaStatus::Completed);                     // then
//! assert_eq!(t.data().hotel.as_deref(), Some("H-42"));
//! ```
//!
//! [`InMemoryRuntime`]: crate::InMemoryRuntime
//! [`Clock`]: crate::Clock
//! [`MemoryBackend::duplicate_deliveries`]: crate::MemoryBackend::duplicate_deliveries

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::definition::{SagaData, SagaDefinition, StepError};
use crate::engine::{Effect, Handled, Input, OperatorAction};
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
        }
    }

    fn collect(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send(env) => self.sent.push(env),
                Effect::DeadLetter(d) => self.dead_letters.push(d),
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
            .unwrap_or_else(|| Envelope {
                id: crate::MessageId::new(format!("{}/{step}/forward", inst.id)),
                channel: String::new(),
                saga_id: inst.id.clone(),
                saga: inst.saga.clone(),
                kind: MessageKind::Command,
                step: Some(step.to_owned()),
                phase: None,
                attempt: 1,
                reply_to: Some(String::new()),
                outcome: None,
                timestamp: self.now,
                payload: Value::Null,
            });
        let mut reply = command
            .reply(outcome.clone(), payload.clone(), self.now)
            .unwrap_or_else(|| Envelope {
                kind: MessageKind::Reply,
                outcome: Some(outcome),
                payload,
                ..command.clone()
            });
        reply.kind = MessageKind::Reply;
        self.last_reply = Some(reply.clone());
        self.input(Input::Reply(reply))
    }

    /// When: the participant of `step` replies with success and `reply`
    /// (to the latest command of that step).
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

    /// When: the participant of `step` answers with a failure.
    pub fn reply_failure(
        &mut self,
        step: &str,
        class: ErrorClass,
        error: &str,
    ) -> Result<Handled, SagaError> {
        self.reply(
            step,
            ReplyOutcome::Failure {
                class,
                error: error.to_owned(),
            },
            Value::Null,
        )
    }

    /// When: the last reply is delivered again (a redelivery).
    pub fn redeliver_last_reply(&mut self) -> Result<Handled, SagaError> {
        let reply = self
            .last_reply
            .clone()
            .ok_or_else(|| SagaError::Transport("no reply delivered yet".into()))?;
        self.input(Input::Reply(reply))
    }

    /// When: an operator acts on the parked saga.
    pub fn operator(&mut self, action: OperatorAction) -> Result<Handled, SagaError> {
        self.input(Input::Operator(action))
    }

    /// When: time passes by `d`; every timer due on the way fires in order.
    /// Returns how many fired.
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
    pub fn restart(&mut self) -> Result<(), SagaError> {
        let inst = self.current()?;
        let id = inst.id.clone();
        let json = serde_json::to_value(inst).map_err(|source| SagaError::Encode {
            saga_id: id.clone(),
            what: "saga instance".into(),
            source,
        })?;
        let back = serde_json::from_value(json).map_err(|source| SagaError::CorruptState {
            saga_id: id,
            source,
        })?;
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
}

/// One scripted outcome of a [`ScriptedParticipant`].
#[derive(Clone, Debug)]
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
        }
    }
}
