//! The pure core: `(instance, input, now) -> (instance', effects)`.
//!
//! Nothing here does I/O, reads a clock or draws random numbers: drivers
//! pass the time in and carry the effects out.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::{
    Action, Emitted, SagaData, SagaDefinition, StepContext, StepError, StepKind,
};
use crate::error::SagaError;
use crate::ids::{MessageId, SagaId, Timestamp};
use crate::instance::{
    Awaiting, SagaInstance, SagaStatus, StepRecord, StepState, Timer, TimerId, TimerKind,
};
use crate::message::{DeadLetter, Envelope, MessageKind, Phase, ReplyOutcome};
use crate::retry::RetryDecision;

/// Something that happens to a running saga.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A participant's reply.
    Reply(Envelope),
    /// A timer the saga armed is due.
    Timer(TimerId),
    /// An operator's decision about a parked saga.
    Operator(OperatorAction),
}

/// What an operator can do with a parked saga.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorAction {
    /// Try the parked step or compensation again, with a fresh retry budget.
    /// Commands keep their ids, so participants still deduplicate them.
    Retry,
    /// Consider the parked step done (forward) or undone (compensating) and go on.
    Skip,
}

/// What the driver must carry out after a transition, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Send this command or event on its channel.
    Send(Envelope),
    /// Arm this timer (it is also in the instance, for recovery).
    ScheduleTimer(Timer),
    /// Disarm this timer.
    CancelTimer(TimerId),
    /// Write this dead letter to its channel.
    DeadLetter(DeadLetter),
}

/// Whether an input changed the saga.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// The input was applied.
    Applied,
    /// The input was a duplicate or stale and was ignored (the reason says which).
    Ignored(&'static str),
}

/// The result of handling one input: the new instance and the effects.
#[derive(Clone, Debug)]
#[must_use = "the effects of a transition must be carried out"]
pub struct Transition<D> {
    /// The instance after the input.
    pub instance: SagaInstance<D>,
    /// What the driver must do, in order.
    pub effects: Vec<Effect>,
    /// Whether the input was applied or ignored.
    pub handled: Handled,
}

enum Flow {
    Continue,
    Wait,
}

struct Machine<'a, D> {
    def: &'a SagaDefinition<D>,
    inst: SagaInstance<D>,
    now: Timestamp,
    effects: Vec<Effect>,
}

impl<D: SagaData> SagaDefinition<D> {
    /// Starts a new instance `id` with `data` and runs it until it waits.
    pub fn start(&self, id: SagaId, data: D, now: Timestamp) -> Result<Transition<D>, SagaError> {
        let inst = SagaInstance {
            id,
            saga: self.name().to_owned(),
            data,
            status: SagaStatus::Running,
            phase: Phase::Forward,
            cursor: 0,
            steps: self
                .steps()
                .iter()
                .map(|s| StepRecord {
                    name: s.name.clone(),
                    state: StepState::Pending,
                    attempts: 0,
                    first_attempt_at: None,
                    compensation_attempts: 0,
                    first_compensation_at: None,
                    last_error: None,
                })
                .collect(),
            awaiting: None,
            timers: Vec::new(),
            failure: None,
            event_seq: 0,
            version: 0,
            created_at: now,
            updated_at: now,
            history: Vec::new(),
        };
        let _span =
            tracing::debug_span!("saga.start", saga_id = %inst.id, saga = %inst.saga).entered();
        let mut m = Machine {
            def: self,
            inst,
            now,
            effects: Vec::new(),
        };
        m.inst.record(now, "started".into());
        if let Some(timeout) = self.inner.timeout {
            m.arm(TimerKind::SagaDeadline, "saga-deadline".into(), timeout);
        }
        m.drive();
        Ok(m.finish(Handled::Applied))
    }

    /// Handles one input for `instance` at time `now`.
    ///
    /// Duplicate and stale inputs (a second reply to the same command, a
    /// reply to an attempt that timed out, a timer that was disarmed) are
    /// ignored: the result says [`Handled::Ignored`] and has no effects.
    /// Malformed inputs (a reply for another saga, a payload of the wrong
    /// type) are errors, and `instance` is left as it was.
    pub fn handle(
        &self,
        instance: &SagaInstance<D>,
        input: Input,
        now: Timestamp,
    ) -> Result<Transition<D>, SagaError> {
        let _span =
            tracing::debug_span!("saga.handle", saga_id = %instance.id, saga = %instance.saga)
                .entered();
        if instance.saga != self.name() {
            return Err(SagaError::WrongSaga {
                expected: self.name().to_owned(),
                found: instance.saga.clone(),
                message_id: MessageId::new(format!("{}/instance", instance.id)),
            });
        }
        let mut m = Machine {
            def: self,
            inst: instance.clone(),
            now,
            effects: Vec::new(),
        };
        let handled = match input {
            Input::Reply(env) => m.on_reply(env)?,
            Input::Timer(id) => m.on_timer(&id),
            Input::Operator(action) => m.on_operator(action)?,
        };
        if handled != Handled::Applied {
            return Ok(Transition {
                instance: instance.clone(),
                effects: Vec::new(),
                handled,
            });
        }
        Ok(m.finish(handled))
    }
}

fn seed(id: &SagaId, step: usize, phase: Phase) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    step.hash(&mut h);
    phase.hash(&mut h);
    h.finish()
}

impl<D: SagaData> Machine<'_, D> {
    fn finish(mut self, handled: Handled) -> Transition<D> {
        self.inst.version += 1;
        self.inst.updated_at = self.now;
        Transition {
            instance: self.inst,
            effects: self.effects,
            handled,
        }
    }

    fn step_name(&self, i: usize) -> String {
        self.def.steps()[i].name.clone()
    }

    fn arm(&mut self, kind: TimerKind, id: String, after: std::time::Duration) {
        let timer = Timer {
            id: TimerId(id),
            fire_at: self.now.saturating_add(after),
            kind,
        };
        self.inst.timers.retain(|t| t.id != timer.id);
        self.inst.timers.push(timer.clone());
        self.effects.push(Effect::ScheduleTimer(timer));
    }

    fn disarm(&mut self, id: &TimerId) {
        let before = self.inst.timers.len();
        self.inst.timers.retain(|t| &t.id != id);
        if self.inst.timers.len() != before {
            self.effects.push(Effect::CancelTimer(id.clone()));
        }
    }

    fn disarm_all(&mut self) {
        for t in std::mem::take(&mut self.inst.timers) {
            self.effects.push(Effect::CancelTimer(t.id));
        }
    }

    fn set_status(&mut self, status: SagaStatus, what: String) {
        self.inst.status = status;
        self.inst.record(self.now, what);
    }

    /// Runs steps (or compensations) until the saga waits or settles.
    fn drive(&mut self) {
        loop {
            let flow = match self.inst.status {
                SagaStatus::Running => self.forward_once(),
                SagaStatus::Compensating => self.compensate_once(),
                _ => Flow::Wait,
            };
            if let Flow::Wait = flow {
                break;
            }
        }
        if self.inst.status.is_final() {
            self.disarm_all();
            let hook = match self.inst.status {
                SagaStatus::Completed => self.def.inner.on_completed.clone(),
                _ => self.def.inner.on_compensated.clone(),
            };
            if let Some(hook) = hook {
                // Hooks cannot fail; a message that cannot be encoded is
                // dropped with the rest of the hook's output, and said so.
                if let Err(e) = self.run_user_code(|ctx| {
                    hook(ctx);
                    Ok(())
                }) {
                    let what = format!("completion hook failed: {e}");
                    tracing::warn!(saga_id = %self.inst.id, %what);
                    self.inst.record(self.now, what);
                }
            }
        }
    }

    fn forward_once(&mut self) -> Flow {
        let i = self.inst.cursor;
        if i >= self.def.steps().len() {
            self.set_status(SagaStatus::Completed, "completed".into());
            return Flow::Wait;
        }
        let rec = &mut self.inst.steps[i];
        rec.attempts += 1;
        rec.first_attempt_at.get_or_insert(self.now);
        rec.state = StepState::Running;
        let attempt = rec.attempts;
        let step = &self.def.steps()[i];
        let _span =
            tracing::debug_span!("saga.step", step = %step.name, attempt, phase = "forward")
                .entered();
        let Some(action) = step.forward.clone() else {
            return self.step_succeeded(i);
        };
        self.run_action(i, Phase::Forward, &action, attempt)
    }

    fn compensate_once(&mut self) -> Flow {
        // Walk down from the cursor to the next step that needs undoing.
        let mut next = None;
        for i in (0..=self.inst.cursor.min(self.def.steps().len() - 1)).rev() {
            let state = self.inst.steps[i].state;
            if !state.needs_compensation() || self.def.steps()[i].kind != StepKind::Compensatable {
                continue;
            }
            if self.def.steps()[i].compensation.is_none() {
                self.inst.steps[i].state = StepState::Compensated;
                self.inst.record(
                    self.now,
                    format!("step `{}`: nothing to compensate", self.step_name(i)),
                );
                continue;
            }
            next = Some(i);
            break;
        }
        let Some(i) = next else {
            self.set_status(SagaStatus::Compensated, "compensated".into());
            return Flow::Wait;
        };
        self.inst.cursor = i;
        let rec = &mut self.inst.steps[i];
        rec.state = StepState::Compensating;
        rec.compensation_attempts += 1;
        rec.first_compensation_at.get_or_insert(self.now);
        let attempt = rec.compensation_attempts;
        let step = &self.def.steps()[i];
        let _span =
            tracing::debug_span!("saga.step", step = %step.name, attempt, phase = "compensation")
                .entered();
        let Some(action) = step.compensation.clone() else {
            return Flow::Continue;
        };
        self.run_action(i, Phase::Compensation, &action, attempt)
    }

    fn run_action(&mut self, i: usize, phase: Phase, action: &Action<D>, attempt: u32) -> Flow {
        match action {
            Action::Local(f) => {
                let f = f.clone();
                match self.run_user_code(|ctx| f(ctx)) {
                    Ok(()) => self.succeeded(i, phase),
                    Err(e) => self.failed(i, phase, e, false),
                }
            }
            Action::Remote {
                channel,
                reply_to,
                command,
                ..
            } => {
                let Some(command) = command else {
                    // `build()` rejects remote steps without a command.
                    return self.failed(i, phase, StepError::permanent("no command"), false);
                };
                let payload = match command(&self.inst.data) {
                    Ok(v) => v,
                    Err(e) => {
                        let err = StepError::permanent(format!("cannot encode command: {e}"));
                        return self.failed(i, phase, err, false);
                    }
                };
                let name = self.step_name(i);
                let env = Envelope {
                    id: Envelope::command_id(&self.inst.id, &name, phase),
                    channel: channel.clone(),
                    saga_id: self.inst.id.clone(),
                    saga: self.inst.saga.clone(),
                    kind: MessageKind::Command,
                    step: Some(name.clone()),
                    phase: Some(phase),
                    attempt,
                    reply_to: reply_to.clone(),
                    outcome: None,
                    timestamp: self.now,
                    payload,
                };
                self.effects.push(Effect::Send(env.clone()));
                self.inst.awaiting = Some(Awaiting {
                    step: i,
                    phase,
                    attempt,
                    command: env,
                });
                self.inst.record(
                    self.now,
                    format!(
                        "step `{name}`: {} command sent (attempt {attempt})",
                        phase.as_str()
                    ),
                );
                if let Some(timeout) = self.def.steps()[i].timeout {
                    let id = format!("{name}/{}/deadline/{attempt}", phase.as_str());
                    self.arm(
                        TimerKind::AttemptDeadline {
                            step: i,
                            phase,
                            attempt,
                        },
                        id,
                        timeout,
                    );
                }
                Flow::Wait
            }
        }
    }

    /// Runs user code on a copy of the data; keeps the copy and the emitted
    /// events only on success.
    fn run_user_code(
        &mut self,
        f: impl FnOnce(&mut StepContext<'_, D>) -> Result<(), StepError>,
    ) -> Result<(), StepError> {
        let mut data = self.inst.data.clone();
        let mut emitted = Vec::new();
        let result = {
            let mut ctx = StepContext {
                data: &mut data,
                saga_id: &self.inst.id,
                now: self.now,
                failure: self.inst.failure.as_deref(),
                emitted: &mut emitted,
            };
            f(&mut ctx)
        };
        result?;
        let mut messages = Vec::with_capacity(emitted.len());
        for Emitted {
            channel,
            command,
            value,
        } in emitted
        {
            match value {
                Ok(payload) => messages.push((channel, command, payload)),
                Err(e) => {
                    return Err(StepError::permanent(format!(
                        "cannot encode message for `{channel}`: {e}"
                    )))
                }
            }
        }
        self.inst.data = data;
        for (channel, command, payload) in messages {
            self.inst.event_seq += 1;
            let kind = if command { "command" } else { "event" };
            let id = MessageId::new(format!("{}/{kind}/{}", self.inst.id, self.inst.event_seq));
            let mut env = Envelope::event(
                id,
                channel,
                self.inst.id.clone(),
                self.inst.saga.clone(),
                payload,
                self.now,
            );
            if command {
                env.kind = MessageKind::Command;
                env.attempt = 1;
            }
            self.effects.push(Effect::Send(env));
        }
        Ok(())
    }

    fn succeeded(&mut self, i: usize, phase: Phase) -> Flow {
        match phase {
            Phase::Forward => self.step_succeeded(i),
            Phase::Compensation => {
                self.inst.steps[i].state = StepState::Compensated;
                self.inst.record(
                    self.now,
                    format!("step `{}`: compensated", self.step_name(i)),
                );
                Flow::Continue
            }
        }
    }

    fn step_succeeded(&mut self, i: usize) -> Flow {
        self.inst.steps[i].state = StepState::Succeeded;
        self.inst
            .record(self.now, format!("step `{}`: succeeded", self.step_name(i)));
        self.inst.cursor = i + 1;
        Flow::Continue
    }

    /// An attempt failed: retry after a backoff, compensate, or park.
    fn failed(&mut self, i: usize, phase: Phase, err: StepError, indeterminate: bool) -> Flow {
        let step = &self.def.steps()[i];
        let name = step.name.clone();
        let kind = step.kind;
        let rec = &mut self.inst.steps[i];
        rec.last_error = Some(err.message.clone());
        let (policy, attempts, first) = match phase {
            Phase::Forward => (&step.retry, rec.attempts, rec.first_attempt_at),
            Phase::Compensation => (
                &step.compensation_retry,
                rec.compensation_attempts,
                rec.first_compensation_at,
            ),
        };
        let elapsed = self.now.saturating_since(first.unwrap_or(self.now));
        let decision = policy.decide(err.class, attempts, elapsed, seed(&self.inst.id, i, phase));
        tracing::debug!(step = %name, attempt = attempts, error = %err, ?decision, "attempt failed");
        match decision {
            RetryDecision::RetryAfter(delay) => {
                self.inst.record(
                    self.now,
                    format!(
                        "step `{name}`: {} attempt {attempts} failed: {err}; retry in {delay:?}",
                        phase.as_str()
                    ),
                );
                let id = format!("{name}/{}/backoff/{attempts}", phase.as_str());
                self.arm(TimerKind::Backoff { step: i, phase }, id, delay);
                Flow::Wait
            }
            RetryDecision::GiveUp(why) => {
                let what = format!(
                    "step `{name}`: {} failed after {attempts} attempt(s) ({why}): {err}",
                    phase.as_str()
                );
                let reason = match (phase, kind) {
                    (Phase::Forward, StepKind::Compensatable) => {
                        self.inst.steps[i].state = if indeterminate {
                            StepState::Indeterminate
                        } else {
                            StepState::Failed
                        };
                        self.begin_compensation(err.message, what);
                        return Flow::Continue;
                    }
                    (Phase::Forward, StepKind::Pivot) if !indeterminate => {
                        self.inst.steps[i].state = StepState::Failed;
                        self.begin_compensation(err.message, what);
                        return Flow::Continue;
                    }
                    (Phase::Forward, StepKind::Pivot) => {
                        self.inst.steps[i].state = StepState::Indeterminate;
                        format!("outcome of pivot step `{name}` unknown: {err}")
                    }
                    (Phase::Forward, StepKind::Retriable) => {
                        self.inst.steps[i].state = StepState::Failed;
                        format!("step `{name}` failed after the point of no return: {err}")
                    }
                    (Phase::Compensation, _) => {
                        format!("compensation of step `{name}` failed: {err}")
                    }
                };
                let why = why.to_string();
                self.park(i, phase, reason, &why, &err.message, attempts, what)
            }
        }
    }

    fn begin_compensation(&mut self, reason: String, what: String) {
        self.inst.failure = Some(reason);
        self.inst.phase = Phase::Compensation;
        self.set_status(SagaStatus::Compensating, what);
    }

    #[allow(clippy::too_many_arguments)]
    fn park(
        &mut self,
        i: usize,
        phase: Phase,
        reason: String,
        why: &str,
        last_error: &str,
        attempts: u32,
        what: String,
    ) -> Flow {
        let original = match self.inst.awaiting.take() {
            Some(a) => a.command,
            None => self.local_envelope(i, phase),
        };
        let dead = DeadLetter {
            id: MessageId::new(format!("{}/dead-letter/{}", original.id, self.inst.version)),
            channel: self.def.dead_letter_channel().to_owned(),
            source: self.inst.saga.clone(),
            original,
            failure_timestamp: self.now,
            retry_count: attempts,
            reason: format!("{reason} ({why})"),
            last_error: last_error.to_owned(),
        };
        self.effects.push(Effect::DeadLetter(dead));
        self.inst.failure = Some(reason.clone());
        self.inst.phase = phase;
        self.set_status(SagaStatus::Parked { reason }, what);
        Flow::Wait
    }

    /// A stand-in envelope for a local step, for its dead letter.
    fn local_envelope(&self, i: usize, phase: Phase) -> Envelope {
        let name = self.step_name(i);
        Envelope {
            id: Envelope::command_id(&self.inst.id, &name, phase),
            channel: format!("{}.local", self.inst.saga),
            saga_id: self.inst.id.clone(),
            saga: self.inst.saga.clone(),
            kind: MessageKind::Command,
            step: Some(name),
            phase: Some(phase),
            attempt: self.inst.steps[i].attempts,
            reply_to: None,
            outcome: None,
            timestamp: self.now,
            payload: serde_json::to_value(&self.inst.data).unwrap_or(Value::Null),
        }
    }

    fn on_reply(&mut self, env: Envelope) -> Result<Handled, SagaError> {
        if env.kind != MessageKind::Reply {
            return Err(SagaError::WrongMessageKind {
                message_id: env.id,
                expected: "reply",
                found: env.kind.as_str(),
            });
        }
        if env.saga != self.inst.saga || env.saga_id != self.inst.id {
            return Err(SagaError::WrongSaga {
                expected: format!("{}/{}", self.inst.saga, self.inst.id),
                found: format!("{}/{}", env.saga, env.saga_id),
                message_id: env.id,
            });
        }
        let step_name = env.step.clone().unwrap_or_default();
        let Some(i) = self.def.step_index(&step_name) else {
            return Err(SagaError::UnknownStep {
                saga_id: env.saga_id,
                step: step_name,
                message_id: env.id,
            });
        };
        let phase = env.phase.unwrap_or(Phase::Forward);
        let outcome = env.outcome.clone().unwrap_or(ReplyOutcome::Success);
        let Some(awaiting) = &self.inst.awaiting else {
            return Ok(Handled::Ignored("no command is waiting for a reply"));
        };
        if awaiting.step != i || awaiting.phase != phase {
            return Ok(Handled::Ignored(
                "reply to a command that is no longer awaited",
            ));
        }
        // A success answers every attempt of the same command (participants
        // deduplicate by message id); a failure only the current attempt.
        let current = awaiting.attempt;
        let acceptable = match outcome {
            ReplyOutcome::Success => env.attempt <= current,
            ReplyOutcome::Failure { .. } => env.attempt == current,
        };
        if !acceptable {
            return Ok(Handled::Ignored("reply to an earlier attempt"));
        }
        let deadline = TimerId(format!("{step_name}/{}/deadline/{current}", phase.as_str()));
        match outcome {
            ReplyOutcome::Success => {
                let flow = match (phase, &self.def.steps()[i].forward) {
                    (Phase::Forward, Some(Action::Remote { on_reply, .. })) => {
                        let on_reply = on_reply.clone();
                        let mut decode_error = None;
                        let payload = env.payload;
                        let result = self.run_user_code(|ctx| match on_reply(ctx, payload) {
                            Ok(r) => r,
                            Err(e) => {
                                decode_error = Some(e);
                                Ok(())
                            }
                        });
                        if let Some(source) = decode_error {
                            return Err(SagaError::Decode {
                                saga_id: self.inst.id.clone(),
                                step: step_name,
                                what: "reply",
                                source,
                            });
                        }
                        self.inst.awaiting = None;
                        self.disarm(&deadline);
                        match result {
                            Ok(()) => self.succeeded(i, phase),
                            Err(e) => self.failed(i, phase, e, false),
                        }
                    }
                    _ => {
                        self.inst.awaiting = None;
                        self.disarm(&deadline);
                        self.succeeded(i, phase)
                    }
                };
                if let Flow::Continue = flow {
                    self.drive();
                }
            }
            ReplyOutcome::Failure { class, error } => {
                self.inst.awaiting = None;
                self.disarm(&deadline);
                let err = StepError {
                    class,
                    message: error,
                };
                // A retryable failure says nothing of other deliveries of the
                // same command (a redelivered copy may have succeeded): if
                // this is the last attempt, the outcome is unknown. A
                // permanent failure is cached by the participant's ledger, so
                // no copy took effect.
                let unknown = class == crate::retry::ErrorClass::Retryable;
                if let Flow::Continue = self.failed(i, phase, err, unknown) {
                    self.drive();
                }
            }
        }
        Ok(Handled::Applied)
    }

    fn on_timer(&mut self, id: &TimerId) -> Handled {
        let Some(timer) = self.inst.timer(id).cloned() else {
            return Handled::Ignored("timer not armed (already fired or disarmed)");
        };
        self.inst.timers.retain(|t| &t.id != id);
        match timer.kind {
            TimerKind::AttemptDeadline {
                step,
                phase,
                attempt,
            } => {
                let matches =
                    self.inst.awaiting.as_ref().is_some_and(|a| {
                        a.step == step && a.phase == phase && a.attempt == attempt
                    });
                if !matches {
                    return Handled::Ignored("deadline of an attempt that already ended");
                }
                let timeout = self.def.steps()[step].timeout.unwrap_or_default();
                let err = StepError::retryable(format!("no reply within {timeout:?}"));
                // Keep `awaiting` until `failed` decides: a dead letter needs the command.
                let flow = self.failed(step, phase, err, true);
                if !matches!(self.inst.status, SagaStatus::Parked { .. }) {
                    self.inst.awaiting = None;
                }
                if let Flow::Continue = flow {
                    self.drive();
                }
            }
            TimerKind::Backoff { .. } => self.drive(),
            TimerKind::SagaDeadline => self.on_saga_deadline(),
        }
        Handled::Applied
    }

    fn on_saga_deadline(&mut self) {
        let past_no_return =
            self.inst.status != SagaStatus::Running
                || self.def.steps().iter().zip(&self.inst.steps).any(|(s, r)| {
                    s.kind != StepKind::Compensatable && r.state == StepState::Succeeded
                });
        if past_no_return {
            self.inst.record(
                self.now,
                "saga deadline passed after the point of no return: carrying on".into(),
            );
            return;
        }
        let i = self.inst.cursor;
        let waiting = self.inst.awaiting.take();
        for t in self.inst.timers.clone() {
            if matches!(
                t.kind,
                TimerKind::AttemptDeadline { .. } | TimerKind::Backoff { .. }
            ) {
                self.disarm(&t.id);
            }
        }
        let name = self.step_name(i);
        let reason = "saga timed out".to_owned();
        if waiting.is_some() && self.def.steps()[i].kind == StepKind::Pivot {
            self.inst.awaiting = waiting;
            self.inst.steps[i].state = StepState::Indeterminate;
            let attempts = self.inst.steps[i].attempts;
            self.park(
                i,
                Phase::Forward,
                format!("saga timed out while pivot step `{name}` was in flight"),
                "saga deadline",
                "saga timed out",
                attempts,
                "saga timed out during the pivot".into(),
            );
            return;
        }
        self.inst.steps[i].state = if waiting.is_some() {
            StepState::Indeterminate
        } else {
            StepState::Failed
        };
        self.begin_compensation(reason, format!("saga timed out during step `{name}`"));
        self.drive();
    }

    fn on_operator(&mut self, action: OperatorAction) -> Result<Handled, SagaError> {
        let SagaStatus::Parked { .. } = self.inst.status else {
            return Err(SagaError::InvalidAction {
                saga_id: self.inst.id.clone(),
                action: format!("{action:?}").to_lowercase(),
                status: self.inst.status.to_string(),
            });
        };
        let i = self.inst.cursor.min(self.def.steps().len() - 1);
        let name = self.step_name(i);
        self.inst.awaiting = None;
        let phase = self.inst.phase;
        let rec = &mut self.inst.steps[i];
        match (action, phase) {
            (OperatorAction::Retry, Phase::Forward) => {
                rec.attempts = 0;
                rec.first_attempt_at = None;
                self.set_status(
                    SagaStatus::Running,
                    format!("operator: retry step `{name}`"),
                );
            }
            (OperatorAction::Retry, Phase::Compensation) => {
                rec.compensation_attempts = 0;
                rec.first_compensation_at = None;
                rec.state = StepState::Compensating;
                self.set_status(
                    SagaStatus::Compensating,
                    format!("operator: retry compensation of step `{name}`"),
                );
            }
            (OperatorAction::Skip, Phase::Forward) => {
                rec.state = StepState::Skipped;
                self.inst.cursor = i + 1;
                self.set_status(SagaStatus::Running, format!("operator: skip step `{name}`"));
            }
            (OperatorAction::Skip, Phase::Compensation) => {
                rec.state = StepState::Compensated;
                self.set_status(
                    SagaStatus::Compensating,
                    format!("operator: mark step `{name}` compensated"),
                );
            }
        }
        if phase == Phase::Forward {
            self.inst.failure = None;
        }
        self.drive();
        Ok(Handled::Applied)
    }
}
