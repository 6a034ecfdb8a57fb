//! The participant driver: deduplication, local retries, fencing and dead
//! letters around a [`Participant`], for the partitions a worker owns.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::driver::metrics;
use crate::driver::record::{Incoming, Record, RecordKind};
use crate::driver::saga::RECORD_OVERHEAD;
use crate::error::SagaError;
use crate::ids::{FastMap, MessageId, Timestamp};
use crate::message::{
    json_len, DeadLetter, EncodedEnvelope, Envelope, MessageKind, Phase, RecordOrigin, ReplyOutcome,
};
use crate::participant::{Participant, ParticipantContext, ParticipantPolicy};
use crate::retry::{Classify, ErrorClass, RetryDecision};
use crate::trace::{link_span, TraceContext};

/// The ledger topic of participant `name`: `<name>.ledger`, compacted,
/// co-partitioned with its command topic. It holds one entry per command
/// handled (keyed by message id), the fences of compensated steps, and the
/// participant's per-partition state snapshot.
pub fn ledger_topic(name: &str) -> String {
    format!("{name}.ledger")
}

/// The reserved key of a participant's per-partition state snapshot in its
/// ledger topic (one per partition; the NUL byte keeps it apart from
/// message ids).
pub const PARTICIPANT_STATE_KEY: &str = "\u{0}participant-state";

/// The result of one attempt at handling a command.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
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

impl AttemptResult {
    /// The result of an attempt that did not end within `timeout`: a
    /// retryable failure.
    pub fn timed_out(timeout: Duration) -> Self {
        AttemptResult::Failed {
            class: ErrorClass::Retryable,
            error: format!("timed out after {timeout:?}"),
        }
    }
}

/// A participant with its types erased, as the driver holds it.
#[async_trait]
trait Erased: Send + Sync + 'static {
    async fn attempt(
        &self,
        command: &Envelope,
        attempt: u32,
        partition: u32,
        now: Timestamp,
        span_trace: &OnceLock<TraceContext>,
    ) -> AttemptResult;
    fn snapshot(&self, partition: u32) -> Option<Value>;
    fn restore(
        &self,
        partition: u32,
        snapshot: Option<Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    fn revoke(&self, partition: u32);
    fn dead_letter_events(&self, dead: &DeadLetter, now: Timestamp) -> Vec<Envelope>;
}

#[async_trait]
impl<P: Participant> Erased for P {
    async fn attempt(
        &self,
        command: &Envelope,
        attempt: u32,
        partition: u32,
        now: Timestamp,
        span_trace: &OnceLock<TraceContext>,
    ) -> AttemptResult {
        let decoded: P::Command = match serde_json::from_value(command.payload.clone()) {
            Ok(c) => c,
            Err(e) => {
                return AttemptResult::Failed {
                    class: ErrorClass::Permanent,
                    error: format!("cannot decode command `{}`: {e}", command.id),
                }
            }
        };
        let span = tracing::info_span!("participant.attempt", saga_id = %command.saga_id, saga = %command.saga, step = command.step.as_deref().unwrap_or(""), attempt, trace_id = tracing::field::Empty, span_id = tracing::field::Empty, parent_span_id = tracing::field::Empty);
        // In the command's trace: the reply and events carry this span.
        let trace = command.traceparent.map(|p| link_span(&span, Some(&p)));
        if let Some(t) = trace {
            let _ = span_trace.set(t);
        }
        let mut ctx = ParticipantContext::new(command, attempt, now)
            .on_partition(partition)
            .in_trace(trace);
        let outcome = tracing::Instrument::instrument(self.handle(decoded, &mut ctx), span).await;
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

    fn snapshot(&self, partition: u32) -> Option<Value> {
        Participant::snapshot(self, partition)
    }

    fn restore(
        &self,
        partition: u32,
        snapshot: Option<Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Participant::restore(self, partition, snapshot)
    }

    fn revoke(&self, partition: u32) {
        Participant::revoke(self, partition)
    }

    fn dead_letter_events(&self, dead: &DeadLetter, now: Timestamp) -> Vec<Envelope> {
        let mut ctx = ParticipantContext::new(&dead.original, dead.retry_count, now);
        self.on_dead_letter(dead, &mut ctx);
        ctx.take_events(&dead.original.saga).unwrap_or_else(|e| {
            tracing::warn!(dead_letter = %dead.id, error = %e, "dead-letter events dropped");
            Vec::new()
        })
    }
}

/// One attempt of the handler that the runtime must run, outside the
/// driver (it is async), then hand back with [`ParticipantDriver::finish`].
#[must_use = "run the attempt and hand its result to `ParticipantDriver::finish`"]
pub struct Attempt {
    participant: Arc<dyn Erased>,
    command: Envelope,
    number: u32,
    partition: u32,
    timeout: Option<Duration>,
    /// The context of the attempt's span, once it ran in a trace.
    trace: OnceLock<TraceContext>,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("command", &self.command.id)
            .field("number", &self.number)
            .field("partition", &self.partition)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Attempt {
    /// The command.
    pub fn command(&self) -> &Envelope {
        &self.command
    }

    /// The participant-side attempt number (1-based).
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The partition the command came from.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The handler's deadline ([`ParticipantPolicy::timeout`]).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The trace the attempt runs in: once it ran, the context of its
    /// `participant.attempt` span (what its reply carries); before, the
    /// command's ([`Envelope::traceparent`]). `None` for a command
    /// without one.
    pub fn trace(&self) -> Option<TraceContext> {
        self.trace.get().copied().or(self.command.traceparent)
    }

    /// Runs the handler once, at `now`, without bounding it in time (see
    /// `Attempt::run`, feature `tokio`).
    ///
    /// A panic in the handler (or in the command's or reply's serde code)
    /// is a retryable failure of the attempt, with the panic's message:
    /// the participant's retry policy bounds how often it runs again, and
    /// the thread that runs it goes on.
    pub async fn run_unbounded(&self, now: Timestamp) -> AttemptResult {
        let run =
            self.participant
                .attempt(&self.command, self.number, self.partition, now, &self.trace);
        match std::panic::AssertUnwindSafe(run).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let error = format!(
                    "the handler panicked: {}",
                    crate::error::panic_message(&*panic)
                );
                tracing::error!(message_id = %self.command.id, attempt = self.number, %error, "participant handler panicked: a retryable failure");
                AttemptResult::Failed {
                    class: ErrorClass::Retryable,
                    error,
                }
            }
        }
    }

    /// Runs the handler once, at `now`, cut off after
    /// [`Attempt::timeout`] (a retryable failure then).
    #[cfg(feature = "tokio")]
    pub async fn run(&self, now: Timestamp) -> AttemptResult {
        match self.timeout {
            Some(t) => tokio::time::timeout(t, self.run_unbounded(now))
                .await
                .unwrap_or_else(|_| AttemptResult::timed_out(t)),
            None => self.run_unbounded(now).await,
        }
    }
}

/// What the ledger remembers of one command, or of one compensated step.
///
/// Written as an internally tagged enum (`"state"`), read through
/// [`EntryFields`]: serde reads an internally tagged enum through a buffer
/// of every field, which made a restore decode each kept reply as an
/// [`Envelope`] and encode it again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", try_from = "EntryFields")]
enum Entry {
    /// Handled at `at`: the reply it got, sent again to a redelivery (none
    /// for a fire-and-forget command). Kept as the text its record was
    /// written with, encoded once for both.
    Answered {
        reply: Option<EncodedEnvelope>,
        #[serde(default)]
        at: Timestamp,
    },
    /// A step answered with a success at `at` (with `remember_steps`):
    /// its reply payload, for the step's later attempts.
    Remembered {
        payload: Value,
        #[serde(default)]
        at: Timestamp,
    },
    /// Waiting for its next local attempt (the command boxed: an entry
    /// of the other kinds, the many, stays small).
    Retrying {
        command: Box<Envelope>,
        attempts: u32,
        first_attempt_at: Timestamp,
        next_attempt_at: Timestamp,
        last_error: String,
    },
    /// The step was compensated at `at`: its forward commands no longer
    /// take effect.
    Fenced {
        #[serde(default)]
        at: Timestamp,
    },
}

impl Entry {
    /// When the entry was written, for those that expire.
    fn written_at(&self) -> Option<Timestamp> {
        match self {
            Entry::Answered { at, .. } | Entry::Remembered { at, .. } | Entry::Fenced { at } => {
                Some(*at)
            }
            Entry::Retrying { .. } => None,
        }
    }
}

/// The `"state"` of a ledger entry.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum EntryState {
    Answered,
    Remembered,
    Retrying,
    Fenced,
}

/// A ledger entry as read: the fields of every kind of [`Entry`] at once,
/// read in place (a kept reply as its text, checked to be JSON with an
/// envelope's `timestamp`), then checked against the entry's `state`.
#[derive(Deserialize)]
struct EntryFields {
    state: EntryState,
    #[serde(default)]
    reply: Option<EncodedEnvelope>,
    #[serde(default)]
    at: Timestamp,
    /// `Some(Value::Null)` for a `null` payload, `None` for none.
    #[serde(default, deserialize_with = "present")]
    payload: Option<Value>,
    #[serde(default)]
    command: Option<Box<Envelope>>,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    first_attempt_at: Option<Timestamp>,
    #[serde(default)]
    next_attempt_at: Option<Timestamp>,
    #[serde(default)]
    last_error: Option<String>,
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl TryFrom<EntryFields> for Entry {
    type Error = String;

    fn try_from(f: EntryFields) -> Result<Self, String> {
        let missing = |field: &str| format!("missing field `{field}`");
        Ok(match f.state {
            EntryState::Answered => Entry::Answered {
                reply: f.reply,
                at: f.at,
            },
            EntryState::Remembered => Entry::Remembered {
                payload: f.payload.ok_or_else(|| missing("payload"))?,
                at: f.at,
            },
            EntryState::Retrying => Entry::Retrying {
                command: f.command.ok_or_else(|| missing("command"))?,
                attempts: f.attempts.ok_or_else(|| missing("attempts"))?,
                first_attempt_at: f
                    .first_attempt_at
                    .ok_or_else(|| missing("first_attempt_at"))?,
                next_attempt_at: f
                    .next_attempt_at
                    .ok_or_else(|| missing("next_attempt_at"))?,
                last_error: f.last_error.ok_or_else(|| missing("last_error"))?,
            },
            EntryState::Fenced => Entry::Fenced { at: f.at },
        })
    }
}

/// Writes `reply`, if there is one, and gives what the ledger keeps of
/// it: the reply is encoded once, for its record and its ledger entry.
fn send_reply(reply: Option<Envelope>, out: &mut Vec<Record>) -> Option<EncodedEnvelope> {
    let reply = reply?;
    let encoded = EncodedEnvelope::encode(&reply);
    out.push(Record::message_text(&reply, encoded.json()));
    Some(encoded)
}

/// A handler's success as [`ParticipantDriver::success`] encodes it.
struct Success {
    /// The events' records.
    events: Vec<Record>,
    /// The reply and its text, if the command takes one.
    reply: Option<(Envelope, EncodedEnvelope)>,
    /// The payload the step remembers and the key it goes under, if it
    /// does.
    remembered: Option<(String, Value)>,
}

/// What a ledger entry's JSON adds to the reply or payload it holds (its
/// state, its time, the punctuation), with room to spare.
const LEDGER_ENTRY_FRAMING: usize = 64;

#[derive(Clone, Debug)]
struct Kept {
    partition: u32,
    entry: Entry,
}

fn fence_key(forward_business_key: &str) -> String {
    format!("fence/{forward_business_key}")
}

fn step_entry_key(business_key: &str) -> String {
    format!("step/{business_key}")
}

/// Runs one participant for a runtime worker, without I/O (but for the
/// handler, which the runtime runs: see [`Attempt`]).
///
/// For the partitions of the command channel the worker owns it keeps the
/// ledger: every command handled and its reply (a redelivery is answered
/// the same way without running the handler), the commands waiting for a
/// local retry, and the fences of compensated steps (a forward command
/// that arrives after its step's compensation never takes effect).
///
/// When the [`ParticipantPolicy`] gives up on a command, a command a saga
/// waits on (it has a `reply_to`) is answered with a failure of the last
/// error's class, so the saga's step decides what comes next; a
/// fire-and-forget command is dead-lettered. Records that are not commands
/// are dead-lettered.
pub struct ParticipantDriver {
    participant: Arc<dyn Erased>,
    policy: ParticipantPolicy,
    channel: String,
    ledger_topic: String,
    owned: BTreeSet<u32>,
    entries: FastMap<String, Kept>,
    /// How many of `entries` are fences: while none is, a command is
    /// known not to be fenced without building its fence key.
    fences: usize,
    retries: BTreeSet<(Timestamp, String)>,
    /// The local retry the last `take_due` call returned, for
    /// `reject_due`.
    last_taken: Option<(Timestamp, String)>,
    /// The command waiting for a local retry, by business key (at most one
    /// per step: a newer attempt supersedes it).
    retrying: FastMap<String, String>,
    /// Entries that expire, by when they were written, with their
    /// partition (a release goes by it without looking each entry up).
    expiring: BTreeSet<(Timestamp, String, u32)>,
    /// Restored entries written before entries carried their time: they
    /// count from the first time the driver is given (not from 1970).
    unstamped: Vec<String>,
    max_record_bytes: usize,
    undo: FastMap<String, Option<Kept>>,
    /// The last committed state snapshot of each owned partition.
    shards: HashMap<u32, Option<Value>>,
    /// Partitions whose participant state the open batch may have changed.
    touched: BTreeSet<u32>,
    /// Snapshots written in the open batch.
    written: HashMap<u32, Option<Value>>,
    /// A record of the open batch that could not be encoded: the batch
    /// must not commit.
    fault: Option<(u32, SagaError)>,
    /// Partitions being restored record by record: the latest state
    /// snapshot read so far (or why it cannot be read).
    restoring: HashMap<u32, Option<Result<Value, String>>>,
    metrics: metrics::ParticipantMetrics,
}

impl std::fmt::Debug for ParticipantDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantDriver")
            .field("participant", &self.policy.name)
            .field("channel", &self.channel)
            .field("owned", &self.owned)
            .field("entries", &self.entries.len())
            .field("retries", &self.retries.len())
            .finish_non_exhaustive()
    }
}

impl ParticipantDriver {
    /// A driver for `participant` on command channel `channel` under `policy`.
    pub fn new<P: Participant>(
        channel: impl Into<String>,
        policy: ParticipantPolicy,
        participant: Arc<P>,
    ) -> Self {
        Self {
            participant,
            ledger_topic: ledger_topic(&policy.name),
            metrics: metrics::ParticipantMetrics::new(&policy.name),
            policy,
            channel: channel.into(),
            owned: BTreeSet::new(),
            entries: FastMap::default(),
            fences: 0,
            retries: BTreeSet::new(),
            last_taken: None,
            retrying: FastMap::default(),
            expiring: BTreeSet::new(),
            unstamped: Vec::new(),
            max_record_bytes: super::saga::DEFAULT_MAX_RECORD_BYTES,
            undo: FastMap::default(),
            shards: HashMap::new(),
            touched: BTreeSet::new(),
            written: HashMap::new(),
            fault: None,
            restoring: HashMap::new(),
        }
    }

    /// The largest record (key and value) the driver writes, less 128
    /// bytes kept for headers and framing: a handler's success whose
    /// reply, ledger entries (the answer, a remembered payload) or events
    /// would be too large becomes a permanent failure, a dead
    /// letter too large keeps a truncated copy of its original, and a
    /// state snapshot too large stops its partition (see
    /// [`ParticipantDriver::before_commit`]).
    pub fn with_max_record_bytes(mut self, limit: usize) -> Self {
        self.max_record_bytes = limit.max(1024);
        self
    }

    /// The policy.
    pub fn policy(&self) -> &ParticipantPolicy {
        &self.policy
    }

    /// The command channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The ledger topic ([`ledger_topic`]).
    pub fn ledger_topic(&self) -> &str {
        &self.ledger_topic
    }

    /// Whether the worker owns `partition`.
    pub fn owns(&self, partition: u32) -> bool {
        self.owned.contains(&partition)
    }

    /// Commands waiting for a local retry.
    pub fn pending_retries(&self) -> usize {
        self.retries.len()
    }

    /// Takes `partition` with the latest record of each key of its ledger
    /// (key, bytes): the ledger entries and the participant's state
    /// snapshot, which the participant gets through
    /// [`Participant::restore`] before any command of the partition.
    /// Unreadable ledger entries are skipped (and logged).
    ///
    /// # Errors
    /// [`SagaError::Runtime`] if the participant's state snapshot is
    /// unreadable or the participant refuses it: the partition is not
    /// taken (do not serve it; report it).
    pub fn restore(
        &mut self,
        partition: u32,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<(), SagaError> {
        self.restore_begin(partition);
        for (key, bytes) in records {
            self.restore_record(partition, &key, Some(&bytes));
        }
        self.restore_end(partition)
    }

    /// Starts taking `partition` record by record, as the ledger is read
    /// (a restore that does not collect the topic first): feed every
    /// record in the topic's order with
    /// [`ParticipantDriver::restore_record`], then call
    /// [`ParticipantDriver::restore_end`]. A restore abandoned half way is
    /// dropped with [`ParticipantDriver::release`].
    pub fn restore_begin(&mut self, partition: u32) {
        self.restoring.insert(partition, None);
    }

    /// One record of a partition's ledger being restored (`value` `None`:
    /// a tombstone). A key's later record replaces what its earlier ones
    /// installed. An unreadable ledger entry is skipped (and logged).
    pub fn restore_record(&mut self, partition: u32, key: &str, value: Option<&[u8]>) {
        if key == PARTICIPANT_STATE_KEY {
            let snapshot = value
                .map(|bytes| crate::message::from_json::<Value>(bytes).map_err(|e| e.to_string()));
            self.restoring.insert(partition, snapshot);
            return;
        }
        self.put(key, None);
        let Some(bytes) = value else {
            return;
        };
        match crate::message::from_json::<Entry>(bytes) {
            Ok(entry) => self.put(key, Some(Kept { partition, entry })),
            Err(e) => {
                tracing::error!(participant = %self.policy.name, partition, key, error = %e, "unreadable ledger entry: skipped")
            }
        }
    }

    /// Ends the restore of `partition`: the participant gets its state
    /// snapshot ([`Participant::restore`]) and the driver owns the
    /// partition.
    ///
    /// # Errors
    /// [`SagaError::Runtime`] if the participant's state snapshot is
    /// unreadable or the participant refuses it: the partition is not
    /// taken (its ledger is dropped again; do not serve it; report it).
    pub fn restore_end(&mut self, partition: u32) -> Result<(), SagaError> {
        let refused = |source: Box<dyn std::error::Error + Send + Sync>| SagaError::Runtime {
            what: format!(
                "restoring the state of participant `{}` in partition {partition}",
                self.policy.name
            ),
            source,
        };
        let snapshot = match self.restoring.remove(&partition).flatten() {
            None => None,
            Some(Ok(value)) => Some(value),
            Some(Err(e)) => {
                let e = refused(format!("unreadable state snapshot: {e}").into());
                self.release(&[partition]);
                return Err(e);
            }
        };
        if let Err(e) = self.participant.restore(partition, snapshot.clone()) {
            let e = refused(e);
            self.release(&[partition]);
            return Err(e);
        }
        self.owned.insert(partition);
        self.shards.insert(partition, snapshot);
        Ok(())
    }

    /// Gives up `partitions`: their ledger leaves memory.
    pub fn release(&mut self, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        // One pass over each index, not a removal per entry: a partition
        // keeps every entry within the dedupe horizon, and a rebalance or
        // shutdown waits for this. The other indexes hold keys of
        // `entries` (and `unstamped` perhaps keys since deleted, which go
        // too).
        let (undo, fences) = (&mut self.undo, &mut self.fences);
        self.entries.retain(|key, kept| {
            let keep = !partitions.contains(&kept.partition);
            if !keep {
                undo.remove(key);
                *fences -= usize::from(matches!(kept.entry, Entry::Fenced { .. }));
            }
            keep
        });
        // Entries the open batch deleted (expired): a rollback after the
        // release must not bring back those of a partition given up.
        self.undo.retain(|_, old| {
            old.as_ref()
                .is_none_or(|kept| !partitions.contains(&kept.partition))
        });
        let entries = &self.entries;
        self.expiring.retain(|(_, _, p)| !partitions.contains(p));
        self.retries.retain(|(_, key)| entries.contains_key(key));
        self.retrying.retain(|_, key| entries.contains_key(key));
        self.unstamped.retain(|key| entries.contains_key(key));
        for p in partitions {
            if self.owned.remove(p) {
                self.participant.revoke(*p);
            }
            self.shards.remove(p);
            self.touched.remove(p);
            self.written.remove(p);
            self.restoring.remove(p);
        }
    }

    /// Handles one record of the command channel: a redelivered command is
    /// answered again, a forward command of a compensated step is refused,
    /// anything not a command is dead-lettered; a new command returns the
    /// [`Attempt`] to run. It is [`read_command`](Self::read_command) then
    /// [`handle_command`](Self::handle_command).
    pub fn on_record(
        &mut self,
        rec: &Incoming<'_>,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) -> Option<Attempt> {
        let command = self.read_command(rec, now, out)?;
        self.handle_command(rec.partition, command, now, out)
    }

    /// Reads the command `rec` holds, for a runtime that must know which
    /// saga it is for before it is handled (to finish first what it
    /// queued for that saga: a command's record need not be keyed by its
    /// saga id). `None` if its partition is not owned (skipped) or it holds
    /// no command (dead-lettered into `out`).
    pub fn read_command(
        &mut self,
        rec: &Incoming<'_>,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) -> Option<Envelope> {
        if !self.owns(rec.partition) {
            tracing::error!(participant = %self.policy.name, partition = rec.partition, "record of a partition the driver does not own: skipped");
            return None;
        }
        self.stamp(now);
        match self.command_of(rec) {
            Ok(c) => Some(c),
            Err(reason) => {
                let original = rec.as_poison("", now);
                let origin = Some(rec.origin());
                self.dead_letter(
                    original,
                    0,
                    "not a command".into(),
                    reason,
                    now,
                    origin,
                    out,
                );
                None
            }
        }
    }

    /// Handles `command`, read by [`read_command`](Self::read_command) from
    /// a record of `partition`, against the ledger as it is now: see
    /// [`on_record`](Self::on_record). A runtime that runs attempts later
    /// (queued, concurrently) must [`finish`](Self::finish) the attempts it
    /// took of the same saga first: the ledger does not know their outcome
    /// yet.
    pub fn handle_command(
        &mut self,
        partition: u32,
        command: Envelope,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) -> Option<Attempt> {
        match self.entries.get(command.id.as_str()).map(|k| &k.entry) {
            Some(Entry::Answered { reply, .. }) => {
                tracing::debug!(participant = %self.policy.name, message_id = %command.id, "duplicate command: answering again");
                if let Some(reply) = reply {
                    // Its channel, key and trace are in the text. It was
                    // encoded from an envelope when it was sent (a restore
                    // only checks it is JSON with an envelope's timestamp),
                    // so it decodes; were it not to, the saga's timeout
                    // would ask again.
                    match reply.decode() {
                        Ok(env) => out.push(Record::message_text(&env, reply.json())),
                        Err(e) => {
                            tracing::error!(participant = %self.policy.name, message_id = %command.id, error = %e, "the kept reply cannot be read: not sent again");
                        }
                    }
                }
                return None;
            }
            Some(Entry::Retrying { .. }) => return None,
            Some(Entry::Fenced { .. } | Entry::Remembered { .. }) | None => {}
        }
        self.supersede(partition, &command, out, now);
        if command.phase == Some(Phase::Compensation) {
            self.fence(partition, &command, out, now);
        } else if self.fenced(&command) {
            self.refuse_fenced(partition, &command, now, out);
            return None;
        }
        if self.answer_from_step(partition, &command, now, out) {
            return None;
        }
        Some(self.attempt(partition, command, 1))
    }

    /// Dead-letters `rec` without running the handler, with reason `why`:
    /// for a runtime whose broker refuses what handling it produced (a
    /// reply over the broker's size limit), so the partition goes on. A
    /// command a saga waits on is also answered with a permanent failure,
    /// so the saga does not wait for its timeout.
    pub fn reject(&mut self, rec: &Incoming<'_>, why: &str, now: Timestamp, out: &mut Vec<Record>) {
        let reason = format!("its handling produced a record the broker refuses: {why}");
        let origin = Some(rec.origin());
        let Ok(command) = self.command_of(rec) else {
            let original = rec.as_poison("", now);
            self.dead_letter(original, 0, "rejected".into(), reason, now, origin, out);
            return;
        };
        self.give_up_rejected(rec.partition, command, 0, reason, now, origin, out);
    }

    /// Gives up the local retry the last [`take_due`](Self::take_due) call
    /// returned, without running it again, with reason `why`: for a
    /// runtime whose broker refused what running it produced (a reply over
    /// the broker's size limit), so that it is not retried for ever. As
    /// with [`reject`](Self::reject), the command is dead-lettered and a
    /// saga waiting on it is answered with a permanent failure. A rollback
    /// brings the retry back.
    ///
    /// Returns the command's partition; `None` if there is nothing to
    /// reject: the last call returned no retry, or the retry is no longer
    /// pending (a newer attempt superseded it, its partition was
    /// released).
    pub fn reject_due(&mut self, why: &str, now: Timestamp, out: &mut Vec<Record>) -> Option<u32> {
        let (at, key) = self.last_taken.clone()?;
        if !self.retries.contains(&(at, key.clone())) {
            return None;
        }
        let (partition, command, attempts) = self.waiting(&key)?;
        let reason = format!("running it produced a record the broker refuses: {why}");
        // Its last attempt ran (and was undone with its batch).
        let attempts = attempts + 1;
        self.give_up_rejected(partition, command, attempts, reason, now, None, out);
        Some(partition)
    }

    /// The partition of the command whose local retry the last
    /// [`take_due`](Self::take_due) call returned, if it returned one: for
    /// a runtime whose broker refused what the retry wrote, to stop that
    /// partition when the refused record is in the ledger (see
    /// [`reject_due`](Self::reject_due) for the others).
    pub fn due_partition(&self) -> Option<u32> {
        let (_, key) = self.last_taken.as_ref()?;
        self.entries.get(key).map(|k| k.partition)
    }

    /// Answers `command`, whose handling the broker refused (`reason`),
    /// with a permanent failure if a saga waits on it, records that
    /// answer in the ledger, and dead-letters the command.
    #[allow(clippy::too_many_arguments)]
    fn give_up_rejected(
        &mut self,
        partition: u32,
        command: Envelope,
        attempts: u32,
        reason: String,
        now: Timestamp,
        origin: Option<RecordOrigin>,
        out: &mut Vec<Record>,
    ) {
        let failure = ReplyOutcome::failure(ErrorClass::Permanent, reason.clone());
        let reply = send_reply(command.reply(failure, Value::Null, now), out);
        let entry = Entry::Answered { reply, at: now };
        self.write(partition, command.id.to_string(), entry, out);
        self.dead_letter(
            command,
            attempts,
            "rejected".into(),
            reason,
            now,
            origin,
            out,
        );
    }

    /// When the next local retry is due, or the next ledger entry past
    /// the dedupe horizon is to be deleted.
    pub fn next_due(&self) -> Option<Timestamp> {
        let retry = self.retries.iter().next().map(|(at, _)| *at);
        let expiry = self
            .expiring
            .iter()
            .next()
            .map(|(at, _, _)| at.saturating_add(self.policy.dedupe_horizon));
        match (retry, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The work due at `now`: deletes ledger entries past the dedupe
    /// horizon (tombstones into `out`, a bounded number per call), then
    /// returns the earliest local retry due, if any: the [`Attempt`] to
    /// run.
    pub fn take_due(&mut self, now: Timestamp, out: &mut Vec<Record>) -> Option<Attempt> {
        self.last_taken = None;
        self.stamp(now);
        self.expire(now, out);
        loop {
            let (at, key) = self.retries.iter().next().cloned()?;
            if at > now {
                return None;
            }
            // The attempt may be rolled back before it runs (a runtime that
            // queues attempts until its batch ends): the retry must come
            // back with the entry.
            self.keep_undo(&key);
            self.retries.remove(&(at, key.clone()));
            let Some((partition, command, attempts)) = self.waiting(&key) else {
                continue;
            };
            if command.phase != Some(Phase::Compensation) && self.fenced(&command) {
                self.refuse_fenced(partition, &command, now, out);
                continue;
            }
            self.last_taken = Some((at, key));
            return Some(self.attempt(partition, command, attempts + 1));
        }
    }

    /// Gives restored entries without a time the time `now`.
    fn stamp(&mut self, now: Timestamp) {
        for key in std::mem::take(&mut self.unstamped) {
            let Some(kept) = self.entries.get_mut(&key) else {
                continue;
            };
            match &mut kept.entry {
                Entry::Answered { at, .. }
                | Entry::Remembered { at, .. }
                | Entry::Fenced { at }
                    if *at == Timestamp::EPOCH =>
                {
                    *at = now;
                    self.expiring.insert((now, key, kept.partition));
                }
                _ => {}
            }
        }
    }

    /// Deletes up to 500 ledger entries written before the dedupe horizon.
    fn expire(&mut self, now: Timestamp, out: &mut Vec<Record>) {
        for _ in 0..500 {
            let Some((at, key, partition)) = self.expiring.iter().next().cloned() else {
                return;
            };
            if at.saturating_add(self.policy.dedupe_horizon) > now {
                return;
            }
            if !self.entries.contains_key(&key) {
                self.expiring.remove(&(at, key, partition));
                continue;
            }
            out.push(
                Record::new(&self.ledger_topic, key.clone(), None, RecordKind::Ledger)
                    .on_partition(partition),
            );
            self.keep_undo(&key);
            self.put(&key, None);
        }
    }

    /// Records the outcome of `attempt`, which took `took` to run: the
    /// reply and events, a local retry, or giving up (a failure reply, or a
    /// dead letter for a fire-and-forget command).
    pub fn finish(
        &mut self,
        attempt: Attempt,
        result: AttemptResult,
        took: Duration,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) {
        self.metrics.attempt(&result, took.as_secs_f64());
        let trace = attempt.trace();
        let Attempt {
            command,
            number,
            partition,
            ..
        } = attempt;
        self.touched.insert(partition);
        let first = match self.entries.get(command.id.as_str()).map(|k| &k.entry) {
            Some(Entry::Retrying {
                first_attempt_at, ..
            }) => *first_attempt_at,
            _ => now,
        };
        let outcome = match result {
            AttemptResult::Replied { reply, events } => {
                self.success(&command, reply, &events, trace, now)
            }
            AttemptResult::Failed { class, error } => Err((class, error)),
        };
        let entry = match outcome {
            Ok(Success {
                events,
                reply,
                remembered,
            }) => {
                out.extend(events);
                let reply = reply.map(|(answer, encoded)| {
                    out.push(Record::message_text(&answer, encoded.json()));
                    encoded
                });
                if let Some((key, payload)) = remembered {
                    let remembered = Entry::Remembered { payload, at: now };
                    self.write(partition, key, remembered, out);
                }
                Entry::Answered { reply, at: now }
            }
            Err((class, error)) => {
                tracing::debug!(participant = %self.policy.name, message_id = %command.id, attempt = number, %error, "attempt failed");
                let seed = seed_of(&command.id);
                let elapsed = now.saturating_since(first);
                match self.policy.retry.decide(class, number, elapsed, seed) {
                    RetryDecision::RetryAfter(delay) => Entry::Retrying {
                        command: Box::new(command.clone()),
                        attempts: number,
                        first_attempt_at: first,
                        next_attempt_at: now.saturating_add(delay),
                        last_error: error,
                    },
                    RetryDecision::GiveUp(why) => {
                        let failure = ReplyOutcome::Failure {
                            class,
                            error: error.clone(),
                            attempts: number,
                        };
                        match command.reply(failure, Value::Null, now) {
                            Some(reply) => Entry::Answered {
                                reply: send_reply(Some(reply.with_traceparent(trace)), out),
                                at: now,
                            },
                            None => {
                                self.dead_letter(
                                    command.clone(),
                                    number,
                                    why.to_string(),
                                    error,
                                    now,
                                    None,
                                    out,
                                );
                                Entry::Answered {
                                    reply: None,
                                    at: now,
                                }
                            }
                        }
                    }
                }
            }
        };
        self.write(partition, command.id.to_string(), entry, out);
    }

    /// The open batch is about to commit: writes the participant's state
    /// snapshot of every partition the batch touched (if it keeps any).
    ///
    /// # Errors
    ///
    /// The partition and [`SagaError::RecordTooLarge`] if its snapshot is
    /// over the record size limit: the batch must not commit (roll it
    /// back), and the partition cannot go on until the participant keeps
    /// less state in it.
    /// The partition and [`SagaError::Runtime`] if a snapshot or a ledger
    /// entry of the batch could not be encoded: likewise. Such a fault is
    /// kept through a [`release`](Self::release) of its partition (the
    /// batch still must not commit), so the partition named may no longer
    /// be owned.
    pub fn before_commit(&mut self, out: &mut Vec<Record>) -> Result<(), (u32, SagaError)> {
        if let Some(fault) = self.fault.take() {
            return Err(fault);
        }
        // The touched partitions stay marked until the batch commits: if it
        // rolls back instead, each gets its last committed state again.
        let touched: Vec<u32> = self.touched.iter().copied().collect();
        for p in touched {
            let Some(snapshot) = self.participant.snapshot(p) else {
                continue;
            };
            let bytes = serde_json::to_vec(&snapshot).map_err(|e| {
                let error = SagaError::Runtime {
                    what: format!(
                        "encoding the state of participant `{}` in partition {p}",
                        self.policy.name
                    ),
                    source: Box::new(e),
                };
                (p, error)
            })?;
            let limit = self.max_record_bytes.saturating_sub(RECORD_OVERHEAD);
            if bytes.len() + PARTICIPANT_STATE_KEY.len() > limit {
                let error = SagaError::RecordTooLarge {
                    topic: self.ledger_topic.clone(),
                    key: format!("participant state of partition {p}"),
                    size: bytes.len() + PARTICIPANT_STATE_KEY.len(),
                    limit,
                };
                return Err((p, error));
            }
            out.push(
                Record::new(
                    &self.ledger_topic,
                    PARTICIPANT_STATE_KEY,
                    Some(bytes),
                    RecordKind::ParticipantState,
                )
                .on_partition(p),
            );
            self.written.insert(p, Some(snapshot));
        }
        Ok(())
    }

    /// The open batch committed.
    pub fn committed(&mut self) {
        self.fault = None;
        self.last_taken = None;
        self.undo.clear();
        self.touched.clear();
        self.shards.extend(self.written.drain());
    }

    /// The open batch aborted: the ledger and the participant's state go
    /// back to their last committed values.
    pub fn rolled_back(&mut self) {
        self.fault = None;
        for (key, old) in std::mem::take(&mut self.undo) {
            self.put(&key, old);
        }
        let touched = std::mem::take(&mut self.touched);
        let written = std::mem::take(&mut self.written);
        for p in touched.into_iter().chain(written.into_keys()) {
            let snapshot = self.shards.get(&p).cloned().flatten();
            // It took this snapshot before.
            if let Err(e) = self.participant.restore(p, snapshot) {
                tracing::error!(participant = %self.policy.name, partition = p, error = %e, "the participant refused its last committed state after an abort");
            }
        }
    }

    fn command_of(&self, rec: &Incoming<'_>) -> Result<Envelope, String> {
        match RecordKind::from_header(rec.kind) {
            Ok(RecordKind::Message) => {}
            Ok(kind) => return Err(format!("a {kind} record on a command topic")),
            Err(kind) => return Err(format!("unknown record kind `{kind}`")),
        }
        rec.value.ok_or("an empty record (tombstone)")?;
        let env = rec
            .envelope()
            .map_err(|e| format!("not an envelope: {e}"))?;
        match env.kind {
            MessageKind::Command => {}
            MessageKind::Event => {
                return Err(format!("message `{}` is an event, not a command", env.id))
            }
            _ => {
                return Err(format!(
                    "message `{}` is a {}, not a command",
                    env.id,
                    env.kind.as_str()
                ))
            }
        }
        Ok(env)
    }

    fn attempt(&mut self, partition: u32, command: Envelope, number: u32) -> Attempt {
        Attempt {
            participant: self.participant.clone(),
            command,
            number,
            partition,
            timeout: self.policy.timeout,
            trace: OnceLock::new(),
        }
    }

    /// A new attempt of a step supersedes an older one still waiting for a
    /// local retry: the older one must not run after it (the saga judges
    /// the newest attempt, and the participant's own idempotency by
    /// business key holds only if attempts run in order).
    fn supersede(
        &mut self,
        partition: u32,
        command: &Envelope,
        out: &mut Vec<Record>,
        now: Timestamp,
    ) {
        if command.step.is_none() || self.retrying.is_empty() {
            return;
        }
        let Some(older) = self.retrying.get(&command.idempotency_key()).cloned() else {
            return;
        };
        if older != command.id.as_str() {
            tracing::debug!(participant = %self.policy.name, superseded = %older, by = %command.id, "local retry superseded by a newer attempt");
            let superseded = Entry::Answered {
                reply: None,
                at: now,
            };
            self.write(partition, older, superseded, out);
        }
    }

    fn fenced(&self, command: &Envelope) -> bool {
        command.step.is_some()
            && self.fences > 0
            && self
                .entries
                .contains_key(&fence_key(&command.idempotency_key()))
    }

    /// A compensation arrived: the forward commands of its step must never
    /// take effect from now on.
    fn fence(
        &mut self,
        partition: u32,
        compensation: &Envelope,
        out: &mut Vec<Record>,
        now: Timestamp,
    ) {
        let Some(step) = compensation.step.as_deref() else {
            return;
        };
        let forward = Envelope::step_key(
            &compensation.saga,
            &compensation.saga_id,
            step,
            Phase::Forward,
        );
        let key = fence_key(&forward);
        if !self.entries.contains_key(&key) {
            self.write(partition, key, Entry::Fenced { at: now }, out);
        }
        // A forward command waiting for its local retry is refused now:
        // the fence expires after the dedupe horizon, and the retry may
        // fall due later than that.
        let Some(waiting) = self.retrying.get(&forward).cloned() else {
            return;
        };
        if let Some((partition, command, _)) = self.waiting(&waiting) {
            self.refuse_fenced(partition, &command, now, out);
        }
    }

    /// The command under ledger key `key` if it waits for a local retry:
    /// its partition, the command, and the attempts it has run.
    fn waiting(&self, key: &str) -> Option<(u32, Envelope, u32)> {
        match self.entries.get(key)? {
            Kept {
                partition,
                entry: Entry::Retrying {
                    command, attempts, ..
                },
            } => Some((*partition, (**command).clone(), *attempts)),
            _ => None,
        }
    }

    fn refuse_fenced(
        &mut self,
        partition: u32,
        command: &Envelope,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) {
        tracing::debug!(participant = %self.policy.name, message_id = %command.id, "forward command of a compensated step: refused");
        let failure =
            ReplyOutcome::failure(ErrorClass::Permanent, "compensated before it took effect");
        let reply = send_reply(command.reply(failure, Value::Null, now), out);
        let entry = Entry::Answered { reply, at: now };
        self.write(partition, command.id.to_string(), entry, out);
    }

    /// With [`ParticipantPolicy::remember_steps`], a new attempt of a step
    /// this participant already answered with a success gets that answer
    /// again (`true`), without running the handler.
    fn answer_from_step(
        &mut self,
        partition: u32,
        command: &Envelope,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) -> bool {
        if !self.policy.remember_steps || command.step.is_none() {
            return false;
        }
        let key = step_entry_key(&command.idempotency_key());
        let Some(Entry::Remembered { payload, .. }) =
            self.entries.get(&key).map(|k| k.entry.clone())
        else {
            return false;
        };
        tracing::debug!(participant = %self.policy.name, message_id = %command.id, "step already answered: answering again");
        let reply = send_reply(command.reply(ReplyOutcome::Success, payload, now), out);
        let entry = Entry::Answered { reply, at: now };
        self.write(partition, command.id.to_string(), entry, out);
        true
    }

    /// A handler's success, encoded once: its events' records, its reply
    /// (if the command takes one) and the payload a step remembers. A
    /// success whose records would be over the size limit becomes a
    /// permanent failure instead (the records could never be written).
    fn success(
        &self,
        command: &Envelope,
        payload: Value,
        events: &[Envelope],
        trace: Option<TraceContext>,
        now: Timestamp,
    ) -> Result<Success, (ErrorClass, String)> {
        let limit = self.max_record_bytes.saturating_sub(RECORD_OVERHEAD);
        let events: Vec<Record> = events.iter().map(Record::message).collect();
        let remember = self.policy.remember_steps && command.step.is_some();
        let remembered = remember.then(|| payload.clone());
        let reply = command
            .reply(ReplyOutcome::Success, payload, now)
            .map(|answer| {
                let answer = answer.with_traceparent(trace);
                let encoded = EncodedEnvelope::encode(&answer);
                (answer, encoded)
            });
        let text = reply.as_ref().map(|(_, encoded)| encoded.json().len());
        // The ledger entry, under the command's id, holds the reply's text.
        let entry_size = text
            .unwrap_or(0)
            .saturating_add(LEDGER_ENTRY_FRAMING + command.id.as_str().len());
        // The remembered entry, under the step's key, holds the payload,
        // which the reply's text holds too (when there is one).
        let remembered = remembered.map(|payload| {
            let key = step_entry_key(&command.idempotency_key());
            let value = match text {
                Some(len) => len,
                None => json_len(&payload).unwrap_or(usize::MAX),
            };
            let size = value.saturating_add(LEDGER_ENTRY_FRAMING + key.len());
            (key, payload, size)
        });
        let entry_size = remembered
            .as_ref()
            .map_or(entry_size, |(_, _, size)| entry_size.max(*size));
        let size = events
            .iter()
            .map(Record::size)
            .chain(
                reply
                    .iter()
                    .map(|(answer, encoded)| encoded.json().len() + answer.key().len()),
            )
            .fold(entry_size, usize::max);
        if size > limit {
            tracing::error!(participant = %self.policy.name, message_id = %command.id, size, limit, "reply or event over the record size limit: answered as a permanent failure");
            return Err((
                ErrorClass::Permanent,
                format!(
                    "the handler's reply or events need a record of about {size} bytes, over the limit of {limit}"
                ),
            ));
        }
        Ok(Success {
            events,
            reply,
            remembered: remembered.map(|(key, payload, _)| (key, payload)),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &self,
        original: Envelope,
        retry_count: u32,
        reason: String,
        last_error: String,
        now: Timestamp,
        origin: Option<RecordOrigin>,
        out: &mut Vec<Record>,
    ) {
        tracing::warn!(participant = %self.policy.name, message_id = %original.id, %reason, %last_error, "dead-lettered");
        let mut dead = DeadLetter::new(
            &self.policy.dead_letter_channel,
            &self.policy.name,
            original,
            now,
            retry_count,
            reason,
            last_error,
        );
        dead.origin = origin;
        metrics::dead_letter(&self.policy.name);
        let events = self.participant.dead_letter_events(&dead, now);
        let limit = self.max_record_bytes.saturating_sub(RECORD_OVERHEAD);
        out.push(Record::message(&dead.to_envelope_within(limit)));
        out.extend(events.iter().map(Record::message));
    }

    /// Writes `entry` under `key` in the open batch and keeps it. An entry
    /// that cannot be encoded fails the batch (see `before_commit`) rather
    /// than being written empty.
    fn write(&mut self, partition: u32, key: String, entry: Entry, out: &mut Vec<Record>) {
        // Room for the reply the entry holds: growing the buffer step by
        // step would copy it each time.
        let room = match &entry {
            Entry::Answered {
                reply: Some(reply), ..
            } => reply.json().len() + LEDGER_ENTRY_FRAMING,
            _ => 128,
        };
        let mut bytes = Vec::with_capacity(room);
        let bytes = match serde_json::to_writer(&mut bytes, &entry) {
            Ok(()) => bytes,
            Err(e) => {
                tracing::error!(participant = %self.policy.name, partition, key, error = %e, "ledger entry cannot be encoded: the batch fails");
                let error = SagaError::Runtime {
                    what: format!("encoding the ledger entry `{key}`"),
                    source: Box::new(e),
                };
                self.fault.get_or_insert((partition, error));
                return;
            }
        };
        out.push(
            Record::new(
                &self.ledger_topic,
                key.clone(),
                Some(bytes),
                RecordKind::Ledger,
            )
            .on_partition(partition),
        );
        self.keep_undo(&key);
        self.put(&key, Some(Kept { partition, entry }));
    }

    /// Remembers what `key` held before the open batch, once.
    fn keep_undo(&mut self, key: &str) {
        if !self.undo.contains_key(key) {
            let old = self.entries.get(key).cloned();
            self.undo.insert(key.to_owned(), old);
        }
    }

    fn put(&mut self, key: &str, new: Option<Kept>) {
        if let Some(kept) = self.entries.get(key) {
            if let Some(at) = kept.entry.written_at() {
                self.expiring.remove(&(at, key.to_owned(), kept.partition));
            }
        }
        if let Some(Kept {
            entry:
                Entry::Retrying {
                    next_attempt_at,
                    command,
                    ..
                },
            ..
        }) = self.entries.get(key)
        {
            self.retries.remove(&(*next_attempt_at, key.to_owned()));
            // Only if it is this entry's: a restore replays older versions,
            // and another command of the step may hold the slot now.
            let step = command.idempotency_key();
            if self.retrying.get(&step).is_some_and(|k| k == key) {
                self.retrying.remove(&step);
            }
        }
        match new {
            Some(kept) => {
                match kept.entry.written_at() {
                    Some(Timestamp::EPOCH) => self.unstamped.push(key.to_owned()),
                    Some(at) => {
                        self.expiring.insert((at, key.to_owned(), kept.partition));
                    }
                    None => {}
                }
                if let Entry::Retrying {
                    next_attempt_at,
                    command,
                    ..
                } = &kept.entry
                {
                    self.retries.insert((*next_attempt_at, key.to_owned()));
                    self.retrying
                        .insert(command.idempotency_key(), key.to_owned());
                }
                let fence = matches!(kept.entry, Entry::Fenced { .. });
                if let Some(old) = self.entries.insert(key.to_owned(), kept) {
                    self.fences -= usize::from(matches!(old.entry, Entry::Fenced { .. }));
                }
                self.fences += usize::from(fence);
            }
            None => {
                if let Some(old) = self.entries.remove(key) {
                    self.fences -= usize::from(matches!(old.entry, Entry::Fenced { .. }));
                }
            }
        }
    }
}

fn seed_of(id: &MessageId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use crate::driver::tests::tombstones;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::definition::StepError;
    use crate::ids::SagaId;
    use crate::retry::RetryPolicy;

    const T0: Timestamp = Timestamp::from_millis(1_000_000);

    /// Answers from a script; keeps a counter as its per-partition state.
    #[derive(Default)]
    struct Scripted {
        script: Mutex<VecDeque<Result<u32, StepError>>>,
        runs: Mutex<u32>,
        state: Mutex<HashMap<u32, u64>>,
    }

    #[async_trait]
    impl Participant for Scripted {
        type Command = Value;
        type Reply = u32;
        type Error = StepError;
        async fn handle(&self, _: Value, ctx: &mut ParticipantContext) -> Result<u32, StepError> {
            *self.runs.lock().unwrap() += 1;
            let next = self.script.lock().unwrap().pop_front().unwrap_or(Ok(0));
            if next.is_ok() {
                *self
                    .state
                    .lock()
                    .unwrap()
                    .entry(ctx.partition())
                    .or_default() += 1;
                ctx.emit("svc.events", &"DONE");
            }
            next
        }
        fn snapshot(&self, partition: u32) -> Option<Value> {
            self.state
                .lock()
                .unwrap()
                .get(&partition)
                .map(|n| Value::from(*n))
        }
        fn restore(
            &self,
            partition: u32,
            snapshot: Option<Value>,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let n = match snapshot {
                None => 0,
                Some(v) => v.as_u64().ok_or("not a counter")?,
            };
            self.state.lock().unwrap().insert(partition, n);
            Ok(())
        }
    }

    fn setup(
        script: Vec<Result<u32, StepError>>,
        policy: ParticipantPolicy,
    ) -> (ParticipantDriver, Arc<Scripted>) {
        let p = Arc::new(Scripted::default());
        p.script.lock().unwrap().extend(script);
        let mut d = ParticipantDriver::new("svc", policy, p.clone());
        d.restore(0, Vec::new()).unwrap();
        (d, p)
    }

    fn command(step: Option<(&str, Phase)>, attempt: u32, reply_to: Option<&str>) -> Envelope {
        let saga = SagaId::new("s-1");
        let id = match step {
            Some((name, phase)) => Envelope::command_id("job", &saga, name, phase, attempt),
            None => MessageId::new("s-1/command/1"),
        };
        let mut c = Envelope::command(id, "svc", saga, "job", Value::Null, T0);
        if let Some((name, phase)) = step {
            c.step = Some(name.into());
            c.phase = Some(phase);
        }
        c.attempt = attempt;
        c.reply_to = reply_to.map(str::to_owned);
        c
    }

    fn incoming(bytes: &[u8]) -> Incoming<'_> {
        Incoming {
            topic: "svc",
            partition: 0,
            offset: 3,
            key: Some(b"s-1"),
            value: Some(bytes),
            kind: None,
            traceparent: None,
        }
    }

    /// Delivers `cmd`, runs the attempt it asks for (if any), returns what
    /// was written.
    async fn deliver(d: &mut ParticipantDriver, cmd: &Envelope) -> Vec<Record> {
        let mut out = Vec::new();
        let bytes = cmd.to_bytes();
        if let Some(a) = d.on_record(&incoming(&bytes), T0, &mut out) {
            let r = a.run_unbounded(T0).await;
            d.finish(a, r, Duration::ZERO, T0, &mut out);
        }
        out
    }

    fn messages(out: &[Record]) -> Vec<Envelope> {
        out.iter()
            .filter(|r| r.kind == RecordKind::Message)
            .map(|r| Envelope::from_bytes(r.value.as_deref().unwrap()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_redelivered_command_is_answered_again_without_running() {
        let (mut d, p) = setup(vec![Ok(7)], ParticipantPolicy::new("svc"));
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let first = messages(&deliver(&mut d, &cmd).await);
        let again = messages(&deliver(&mut d, &cmd).await);
        assert_eq!(*p.runs.lock().unwrap(), 1);
        assert_eq!(first.len(), 2, "the event and the reply");
        assert_eq!(again.len(), 1, "the reply only");
        assert_eq!(again[0], first[1]);
        // A new attempt of the same step is a new command: it runs.
        deliver(
            &mut d,
            &command(Some(("call", Phase::Forward)), 2, Some("job.replies")),
        )
        .await;
        assert_eq!(*p.runs.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_ledger_entry_holds_the_reply_as_written_and_a_restored_ledger_answers_with_it() {
        let (mut d, _) = setup(vec![Ok(7)], ParticipantPolicy::new("svc"));
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let out = deliver(&mut d, &cmd).await;
        let reply = out
            .iter()
            .find(|r| r.topic == "job.replies")
            .expect("a reply");
        let ledger = out
            .iter()
            .find(|r| r.kind == RecordKind::Ledger)
            .expect("a ledger entry");
        // The entry nests the reply's own text, as an object.
        let entry: Value = serde_json::from_slice(ledger.value.as_deref().unwrap()).unwrap();
        assert_eq!(entry["state"], "answered");
        let sent: Value = serde_json::from_slice(reply.value.as_deref().unwrap()).unwrap();
        assert_eq!(entry["reply"], sent);
        let text = std::str::from_utf8(ledger.value.as_deref().unwrap()).unwrap();
        let reply_text = std::str::from_utf8(reply.value.as_deref().unwrap()).unwrap();
        assert!(text.contains(reply_text), "{text}");
        d.committed();
        // A process that restores the ledger answers a redelivery with the
        // same record, without running the handler.
        let (mut fresh, p) = setup(vec![], ParticipantPolicy::new("svc"));
        fresh
            .restore(0, vec![(ledger.key.clone(), ledger.value.clone().unwrap())])
            .unwrap();
        let again = deliver(&mut fresh, &cmd).await;
        assert_eq!(*p.runs.lock().unwrap(), 0);
        assert_eq!(again, vec![reply.clone()]);
        // An entry whose reply is not an envelope stays unreadable.
        let (mut bad, _) = setup(vec![], ParticipantPolicy::new("svc"));
        let junk = br#"{"state":"answered","reply":{"x":1},"at":5}"#.to_vec();
        bad.restore(0, vec![(ledger.key.clone(), junk)]).unwrap();
        assert!(bad.entries.is_empty());
    }

    #[tokio::test]
    async fn a_compensation_fences_its_forward_command_through_rollbacks_and_restores() {
        let forward = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let compensation = command(Some(("call", Phase::Compensation)), 1, Some("job.replies"));
        let other = command(Some(("other", Phase::Forward)), 1, Some("job.replies"));
        let (mut d, p) = setup(vec![], ParticipantPolicy::new("svc"));
        // A fence written in a batch that aborts fences nothing.
        deliver(&mut d, &compensation).await;
        d.rolled_back();
        assert_eq!(d.fences, 0);
        let runs = *p.runs.lock().unwrap();
        deliver(&mut d, &forward).await;
        assert_eq!(
            *p.runs.lock().unwrap(),
            runs + 1,
            "no fence: the forward command ran"
        );
        d.rolled_back();
        // Committed, the fence refuses the late forward command, and only it.
        deliver(&mut d, &compensation).await;
        d.committed();
        let runs = *p.runs.lock().unwrap();
        let refused = messages(&deliver(&mut d, &forward).await);
        assert_eq!(*p.runs.lock().unwrap(), runs, "fenced: not run");
        assert!(
            refused
                .iter()
                .any(|m| m.kind == MessageKind::Reply && m.outcome != Some(ReplyOutcome::Success)),
            "{refused:?}"
        );
        deliver(&mut d, &other).await;
        assert_eq!(
            *p.runs.lock().unwrap(),
            runs + 1,
            "another step is not fenced"
        );
        d.committed();
        // A process that restores the ledger keeps the fence.
        let ledger: Vec<(String, Vec<u8>)> = d
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::to_vec(&v.entry).unwrap()))
            .collect();
        let (mut fresh, q) = setup(vec![], ParticipantPolicy::new("svc"));
        fresh.restore(0, ledger).unwrap();
        assert_eq!(fresh.fences, 1);
        deliver(&mut fresh, &forward).await;
        assert_eq!(*q.runs.lock().unwrap(), 0, "fenced after a restore");
    }

    #[tokio::test]
    async fn a_due_retry_taken_but_rolled_back_before_it_ran_is_due_again() {
        let policy = ParticipantPolicy::new("svc")
            .retry(RetryPolicy::fixed(Duration::from_secs(2)).with_max_attempts(3));
        let (mut d, _) = setup(vec![Err(StepError::retryable("503"))], policy);
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let _ = deliver(&mut d, &cmd).await;
        d.committed();
        let due = T0.saturating_add(Duration::from_secs(2));
        let mut out = Vec::new();
        let taken = d.take_due(due, &mut out).expect("the retry");
        assert_eq!(taken.number(), 2);
        // The batch it was queued in aborts before the attempt runs.
        drop(taken);
        d.rolled_back();
        assert_eq!(d.next_due(), Some(due), "the retry is armed again");
        let again = d.take_due(due, &mut out).expect("the retry, again");
        assert_eq!(again.number(), 2);
    }

    #[tokio::test]
    async fn a_retry_whose_records_were_refused_is_answered_with_a_failure_not_run_again() {
        let policy = ParticipantPolicy::new("svc")
            .retry(RetryPolicy::fixed(Duration::from_secs(2)).with_max_attempts(5));
        let (mut d, p) = setup(vec![Err(StepError::retryable("503")), Ok(1), Ok(2)], policy);
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let _ = deliver(&mut d, &cmd).await;
        d.committed();
        let due = T0.saturating_add(Duration::from_secs(2));
        // Nothing taken yet: nothing to reject.
        assert_eq!(d.reject_due("refused", due, &mut Vec::new()), None);
        assert_eq!(d.due_partition(), None);
        // The retry runs; the broker refuses its reply and the batch aborts.
        let mut out = Vec::new();
        let a = d.take_due(due, &mut out).expect("the retry");
        let r = a.run_unbounded(due).await;
        d.finish(a, r, Duration::ZERO, due, &mut out);
        assert_eq!(messages(&out).len(), 2, "its event and reply");
        d.rolled_back();
        assert_eq!(d.next_due(), Some(due), "armed again by the rollback");
        assert_eq!(d.due_partition(), Some(0));
        // Rejected instead: a permanent failure for the saga, the answer
        // in the ledger, a dead letter; the handler does not run again.
        let mut out = Vec::new();
        assert_eq!(d.reject_due("too large", due, &mut out), Some(0));
        assert_eq!(*p.runs.lock().unwrap(), 2);
        let sent = messages(&out);
        let reply = sent
            .iter()
            .find(|m| m.kind == MessageKind::Reply)
            .expect("a reply");
        assert!(
            matches!(&reply.outcome, Some(ReplyOutcome::Failure { class: ErrorClass::Permanent, error, .. }) if error.contains("broker refuses: too large")),
            "{:?}",
            reply.outcome
        );
        let dead = sent
            .iter()
            .find(|m| m.channel == "svc.dlq")
            .expect("a dead letter");
        let dead = DeadLetter::from_envelope(dead).unwrap();
        assert_eq!(dead.original.id, cmd.id);
        assert_eq!(dead.retry_count, 2, "the attempts made");
        assert!(out.iter().any(|r| r.kind == RecordKind::Ledger));
        d.committed();
        assert_eq!(d.pending_retries(), 0);
        assert!(d.take_due(due, &mut Vec::new()).is_none(), "not run again");
        // Redelivered, the command is answered from the ledger.
        let again = messages(&deliver(&mut d, &cmd).await);
        assert_eq!(*p.runs.lock().unwrap(), 2);
        assert!(again.iter().any(|m| m.kind == MessageKind::Reply
            && matches!(m.outcome, Some(ReplyOutcome::Failure { .. }))));
    }

    #[tokio::test]
    async fn a_forward_retry_waiting_past_the_dedupe_horizon_never_runs_after_its_compensation() {
        let policy = ParticipantPolicy::new("svc")
            .dedupe_horizon(Duration::from_secs(60))
            .retry(RetryPolicy::fixed(Duration::from_secs(600)).with_max_attempts(5));
        let (mut d, p) = setup(
            vec![Err(StepError::retryable("busy")), Ok(1), Ok(2)],
            policy,
        );
        let forward = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let _ = deliver(&mut d, &forward).await;
        assert_eq!(d.pending_retries(), 1, "retried in 600 s");
        // The compensation fences the step, and answers the waiting
        // forward command with a failure at once.
        let compensation = command(Some(("call", Phase::Compensation)), 1, Some("job.replies"));
        let answered = messages(&deliver(&mut d, &compensation).await);
        assert_eq!(
            *p.runs.lock().unwrap(),
            2,
            "the forward once, the compensation"
        );
        assert_eq!(d.pending_retries(), 0);
        assert!(
            answered
                .iter()
                .any(|m| m.id.as_str().starts_with(forward.id.as_str())
                    && matches!(m.outcome, Some(ReplyOutcome::Failure { .. }))),
            "{answered:?}"
        );
        d.committed();
        // Past the horizon (the fence expires) and the retry's time: the
        // forward command does not run.
        let later = T0.saturating_add(Duration::from_secs(601));
        let mut out = Vec::new();
        assert!(d.take_due(later, &mut out).is_none());
        assert_eq!(*p.runs.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn local_retries_run_when_due_then_the_failure_goes_back_with_its_class() {
        let policy = ParticipantPolicy::new("svc")
            .retry(RetryPolicy::fixed(Duration::from_secs(2)).with_max_attempts(2));
        let (mut d, p) = setup(
            vec![
                Err(StepError::retryable("503")),
                Err(StepError::retryable("500")),
            ],
            policy,
        );
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        assert!(
            messages(&deliver(&mut d, &cmd).await).is_empty(),
            "no answer yet"
        );
        let due = T0.saturating_add(Duration::from_secs(2));
        assert_eq!(d.next_due(), Some(due));
        let mut out = Vec::new();
        assert!(d.take_due(T0, &mut out).is_none(), "not before its time");
        let a = d.take_due(due, &mut out).expect("the retry");
        assert_eq!(a.number(), 2);
        let r = a.run_unbounded(due).await;
        d.finish(a, r, Duration::ZERO, due, &mut out);
        let replies = messages(&out);
        assert_eq!(replies.len(), 1);
        assert_eq!(
            replies[0].outcome,
            Some(ReplyOutcome::Failure {
                class: ErrorClass::Retryable,
                error: "500".into(),
                attempts: 2
            })
        );
        assert_eq!(*p.runs.lock().unwrap(), 2);
        assert_eq!(d.pending_retries(), 0);
    }

    #[tokio::test]
    async fn a_fire_and_forget_command_is_dead_lettered_when_it_gives_up() {
        let (mut d, _) = setup(
            vec![Err(StepError::permanent("bad address"))],
            ParticipantPolicy::new("svc"),
        );
        let out = messages(&deliver(&mut d, &command(None, 1, None)).await);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].channel, "svc.dlq");
        let dead = DeadLetter::from_envelope(&out[0]).unwrap();
        assert_eq!(dead.last_error, "bad address");
        assert_eq!(dead.reason, "permanent error");
        assert_eq!(dead.original.id.as_str(), "s-1/command/1");
    }

    #[tokio::test]
    async fn a_forward_command_after_its_compensation_never_takes_effect() {
        let (mut d, p) = setup(vec![], ParticipantPolicy::new("svc"));
        deliver(
            &mut d,
            &command(Some(("call", Phase::Compensation)), 2, Some("job.replies")),
        )
        .await;
        let late = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let out = messages(&deliver(&mut d, &late).await);
        assert_eq!(*p.runs.lock().unwrap(), 1, "only the compensation ran");
        assert_eq!(
            out[0].outcome,
            Some(ReplyOutcome::failure(
                ErrorClass::Permanent,
                "compensated before it took effect"
            ))
        );
    }

    #[tokio::test]
    async fn an_abort_puts_the_ledger_and_the_participants_state_back() {
        let (mut d, p) = setup(vec![Ok(1), Ok(2)], ParticipantPolicy::new("svc"));
        let first = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let mut out = deliver(&mut d, &first).await;
        d.before_commit(&mut out).unwrap();
        d.committed();
        let snapshot = out
            .iter()
            .find(|r| r.kind == RecordKind::ParticipantState)
            .expect("the partition's state is written with the batch");
        assert_eq!(snapshot.partition, Some(0));
        assert_eq!(p.state.lock().unwrap()[&0], 1);
        // A second command's batch aborts.
        let second = command(Some(("other", Phase::Forward)), 1, Some("job.replies"));
        deliver(&mut d, &second).await;
        assert_eq!(p.state.lock().unwrap()[&0], 2);
        d.rolled_back();
        assert_eq!(p.state.lock().unwrap()[&0], 1, "back to the last commit");
        // Redelivered, the aborted command runs again.
        deliver(&mut d, &second).await;
        assert_eq!(*p.runs.lock().unwrap(), 3);
    }

    #[tokio::test]
    async fn records_that_are_not_commands_are_dead_lettered() {
        let (mut d, p) = setup(vec![], ParticipantPolicy::new("svc"));
        let mut out = Vec::new();
        let event = Envelope::event(
            MessageId::new("e-1"),
            "svc",
            SagaId::new("s-1"),
            "job",
            Value::Null,
            T0,
        );
        let bytes = event.to_bytes();
        for rec in [incoming(b"garbage"), incoming(&bytes)] {
            assert!(d.on_record(&rec, T0, &mut out).is_none());
        }
        let dead: Vec<DeadLetter> = messages(&out)
            .iter()
            .map(|e| DeadLetter::from_envelope(e).unwrap())
            .collect();
        assert_eq!(dead.len(), 2);
        assert!(dead[0].last_error.starts_with("not an envelope"));
        assert_eq!(
            dead[1].last_error,
            "message `e-1` is an event, not a command"
        );
        assert_eq!(*p.runs.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn handled_commands_are_forgotten_after_the_dedupe_horizon() {
        let policy = ParticipantPolicy::new("svc").dedupe_horizon(Duration::from_secs(60));
        let (mut d, p) = setup(vec![Ok(1), Ok(2)], policy);
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        deliver(&mut d, &cmd).await;
        d.committed();
        assert_eq!(
            d.next_due(),
            Some(T0.saturating_add(Duration::from_secs(60)))
        );
        let mut out = Vec::new();
        assert!(d.take_due(T0, &mut out).is_none());
        assert!(out.is_empty(), "nothing expires before the horizon");
        let later = T0.saturating_add(Duration::from_secs(61));
        assert!(d.take_due(later, &mut out).is_none());
        assert_eq!(out.len(), 1, "one tombstone");
        assert_eq!(out[0].topic, "svc.ledger");
        assert_eq!(out[0].key, cmd.id.as_str());
        assert!(out[0].value.is_none());
        assert_eq!(d.next_due(), None, "the ledger is empty");
        d.committed();
        // A redelivery older than the horizon runs the handler again.
        deliver(&mut d, &cmd).await;
        assert_eq!(*p.runs.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn an_aborted_expiry_keeps_the_entry() {
        let policy = ParticipantPolicy::new("svc").dedupe_horizon(Duration::from_secs(60));
        let (mut d, p) = setup(vec![Ok(1)], policy);
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        deliver(&mut d, &cmd).await;
        d.committed();
        let mut out = Vec::new();
        let _ = d.take_due(T0.saturating_add(Duration::from_secs(61)), &mut out);
        assert_eq!(out.len(), 1);
        d.rolled_back();
        assert!(d.next_due().is_some(), "the entry expires again later");
        deliver(&mut d, &cmd).await;
        assert_eq!(*p.runs.lock().unwrap(), 1, "still answered from the ledger");
    }

    #[tokio::test]
    async fn with_remember_steps_a_new_attempt_of_an_answered_step_gets_the_same_answer() {
        let policy = ParticipantPolicy::new("svc").remember_steps();
        let (mut d, p) = setup(vec![Ok(7), Ok(8)], policy);
        let first = messages(
            &deliver(
                &mut d,
                &command(Some(("call", Phase::Forward)), 1, Some("job.replies")),
            )
            .await,
        );
        let second = messages(
            &deliver(
                &mut d,
                &command(Some(("call", Phase::Forward)), 2, Some("job.replies")),
            )
            .await,
        );
        assert_eq!(*p.runs.lock().unwrap(), 1, "the handler ran once");
        assert_eq!(second.len(), 1, "the reply only, no events again");
        assert_eq!(second[0].payload, first[1].payload);
        assert_eq!(second[0].attempt, 2, "the answer goes to the new attempt");
        assert_eq!(second[0].outcome, Some(ReplyOutcome::Success));
    }

    #[tokio::test]
    async fn without_remember_steps_a_new_attempt_runs_again() {
        let (mut d, p) = setup(vec![Ok(7), Ok(8)], ParticipantPolicy::new("svc"));
        for attempt in [1, 2] {
            deliver(
                &mut d,
                &command(Some(("call", Phase::Forward)), attempt, Some("job.replies")),
            )
            .await;
        }
        assert_eq!(*p.runs.lock().unwrap(), 2);
    }

    /// Answers with a large string.
    struct Big(usize);

    #[async_trait]
    impl Participant for Big {
        type Command = Value;
        type Reply = String;
        type Error = StepError;
        async fn handle(&self, _: Value, _: &mut ParticipantContext) -> Result<String, StepError> {
            Ok("x".repeat(self.0))
        }
        fn snapshot(&self, _: u32) -> Option<Value> {
            Some(Value::String("y".repeat(self.0)))
        }
    }

    /// Panics on a command whose payload is `"boom"`, answers others.
    struct Fragile;

    #[async_trait]
    impl Participant for Fragile {
        type Command = Value;
        type Reply = u32;
        type Error = StepError;
        async fn handle(
            &self,
            command: Value,
            _: &mut ParticipantContext,
        ) -> Result<u32, StepError> {
            assert_ne!(command, Value::from("boom"), "boom");
            Ok(1)
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_retryable_failure_and_the_driver_goes_on() {
        let mut d = ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), Arc::new(Fragile));
        d.restore(0, Vec::new()).unwrap();
        let mut boom = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        boom.payload = Value::from("boom");
        let mut out = Vec::new();
        let attempt = d
            .on_record(&incoming(&boom.to_bytes()), T0, &mut out)
            .expect("an attempt");
        match attempt.run_unbounded(T0).await {
            AttemptResult::Failed {
                class: ErrorClass::Retryable,
                error,
            } => assert!(
                error.contains("the handler panicked") && error.contains("boom"),
                "{error}"
            ),
            other => panic!("expected a retryable failure, got {other:?}"),
        }
        // Another command is answered.
        let fine = command(Some(("other", Phase::Forward)), 1, Some("job.replies"));
        let replies = messages(&deliver(&mut d, &fine).await);
        assert_eq!(replies[0].outcome, Some(ReplyOutcome::Success));
    }

    #[tokio::test]
    async fn a_reply_over_the_size_limit_becomes_a_permanent_failure() {
        let mut d =
            ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), Arc::new(Big(5000)))
                .with_max_record_bytes(4096);
        d.restore(0, Vec::new()).unwrap();
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let out = deliver(&mut d, &cmd).await;
        assert!(out.iter().all(|r| r.size() <= 4096), "every record fits");
        let replies = messages(&out);
        assert!(matches!(
            &replies[0].outcome,
            Some(ReplyOutcome::Failure { class: ErrorClass::Permanent, error, .. }) if error.contains("over the limit")
        ));
    }

    /// Handles `cmd` with replies of sizes around the limit of 4,096
    /// bytes: no record goes over it, and a success is refused only near
    /// it. `remember`: with [`ParticipantPolicy::remember_steps`].
    async fn sweep_near_the_size_limit(cmd: &Envelope, remember: bool) {
        let limit = 4096 - RECORD_OVERHEAD;
        let (mut sent, mut refused, mut largest) = (0, 0, 0);
        for n in (2_000..4_000).step_by(7) {
            let mut policy = ParticipantPolicy::new("svc");
            if remember {
                policy = policy.remember_steps();
            }
            let mut d =
                ParticipantDriver::new("svc", policy, Arc::new(Big(n))).with_max_record_bytes(4096);
            d.restore(0, Vec::new()).unwrap();
            let out = deliver(&mut d, cmd).await;
            let biggest = out.iter().map(Record::size).max().unwrap();
            assert!(biggest <= limit, "{n}: a record of {biggest} bytes");
            // Refused: a failure reply, or a dead letter without one.
            let failed = messages(&out).iter().any(|m| {
                m.channel == "svc.dlq"
                    || matches!(
                        m.outcome,
                        Some(ReplyOutcome::Failure {
                            class: ErrorClass::Permanent,
                            ..
                        })
                    )
            });
            if failed {
                refused += 1;
            } else {
                sent += 1;
                largest = largest.max(biggest);
            }
        }
        assert!(sent > 0 && refused > 0, "{sent} sent, {refused} refused");
        assert!(
            largest + 100 > limit,
            "a success is refused only near the limit: the largest sent was {largest} bytes"
        );
    }

    #[tokio::test]
    async fn near_the_size_limit_no_record_goes_over_it_and_only_successes_close_to_it_fail() {
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        sweep_near_the_size_limit(&cmd, true).await;
    }

    #[tokio::test]
    async fn a_long_command_id_counts_against_the_size_limit_of_its_ledger_entry() {
        let mut cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        cmd.saga_id = SagaId::new("s".repeat(300));
        cmd.id = Envelope::command_id("job", &cmd.saga_id, "call", Phase::Forward, 1);
        sweep_near_the_size_limit(&cmd, false).await;
    }

    #[tokio::test]
    async fn a_remembered_payload_counts_against_the_size_limit_under_its_step_key() {
        // No reply, a short id, a long step key.
        let mut cmd = command(Some(("call", Phase::Forward)), 1, None);
        cmd.id = MessageId::new("c");
        cmd.saga_id = SagaId::new("s".repeat(300));
        sweep_near_the_size_limit(&cmd, true).await;
    }

    #[tokio::test]
    async fn a_small_reply_to_a_command_near_the_size_limit_is_sent() {
        let mut d = ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), Arc::new(Big(1)))
            .with_max_record_bytes(4096);
        d.restore(0, Vec::new()).unwrap();
        let mut cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        cmd.payload = Value::String("c".repeat(3_800));
        assert!(
            cmd.to_bytes().len() > 3_900,
            "the command alone is near the limit"
        );
        let out = deliver(&mut d, &cmd).await;
        assert_eq!(
            messages(&out)[0].outcome,
            Some(ReplyOutcome::Success),
            "the reply does not hold the command"
        );
    }

    #[tokio::test]
    async fn a_payload_over_the_size_limit_is_dropped_if_nobody_gets_it() {
        let mut d =
            ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), Arc::new(Big(5000)))
                .with_max_record_bytes(4096);
        d.restore(0, Vec::new()).unwrap();
        let out = deliver(&mut d, &command(None, 1, None)).await;
        assert!(messages(&out).is_empty(), "no reply and no dead letter");
        assert_eq!(out.len(), 1, "the ledger entry only");
        assert!(out[0].size() <= 4096 - RECORD_OVERHEAD);
    }

    #[tokio::test]
    async fn a_state_snapshot_over_the_size_limit_refuses_the_commit() {
        let mut d = ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), Arc::new(Big(10)))
            .with_max_record_bytes(1024);
        d.restore(0, Vec::new()).unwrap();
        let mut out = deliver(&mut d, &command(Some(("a", Phase::Forward)), 1, None)).await;
        assert!(d.before_commit(&mut out).is_ok());
        d.committed();
        let mut d =
            ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), Arc::new(Big(2000)))
                .with_max_record_bytes(1024);
        d.restore(0, Vec::new()).unwrap();
        let mut out = deliver(&mut d, &command(Some(("a", Phase::Forward)), 1, None)).await;
        let (partition, err) = d.before_commit(&mut out).unwrap_err();
        assert_eq!(partition, 0);
        assert!(matches!(err, SagaError::RecordTooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_dead_letter_over_the_size_limit_keeps_its_origin_and_a_truncated_copy() {
        let (d, _) = setup(vec![], ParticipantPolicy::new("svc"));
        let mut d = d.with_max_record_bytes(4096);
        let garbage = vec![b'z'; 20_000];
        let mut out = Vec::new();
        assert!(d.on_record(&incoming(&garbage), T0, &mut out).is_none());
        assert_eq!(out.len(), 1, "one dead letter");
        assert!(out[0].size() <= 4096);
        let dead = DeadLetter::from_envelope(&messages(&out)[0]).unwrap();
        assert_eq!(dead.origin, Some(RecordOrigin::new("svc", 0, 3)));
        assert!(dead.truncated_from.is_some());
    }

    #[derive(Default)]
    struct Revoked(Mutex<Vec<u32>>);

    #[async_trait]
    impl Participant for Revoked {
        type Command = Value;
        type Reply = ();
        type Error = StepError;
        async fn handle(&self, _: Value, _: &mut ParticipantContext) -> Result<(), StepError> {
            Ok(())
        }
        fn revoke(&self, partition: u32) {
            self.0.lock().unwrap().push(partition);
        }
    }

    #[test]
    fn releasing_a_partition_revokes_it_from_the_participant() {
        let p = Arc::new(Revoked::default());
        let mut d = ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), p.clone());
        d.restore(0, Vec::new()).unwrap();
        d.restore(1, Vec::new()).unwrap();
        d.release(&[1, 2]);
        assert_eq!(*p.0.lock().unwrap(), vec![1], "only a partition it held");
        assert!(d.owns(0) && !d.owns(1));
    }

    #[test]
    fn every_kind_of_ledger_entry_reads_back_as_written() {
        let cmd = command(Some(("reserve", Phase::Forward)), 1, Some("job.replies"));
        let reply = cmd
            .reply(
                ReplyOutcome::Success,
                serde_json::json!({"ok": "a \"quoted\" é"}),
                T0,
            )
            .unwrap();
        let entries = [
            Entry::Answered {
                reply: Some(EncodedEnvelope::encode(&reply)),
                at: T0,
            },
            Entry::Answered {
                reply: None,
                at: T0,
            },
            Entry::Remembered {
                payload: Value::Null,
                at: T0,
            },
            Entry::Remembered {
                payload: serde_json::json!([1, {"a": null}]),
                at: T0,
            },
            Entry::Retrying {
                command: Box::new(cmd.clone()),
                attempts: 2,
                first_attempt_at: T0,
                next_attempt_at: T0,
                last_error: "busy".into(),
            },
            Entry::Fenced { at: T0 },
        ];
        for entry in entries {
            let text = serde_json::to_string(&entry).unwrap();
            let back: Entry = serde_json::from_str(&text).unwrap();
            assert_eq!(back, entry, "{text}");
            if let Entry::Answered { reply: Some(r), .. } = &back {
                // The reply is kept as the very text it was written as.
                assert!(text.contains(r.json()), "{text}");
                assert_eq!(r.decode().unwrap(), reply);
            }
        }
        // Entries written before `at` was kept read with no time.
        let old: Entry = serde_json::from_str(r#"{"state":"fenced"}"#).unwrap();
        assert_eq!(
            old,
            Entry::Fenced {
                at: Timestamp::EPOCH
            }
        );
        // What an entry of its kind needs, missing; an unknown kind; a
        // reply without an envelope's timestamp: unreadable.
        for junk in [
            r#"{"state":"retrying","attempts":1}"#,
            r#"{"state":"remembered","at":5}"#,
            r#"{"state":"forgotten","at":5}"#,
            r#"{"state":"answered","reply":{"x":1},"at":5}"#,
            r#"{"at":5}"#,
        ] {
            let err = serde_json::from_str::<Entry>(junk).unwrap_err();
            assert!(!err.to_string().is_empty(), "{junk}");
        }
        let err = serde_json::from_str::<Entry>(r#"{"state":"retrying","attempts":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `command`"), "{err}");
    }

    #[test]
    fn a_rollback_after_a_release_does_not_bring_back_the_released_partitions_expired_entries() {
        let policy = ParticipantPolicy::new("svc").dedupe_horizon(Duration::from_secs(60));
        let mut d = ParticipantDriver::new("svc", policy, Arc::new(Scripted::default()));
        let at = T0.as_millis();
        let answered = format!(r#"{{"state":"answered","at":{at}}}"#).into_bytes();
        let fenced = format!(r#"{{"state":"fenced","at":{at}}}"#).into_bytes();
        for p in [0, 1] {
            let records = vec![
                (format!("answered-{p}"), answered.clone()),
                (format!("fence/step-{p}"), fenced.clone()),
            ];
            d.restore(p, records).unwrap();
        }
        // The open batch deletes all four, past the horizon, then
        // partition 0 goes and the batch aborts.
        let mut out = Vec::new();
        let past = T0.saturating_add(Duration::from_secs(61));
        assert!(d.take_due(past, &mut out).is_none());
        assert_eq!(out.len(), 4, "every entry deleted");
        assert_eq!((d.entries.len(), d.fences), (0, 0));
        d.release(&[0]);
        d.rolled_back();
        let mut kept: Vec<&str> = d.entries.keys().map(String::as_str).collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            ["answered-1", "fence/step-1"],
            "only the kept partition's"
        );
        assert_eq!(d.fences, 1, "the fence count follows the entries");
        assert_eq!(d.expiring.len(), 2);
        // Their deletion is due again, in their own partition only.
        let mut again = Vec::new();
        assert!(d.take_due(past, &mut again).is_none());
        assert_eq!(again.len(), 2, "nothing but the deletions");
        assert_eq!(
            tombstones(&again),
            [("answered-1", Some(1)), ("fence/step-1", Some(1))]
        );
    }

    #[test]
    fn releasing_one_partition_keeps_the_other_partitions_entries_fences_and_expiry() {
        let policy = ParticipantPolicy::new("svc").dedupe_horizon(Duration::from_secs(60));
        let mut d = ParticipantDriver::new("svc", policy, Arc::new(Scripted::default()));
        let at = T0.as_millis();
        let answered = format!(r#"{{"state":"answered","at":{at}}}"#);
        let fenced = format!(r#"{{"state":"fenced","at":{at}}}"#);
        // Written before entries carried their time: stamped when first due.
        let unstamped = r#"{"state":"answered"}"#;
        // Waiting for a local retry a day away.
        let retrying = |p: u32| {
            let saga = SagaId::new(format!("s-{p}"));
            let id = Envelope::command_id("job", &saga, "reserve", Phase::Forward, 1);
            let mut cmd = Envelope::command(id, "svc", saga, "job", Value::Null, T0);
            cmd.step = Some("reserve".into());
            cmd.phase = Some(Phase::Forward);
            let entry = Entry::Retrying {
                command: Box::new(cmd),
                attempts: 1,
                first_attempt_at: T0,
                next_attempt_at: T0.saturating_add(Duration::from_secs(86_400)),
                last_error: "busy".into(),
            };
            serde_json::to_vec(&entry).unwrap()
        };
        for p in [0, 1] {
            let records = vec![
                (format!("answered-{p}"), answered.clone().into_bytes()),
                (format!("fence/step-{p}"), fenced.clone().into_bytes()),
                (format!("unstamped-{p}"), unstamped.as_bytes().to_vec()),
                (format!("retrying-{p}"), retrying(p)),
            ];
            d.restore(p, records).unwrap();
        }
        assert_eq!((d.entries.len(), d.fences), (8, 2));
        assert_eq!(
            (d.retries.len(), d.retrying.len(), d.unstamped.len()),
            (2, 2, 2)
        );
        d.release(&[0]);
        assert!(!d.owns(0) && d.owns(1));
        let mut kept: Vec<&str> = d.entries.keys().map(String::as_str).collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            ["answered-1", "fence/step-1", "retrying-1", "unstamped-1"]
        );
        assert_eq!(d.fences, 1, "the fence count follows the entries");
        assert_eq!(d.expiring.len(), 2);
        assert_eq!(
            (d.retries.len(), d.retrying.len(), d.unstamped.len()),
            (1, 1, 1)
        );
        assert_eq!(d.pending_retries(), 1);
        // Past the horizon, only partition 1's entries are deleted, in
        // their own partition (the unstamped one gets its time now).
        let mut out = Vec::new();
        assert!(d
            .take_due(T0.saturating_add(Duration::from_secs(61)), &mut out)
            .is_none());
        assert_eq!(
            tombstones(&out),
            [("answered-1", Some(1)), ("fence/step-1", Some(1))]
        );
        assert_eq!((d.entries.len(), d.fences, d.expiring.len()), (2, 0, 1));
    }

    #[test]
    fn a_state_snapshot_the_participant_refuses_leaves_the_partition_untaken() {
        let p = Arc::new(Scripted::default());
        let mut d = ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), p);
        let bad = vec![(PARTICIPANT_STATE_KEY.to_owned(), b"\"text\"".to_vec())];
        let err = d.restore(0, bad).unwrap_err();
        assert!(err.to_string().contains("partition 0"), "{err}");
        assert!(!d.owns(0));
        let garbage = vec![(PARTICIPANT_STATE_KEY.to_owned(), b"{oops".to_vec())];
        assert!(d.restore(0, garbage).is_err());
        assert!(!d.owns(0));
        d.restore(0, vec![(PARTICIPANT_STATE_KEY.to_owned(), b"4".to_vec())])
            .unwrap();
        assert!(d.owns(0));
    }

    #[tokio::test]
    async fn a_ledger_fed_record_by_record_keeps_each_keys_latest_record() {
        let (mut d, _) = setup(vec![Ok(7)], ParticipantPolicy::new("svc"));
        let cmd = command(Some(("call", Phase::Forward)), 1, Some("job.replies"));
        let written = deliver(&mut d, &cmd).await;
        let entry = written
            .iter()
            .find(|r| r.kind == RecordKind::Ledger && r.key == cmd.id.as_str())
            .and_then(|r| r.value.clone())
            .expect("the ledger entry");
        let p = Arc::new(Scripted::default());
        let mut fresh = ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), p.clone());
        fresh.restore_begin(0);
        // An unreadable snapshot, then a readable one: the latest counts.
        fresh.restore_record(0, PARTICIPANT_STATE_KEY, Some(b"{oops"));
        fresh.restore_record(0, cmd.id.as_str(), Some(&entry));
        fresh.restore_record(0, "gone", Some(&entry));
        fresh.restore_record(0, "gone", None);
        fresh.restore_record(0, PARTICIPANT_STATE_KEY, Some(b"4"));
        fresh.restore_end(0).unwrap();
        assert!(fresh.owns(0));
        assert_eq!(fresh.entries.len(), 1, "the deleted key is gone");
        assert_eq!(p.state.lock().unwrap().get(&0), Some(&4));
        // The restored entry answers a redelivery without running.
        let mut out = Vec::new();
        let bytes = cmd.to_bytes();
        assert!(fresh.on_record(&incoming(&bytes), T0, &mut out).is_none());
        assert_eq!(messages(&out).len(), 1, "answered from the ledger");
        // The latest snapshot unreadable: the partition is not taken.
        let mut bad = ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), p);
        bad.restore_begin(0);
        bad.restore_record(0, cmd.id.as_str(), Some(&entry));
        bad.restore_record(0, PARTICIPANT_STATE_KEY, Some(b"{oops"));
        assert!(bad.restore_end(0).is_err());
        assert!(!bad.owns(0));
        assert_eq!(bad.entries.len(), 0, "its ledger is dropped");
    }

    #[tokio::test]
    async fn a_refused_snapshot_rolls_back_every_partition_of_the_batch() {
        /// Counts per partition; partition 0's snapshot is too large.
        #[derive(Default)]
        struct Uneven(Mutex<HashMap<u32, u64>>);
        #[async_trait]
        impl Participant for Uneven {
            type Command = Value;
            type Reply = ();
            type Error = StepError;
            async fn handle(
                &self,
                _: Value,
                ctx: &mut ParticipantContext,
            ) -> Result<(), StepError> {
                *self.0.lock().unwrap().entry(ctx.partition()).or_default() += 1;
                Ok(())
            }
            fn snapshot(&self, partition: u32) -> Option<Value> {
                let n = self.0.lock().unwrap().get(&partition).copied().unwrap_or(0);
                Some(match partition {
                    0 => Value::String("x".repeat(5000)),
                    _ => Value::from(n),
                })
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
        let p = Arc::new(Uneven::default());
        let mut d = ParticipantDriver::new("svc", ParticipantPolicy::new("svc"), p.clone())
            .with_max_record_bytes(2048);
        d.restore(0, Vec::new()).unwrap();
        d.restore(1, Vec::new()).unwrap();
        let mut out = Vec::new();
        for (partition, step) in [(0, "a"), (1, "b")] {
            let cmd = command(Some((step, Phase::Forward)), 1, None);
            let bytes = cmd.to_bytes();
            let mut rec = incoming(&bytes);
            rec.partition = partition;
            let a = d.on_record(&rec, T0, &mut out).unwrap();
            let r = a.run_unbounded(T0).await;
            d.finish(a, r, Duration::ZERO, T0, &mut out);
        }
        assert!(d.before_commit(&mut out).is_err());
        d.rolled_back();
        let counts = p.0.lock().unwrap().clone();
        assert_eq!(
            (counts[&0], counts[&1]),
            (0, 0),
            "both partitions rolled back"
        );
    }

    #[test]
    fn entries_restored_without_a_time_expire_a_horizon_after_the_driver_first_sees_a_time() {
        let p = Arc::new(Scripted::default());
        let policy = ParticipantPolicy::new("svc").dedupe_horizon(Duration::from_secs(60));
        let mut d = ParticipantDriver::new("svc", policy, p);
        let legacy = br#"{"state":"fenced"}"#.to_vec();
        d.restore(0, vec![("fence/x".to_owned(), legacy)]).unwrap();
        let mut out = Vec::new();
        assert!(d.take_due(T0, &mut out).is_none());
        assert!(out.is_empty(), "not expired as if written in 1970");
        assert_eq!(
            d.next_due(),
            Some(T0.saturating_add(Duration::from_secs(60)))
        );
        let _ = d.take_due(T0.saturating_add(Duration::from_secs(61)), &mut out);
        assert_eq!(out.len(), 1, "expired a horizon later");
    }
}
