//! What users write: saga definitions built from steps.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::SagaError;
use crate::ids::{SagaId, Timestamp};
use crate::message::Envelope;
use crate::retry::{Classify, ErrorClass, RetryPolicy};

/// The bounds saga data must meet: it is persisted as JSON and cloned per step.
pub trait SagaData: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> SagaData for T {}

/// Where a step stands relative to the point of no return.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StepKind {
    /// Undone by its compensation if a later step fails (the default).
    Compensatable,
    /// The point of no return: once it succeeds the saga only goes forward.
    /// If it fails, the steps before it are compensated; if its outcome is
    /// unknown (no reply in time), the saga parks until a late reply or an
    /// operator decides.
    Pivot,
    /// After the pivot: retried forward, never compensated. When its
    /// retries run out it parks the saga with a dead letter, or, with
    /// [`Exhausted::DeadLetterAndContinue`], dead-letters and goes on.
    Retryable,
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StepKind::Compensatable => "compensatable",
            StepKind::Pivot => "pivot",
            StepKind::Retryable => "retryable",
        })
    }
}

/// What a retryable step (after the point of no return) does when its
/// retries run out or it fails permanently.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Exhausted {
    /// Park the saga with a dead letter for an operator, who retries the
    /// step with a fresh budget or skips it (the default).
    #[default]
    Park,
    /// Write the dead letter and go on with the next step, the step marked
    /// failed: for work that may fail for good without stopping the saga
    /// (a notification email). [`Step::on_give_up`] can record the failure
    /// in the saga data in the same transition.
    DeadLetterAndContinue,
}

/// Why a step gave up, as [`Step::on_give_up`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StepFailure {
    /// The step.
    pub step: String,
    /// Attempts made in the budget that ran out.
    pub attempts: u32,
    /// Why it stopped trying (e.g. "max retries reached (3 attempts)").
    pub reason: String,
    /// The last attempt's error.
    pub error: String,
}

/// A step's failure, as returned by a local step or a reply handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepError {
    /// Retryable or permanent.
    pub class: ErrorClass,
    /// What went wrong, for humans (it becomes the saga's failure reason).
    pub message: String,
}

impl StepError {
    /// A failure that may go away on retry.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Retryable,
            message: message.into(),
        }
    }

    /// A failure that retrying cannot fix (a business rule said no).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: message.into(),
        }
    }
}

impl Classify for StepError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {}

/// What a step's code sees: the saga data, its id, the time, and a way to
/// publish events.
///
/// Changes to the data and emitted events are kept only if the step
/// succeeds; a failing step leaves the saga as it was.
pub struct StepContext<'a, D> {
    pub(crate) data: &'a mut D,
    pub(crate) saga_id: &'a SagaId,
    pub(crate) now: Timestamp,
    pub(crate) failure: Option<&'a str>,
    pub(crate) emitted: &'a mut Vec<Emitted>,
}

/// A message user code asked to publish, kept until the code succeeds.
pub(crate) struct Emitted {
    pub(crate) channel: String,
    pub(crate) command: bool,
    pub(crate) value: Result<Value, serde_json::Error>,
}

impl<D> StepContext<'_, D> {
    /// The saga data.
    pub fn data(&self) -> &D {
        self.data
    }

    /// The saga data, to change it.
    pub fn data_mut(&mut self) -> &mut D {
        self.data
    }

    /// The saga's id.
    pub fn saga_id(&self) -> &SagaId {
        self.saga_id
    }

    /// The time the driver handed to the engine for this transition.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// While compensating: why the saga is being compensated.
    pub fn failure_reason(&self) -> Option<&str> {
        self.failure
    }

    /// Publishes `event` on `channel`, keyed by the saga id, when the step
    /// succeeds (an [`Envelope`](crate::Envelope) of kind `Event`).
    pub fn emit<E: Serialize>(&mut self, channel: impl Into<String>, event: &E) {
        self.emitted.push(Emitted {
            channel: channel.into(),
            command: false,
            value: serde_json::to_value(event),
        });
    }

    /// Sends `command` to the participant on `channel` when the step
    /// succeeds, fire-and-forget: no reply is expected and the saga does
    /// not wait. The participant still deduplicates it by message id.
    pub fn send<C: Serialize>(&mut self, channel: impl Into<String>, command: &C) {
        self.emitted.push(Emitted {
            channel: channel.into(),
            command: true,
            value: serde_json::to_value(command),
        });
    }
}

type LocalFn<D> = Arc<dyn Fn(&mut StepContext<'_, D>) -> Result<(), StepError> + Send + Sync>;
pub(crate) type GiveUpFn<D> = Arc<dyn Fn(&mut StepContext<'_, D>, &StepFailure) + Send + Sync>;
type CommandFn<D> = Arc<dyn Fn(&D) -> Result<Value, serde_json::Error> + Send + Sync>;
type ReplyFn<D> = Arc<
    dyn Fn(&mut StepContext<'_, D>, Value) -> Result<Result<(), StepError>, serde_json::Error>
        + Send
        + Sync,
>;
/// Whether a reply payload is of the step's reply type (without applying it).
type CheckFn = Arc<dyn Fn(&Value) -> Result<(), serde_json::Error> + Send + Sync>;

/// How one direction (forward or compensation) of a step is carried out.
pub(crate) enum Action<D> {
    /// Code run inside the orchestrator.
    Local(LocalFn<D>),
    /// A command to a participant and the handling of its reply.
    Remote {
        channel: String,
        reply_to: Option<String>,
        /// `None` until the builder's `.command(..)` is called; `build()` rejects that.
        command: Option<CommandFn<D>>,
        on_reply: ReplyFn<D>,
        /// Set with a typed `on_reply`: checks a reply's type.
        check_reply: Option<CheckFn>,
    },
}

impl<D> Clone for Action<D> {
    fn clone(&self) -> Self {
        match self {
            Action::Local(f) => Action::Local(f.clone()),
            Action::Remote {
                channel,
                reply_to,
                command,
                on_reply,
                check_reply,
            } => Action::Remote {
                channel: channel.clone(),
                reply_to: reply_to.clone(),
                command: command.clone(),
                on_reply: on_reply.clone(),
                check_reply: check_reply.clone(),
            },
        }
    }
}

impl<D> Action<D> {
    pub(crate) fn channel(&self) -> Option<&str> {
        match self {
            Action::Local(_) => None,
            Action::Remote { channel, .. } => Some(channel),
        }
    }

    pub(crate) fn reply_to(&self) -> Option<&str> {
        match self {
            Action::Local(_) => None,
            Action::Remote { reply_to, .. } => reply_to.as_deref(),
        }
    }
}

fn accept_any<D>() -> ReplyFn<D> {
    Arc::new(|_, _| Ok(Ok(())))
}

fn typed_reply<D, R, F>(f: F) -> ReplyFn<D>
where
    R: DeserializeOwned,
    F: Fn(&mut StepContext<'_, D>, R) -> Result<(), StepError> + Send + Sync + 'static,
{
    Arc::new(move |ctx, value| {
        let reply: R = serde_json::from_value(value)?;
        Ok(f(ctx, reply))
    })
}

fn typed_check<R: DeserializeOwned>() -> CheckFn {
    Arc::new(|value| serde_json::from_value::<R>(value.clone()).map(|_| ()))
}

fn typed_command<D, C, F>(f: F) -> CommandFn<D>
where
    C: Serialize,
    F: Fn(&D) -> C + Send + Sync + 'static,
{
    Arc::new(move |d| serde_json::to_value(f(d)))
}

/// One step of a saga: an action, an optional compensation, a retry policy,
/// a per-attempt timeout and a [`StepKind`].
///
/// ```
/// use std::time::Duration;
/// use saga_core::{RetryPolicy, Step, StepError};
/// # #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// # struct Order { items: u32, reserved: bool }
/// # #[derive(serde::Serialize)] struct Reserve { items: u32 }
/// # #[derive(serde::Serialize)] struct Release { items: u32 }
/// # #[derive(serde::Deserialize)] struct Reserved { ok: bool }
///
/// let reserve = Step::remote("reserve-stock", "inventory.requests")
///     .command(|order: &Order| Reserve { items: order.items })
///     .on_reply(|ctx, reply: Reserved| {
///         if reply.ok { ctx.data_mut().reserved = true; Ok(()) }
///         else { Err(StepError::permanent("Not enough stock")) }
///     })
///     .compensate_remote("inventory.requests", |order: &Order| Release { items: order.items })
///     .retry(RetryPolicy::exponential(Duration::from_millis(200), 2.0).with_max_attempts(5))
///     .timeout(Duration::from_secs(5));
/// # let _ = reserve;
/// ```
pub struct Step<D> {
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) kind: StepKind,
    pub(crate) forward: Option<Action<D>>,
    pub(crate) compensation: Option<Action<D>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
    pub(crate) exhausted: Exhausted,
    pub(crate) give_up: Option<GiveUpFn<D>>,
    pub(crate) dead_letter_channel: Option<String>,
}

impl<D> Clone for Step<D> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            kind: self.kind,
            forward: self.forward.clone(),
            compensation: self.compensation.clone(),
            retry: self.retry.clone(),
            compensation_retry: self.compensation_retry.clone(),
            timeout: self.timeout,
            exhausted: self.exhausted,
            give_up: self.give_up.clone(),
            dead_letter_channel: self.dead_letter_channel.clone(),
        }
    }
}

impl<D> fmt::Debug for Step<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("remote", &self.forward.as_ref().and_then(Action::channel))
            .field("compensated", &self.compensation.is_some())
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("exhausted", &self.exhausted)
            .finish()
    }
}

impl<D: SagaData> Step<D> {
    fn new(name: impl Into<String>, forward: Option<Action<D>>) -> Self {
        Self {
            name: std::sync::Arc::from(name.into()),
            kind: StepKind::Compensatable,
            forward,
            compensation: None,
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::default(),
            timeout: None,
            exhausted: Exhausted::Park,
            give_up: None,
            dead_letter_channel: None,
        }
    }

    /// A step run as code inside the orchestrator.
    ///
    /// The function must be deterministic and free of outside side effects
    /// (use a remote step for those): it may run again after a crash.
    pub fn local<F>(name: impl Into<String>, action: F) -> Self
    where
        F: Fn(&mut StepContext<'_, D>) -> Result<(), StepError> + Send + Sync + 'static,
    {
        Self::new(name, Some(Action::Local(Arc::new(action))))
    }

    /// A step carried out by a participant: a command sent on `channel`,
    /// and a reply folded back into the data. Set the command with
    /// [`Step::command`] and the reply handling with [`Step::on_reply`].
    ///
    /// Replies go to `<saga name>.replies` unless [`Step::reply_to`] says otherwise.
    pub fn remote(name: impl Into<String>, channel: impl Into<String>) -> Self {
        Self::new(name, None).with_remote_channel(channel.into())
    }

    fn with_remote_channel(mut self, channel: String) -> Self {
        self.forward = Some(Action::Remote {
            channel,
            reply_to: None,
            command: None,
            on_reply: accept_any(),
            check_reply: None,
        });
        self
    }

    /// The command a remote step sends, built from the saga data.
    pub fn command<C, F>(mut self, f: F) -> Self
    where
        C: Serialize,
        F: Fn(&D) -> C + Send + Sync + 'static,
    {
        if let Some(Action::Remote { command, .. }) = &mut self.forward {
            *command = Some(typed_command(f));
        }
        self
    }

    /// How a successful reply is folded into the saga data. Returning an
    /// error fails the step (retried if retryable, per the retry policy).
    ///
    /// Without it, any successful reply completes the step.
    pub fn on_reply<R, F>(mut self, f: F) -> Self
    where
        R: DeserializeOwned,
        F: Fn(&mut StepContext<'_, D>, R) -> Result<(), StepError> + Send + Sync + 'static,
    {
        if let Some(Action::Remote {
            on_reply,
            check_reply,
            ..
        }) = &mut self.forward
        {
            *on_reply = typed_reply(f);
            *check_reply = Some(typed_check::<R>());
        }
        self
    }

    /// The channel the participant replies on (default `<saga name>.replies`).
    pub fn reply_to(mut self, channel: impl Into<String>) -> Self {
        let channel = channel.into();
        if let Some(Action::Remote { reply_to, .. }) = &mut self.forward {
            *reply_to = Some(channel.clone());
        }
        if let Some(Action::Remote { reply_to, .. }) = &mut self.compensation {
            *reply_to = Some(channel);
        }
        self
    }

    /// Undoes the step with local code.
    pub fn compensate_local<F>(mut self, f: F) -> Self
    where
        F: Fn(&mut StepContext<'_, D>) -> Result<(), StepError> + Send + Sync + 'static,
    {
        self.compensation = Some(Action::Local(Arc::new(f)));
        self
    }

    /// Undoes the step with a command to a participant on `channel`; any
    /// successful reply completes the compensation.
    pub fn compensate_remote<C, F>(mut self, channel: impl Into<String>, command: F) -> Self
    where
        C: Serialize,
        F: Fn(&D) -> C + Send + Sync + 'static,
    {
        let reply_to = match &self.forward {
            Some(Action::Remote { reply_to, .. }) => reply_to.clone(),
            _ => None,
        };
        self.compensation = Some(Action::Remote {
            channel: channel.into(),
            reply_to,
            command: Some(typed_command(command)),
            on_reply: accept_any(),
            check_reply: None,
        });
        self
    }

    /// Makes this step compensatable: undone by its compensation if a
    /// later step fails (the default kind).
    pub fn compensatable(mut self) -> Self {
        self.kind = StepKind::Compensatable;
        self
    }

    /// Makes this step the pivot (point of no return).
    pub fn pivot(mut self) -> Self {
        self.kind = StepKind::Pivot;
        self
    }

    /// Makes this step retryable: after the pivot, it recovers forward only
    /// (retried per [`Step::retry`], never compensated; see [`Step::on_exhausted`]).
    pub fn retryable(mut self) -> Self {
        self.kind = StepKind::Retryable;
        self
    }

    /// The retry policy of the step's action (default
    /// [`RetryPolicy::default`]: 3 attempts, 100 ms then 200 ms apart).
    ///
    /// The engine retries an attempt that failed with a retryable
    /// [`StepError`] (from a local step or [`Step::on_reply`]), a
    /// retryable failure reply (the participant gave up on a transient
    /// error), or no reply within [`Step::timeout`]. Each retry sends a new
    /// command (a new message id), which the participant runs again.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The retry policy of the step's compensation (default
    /// [`RetryPolicy::default`]). When it runs out, the saga parks.
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// The deadline of each attempt of a remote step (or its compensation):
    /// with no reply by then, the attempt counts as a retryable failure
    /// whose outcome is unknown. Default: none (wait for the reply). It
    /// must cover the participant's whole retry budget for one command
    /// (see the crate docs, "Who retries what").
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// What a retryable step does when its retries run out or it fails
    /// permanently: [`Exhausted::Park`] (the default) or
    /// [`Exhausted::DeadLetterAndContinue`]. Only retryable steps may
    /// continue (`build()` checks it): before the point of no return a
    /// failure compensates.
    pub fn on_exhausted(mut self, outcome: Exhausted) -> Self {
        self.exhausted = outcome;
        self
    }

    /// Code run in the transition in which a step with
    /// [`Exhausted::DeadLetterAndContinue`] gives up, before the saga goes
    /// on: record the failure in the data, [`emit`](StepContext::emit) an
    /// event.
    pub fn on_give_up<F>(mut self, f: F) -> Self
    where
        F: Fn(&mut StepContext<'_, D>, &StepFailure) + Send + Sync + 'static,
    {
        self.give_up = Some(Arc::new(f));
        self
    }

    /// The channel this step's dead letters go to (default: the saga's,
    /// [`SagaBuilder::dead_letter_channel`]).
    pub fn dead_letter_channel(mut self, channel: impl Into<String>) -> Self {
        self.dead_letter_channel = Some(channel.into());
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The step's kind.
    pub fn kind(&self) -> StepKind {
        self.kind
    }

    /// The retry policy of the action.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The retry policy of the compensation.
    pub fn compensation_retry_policy(&self) -> &RetryPolicy {
        &self.compensation_retry
    }

    /// The per-attempt deadline, if any.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// What the step does when its retries run out.
    pub fn exhausted(&self) -> Exhausted {
        self.exhausted
    }

    /// The step's own dead-letter channel, if [`Step::dead_letter_channel`]
    /// set one (else the saga's is used).
    pub fn own_dead_letter_channel(&self) -> Option<&str> {
        self.dead_letter_channel.as_deref()
    }

    /// The channel the step's command goes to, for a remote step.
    pub fn channel(&self) -> Option<&str> {
        self.forward.as_ref().and_then(Action::channel)
    }

    /// The channel the step's compensation command goes to, for a remote compensation.
    pub fn compensation_channel(&self) -> Option<&str> {
        self.compensation.as_ref().and_then(Action::channel)
    }

    /// The channel the participant replies to the step's command on, if
    /// the step names one ([`Step::reply_to`]; else the saga's
    /// [`SagaDefinition::reply_channel`]).
    pub fn reply_channel(&self) -> Option<&str> {
        self.forward.as_ref().and_then(Action::reply_to)
    }

    /// Like [`Step::reply_channel`], for the compensation's command.
    pub fn compensation_reply_channel(&self) -> Option<&str> {
        self.compensation.as_ref().and_then(Action::reply_to)
    }

    /// Whether the step's action is carried out by a participant.
    pub fn is_remote(&self) -> bool {
        matches!(self.forward, Some(Action::Remote { .. }))
    }

    /// Whether the step has a compensation.
    pub fn has_compensation(&self) -> bool {
        self.compensation.is_some()
    }
}

/// A saga type: a name and its steps, validated.
///
/// Build one with [`SagaDefinition::builder`]. A definition is cheap to
/// clone and is shared by every instance of the saga type.
pub struct SagaDefinition<D> {
    pub(crate) inner: Arc<DefinitionInner<D>>,
}

/// Code run once when a saga finishes (see [`SagaBuilder::on_completed`]).
pub(crate) type HookFn<D> = Arc<dyn Fn(&mut StepContext<'_, D>) + Send + Sync>;

pub(crate) struct DefinitionInner<D> {
    /// Shared with every instance of the saga.
    pub(crate) name: Arc<str>,
    pub(crate) steps: Vec<Step<D>>,
    pub(crate) on_completed: Option<HookFn<D>>,
    pub(crate) on_compensated: Option<HookFn<D>>,
    pub(crate) reply_channel: String,
    pub(crate) dead_letter_channel: String,
    pub(crate) timeout: Option<Duration>,
    /// The history lines every instance writes alike.
    pub(crate) lines: HistoryLines,
}

/// History lines that read the same in every instance of a saga, made
/// once: an instance's history shares them instead of writing its own
/// copy (a transition allocates no text for them, an instance in memory
/// keeps none of its own).
pub(crate) struct HistoryLines {
    pub(crate) started: Arc<str>,
    pub(crate) completed: Arc<str>,
    pub(crate) compensated: Arc<str>,
    /// The id of the saga's deadline timer.
    pub(crate) saga_deadline: crate::instance::TimerId,
    /// Per step, in the definition's order.
    pub(crate) steps: Vec<StepLines>,
}

/// The lines of one step (see [`HistoryLines`]).
pub(crate) struct StepLines {
    pub(crate) succeeded: Arc<str>,
    pub(crate) compensated: Arc<str>,
    pub(crate) nothing_to_compensate: Arc<str>,
}

impl HistoryLines {
    fn new<D>(steps: &[Step<D>]) -> Self {
        let line = |name: &str, what: &str| Arc::from(format!("step `{name}`: {what}"));
        Self {
            started: Arc::from("started"),
            completed: Arc::from("completed"),
            compensated: Arc::from("compensated"),
            saga_deadline: crate::instance::TimerId::new("saga-deadline"),
            steps: steps
                .iter()
                .map(|s| StepLines {
                    succeeded: line(&s.name, "succeeded"),
                    compensated: line(&s.name, "compensated"),
                    nothing_to_compensate: line(&s.name, "nothing to compensate"),
                })
                .collect(),
        }
    }
}

impl<D> Clone for SagaDefinition<D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<D> fmt::Debug for SagaDefinition<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition")
            .field("name", &self.inner.name)
            .field("steps", &self.inner.steps)
            .field("reply_channel", &self.inner.reply_channel)
            .field("dead_letter_channel", &self.inner.dead_letter_channel)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

impl<D: SagaData> SagaDefinition<D> {
    /// Starts a definition named `name` (the saga type, e.g. `"order"`).
    pub fn builder(name: impl Into<String>) -> SagaBuilder<D> {
        let name = name.into();
        SagaBuilder {
            reply_channel: format!("{name}.replies"),
            dead_letter_channel: format!("{name}.dlq"),
            name,
            steps: Vec::new(),
            on_completed: None,
            on_compensated: None,
            timeout: None,
        }
    }

    /// The saga type's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The steps, in forward order.
    pub fn steps(&self) -> &[Step<D>] {
        &self.inner.steps
    }

    /// The default channel participants reply on.
    pub fn reply_channel(&self) -> &str {
        &self.inner.reply_channel
    }

    /// The channel dead letters of this saga go to.
    pub fn dead_letter_channel(&self) -> &str {
        &self.inner.dead_letter_channel
    }

    /// Every channel replies to this saga's commands arrive on.
    pub fn reply_channels(&self) -> Vec<String> {
        let mut out = vec![self.inner.reply_channel.clone()];
        for step in &self.inner.steps {
            for action in [&step.forward, &step.compensation].into_iter().flatten() {
                if let Action::Remote {
                    reply_to: Some(ch), ..
                } = action
                {
                    if !out.contains(ch) {
                        out.push(ch.clone());
                    }
                }
            }
        }
        out
    }

    /// Every channel this saga sends commands on.
    pub fn command_channels(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for step in &self.inner.steps {
            for action in [&step.forward, &step.compensation].into_iter().flatten() {
                if let Some(ch) = action.channel() {
                    if !out.iter().any(|c| c == ch) {
                        out.push(ch.to_owned());
                    }
                }
            }
        }
        out
    }

    /// Checks that a success reply's payload is of its step's reply type,
    /// without applying it (for replies the saga ignores: a malformed one
    /// is still worth a dead letter).
    pub(crate) fn check_reply(&self, reply: &Envelope) -> Result<(), SagaError> {
        let step_name = reply.step.as_deref().unwrap_or("");
        let Some(i) = self.step_index(step_name) else {
            return Err(SagaError::UnknownStep {
                saga_id: reply.saga_id.clone(),
                step: step_name.to_owned(),
                message_id: reply.id.clone(),
            });
        };
        let success = matches!(
            reply.outcome,
            None | Some(crate::message::ReplyOutcome::Success)
        );
        if !success || reply.phase == Some(crate::message::Phase::Compensation) {
            return Ok(());
        }
        if let Some(Action::Remote {
            check_reply: Some(check),
            ..
        }) = &self.inner.steps[i].forward
        {
            check(&reply.payload).map_err(|source| SagaError::Decode {
                saga_id: reply.saga_id.clone(),
                step: step_name.to_owned(),
                what: "reply",
                source,
            })?;
        }
        Ok(())
    }

    pub(crate) fn step_index(&self, name: &str) -> Option<usize> {
        self.inner.steps.iter().position(|s| &*s.name == name)
    }
}

/// Builds a [`SagaDefinition`]; [`SagaBuilder::build`] validates it.
pub struct SagaBuilder<D> {
    name: String,
    steps: Vec<Step<D>>,
    on_completed: Option<HookFn<D>>,
    on_compensated: Option<HookFn<D>>,
    reply_channel: String,
    dead_letter_channel: String,
    timeout: Option<Duration>,
}

impl<D: SagaData> SagaBuilder<D> {
    /// Appends a step.
    pub fn step(mut self, step: Step<D>) -> Self {
        self.steps.push(step);
        self
    }

    /// The default channel participants reply on (default `<name>.replies`).
    pub fn reply_channel(mut self, channel: impl Into<String>) -> Self {
        self.reply_channel = channel.into();
        self
    }

    /// The channel dead letters go to (default `<name>.dlq`).
    pub fn dead_letter_channel(mut self, channel: impl Into<String>) -> Self {
        self.dead_letter_channel = channel.into();
        self
    }

    /// Code run once, in the same transition, when the saga completes: it
    /// can change the data, [`emit`](StepContext::emit) events and
    /// [`send`](StepContext::send) fire-and-forget commands.
    pub fn on_completed<F>(mut self, f: F) -> Self
    where
        F: Fn(&mut StepContext<'_, D>) + Send + Sync + 'static,
    {
        self.on_completed = Some(Arc::new(f));
        self
    }

    /// Code run once, in the same transition, when the saga has been
    /// compensated ([`StepContext::failure_reason`] says why): e.g. publish
    /// a cancellation event or send a notification.
    pub fn on_compensated<F>(mut self, f: F) -> Self
    where
        F: Fn(&mut StepContext<'_, D>) + Send + Sync + 'static,
    {
        self.on_compensated = Some(Arc::new(f));
        self
    }

    /// A deadline for the whole saga, a persisted timer armed at its start.
    /// When it passes: before the point of no return the current step is
    /// abandoned and the saga compensated (a remote step in flight counts as
    /// taken effect: its own compensation runs too); with the pivot in
    /// flight the saga parks (its outcome is unknown); after the point of no
    /// return, or while the saga is compensating or parked, it carries on
    /// (the deadline is spent: an operator's later retry runs without it).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Validates and builds the definition.
    ///
    /// # Errors
    /// [`SagaError::EmptyDefinition`] without steps,
    /// [`SagaError::MultiplePivots`], [`SagaError::StepOrder`] when the
    /// kinds are not in the order compensatable*, pivot?, retryable*,
    /// [`SagaError::DuplicateStep`], [`SagaError::IncompleteStep`] for a
    /// remote step without a command, [`SagaError::InvalidStep`] for an
    /// option that does not fit the step's kind, [`SagaError::InvalidPolicy`]
    /// for a bad retry policy.
    pub fn build(mut self) -> Result<SagaDefinition<D>, SagaError> {
        let saga = self.name.clone();
        if self.steps.is_empty() {
            return Err(SagaError::EmptyDefinition { saga });
        }
        let mut pivot: Option<&str> = None;
        let mut no_return: Option<&str> = None;
        for (i, step) in self.steps.iter().enumerate() {
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(SagaError::DuplicateStep {
                    saga,
                    step: step.name.to_string(),
                });
            }
            if let Some(Action::Remote { command: None, .. }) = &step.forward {
                {
                    return Err(SagaError::IncompleteStep {
                        saga,
                        step: step.name.to_string(),
                    });
                }
            }
            step.retry.validate()?;
            step.compensation_retry.validate()?;
            if step.compensation.is_some() && step.kind != StepKind::Compensatable {
                return Err(SagaError::InvalidStep {
                    saga,
                    step: step.name.to_string(),
                    reason: format!(
                        "a {} step is never compensated, so it cannot have a compensation",
                        step.kind
                    ),
                });
            }
            if step.exhausted == Exhausted::DeadLetterAndContinue
                && step.kind != StepKind::Retryable
            {
                return Err(SagaError::InvalidStep {
                    saga,
                    step: step.name.to_string(),
                    reason: format!(
                        "only a retryable step can continue after giving up (on_exhausted(DeadLetterAndContinue)); a {} step's failure compensates",
                        step.kind
                    ),
                });
            }
            match step.kind {
                StepKind::Pivot => {
                    if let Some(first) = pivot {
                        return Err(SagaError::MultiplePivots {
                            saga,
                            first: first.to_owned(),
                            second: step.name.to_string(),
                        });
                    }
                    if let Some(after) = no_return {
                        return Err(SagaError::StepOrder {
                            saga,
                            step: step.name.to_string(),
                            kind: step.kind.to_string(),
                            after: after.to_owned(),
                        });
                    }
                    pivot = Some(&step.name);
                    no_return = Some(&step.name);
                }
                StepKind::Compensatable => {
                    if let Some(after) = no_return {
                        return Err(SagaError::StepOrder {
                            saga,
                            step: step.name.to_string(),
                            kind: step.kind.to_string(),
                            after: after.to_owned(),
                        });
                    }
                }
                StepKind::Retryable => {
                    no_return.get_or_insert(&step.name);
                }
            }
        }
        // Remote actions without an explicit reply channel use the saga's.
        for step in &mut self.steps {
            for action in [&mut step.forward, &mut step.compensation]
                .into_iter()
                .flatten()
            {
                if let Action::Remote { reply_to, .. } = action {
                    reply_to.get_or_insert_with(|| self.reply_channel.clone());
                }
            }
        }
        Ok(SagaDefinition {
            inner: Arc::new(DefinitionInner {
                name: Arc::from(self.name),
                lines: HistoryLines::new(&self.steps),
                steps: self.steps,
                on_completed: self.on_completed,
                on_compensated: self.on_compensated,
                reply_channel: self.reply_channel,
                dead_letter_channel: self.dead_letter_channel,
                timeout: self.timeout,
            }),
        })
    }
}
