//! The participant side: services that receive commands and reply.
//!
//! Users implement [`Participant`]; runtimes wrap it (through the
//! [`ParticipantDriver`](crate::driver::ParticipantDriver)) with
//! deduplication by message id (a redelivered command gets the same reply,
//! never a second effect), retries of transient failures, a per-attempt
//! timeout and a dead-letter policy, as the [`ParticipantPolicy`] says.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{MessageId, SagaId, Timestamp};
use crate::message::{DeadLetter, Envelope, Phase};
use crate::retry::{Classify, RetryPolicy};
use crate::trace::TraceContext;

/// What a participant's handler sees besides the command: who sent it, and
/// a way to publish events.
///
/// Events emitted by an attempt that fails with a retryable error are
/// discarded; they are published with the reply otherwise.
#[derive(Debug)]
pub struct ParticipantContext {
    message_id: MessageId,
    idempotency_key: String,
    saga_id: SagaId,
    step: Option<String>,
    phase: Phase,
    attempt: u32,
    partition: u32,
    now: Timestamp,
    emitted: Vec<(String, Result<Value, String>)>,
    trace: Option<TraceContext>,
}

impl ParticipantContext {
    /// A context for handling `command`, attempt `attempt` (1-based), at `now`.
    pub(crate) fn new(command: &Envelope, attempt: u32, now: Timestamp) -> Self {
        Self {
            message_id: command.id.clone(),
            idempotency_key: command.idempotency_key(),
            saga_id: command.saga_id.clone(),
            step: command.step.clone(),
            phase: command.phase.unwrap_or(Phase::Forward),
            attempt,
            partition: 0,
            now,
            emitted: Vec::new(),
            trace: command.traceparent,
        }
    }

    /// The same context, in the trace of the attempt's span (when the
    /// command has one).
    pub(crate) fn in_trace(mut self, trace: Option<TraceContext>) -> Self {
        if trace.is_some() {
            self.trace = trace;
        }
        self
    }

    /// The trace the command runs in: the context of the attempt's span
    /// (its trace id is the saga's), for handlers that call other
    /// services and pass it on (as a `traceparent` header) or log it.
    /// `None` for a command that carries no trace.
    pub fn trace(&self) -> Option<TraceContext> {
        self.trace
    }

    /// The same context, for a command read from `partition` of its channel.
    pub(crate) fn on_partition(mut self, partition: u32) -> Self {
        self.partition = partition;
        self
    }

    /// The partition of the command channel the command was read from
    /// (messages are partitioned by saga id). A participant that keeps
    /// per-partition state ([`Participant::snapshot`]) uses it to find the
    /// right shard.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The command's message id: the same for every redelivery of one
    /// attempt, new for every attempt the saga makes.
    pub fn message_id(&self) -> &MessageId {
        &self.message_id
    }

    /// The command's business key ([`Envelope::idempotency_key`]):
    /// `{saga id}/{step}/{phase}`, the same for every attempt of a step.
    /// Keep outside effects idempotent on it: a new attempt of a step that
    /// already took effect (its reply was late) must answer the same way
    /// without acting twice.
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    /// The saga the command belongs to.
    pub fn saga_id(&self) -> &SagaId {
        &self.saga_id
    }

    /// The saga step that sent the command, if any.
    pub fn step(&self) -> Option<&str> {
        self.step.as_deref()
    }

    /// Whether the command runs a step or compensates it.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// This participant-side attempt at the command (1-based; above 1 when
    /// the [`ParticipantPolicy`] retries it locally).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the attempt started.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Publishes `event` on `channel`, keyed by the saga id, with the reply.
    pub fn emit<E: Serialize>(&mut self, channel: impl Into<String>, event: &E) {
        let value = serde_json::to_value(event).map_err(|e| e.to_string());
        self.emitted.push((channel.into(), value));
    }

    /// The events emitted so far, as envelopes.
    pub(crate) fn take_events(&mut self, saga: &str) -> Result<Vec<Envelope>, String> {
        let mut out = Vec::new();
        for (n, (channel, value)) in std::mem::take(&mut self.emitted).into_iter().enumerate() {
            let payload = value.map_err(|e| format!("cannot encode event for `{channel}`: {e}"))?;
            out.push(
                Envelope::event(
                    MessageId::new(format!("{}/event/{}", self.message_id, n + 1)),
                    channel,
                    self.saga_id.clone(),
                    saga,
                    payload,
                    self.now,
                )
                .with_traceparent(self.trace),
            );
        }
        Ok(out)
    }
}

/// A service that receives commands and replies: implement this for your
/// participant.
///
/// Business outcomes, including refusals like "not enough stock", are
/// `Ok` replies that the saga's step interprets. `Err` is for failures:
/// retryable ones are retried by the runtime per the
/// [`ParticipantPolicy`] (by default they are not: the saga's step
/// retries). When the runtime gives up, a command a saga waits on is
/// answered with a failure reply of the error's class, and the step decides
/// (retry, compensate, park); a fire-and-forget command, which no saga
/// waits on, is dead-lettered (see [`Participant::on_dead_letter`]).
///
/// ```
/// use async_trait::async_trait;
/// use saga_core::{Classify, ErrorClass, Participant, ParticipantContext};
///
/// struct Payments;
/// #[derive(serde::Deserialize)] struct Charge { cents: u64 }
/// #[derive(serde::Serialize)] struct Charged { receipt: String }
/// #[derive(Debug)] struct Declined;
/// impl std::fmt::Display for Declined {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("declined") }
/// }
/// impl Classify for Declined { fn class(&self) -> ErrorClass { ErrorClass::Permanent } }
///
/// #[async_trait]
/// impl Participant for Payments {
///     type Command = Charge;
///     type Reply = Charged;
///     type Error = Declined;
///     async fn handle(&self, cmd: Charge, ctx: &mut ParticipantContext) -> Result<Charged, Declined> {
///         if cmd.cents > 1_000_000 { return Err(Declined); }
///         ctx.emit("payments.events", &serde_json::json!({"type": "CHARGED", "cents": cmd.cents}));
///         Ok(Charged { receipt: format!("r-{}", ctx.message_id()) })
///     }
/// }
/// ```
#[async_trait]
pub trait Participant: Send + Sync + 'static {
    /// The commands it accepts (an enum if it accepts several, e.g. an
    /// action and its compensation).
    type Command: DeserializeOwned + Send;
    /// Its replies.
    type Reply: Serialize + Send;
    /// Its errors, classified retryable or permanent.
    type Error: Classify + fmt::Display + Send;

    /// Handles one command. May run more than once for one message if the
    /// process crashes before the outcome is recorded, and runs again for
    /// every attempt the saga makes: keep outside side effects idempotent
    /// on [`ParticipantContext::idempotency_key`]. A panic in it is a
    /// retryable failure of the attempt (see
    /// [`Attempt::run_unbounded`](crate::driver::Attempt::run_unbounded)),
    /// but what it changed in the participant's own state before it
    /// panicked stays changed (and goes into the next
    /// [`snapshot`](Participant::snapshot)), and a `std::sync::Mutex` it
    /// held is poisoned: return errors rather than panic where state is
    /// half changed. The other methods (`snapshot`, `restore`, `revoke`,
    /// `on_dead_letter`) must not panic: they run on the runtime's worker
    /// thread unguarded.
    async fn handle(
        &self,
        command: Self::Command,
        ctx: &mut ParticipantContext,
    ) -> Result<Self::Reply, Self::Error>;

    /// Called when a fire-and-forget command is dead-lettered (the
    /// runtime gave up on it and no saga waits for it): events emitted on
    /// `ctx` (e.g. `NOTIFICATION_FAILED`) are published with the dead
    /// letter.
    fn on_dead_letter(&self, dead_letter: &DeadLetter, ctx: &mut ParticipantContext) {
        let _ = (dead_letter, ctx);
    }

    /// The participant's own state for one partition of its command channel
    /// (e.g. the stock shard an inventory serves from that partition), if
    /// it keeps any. Runtimes call it after handling commands from
    /// `partition` and persist the snapshot atomically with the replies and
    /// the consumed offsets, so state and messages never disagree.
    ///
    /// Keep one shard of state per partition: a partition moves between
    /// instances as a whole, and its snapshot moves with it.
    fn snapshot(&self, partition: u32) -> Option<serde_json::Value> {
        let _ = partition;
        None
    }

    /// Installs the last persisted snapshot of `partition` (`None` if there
    /// is none yet) when this instance starts serving it: at start, and
    /// after a rebalance assigns it the partition.
    ///
    /// # Errors
    /// A snapshot it cannot use (say, it does not decode). The runtime then
    /// does not serve the partition: it reports it in its
    /// [`health`](crate::Runtime::health) instead of letting the
    /// participant start from wrong state.
    fn restore(
        &self,
        partition: u32,
        snapshot: Option<serde_json::Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let _ = (partition, snapshot);
        Ok(())
    }

    /// This instance stopped serving `partition` (it moved to another
    /// instance after a rebalance, or the runtime stopped): forget its
    /// state, which is no longer this instance's to change or show.
    fn revoke(&self, partition: u32) {
        let _ = partition;
    }
}

/// How a runtime treats a participant's failures.
///
/// The defaults ([`ParticipantPolicy::new`]): no local retry (one attempt
/// per command: the saga's step owns the retries), no handler timeout,
/// dead letters to `<name>.dlq`, handled commands remembered for an hour,
/// steps not remembered, up to 64 commands of different sagas handled at
/// once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ParticipantPolicy {
    /// The participant's name (its consumer group, ledger and dead-letter source).
    pub name: String,
    /// Local retries of the handler's retryable errors and timeouts
    /// (default [`RetryPolicy::no_retry`]).
    pub retry: RetryPolicy,
    /// The deadline of one attempt of the handler, after which it is a
    /// retryable failure (default: none). Without one, the Kafka runtime
    /// cuts an attempt off after half its transaction timeout (30 s by
    /// default): a handler runs while its batch is open, and one that
    /// never returned would stop every partition of its worker. On Kafka
    /// it must be below the transaction timeout.
    pub timeout: Option<Duration>,
    /// Where fire-and-forget commands go when the runtime gives up, and
    /// records that are not commands (default `<name>.dlq`).
    pub dead_letter_channel: String,
    /// How long the runtime remembers a command it handled, to answer a
    /// redelivery of it with the same reply without running the handler
    /// (default 1 hour). A redelivery older than this runs the handler
    /// again. Memory: a few hundred bytes per command handled within it.
    #[serde(default = "default_horizon")]
    pub dedupe_horizon: Duration,
    /// Answer a new attempt of a step this participant already answered
    /// with a success, with that answer, without running the handler
    /// (within the dedupe horizon). For participants whose successful
    /// answers are final (a reservation made, an email sent); leave it off
    /// (the default) for one that answers "busy" as a reply its step
    /// retries.
    #[serde(default)]
    pub remember_steps: bool,
    /// How many commands of different sagas a runtime may handle at once
    /// (default 64). Commands of one saga are always handled one after the
    /// other, in order, and a batch's replies and ledger entries still
    /// commit together; only the handlers' awaits overlap. A handler whose
    /// shared state spans an `.await` (read, await, write) must hold its
    /// lock across it or run with 1. The Kafka runtime honours it within a
    /// batch; the in-memory runtime handles one command at a time.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_horizon() -> Duration {
    Duration::from_secs(3600)
}

fn default_concurrency() -> usize {
    64
}

impl ParticipantPolicy {
    /// A policy named `name` with the defaults above.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            dead_letter_channel: format!("{name}.dlq"),
            name,
            retry: RetryPolicy::no_retry(),
            timeout: None,
            dedupe_horizon: default_horizon(),
            remember_steps: false,
            concurrency: default_concurrency(),
        }
    }

    /// Sets how many commands of different sagas may be handled at once
    /// (see [`ParticipantPolicy::concurrency`]; at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Sets how long handled commands are remembered (see
    /// [`ParticipantPolicy::dedupe_horizon`]).
    pub fn dedupe_horizon(mut self, horizon: Duration) -> Self {
        self.dedupe_horizon = horizon;
        self
    }

    /// Answers repeated attempts of a step from the first success (see
    /// [`ParticipantPolicy::remember_steps`]).
    pub fn remember_steps(mut self) -> Self {
        self.remember_steps = true;
        self
    }

    /// Sets the local retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the per-attempt timeout of the handler (see
    /// [`ParticipantPolicy::timeout`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the dead-letter channel.
    pub fn dead_letter_channel(mut self, channel: impl Into<String>) -> Self {
        self.dead_letter_channel = channel.into();
        self
    }

    /// The longest the runtime may spend on one command before it answers:
    /// every attempt running into its timeout, with the longest backoffs
    /// between them. `None` without a handler timeout (then nothing bounds
    /// it).
    pub fn budget(&self) -> Option<Duration> {
        let attempts = self.retry.max_attempts.max(1);
        let per_attempt = self.timeout?;
        let mut total = per_attempt.saturating_mul(attempts);
        for failed in 1..attempts {
            total = total.saturating_add(self.retry.base_delay(failed));
        }
        Some(total)
    }
}
