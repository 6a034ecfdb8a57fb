//! The participant side: services that receive commands and reply.
//!
//! Users implement [`Participant`]; runtimes wrap it with deduplication by
//! message id (a duplicate gets the same reply, never a second effect),
//! retries with backoff, a per-attempt timeout and a dead-letter policy. The
//! bookkeeping for that is the [`ParticipantLedger`], a plain value the
//! runtime persists.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::Effect;
use crate::ids::{MessageId, SagaId, Timestamp};
use crate::message::{DeadLetter, Envelope, MessageKind, Phase, ReplyOutcome};
use crate::retry::{Classify, ErrorClass, RetryDecision, RetryPolicy};

/// What a participant's handler sees besides the command: who sent it, and
/// a way to publish events.
///
/// Events emitted by an attempt that fails with a retryable error are
/// discarded; they are published with the reply otherwise.
#[derive(Debug)]
pub struct ParticipantContext {
    message_id: MessageId,
    saga_id: SagaId,
    step: Option<String>,
    phase: Phase,
    attempt: u32,
    partition: u32,
    now: Timestamp,
    emitted: Vec<(String, Result<Value, String>)>,
}

impl ParticipantContext {
    /// A context for handling `command`, attempt `attempt` (1-based), at `now`.
    pub fn new(command: &Envelope, attempt: u32, now: Timestamp) -> Self {
        Self {
            message_id: command.id.clone(),
            saga_id: command.saga_id.clone(),
            step: command.step.clone(),
            phase: command.phase.unwrap_or(Phase::Forward),
            attempt,
            partition: 0,
            now,
            emitted: Vec::new(),
        }
    }

    /// The same context, for a command read from `partition` of its channel.
    pub fn on_partition(mut self, partition: u32) -> Self {
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

    /// The command's message id (stable across redeliveries and retries).
    pub fn message_id(&self) -> &MessageId {
        &self.message_id
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

    /// This participant-side attempt (1-based).
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
    fn take_events(&mut self, saga: &str) -> Result<Vec<Envelope>, String> {
        let mut out = Vec::new();
        for (n, (channel, value)) in std::mem::take(&mut self.emitted).into_iter().enumerate() {
            let payload = value.map_err(|e| format!("cannot encode event for `{channel}`: {e}"))?;
            out.push(Envelope::event(
                MessageId::new(format!("{}/event/{}", self.message_id, n + 1)),
                channel,
                self.saga_id.clone(),
                saga,
                payload,
                self.now,
            ));
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
/// [`ParticipantPolicy`]; permanent ones, and retryable ones that run out of
/// retries, are dead-lettered and answered with a failure reply (or with the
/// reply [`Participant::on_dead_letter`] returns).
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
    /// process crashes before the outcome is recorded: keep outside side
    /// effects idempotent (use [`ParticipantContext::message_id`]).
    async fn handle(
        &self,
        command: Self::Command,
        ctx: &mut ParticipantContext,
    ) -> Result<Self::Reply, Self::Error>;

    /// Called after a command is dead-lettered. Return `Some(reply)` to
    /// answer with a business reply (e.g. `NOTIFICATION_FAILED`) instead of
    /// a failure; events emitted on `ctx` are published either way.
    fn on_dead_letter(
        &self,
        dead_letter: &DeadLetter,
        ctx: &mut ParticipantContext,
    ) -> Option<Self::Reply> {
        let _ = (dead_letter, ctx);
        None
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
    fn restore(&self, partition: u32, snapshot: Option<serde_json::Value>) {
        let _ = (partition, snapshot);
    }
}

/// How a runtime treats a participant's failures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParticipantPolicy {
    /// The participant's name (its consumer group and dead-letter source).
    pub name: String,
    /// Retries of retryable errors and timeouts.
    pub retry: RetryPolicy,
    /// The deadline of one attempt of the handler.
    pub timeout: Option<Duration>,
    /// Where exhausted and poison commands go.
    pub dead_letter_channel: String,
}

impl ParticipantPolicy {
    /// A policy named `name`: default retries, no timeout, dead letters to `<name>.dlq`.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            dead_letter_channel: format!("{name}.dlq"),
            name,
            retry: RetryPolicy::default(),
            timeout: None,
        }
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the per-attempt timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the dead-letter channel.
    pub fn dead_letter_channel(mut self, channel: impl Into<String>) -> Self {
        self.dead_letter_channel = channel.into();
        self
    }
}

/// The result of one attempt at handling a command.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptResult {
    /// The handler returned a reply (payload) and emitted these events.
    Replied {
        /// The reply payload.
        reply: Value,
        /// Events to publish with it.
        events: Vec<Envelope>,
    },
    /// The attempt failed.
    Failed {
        /// Retryable or permanent.
        class: ErrorClass,
        /// The error, for humans.
        error: String,
    },
}

/// A command waiting for its next attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingRetry {
    /// The command.
    pub command: Envelope,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the first attempt started.
    pub first_attempt_at: Timestamp,
    /// When the next attempt is due.
    pub next_attempt_at: Timestamp,
    /// The last attempt's error.
    pub last_error: String,
}

/// What a runtime should do with a delivered command.
#[derive(Clone, Debug, PartialEq)]
pub enum Delivery {
    /// Already handled: send this reply again (if the command wants one)
    /// and do nothing else.
    Duplicate(Option<Box<Envelope>>),
    /// Already waiting for a retry: nothing to do now.
    AlreadyScheduled,
    /// New: run attempt number `attempt`.
    Attempt(u32),
}

/// A participant's deduplication and retry bookkeeping, persisted by the
/// runtime with the consumed offsets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParticipantLedger {
    /// Handled commands and the reply they got (`None` for fire-and-forget).
    pub handled: BTreeMap<MessageId, Option<Envelope>>,
    /// Commands waiting for a retry.
    pub retries: BTreeMap<MessageId, PendingRetry>,
}

impl ParticipantLedger {
    /// Classifies a delivered command.
    pub fn delivery(&self, command: &Envelope) -> Delivery {
        if let Some(reply) = self.handled.get(&command.id) {
            // Answer with the attempt number of this delivery so the
            // orchestrator matches it.
            let reply = reply.clone().map(|mut r| {
                r.attempt = command.attempt;
                Box::new(r)
            });
            return Delivery::Duplicate(reply);
        }
        match self.retries.get(&command.id) {
            Some(_) => Delivery::AlreadyScheduled,
            None => Delivery::Attempt(1),
        }
    }

    /// The earliest pending retry that is due at `now`, if any.
    pub fn due_retry(&self, now: Timestamp) -> Option<&PendingRetry> {
        self.retries
            .values()
            .filter(|r| r.next_attempt_at <= now)
            .min_by_key(|r| r.next_attempt_at)
    }

    /// When the next pending retry is due.
    pub fn next_retry_at(&self) -> Option<Timestamp> {
        self.retries.values().map(|r| r.next_attempt_at).min()
    }

    /// Once a compensation arrives, the forward command of the same step must
    /// never take effect, even if a copy of it shows up later (a redelivery
    /// overtaken by the compensation): record it as handled with a permanent
    /// failure, and drop any retry of it.
    fn fence_forward(&mut self, command: &Envelope, now: Timestamp) {
        let (Some(Phase::Compensation), Some(step)) = (command.phase, command.step.as_deref())
        else {
            return;
        };
        let forward_id = Envelope::command_id(&command.saga_id, step, Phase::Forward);
        if self.handled.contains_key(&forward_id) {
            return;
        }
        let pending = self.retries.remove(&forward_id);
        let forward = pending.map(|p| p.command).unwrap_or_else(|| Envelope {
            id: forward_id.clone(),
            phase: Some(Phase::Forward),
            ..command.clone()
        });
        let reply = forward.reply(
            ReplyOutcome::Failure {
                class: ErrorClass::Permanent,
                error: "compensated before it took effect".into(),
            },
            Value::Null,
            now,
        );
        self.handled.insert(forward_id, reply);
    }

    /// Records the outcome of attempt `attempt` of `command` and returns
    /// the effects to carry out (replies, events, dead letters). A
    /// retryable failure with retries left is recorded as a
    /// [`PendingRetry`] and gives no effects.
    ///
    /// `on_dead_letter` may turn a dead letter into a business reply.
    pub fn record(
        &mut self,
        policy: &ParticipantPolicy,
        command: &Envelope,
        attempt: u32,
        result: AttemptResult,
        now: Timestamp,
        on_dead_letter: impl FnOnce(&DeadLetter) -> (Option<Value>, Vec<Envelope>),
    ) -> Vec<Effect> {
        let first = self
            .retries
            .get(&command.id)
            .map_or(now, |r| r.first_attempt_at);
        self.fence_forward(command, now);
        let mut effects = Vec::new();
        match result {
            AttemptResult::Replied { reply, events } => {
                self.retries.remove(&command.id);
                let reply = command.reply(ReplyOutcome::Success, reply, now);
                effects.extend(events.into_iter().map(Effect::Send));
                effects.extend(reply.clone().map(Effect::Send));
                self.handled.insert(command.id.clone(), reply);
            }
            AttemptResult::Failed { class, error } => {
                let seed = hash_id(&command.id);
                let elapsed = now.saturating_since(first);
                match policy.retry.decide(class, attempt, elapsed, seed) {
                    RetryDecision::RetryAfter(delay) => {
                        self.retries.insert(
                            command.id.clone(),
                            PendingRetry {
                                command: command.clone(),
                                attempts: attempt,
                                first_attempt_at: first,
                                next_attempt_at: now.saturating_add(delay),
                                last_error: error,
                            },
                        );
                    }
                    RetryDecision::GiveUp(why) => {
                        self.retries.remove(&command.id);
                        let dead = DeadLetter {
                            id: MessageId::new(format!("{}/dead-letter", command.id)),
                            channel: policy.dead_letter_channel.clone(),
                            source: policy.name.clone(),
                            original: command.clone(),
                            failure_timestamp: now,
                            retry_count: attempt,
                            reason: why.to_string(),
                            last_error: error.clone(),
                        };
                        let (business, events) = on_dead_letter(&dead);
                        effects.push(Effect::DeadLetter(dead));
                        effects.extend(events.into_iter().map(Effect::Send));
                        let reply = match business {
                            Some(payload) => command.reply(ReplyOutcome::Success, payload, now),
                            None => command.reply(
                                ReplyOutcome::Failure {
                                    class: ErrorClass::Permanent,
                                    error: format!("{why}: {error}"),
                                },
                                Value::Null,
                                now,
                            ),
                        };
                        effects.extend(reply.clone().map(Effect::Send));
                        self.handled.insert(command.id.clone(), reply);
                    }
                }
            }
        }
        effects
    }
}

fn hash_id(id: &MessageId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// A participant with its types erased, as runtimes hold it.
#[async_trait]
pub trait DynParticipant: Send + Sync + 'static {
    /// Runs one attempt of `command`, bounded by `timeout`.
    async fn attempt(
        &self,
        command: &Envelope,
        attempt: u32,
        partition: u32,
        timeout: Option<Duration>,
        now: Timestamp,
    ) -> AttemptResult;

    /// See [`Participant::snapshot`].
    fn snapshot(&self, partition: u32) -> Option<Value>;

    /// See [`Participant::restore`].
    fn restore(&self, partition: u32, snapshot: Option<Value>);

    /// The business reply (and events) for a dead letter, if the participant gives one.
    fn dead_letter_reply(
        &self,
        dead: &DeadLetter,
        now: Timestamp,
    ) -> (Option<Value>, Vec<Envelope>);
}

#[async_trait]
impl<P: Participant> DynParticipant for P {
    fn snapshot(&self, partition: u32) -> Option<Value> {
        Participant::snapshot(self, partition)
    }

    fn restore(&self, partition: u32, snapshot: Option<Value>) {
        Participant::restore(self, partition, snapshot)
    }

    async fn attempt(
        &self,
        command: &Envelope,
        attempt: u32,
        partition: u32,
        timeout: Option<Duration>,
        now: Timestamp,
    ) -> AttemptResult {
        if command.kind != MessageKind::Command {
            return AttemptResult::Failed {
                class: ErrorClass::Permanent,
                error: format!(
                    "message `{}` is a {}, not a command",
                    command.id,
                    command.kind.as_str()
                ),
            };
        }
        let decoded: P::Command = match serde_json::from_value(command.payload.clone()) {
            Ok(c) => c,
            Err(e) => {
                return AttemptResult::Failed {
                    class: ErrorClass::Permanent,
                    error: format!("cannot decode command `{}`: {e}", command.id),
                }
            }
        };
        let mut ctx = ParticipantContext::new(command, attempt, now).on_partition(partition);
        let span = tracing::debug_span!("participant.attempt", saga_id = %command.saga_id, saga = %command.saga, step = command.step.as_deref().unwrap_or(""), attempt);
        let fut = tracing::Instrument::instrument(self.handle(decoded, &mut ctx), span);
        let outcome = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => {
                    return AttemptResult::Failed {
                        class: ErrorClass::Retryable,
                        error: format!("timed out after {t:?}"),
                    }
                }
            },
            None => fut.await,
        };
        match outcome {
            Ok(reply) => {
                let reply = match serde_json::to_value(reply) {
                    Ok(v) => v,
                    Err(e) => {
                        return AttemptResult::Failed {
                            class: ErrorClass::Permanent,
                            error: format!("cannot encode reply: {e}"),
                        }
                    }
                };
                match ctx.take_events(&command.saga) {
                    Ok(events) => AttemptResult::Replied { reply, events },
                    Err(error) => AttemptResult::Failed {
                        class: ErrorClass::Permanent,
                        error,
                    },
                }
            }
            Err(e) => AttemptResult::Failed {
                class: e.class(),
                error: e.to_string(),
            },
        }
    }

    fn dead_letter_reply(
        &self,
        dead: &DeadLetter,
        now: Timestamp,
    ) -> (Option<Value>, Vec<Envelope>) {
        let mut ctx = ParticipantContext::new(&dead.original, dead.retry_count, now);
        let reply = self.on_dead_letter(dead, &mut ctx);
        let events = ctx.take_events(&dead.original.saga).unwrap_or_default();
        (reply.and_then(|r| serde_json::to_value(r).ok()), events)
    }
}
