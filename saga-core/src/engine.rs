//! The pure core: `(instance, input, now) -> (instance', effects)`.
//!
//! Nothing here does I/O, reads a clock or draws random numbers: drivers
//! pass the time in and carry the effects out.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::{
    Action, Emitted, Exhausted, SagaData, SagaDefinition, StepContext, StepError, StepFailure,
    StepKind,
};
use crate::error::SagaError;
use crate::ids::{concat_interned, concat_shared, MessageId, Part::N, Part::S, SagaId, Timestamp};
use crate::instance::{
    Awaiting, SagaInstance, SagaStatus, StepRecord, StepState, Timer, TimerId, TimerKind,
};
use crate::message::{DeadLetter, EncodedEnvelope, Envelope, MessageKind, Phase, ReplyOutcome};
use crate::retry::{ErrorClass, GiveUpReason, RetryDecision};
use crate::trace::TraceContext;

/// Something that happens to a running saga.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Input {
    /// A participant's reply.
    Reply(Envelope),
    /// A timer the saga armed is due.
    Timer(TimerId),
    /// An operator's decision about a parked or stuck saga.
    Operator(Operation),
}

/// What an operator can do with a parked saga, or with a stuck one (a
/// saga waiting on its current step: a command in flight with no reply
/// yet, or a backoff before the next attempt).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OperatorAction {
    /// Run the parked step or compensation again, with a fresh retry
    /// budget. The new command has a new message id, so the participant
    /// runs it again (its own idempotency, by
    /// [`Envelope::idempotency_key`], keeps it from acting twice).
    ///
    /// On a stuck saga (running or compensating, waiting on its current
    /// step) it is "retry now": the backoff is cut short, or the command
    /// in flight is abandoned as if its deadline had passed (a
    /// compensatable forward step then counts as possibly applied, so it
    /// is compensated if the saga later compensates; a pivot is never
    /// compensated), and the next attempt is sent at once, with a fresh
    /// retry budget. A late success reply to the abandoned command is
    /// still applied. Pass [`Operation::at_version`] so that the same
    /// request sent twice does not abandon the command the first sent.
    Retry,
    /// Consider the parked step done (forward) or undone (compensating) and
    /// go on. Parked sagas only: a step still waiting on a reply or a
    /// backoff is retried or aborted instead.
    Skip,
    /// Give up a saga parked on a forward step before its point of no
    /// return: the parked step counts as not done (as possibly done if its
    /// outcome is unknown and it is compensatable: it is compensated too)
    /// and the steps done are compensated. Refused past the point of no
    /// return (after a pivot or on a retryable step) and while
    /// compensating. Aborting a pivot whose outcome is unknown is the
    /// operator's word that it did not take effect: a late success reply
    /// to its abandoned command is ignored, so check the participant first.
    ///
    /// A stuck saga may be aborted too while its current step is
    /// compensatable; a command of that step still in flight counts as
    /// possibly applied, so the step is compensated as well. A stuck saga
    /// waiting on a pivot is not aborted: its reply or deadline decides.
    Abort,
}

impl OperatorAction {
    /// `"retry"`, `"skip"` or `"abort"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::Retry => "retry",
            OperatorAction::Skip => "skip",
            OperatorAction::Abort => "abort",
        }
    }
}

impl fmt::Display for OperatorAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator's action on a parked or stuck saga, with who took it and why: both
/// are recorded in the saga's history.
///
/// ```
/// use saga_core::{Operation, OperatorAction};
/// let op = Operation::retry("alice").note("the card provider is back");
/// assert_eq!(op.action, OperatorAction::Retry);
/// assert_eq!(op.operator, "alice");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Operation {
    /// What to do.
    pub action: OperatorAction,
    /// Who does it (an operator's name or identity).
    pub operator: String,
    /// Why (free text, may be empty).
    #[serde(default)]
    pub note: String,
    /// The step the operator saw the saga parked (or stuck) on, if given:
    /// the action is refused if by the time it is applied the saga is on
    /// another step (a late reply moved it on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The saga's [`SagaInstance::version`] the operator saw, if given:
    /// the action is refused if the saga changed since (a reply moved it
    /// on, or another action was applied first). It makes an action safe
    /// to send twice (a double click, a retried request): the second one
    /// is refused, where a second "retry now" would otherwise abandon the
    /// command the first one just sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

impl Operation {
    /// `action` by `operator`, without a note.
    pub fn new(action: OperatorAction, operator: impl Into<String>) -> Self {
        Self {
            action,
            operator: operator.into(),
            note: String::new(),
            step: None,
            version: None,
        }
    }

    /// [`OperatorAction::Retry`] by `operator`.
    pub fn retry(operator: impl Into<String>) -> Self {
        Self::new(OperatorAction::Retry, operator)
    }

    /// [`OperatorAction::Skip`] by `operator`.
    pub fn skip(operator: impl Into<String>) -> Self {
        Self::new(OperatorAction::Skip, operator)
    }

    /// [`OperatorAction::Abort`] by `operator`.
    pub fn abort(operator: impl Into<String>) -> Self {
        Self::new(OperatorAction::Abort, operator)
    }

    /// Adds a note saying why.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// Whether the operation applies to `instance` (of `def`) as it stands:
    /// it must be parked (or, for a retry or an abort, stuck: see
    /// [`OperatorAction`]), on [`Operation::step`] if given, and an abort
    /// must come before the point of no return. Runtimes check this before
    /// sending an operation to a saga's owner, which checks it again.
    ///
    /// # Errors
    /// [`SagaError::InvalidAction`] saying why not.
    pub fn check<D: SagaData>(
        &self,
        def: &SagaDefinition<D>,
        instance: &SagaInstance<D>,
    ) -> Result<(), SagaError> {
        let refuse = |action: String, status: String| SagaError::InvalidAction {
            saga_id: instance.id.clone(),
            action,
            status,
        };
        let steps = def.steps();
        let i = instance.cursor.min(steps.len().saturating_sub(1));
        let name = steps.get(i).map_or("", |s| &*s.name);
        if !instance.status.is_parked() {
            let stuck = match self.action {
                OperatorAction::Retry => waiting_on(instance, i).is_some(),
                OperatorAction::Abort => {
                    instance.status == SagaStatus::Running
                        && waiting_on(instance, i).is_some()
                        && steps
                            .get(i)
                            .is_some_and(|s| s.kind == StepKind::Compensatable)
                }
                OperatorAction::Skip => false,
            };
            if !stuck {
                let status = if waiting_on(instance, i).is_some() {
                    format!("{} on step `{name}`, not parked", instance.status)
                } else {
                    instance.status.to_string()
                };
                return Err(refuse(self.action.as_str().to_owned(), status));
            }
        }
        if let Some(expected) = &self.step {
            if expected != name {
                return Err(refuse(
                    format!("{} step `{expected}`", self.action),
                    format!("{} on step `{name}`", instance.status),
                ));
            }
        }
        if let Some(seen) = self.version {
            if seen != instance.version {
                return Err(refuse(
                    format!("{} the saga as of version {seen}", self.action),
                    format!(
                        "{} at version {} (it changed since)",
                        instance.status, instance.version
                    ),
                ));
            }
        }
        if self.action == OperatorAction::Abort {
            let first_no_return = steps.iter().position(|s| s.kind != StepKind::Compensatable);
            let past = instance.phase != Phase::Forward
                || first_no_return
                    .is_some_and(|f| i > f || (i == f && steps[f].kind == StepKind::Retryable));
            if past {
                return Err(refuse(
                    "abort".into(),
                    format!(
                        "{} on step `{name}`, past the point of no return",
                        instance.status
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Applies only if the saga is still parked (or stuck) on `step`
    /// (the step the operator looked at).
    pub fn on_step(mut self, step: impl Into<String>) -> Self {
        self.step = Some(step.into());
        self
    }

    /// Applies only if the saga is still at `version`
    /// ([`SagaInstance::version`], as the operator saw it).
    pub fn at_version(mut self, version: u64) -> Self {
        self.version = Some(version);
        self
    }
}

/// What a saga that is neither parked nor settled waits on at step `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// A command in flight, with no reply and no verdict yet.
    Reply,
    /// A backoff before the next attempt.
    Backoff,
}

/// What `instance` waits on at step `i` in its current phase, if anything
/// (running or compensating sagas only).
fn waiting_on<D>(instance: &SagaInstance<D>, i: usize) -> Option<Waiting> {
    let phase = match instance.status {
        SagaStatus::Running => Phase::Forward,
        SagaStatus::Compensating => Phase::Compensation,
        _ => return None,
    };
    if instance.phase != phase {
        return None;
    }
    let in_flight = instance
        .awaiting
        .as_ref()
        .is_some_and(|a| a.step == i && a.phase == phase && a.in_flight);
    if in_flight {
        return Some(Waiting::Reply);
    }
    let backoff = instance.timers.iter().any(
        |t| matches!(t.kind, TimerKind::Backoff { step, phase: p } if step == i && p == phase),
    );
    backoff.then_some(Waiting::Backoff)
}

/// What the driver must carry out after a transition, in order.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Effect {
    /// Send this command or event on its channel.
    Send(Envelope),
    /// Arm this timer (it is also in the instance, for recovery).
    ScheduleTimer(Timer),
    /// Disarm this timer.
    CancelTimer(TimerId),
    /// Write this dead letter to its channel. Boxed: a dead letter is
    /// large and rare, and every transition's list of effects would
    /// otherwise be sized for it.
    DeadLetter(Box<DeadLetter>),
}

/// Whether an input changed the saga.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handled {
    /// The input was applied.
    Applied,
    /// The input was a duplicate or stale and was ignored.
    Ignored(Ignored),
}

/// Why an input was ignored (it changes nothing, and that is not an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Ignored {
    /// A reply, but the saga waits for no reply.
    NothingAwaited,
    /// A reply to a step or phase the saga no longer waits on.
    NotAwaited,
    /// A failure reply to an earlier attempt (a later one is in flight).
    EarlierAttempt,
    /// A failure reply to an attempt already judged (a duplicate, or a
    /// reply after its deadline).
    AlreadyJudged,
    /// A timer that is not armed (fired already or disarmed).
    TimerNotArmed,
}

impl Ignored {
    /// A short text, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::NothingAwaited => "no command is waiting for a reply",
            Ignored::NotAwaited => "reply to a command that is no longer awaited",
            Ignored::EarlierAttempt => "failure reply to an earlier attempt",
            Ignored::AlreadyJudged => "failure reply to an attempt already judged",
            Ignored::TimerNotArmed => "timer not armed (already fired or disarmed)",
        }
    }
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of handling one input: the new instance and the effects.
#[derive(Clone, Debug)]
#[non_exhaustive]
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
    /// For a reply: the command the input instance awaits, not copied
    /// into `inst` (whose `awaiting` is then `None`) because the usual
    /// outcome, a success, drops it. Copied in by `keep_awaiting` on every
    /// other outcome; only `on_reply` and `handle` see it.
    uncopied: Option<&'a Awaiting>,
    /// For an input to an instance: that instance's data, while
    /// `inst.data` is still equal to it. User code then runs on
    /// `inst.data` in place, and a failure copies this back: the data is
    /// copied once per transition, not once more per step that runs.
    input_data: Option<&'a D>,
    /// The trace context the messages sent carry: the instance's, or the
    /// span of the driver that handles the input.
    send_trace: Option<TraceContext>,
}

impl<D: SagaData> SagaDefinition<D> {
    /// Starts a new instance `id` with `data` and runs it until it waits.
    ///
    /// # Errors
    /// [`SagaError::Panicked`] if the saga's code panicked.
    pub fn start(&self, id: SagaId, data: D, now: Timestamp) -> Result<Transition<D>, SagaError> {
        self.start_traced(id, data, now, None)
    }

    /// Like [`SagaDefinition::start`], in trace `trace`: the instance
    /// keeps it ([`SagaInstance::trace`]) and every message it sends
    /// carries it ([`Envelope::traceparent`]). The engine draws no ids: a
    /// driver links its span to the caller's trace and passes the span's
    /// context here.
    ///
    /// # Errors
    /// [`SagaError::Panicked`] if the saga's code panicked.
    pub fn start_traced(
        &self,
        id: SagaId,
        data: D,
        now: Timestamp,
        trace: Option<TraceContext>,
    ) -> Result<Transition<D>, SagaError> {
        let inst = SagaInstance {
            id,
            saga: self.inner.name.clone(),
            data,
            status: SagaStatus::Running,
            phase: Phase::Forward,
            cursor: 0,
            steps: self
                .steps()
                .iter()
                .map(|s| StepRecord::new(s.name.clone()))
                .collect(),
            awaiting: None,
            timers: Vec::new(),
            failure: None,
            event_seq: 0,
            version: 0,
            created_at: now,
            updated_at: now,
            history: Vec::new(),
            trace,
        };
        let _span =
            tracing::debug_span!("saga.start", saga_id = %inst.id, saga = %inst.saga).entered();
        let mut m = Machine {
            def: self,
            inst,
            now,
            effects: Vec::new(),
            uncopied: None,
            input_data: None,
            send_trace: trace,
        };
        m.inst.record(now, self.inner.lines.started.clone());
        if let Some(timeout) = self.inner.timeout {
            let id = self.inner.lines.saga_deadline.clone();
            m.arm(TimerKind::SagaDeadline, id, timeout);
        }
        // As in `handle`: a panic in the saga's code is an error for this
        // start, not the end of the caller's thread.
        let saga_id = m.inst.id.clone();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            m.drive();
            m.finish(Handled::Applied)
        }))
        .map_err(|panic| panicked(&saga_id, &*panic))
    }

    /// Handles one input for `instance` at time `now`.
    ///
    /// Duplicate and stale inputs (a second reply to the same command, a
    /// failure reply to an attempt that timed out, a timer that was
    /// disarmed) are ignored: the result says [`Handled::Ignored`] and has
    /// no effects.
    ///
    /// # Errors
    /// Malformed inputs, and `instance` is left as it was:
    /// [`SagaError::WrongSaga`] (an instance or reply of another saga),
    /// [`SagaError::WrongMessageKind`], [`SagaError::UnknownStep`],
    /// [`SagaError::Decode`] (a reply payload of the wrong type), and
    /// [`SagaError::InvalidAction`] for an operator action that does not
    /// apply ([`Operation::check`]), [`SagaError::DefinitionMismatch`]
    /// for an instance recorded with other steps than this definition's,
    /// and [`SagaError::Panicked`] if the saga's code panicked.
    pub fn handle(
        &self,
        instance: &SagaInstance<D>,
        input: Input,
        now: Timestamp,
    ) -> Result<Transition<D>, SagaError> {
        self.handle_sending_in(instance, input, now, instance.trace)
    }

    /// Whether `instance` fits this definition: one record per step, in
    /// the definition's order and with its names, and a cursor, awaited
    /// command and timers that name steps it has. The engine indexes the
    /// definition's steps by the instance's positions.
    fn check_fits(&self, instance: &SagaInstance<D>) -> Result<(), SagaError> {
        let steps = self.steps();
        let mismatch = |reason: String| SagaError::DefinitionMismatch {
            saga_id: instance.id.clone(),
            reason,
        };
        if instance.steps.len() != steps.len() {
            return Err(mismatch(format!(
                "it was recorded with {} steps, the definition has {}",
                instance.steps.len(),
                steps.len()
            )));
        }
        if let Some((i, (kept, step))) = instance
            .steps
            .iter()
            .zip(steps)
            .enumerate()
            .find(|(_, (kept, step))| kept.name != step.name)
        {
            return Err(mismatch(format!(
                "its step {} is `{}`, the definition's is `{}`",
                i + 1,
                kept.name,
                step.name
            )));
        }
        let step_of_timer = |t: &crate::instance::Timer| match t.kind {
            TimerKind::AttemptDeadline { step, .. } | TimerKind::Backoff { step, .. } => Some(step),
            TimerKind::SagaDeadline => None,
        };
        let out_of_range = [instance.cursor.checked_sub(1)]
            .into_iter()
            .chain([instance.awaiting.as_ref().map(|a| a.step)])
            .chain(instance.timers.iter().map(step_of_timer))
            .flatten()
            .find(|i| *i >= steps.len());
        match out_of_range {
            Some(i) => Err(mismatch(format!(
                "it refers to step {} of {}",
                i + 1,
                steps.len()
            ))),
            None => Ok(()),
        }
    }

    /// Like [`SagaDefinition::handle`], the messages sent carrying trace
    /// context `send_trace` (a driver's span for the input) instead of the
    /// instance's.
    pub(crate) fn handle_sending_in(
        &self,
        instance: &SagaInstance<D>,
        input: Input,
        now: Timestamp,
        send_trace: Option<TraceContext>,
    ) -> Result<Transition<D>, SagaError> {
        let _span =
            tracing::debug_span!("saga.handle", saga_id = %instance.id, saga = %instance.saga)
                .entered();
        if *instance.saga != *self.name() {
            return Err(SagaError::WrongSaga {
                expected: self.name().to_owned(),
                found: instance.saga.to_string(),
                message_id: MessageId::new(format!("{}/instance", instance.id)),
            });
        }
        self.check_fits(instance)?;
        // The saga's own code (its steps' closures) runs on a copy: a panic
        // in it leaves `instance` as it was, and is an error for this
        // input rather than the end of the thread that runs the saga.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.transition(instance, input, now, send_trace)
        }))
        .unwrap_or_else(|panic| Err(panicked(&instance.id, &*panic)))
    }

    fn transition(
        &self,
        instance: &SagaInstance<D>,
        input: Input,
        now: Timestamp,
        send_trace: Option<TraceContext>,
    ) -> Result<Transition<D>, SagaError> {
        let mut m = match (&input, &instance.awaiting) {
            (Input::Reply(_), Some(awaiting)) => Machine {
                def: self,
                inst: instance.clone_for_transition(false),
                now,
                effects: Vec::new(),
                uncopied: Some(awaiting),
                input_data: Some(&instance.data),
                send_trace,
            },
            _ => Machine {
                def: self,
                inst: instance.clone_for_transition(true),
                now,
                effects: Vec::new(),
                uncopied: None,
                input_data: Some(&instance.data),
                send_trace,
            },
        };
        let handled = match input {
            Input::Reply(env) => {
                let handled = m.on_reply(env)?;
                m.keep_awaiting();
                handled
            }
            Input::Timer(id) => m.on_timer(&id),
            Input::Operator(op) => m.on_operator(op)?,
        };
        if handled != Handled::Applied {
            return Ok(Transition {
                instance: m.inst,
                effects: Vec::new(),
                handled,
            });
        }
        Ok(m.finish(handled))
    }
}

/// The error for a panic in saga `id`'s code.
fn panicked(id: &SagaId, panic: &(dyn std::any::Any + Send)) -> SagaError {
    let message = crate::error::panic_message(panic);
    tracing::error!(saga_id = %id, %message, "the saga's code panicked: input refused");
    SagaError::Panicked {
        saga_id: id.clone(),
        message,
    }
}

fn seed(id: &SagaId, step: usize, phase: Phase) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    step.hash(&mut h);
    phase.hash(&mut h);
    h.finish()
}

/// A permanent error if a message user code emitted did not encode.
fn all_encoded(emitted: &[Emitted]) -> Result<(), StepError> {
    for e in emitted {
        if let Err(err) = &e.value {
            return Err(StepError::permanent(format!(
                "cannot encode message for `{}`: {err}",
                e.channel
            )));
        }
    }
    Ok(())
}

fn deadline_id(step: &str, phase: Phase, attempt: u32) -> TimerId {
    TimerId(concat_interned(&[
        S(step),
        S("/"),
        S(phase.as_str()),
        S("/deadline/"),
        N(attempt.into()),
    ]))
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

    /// Copies the awaited command into the instance if `handle` left it
    /// out (see `Machine::uncopied`).
    fn keep_awaiting(&mut self) {
        if let Some(awaiting) = self.uncopied.take() {
            self.inst.awaiting = Some(awaiting.clone());
        }
    }

    fn step_name(&self, i: usize) -> String {
        self.def.steps()[i].name.to_string()
    }

    fn arm(&mut self, kind: TimerKind, id: TimerId, after: std::time::Duration) {
        let timer = Timer {
            id,
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

    /// Disarms the attempt deadlines and backoffs of step `i` in `phase`.
    fn disarm_step(&mut self, i: usize, phase: Phase) {
        let of_step = |t: &Timer| match t.kind {
            TimerKind::AttemptDeadline { step, phase: p, .. }
            | TimerKind::Backoff { step, phase: p } => step == i && p == phase,
            _ => false,
        };
        // One at a time, in the timers' order, each taken out with any
        // other timer of its id (as `disarm` does): no list of ids, no
        // copies of them (a saga has a handful of timers at most).
        while let Some(k) = self.inst.timers.iter().position(of_step) {
            let timer = self.inst.timers.remove(k);
            self.inst.timers.retain(|t| t.id != timer.id);
            self.effects.push(Effect::CancelTimer(timer.id));
        }
    }

    fn disarm_all(&mut self) {
        for t in std::mem::take(&mut self.inst.timers) {
            self.effects.push(Effect::CancelTimer(t.id));
        }
    }

    fn set_status(&mut self, status: SagaStatus, what: impl Into<std::sync::Arc<str>>) {
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
            self.inst.awaiting = None;
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
            self.set_status(
                SagaStatus::Completed,
                self.def.inner.lines.completed.clone(),
            );
            return Flow::Wait;
        }
        let rec = &mut self.inst.steps[i];
        rec.attempts += 1;
        if rec.attempts == 1 {
            rec.executions = 0;
        }
        rec.first_attempt_at.get_or_insert(self.now);
        rec.state = StepState::Running;
        let attempt = rec.attempts;
        // Borrowed from the definition, not from `self`: no copy of the
        // action (a remote one's channel names) to run it.
        let def = self.def;
        let step = &def.steps()[i];
        let _span =
            tracing::debug_span!("saga.step", step = %step.name, attempt, phase = "forward")
                .entered();
        let Some(action) = &step.forward else {
            return self.step_succeeded(i);
        };
        self.run_action(i, Phase::Forward, action)
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
                let what = self.def.inner.lines.steps[i].nothing_to_compensate.clone();
                self.inst.record(self.now, what);
                continue;
            }
            next = Some(i);
            break;
        }
        let Some(i) = next else {
            self.set_status(
                SagaStatus::Compensated,
                self.def.inner.lines.compensated.clone(),
            );
            return Flow::Wait;
        };
        self.inst.cursor = i;
        let rec = &mut self.inst.steps[i];
        if rec.state != StepState::Compensating {
            // The compensation's budget starts.
            rec.executions = 0;
        }
        rec.state = StepState::Compensating;
        rec.compensation_attempts += 1;
        rec.first_compensation_at.get_or_insert(self.now);
        let attempt = rec.compensation_attempts;
        let def = self.def;
        let step = &def.steps()[i];
        let _span =
            tracing::debug_span!("saga.step", step = %step.name, attempt, phase = "compensation")
                .entered();
        let Some(action) = &step.compensation else {
            return Flow::Continue;
        };
        self.run_action(i, Phase::Compensation, action)
    }

    fn run_action(&mut self, i: usize, phase: Phase, action: &Action<D>) -> Flow {
        match action {
            Action::Local(f) => match self.run_user_code(|ctx| f(ctx)) {
                Ok(()) => self.succeeded(i, phase),
                Err(e) => self.failed(i, phase, e, false),
            },
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
                let def = self.def;
                let name = &*def.steps()[i].name;
                let rec = &mut self.inst.steps[i];
                rec.sends += 1;
                let seq = rec.sends;
                let budget_attempt = match phase {
                    Phase::Forward => rec.attempts,
                    Phase::Compensation => rec.compensation_attempts,
                };
                let mut env = Envelope::command(
                    Envelope::command_id(&self.inst.saga, &self.inst.id, name, phase, seq),
                    channel.clone(),
                    self.inst.id.clone(),
                    self.inst.saga.to_string(),
                    payload,
                    self.now,
                );
                env.step = Some(name.to_owned());
                env.phase = Some(phase);
                env.attempt = seq;
                env.reply_to = reply_to.clone();
                env.traceparent = self.send_trace;
                let command = EncodedEnvelope::encode(&env);
                self.effects.push(Effect::Send(env));
                self.inst.awaiting = Some(Awaiting {
                    step: i,
                    phase,
                    attempt: seq,
                    in_flight: true,
                    command,
                });
                self.inst.record(
                    self.now,
                    concat_interned(&[
                        S("step `"),
                        S(name),
                        S("`: "),
                        S(phase.as_str()),
                        S(" command "),
                        N(seq.into()),
                        S(" sent (attempt "),
                        N(budget_attempt.into()),
                        S(")"),
                    ]),
                );
                if let Some(timeout) = self.def.steps()[i].timeout {
                    let id = deadline_id(name, phase, seq);
                    self.arm(
                        TimerKind::AttemptDeadline {
                            step: i,
                            phase,
                            attempt: seq,
                        },
                        id,
                        timeout,
                    );
                }
                Flow::Wait
            }
        }
    }

    /// Runs user code on the data; keeps its changes and the emitted
    /// messages only on success (a failure leaves the data as it was).
    fn run_user_code(
        &mut self,
        f: impl FnOnce(&mut StepContext<'_, D>) -> Result<(), StepError>,
    ) -> Result<(), StepError> {
        let mut emitted = Vec::new();
        match self.input_data {
            // The data is still the input instance's: the code runs on it
            // in place, and a failure puts the input's back.
            Some(input) => {
                let mut ctx = StepContext {
                    data: &mut self.inst.data,
                    saga_id: &self.inst.id,
                    now: self.now,
                    failure: self.inst.failure.as_deref(),
                    emitted: &mut emitted,
                };
                let result = f(&mut ctx).and_then(|()| all_encoded(&emitted));
                if result.is_err() {
                    self.inst.data = input.clone();
                }
                result?;
                self.input_data = None;
            }
            None => {
                let mut data = self.inst.data.clone();
                let mut ctx = StepContext {
                    data: &mut data,
                    saga_id: &self.inst.id,
                    now: self.now,
                    failure: self.inst.failure.as_deref(),
                    emitted: &mut emitted,
                };
                f(&mut ctx).and_then(|()| all_encoded(&emitted))?;
                self.inst.data = data;
            }
        }
        for Emitted {
            channel,
            command,
            value,
        } in emitted
        {
            // Every message encoded (checked above).
            let Ok(payload) = value else { continue };
            self.inst.event_seq += 1;
            let kind = if command { "/command/" } else { "/event/" };
            let id = MessageId::from(concat_shared(&[
                S(&self.inst.saga),
                S(":"),
                S(self.inst.id.as_str()),
                S(kind),
                N(self.inst.event_seq),
            ]));
            let make = if command {
                Envelope::command
            } else {
                Envelope::event
            };
            let env = make(
                id,
                channel,
                self.inst.id.clone(),
                self.inst.saga.to_string(),
                payload,
                self.now,
            )
            .with_traceparent(self.send_trace);
            self.effects.push(Effect::Send(env));
        }
        Ok(())
    }

    fn succeeded(&mut self, i: usize, phase: Phase) -> Flow {
        match phase {
            Phase::Forward => self.step_succeeded(i),
            Phase::Compensation => {
                self.inst.steps[i].state = StepState::Compensated;
                let what = self.def.inner.lines.steps[i].compensated.clone();
                self.inst.record(self.now, what);
                Flow::Continue
            }
        }
    }

    fn step_succeeded(&mut self, i: usize) -> Flow {
        self.inst.steps[i].state = StepState::Succeeded;
        let what = self.def.inner.lines.steps[i].succeeded.clone();
        self.inst.record(self.now, what);
        self.inst.cursor = i + 1;
        Flow::Continue
    }

    /// An attempt failed: retry after a backoff, compensate, continue or
    /// park. `indeterminate`: the attempt may have taken effect.
    fn failed(&mut self, i: usize, phase: Phase, err: StepError, indeterminate: bool) -> Flow {
        self.failed_after(i, phase, err, indeterminate, 1)
    }

    /// Like `failed`, for an attempt the participant ran `executions` times.
    fn failed_after(
        &mut self,
        i: usize,
        phase: Phase,
        err: StepError,
        indeterminate: bool,
        executions: u32,
    ) -> Flow {
        self.inst.steps[i].executions += executions.max(1);
        let step = &self.def.steps()[i];
        let name = step.name.clone();
        let kind = step.kind;
        let exhausted = step.exhausted;
        let rec = &mut self.inst.steps[i];
        rec.last_error = Some(err.message.clone());
        if phase == Phase::Forward && indeterminate {
            rec.uncertain = true;
        }
        // On a transport that may reorder messages, an earlier attempt with
        // no verdict can still arrive and apply after a later one failed for
        // good: a compensatable step then counts as possibly applied.
        let possibly_applied = indeterminate || rec.uncertain;
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
        if let Some(a) = &mut self.inst.awaiting {
            a.in_flight = false;
        }
        match decision {
            RetryDecision::RetryAfter(delay) => {
                self.inst.record(
                    self.now,
                    format!(
                        "step `{name}`: {} attempt {attempts} failed: {err}; retry in {delay:?}",
                        phase.as_str()
                    ),
                );
                let seq = self.inst.steps[i].sends;
                let id = TimerId(concat_interned(&[
                    S(&name),
                    S("/"),
                    S(phase.as_str()),
                    S("/backoff/"),
                    N(seq.into()),
                ]));
                self.arm(TimerKind::Backoff { step: i, phase }, id, delay);
                Flow::Wait
            }
            RetryDecision::GiveUp(why) => {
                // A participant's local retries count as attempts too.
                let executions = self.inst.steps[i].executions;
                let why = match why {
                    GiveUpReason::MaxAttempts(n) if executions > n => {
                        GiveUpReason::MaxAttempts(executions)
                    }
                    other => other,
                };
                let what = format!(
                    "step `{name}`: {} failed after {attempts} attempt(s) ({why}): {err}",
                    phase.as_str()
                );
                let reason = match (phase, kind) {
                    (Phase::Forward, StepKind::Compensatable) => {
                        self.inst.steps[i].state = if possibly_applied {
                            StepState::Indeterminate
                        } else {
                            StepState::Failed
                        };
                        self.abandon_awaiting(indeterminate);
                        self.begin_compensation(err.message, what);
                        return Flow::Continue;
                    }
                    (Phase::Forward, StepKind::Pivot) if !indeterminate => {
                        self.inst.steps[i].state = StepState::Failed;
                        self.inst.awaiting = None;
                        self.begin_compensation(err.message, what);
                        return Flow::Continue;
                    }
                    (Phase::Forward, StepKind::Pivot) => {
                        self.inst.steps[i].state = StepState::Indeterminate;
                        format!("outcome of pivot step `{name}` unknown: {err}")
                    }
                    (Phase::Forward, _) if exhausted == Exhausted::DeadLetterAndContinue => {
                        let executions = self.inst.steps[i].executions;
                        return self.give_up_and_continue(
                            i,
                            &why.to_string(),
                            &err,
                            executions,
                            what,
                        );
                    }
                    (Phase::Forward, _) => {
                        self.inst.steps[i].state = StepState::Failed;
                        format!("step `{name}` failed after the point of no return: {err}")
                    }
                    (Phase::Compensation, _) => {
                        format!("compensation of step `{name}` failed: {err}")
                    }
                };
                let why = why.to_string();
                let executions = self.inst.steps[i].executions;
                self.park(
                    i,
                    phase,
                    reason,
                    &why,
                    &err.message,
                    executions,
                    what,
                    indeterminate,
                )
            }
        }
    }

    /// A step that gives up for good stops waiting on its command; one whose
    /// last attempt may have taken effect keeps it, so a late success reply
    /// is still recognised (and ignored, the saga having moved on).
    fn abandon_awaiting(&mut self, indeterminate: bool) {
        if !indeterminate {
            self.inst.awaiting = None;
        }
    }

    fn begin_compensation(&mut self, reason: String, what: String) {
        self.inst.awaiting = None;
        self.inst.failure = Some(reason);
        self.inst.phase = Phase::Compensation;
        self.set_status(SagaStatus::Compensating, what);
    }

    /// [`Exhausted::DeadLetterAndContinue`]: the dead letter, the give-up
    /// hook, and on to the next step.
    fn give_up_and_continue(
        &mut self,
        i: usize,
        why: &str,
        err: &StepError,
        attempts: u32,
        what: String,
    ) -> Flow {
        let original = self.original_for(i, Phase::Forward);
        let dead = DeadLetter::new(
            self.dead_letter_channel(i),
            self.inst.saga.to_string(),
            original,
            self.now,
            attempts,
            why,
            err.message.clone(),
        );
        self.effects.push(Effect::DeadLetter(Box::new(dead)));
        self.inst.awaiting = None;
        self.inst.steps[i].state = StepState::Failed;
        self.inst
            .record(self.now, format!("{what}; dead-lettered, continuing"));
        if let Some(hook) = self.def.steps()[i].give_up.clone() {
            let failure = StepFailure {
                step: self.step_name(i),
                attempts,
                reason: why.to_owned(),
                error: err.message.clone(),
            };
            if let Err(e) = self.run_user_code(|ctx| {
                hook(ctx, &failure);
                Ok(())
            }) {
                let what = format!("give-up hook of step `{}` failed: {e}", failure.step);
                tracing::warn!(saga_id = %self.inst.id, %what);
                self.inst.record(self.now, what);
            }
        }
        self.inst.cursor = i + 1;
        Flow::Continue
    }

    fn dead_letter_channel(&self, i: usize) -> String {
        self.def.steps()[i]
            .dead_letter_channel
            .clone()
            .unwrap_or_else(|| self.def.dead_letter_channel().to_owned())
    }

    /// The message a dead letter of step `i` carries: the command sent, or
    /// a stand-in for a local step.
    fn original_for(&self, i: usize, phase: Phase) -> Envelope {
        match &self.inst.awaiting {
            Some(a) if a.step == i && a.phase == phase => match a.command.decode() {
                Ok(command) => command,
                Err(e) => {
                    // Only a state record written elsewhere can hold a
                    // command that does not decode: the dead letter
                    // still goes out, with the stand-in.
                    tracing::warn!(saga_id = %self.inst.id, error = %e, "the awaited command does not decode: its dead letter carries a stand-in");
                    self.local_envelope(i, phase)
                }
            },
            _ => self.local_envelope(i, phase),
        }
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
        indeterminate: bool,
    ) -> Flow {
        let original = self.original_for(i, phase);
        let mut dead = DeadLetter::new(
            self.dead_letter_channel(i),
            self.inst.saga.to_string(),
            original,
            self.now,
            attempts,
            format!("{reason} ({why})"),
            last_error,
        );
        // One saga may park on the same command more than once (after an
        // operator's retry): the version keeps the dead letters apart.
        dead.id = MessageId::new(format!("{}/{}", dead.id, self.inst.version));
        self.effects.push(Effect::DeadLetter(Box::new(dead)));
        // While parked, a late reply to a command that may have taken
        // effect still resolves the step: keep waiting on it (judged: only
        // an operator sends it again).
        self.abandon_awaiting(indeterminate);
        if let Some(a) = &mut self.inst.awaiting {
            a.in_flight = false;
        }
        self.inst.failure = Some(reason.clone());
        self.inst.phase = phase;
        self.set_status(SagaStatus::Parked { reason }, what);
        Flow::Wait
    }

    /// A stand-in envelope for a local step, for its dead letter.
    fn local_envelope(&self, i: usize, phase: Phase) -> Envelope {
        let name = self.step_name(i);
        let rec = &self.inst.steps[i];
        let attempt = match phase {
            Phase::Forward => rec.attempts,
            Phase::Compensation => rec.compensation_attempts,
        };
        let mut env = Envelope::command(
            Envelope::command_id(&self.inst.saga, &self.inst.id, &name, phase, attempt),
            format!("{}.local", self.inst.saga),
            self.inst.id.clone(),
            self.inst.saga.to_string(),
            // The saga's data, as far as it encodes: the dead letter says
            // why if it does not.
            serde_json::to_value(&self.inst.data).unwrap_or_else(|e| {
                Value::String(format!("(the saga's data does not encode: {e})"))
            }),
            self.now,
        );
        env.step = Some(name);
        env.phase = Some(phase);
        env.attempt = attempt;
        env.traceparent = self.inst.trace;
        env
    }

    fn on_reply(&mut self, mut env: Envelope) -> Result<Handled, SagaError> {
        if env.kind != MessageKind::Reply {
            return Err(SagaError::WrongMessageKind {
                message_id: env.id,
                expected: "reply",
                found: env.kind.as_str(),
            });
        }
        if *env.saga != *self.inst.saga || env.saga_id != self.inst.id {
            return Err(SagaError::WrongSaga {
                expected: format!("{}/{}", self.inst.saga, self.inst.id),
                found: format!("{}/{}", env.saga, env.saga_id),
                message_id: env.id,
            });
        }
        let Some(i) = self.def.step_index(env.step.as_deref().unwrap_or_default()) else {
            return Err(SagaError::UnknownStep {
                saga_id: env.saga_id,
                step: env.step.unwrap_or_default(),
                message_id: env.id,
            });
        };
        let phase = env.phase.unwrap_or(Phase::Forward);
        // A reply ignored here is still checked: malformed is an error.
        // (Past this point a reply is applied, or its payload was decoded
        // by the step's reply handler, or it is a failure, which has no
        // payload to check: no copy of it is kept for a check.)
        let awaited = self
            .inst
            .awaiting
            .as_ref()
            .or(self.uncopied)
            .map(|a| (a.step, a.phase, a.attempt, a.in_flight));
        let Some((awaited_step, awaited_phase, current, in_flight)) = awaited else {
            self.def.check_reply(&env)?;
            return Ok(Handled::Ignored(Ignored::NothingAwaited));
        };
        if awaited_step != i || awaited_phase != phase || env.attempt > current {
            self.def.check_reply(&env)?;
            return Ok(Handled::Ignored(Ignored::NotAwaited));
        }
        let step_name = env.step.take().unwrap_or_default();
        let outcome = env.outcome.take().unwrap_or(ReplyOutcome::Success);
        // The reply's verdict: a success the step's reply handler accepts
        // (its changes to the data and its messages are kept only then), or
        // a failure (the participant's, or the handler's judgement).
        // `unknown`: a retryable failure reply says nothing of other
        // deliveries of the same command, so if this is the last attempt the
        // outcome is unknown; a permanent one, or the reply handler's verdict
        // on a reply, means the attempt took no effect.
        let (verdict, executions, unknown) = match outcome {
            ReplyOutcome::Success => match (phase, &self.def.steps()[i].forward) {
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
                    (result, 1, false)
                }
                _ => (Ok(()), 1, false),
            },
            ReplyOutcome::Failure {
                class,
                error,
                attempts,
            } => (
                Err(StepError {
                    class,
                    message: error,
                }),
                attempts,
                class == ErrorClass::Retryable,
            ),
        };
        if verdict.is_err() {
            self.keep_awaiting();
        }
        match verdict {
            // A success answers every attempt of the step: each may have
            // taken effect.
            Ok(()) => {
                self.uncopied = None;
                self.resume_if_parked(&step_name, phase, env.attempt);
                self.disarm_step(i, phase);
                self.inst.awaiting = None;
                if let Flow::Continue = self.succeeded(i, phase) {
                    self.drive();
                }
            }
            // A failure speaks only for its own attempt: one of an earlier
            // attempt says nothing of the attempt in flight (and was counted
            // when that attempt ended).
            Err(_) if env.attempt < current => {
                return Ok(Handled::Ignored(Ignored::EarlierAttempt));
            }
            Err(err) if !in_flight => return self.failure_while_judged(i, phase, err),
            Err(err) => {
                self.disarm_step(i, phase);
                if let Flow::Continue = self.failed_after(i, phase, err, unknown, executions) {
                    self.drive();
                }
            }
        }
        Ok(Handled::Applied)
    }

    /// A late success reply resolves the parked step: the saga resumes as
    /// if it had arrived in time.
    fn resume_if_parked(&mut self, step_name: &str, phase: Phase, attempt: u32) {
        if !self.inst.status.is_parked() {
            return;
        }
        let resumed = match phase {
            Phase::Forward => SagaStatus::Running,
            Phase::Compensation => SagaStatus::Compensating,
        };
        self.set_status(
            resumed,
            format!("step `{step_name}`: late reply to command {attempt} resumes the parked saga"),
        );
        if phase == Phase::Forward {
            self.inst.failure = None;
        }
    }

    /// A failure reply to the current attempt after it was judged (its
    /// deadline passed, or it already failed). Running: a duplicate,
    /// ignored. Parked on that command: recorded; a permanent failure of a
    /// pivot whose outcome was unknown settles it: the pivot took no
    /// effect, so the saga compensates.
    fn failure_while_judged(
        &mut self,
        i: usize,
        phase: Phase,
        err: StepError,
    ) -> Result<Handled, SagaError> {
        if !self.inst.status.is_parked() {
            return Ok(Handled::Ignored(Ignored::AlreadyJudged));
        }
        let name = self.step_name(i);
        let pivot = self.def.steps()[i].kind == StepKind::Pivot;
        let error = err.message;
        if err.class == ErrorClass::Permanent && pivot && phase == Phase::Forward {
            self.inst.steps[i].state = StepState::Failed;
            self.inst.steps[i].last_error = Some(error.clone());
            self.begin_compensation(
                error.clone(),
                format!("step `{name}`: late permanent failure of the parked pivot: {error}"),
            );
            self.drive();
            return Ok(Handled::Applied);
        }
        self.inst.steps[i].last_error = Some(error.clone());
        self.inst.record(
            self.now,
            format!(
                "step `{name}`: late {} failure of the parked {} command: {error}",
                match err.class {
                    ErrorClass::Retryable => "retryable",
                    ErrorClass::Permanent => "permanent",
                },
                phase.as_str()
            ),
        );
        Ok(Handled::Applied)
    }

    fn on_timer(&mut self, id: &TimerId) -> Handled {
        let Some(timer) = self.inst.timer(id).cloned() else {
            return Handled::Ignored(Ignored::TimerNotArmed);
        };
        self.inst.timers.retain(|t| &t.id != id);
        match timer.kind {
            TimerKind::AttemptDeadline {
                step,
                phase,
                attempt,
            } => {
                let matches = self.inst.awaiting.as_ref().is_some_and(|a| {
                    a.step == step && a.phase == phase && a.attempt == attempt && a.in_flight
                });
                if !matches {
                    // The attempt ended already: the stale timer just goes.
                    return Handled::Applied;
                }
                let timeout = self.def.steps()[step].timeout.unwrap_or_default();
                let err = StepError::retryable(format!("no reply within {timeout:?}"));
                if let Flow::Continue = self.failed(step, phase, err, true) {
                    self.drive();
                }
            }
            TimerKind::Backoff { .. } => self.drive(),
            TimerKind::SagaDeadline => self.on_saga_deadline(),
        }
        Handled::Applied
    }

    fn on_saga_deadline(&mut self) {
        // Past the point of no return once the cursor is beyond the first
        // step that is not compensatable (a pivot, even one an operator
        // skipped, or a retryable step), or on a retryable one: from there
        // the saga only goes forward.
        let first_no_return = self
            .def
            .steps()
            .iter()
            .position(|s| s.kind != StepKind::Compensatable);
        let cursor = self.inst.cursor;
        let past_no_return = self.inst.status != SagaStatus::Running
            || first_no_return.is_some_and(|f| {
                cursor > f || (cursor == f && self.def.steps()[f].kind == StepKind::Retryable)
            });
        if past_no_return {
            self.inst.record(
                self.now,
                "saga deadline passed after the point of no return: carrying on",
            );
            return;
        }
        let i = self.inst.cursor;
        let waiting = self.inst.awaiting.as_ref().is_some_and(|a| a.step == i);
        for t in self.inst.timers.clone() {
            if matches!(
                t.kind,
                TimerKind::AttemptDeadline { .. } | TimerKind::Backoff { .. }
            ) {
                self.disarm(&t.id);
            }
        }
        let name = self.step_name(i);
        if waiting && self.def.steps()[i].kind == StepKind::Pivot {
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
                true,
            );
            return;
        }
        self.inst.steps[i].state = if waiting {
            StepState::Indeterminate
        } else {
            StepState::Failed
        };
        self.begin_compensation(
            "saga timed out".to_owned(),
            format!("saga timed out during step `{name}`"),
        );
        self.drive();
    }

    /// [`OperatorAction::Abort`] of a saga parked or stuck on step `i`.
    fn abort(&mut self, i: usize, op: Operation) -> Result<Handled, SagaError> {
        let name = self.step_name(i);
        let steps = self.def.steps();
        let kind = steps[i].kind;
        let in_flight = waiting_on(&self.inst, i) == Some(Waiting::Reply);
        for t in self.inst.timers.clone() {
            if matches!(
                t.kind,
                TimerKind::AttemptDeadline { .. } | TimerKind::Backoff { .. }
            ) {
                self.disarm(&t.id);
            }
        }
        self.inst.awaiting = None;
        let rec = &mut self.inst.steps[i];
        // The operator answers for a pivot (they checked it did not take
        // effect); a compensatable step that may have applied is undone.
        rec.state = match kind {
            StepKind::Compensatable
                if in_flight || rec.state == StepState::Indeterminate || rec.uncertain =>
            {
                StepState::Indeterminate
            }
            _ => StepState::Failed,
        };
        let reason = if op.note.is_empty() {
            format!("aborted by {}", op.operator)
        } else {
            format!("aborted by {}: {}", op.operator, op.note)
        };
        self.inst.failure = Some(reason);
        self.inst.phase = Phase::Compensation;
        self.inst.status = SagaStatus::Compensating;
        let note = (!op.note.is_empty()).then_some(op.note);
        self.inst.record_by(
            self.now,
            format!("operator: abort at step `{name}`: compensating"),
            Some(op.operator),
            note,
        );
        self.drive();
        Ok(Handled::Applied)
    }

    /// [`OperatorAction::Retry`] of a stuck saga: the wait on step `i` is
    /// cut short and the next attempt sent now, with a fresh budget.
    fn retry_now(&mut self, i: usize, waiting: Waiting, op: Operation) -> Handled {
        let name = self.step_name(i);
        let phase = self.inst.phase;
        self.disarm_step(i, phase);
        let rec = &mut self.inst.steps[i];
        let cut = match waiting {
            Waiting::Reply => {
                let attempt = self.inst.awaiting.as_ref().map_or(0, |a| a.attempt);
                if let Some(a) = &mut self.inst.awaiting {
                    a.in_flight = false;
                }
                // Its reply may never come, or come late: the attempt may
                // have applied.
                if phase == Phase::Forward {
                    rec.uncertain = true;
                }
                format!("abandons command {attempt}, still unanswered")
            }
            Waiting::Backoff => "skips the backoff".to_owned(),
        };
        match phase {
            Phase::Forward => {
                rec.attempts = 0;
                rec.first_attempt_at = None;
            }
            Phase::Compensation => {
                rec.compensation_attempts = 0;
                rec.first_compensation_at = None;
            }
        }
        rec.executions = 0;
        let what = match phase {
            Phase::Forward => format!("operator: retry step `{name}` now ({cut})"),
            Phase::Compensation => {
                format!("operator: retry compensation of step `{name}` now ({cut})")
            }
        };
        let note = (!op.note.is_empty()).then_some(op.note);
        self.inst.record_by(self.now, what, Some(op.operator), note);
        self.drive();
        Handled::Applied
    }

    fn on_operator(&mut self, op: Operation) -> Result<Handled, SagaError> {
        op.check(self.def, &self.inst)?;
        let i = self.inst.cursor.min(self.def.steps().len() - 1);
        let name = self.step_name(i);
        if op.action == OperatorAction::Abort {
            return self.abort(i, op);
        }
        if let Some(waiting) = waiting_on(&self.inst, i) {
            return Ok(self.retry_now(i, waiting, op));
        }
        // The parked command is abandoned; a late success reply to it is
        // still applied after a retry (its attempt number is lower).
        if op.action == OperatorAction::Skip {
            self.inst.awaiting = None;
        }
        let phase = self.inst.phase;
        let rec = &mut self.inst.steps[i];
        let (status, what) = match (op.action, phase) {
            (OperatorAction::Retry, Phase::Forward) => {
                rec.attempts = 0;
                rec.executions = 0;
                rec.first_attempt_at = None;
                (
                    SagaStatus::Running,
                    format!("operator: retry step `{name}`"),
                )
            }
            (OperatorAction::Retry, Phase::Compensation) => {
                rec.compensation_attempts = 0;
                rec.executions = 0;
                rec.first_compensation_at = None;
                rec.state = StepState::Compensating;
                (
                    SagaStatus::Compensating,
                    format!("operator: retry compensation of step `{name}`"),
                )
            }
            (OperatorAction::Skip, Phase::Forward) => {
                rec.state = StepState::Skipped;
                self.inst.cursor = i + 1;
                (SagaStatus::Running, format!("operator: skip step `{name}`"))
            }
            (OperatorAction::Skip, Phase::Compensation) => {
                rec.state = StepState::Compensated;
                (
                    SagaStatus::Compensating,
                    format!("operator: mark step `{name}` compensated"),
                )
            }
            (OperatorAction::Abort, _) => unreachable!("handled above"),
        };
        self.inst.status = status;
        let note = (!op.note.is_empty()).then_some(op.note);
        self.inst.record_by(self.now, what, Some(op.operator), note);
        if phase == Phase::Forward {
            self.inst.failure = None;
        }
        self.drive();
        Ok(Handled::Applied)
    }
}
