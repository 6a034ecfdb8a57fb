//! The saga driver: the instances of one saga type in the partitions a
//! runtime worker owns, their timers, the undo log of the open batch, and
//! the sagas that settled recently (until their state is deleted).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::{SagaData, SagaDefinition};
use crate::driver::metrics;
use crate::driver::record::{Incoming, Record, RecordKind};
use crate::engine::{Effect, Handled, Input, Operation, Transition};
use crate::error::SagaError;
use crate::ids::{FastMap, MessageId, SagaId, Timestamp};
use crate::instance::{SagaInstance, TimerId};
use crate::message::{DeadLetter, Envelope, MessageKind, RecordOrigin};
use crate::trace::{link_span, TraceContext};

/// The largest record a driver writes by default (the value plus its key,
/// with room for headers): librdkafka's default `message.max.bytes`.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;

/// How long a settled saga's state stays by default before it is deleted
/// (1 h 15 min): long enough for clients to read the outcome and to retry
/// a start safely (a start of a settled saga's id within it returns that
/// saga), and longer than a participant's default dedupe horizon
/// ([`ParticipantPolicy::dedupe_horizon`](crate::ParticipantPolicy::dedupe_horizon),
/// 1 h) by a quarter hour.
///
/// A start of the id after the retention is a new saga whose commands
/// carry the ids its predecessor's did: a participant that still
/// remembers those answers them from its ledger without running its
/// handler. A participant's entry ages from when it handled the command,
/// which can be after the saga settled (a command sent by the last
/// transition, a participant behind on its input): keep the retention
/// longer than the dedupe horizon of every participant the saga calls,
/// plus how late they may run. What a partition keeps, and reads back
/// after a rebalance, is bounded by the traffic of the retention.
pub const DEFAULT_SETTLED_RETENTION: Duration = Duration::from_secs(75 * 60);

/// Room kept for a record's headers and framing within the size limit.
pub(crate) const RECORD_OVERHEAD: usize = 128;

/// The state topic of saga type `saga`: `<saga>.state`, compacted, keyed
/// by saga id, co-partitioned with the saga's reply topics.
pub fn state_topic(saga: &str) -> String {
    format!("{saga}.state")
}

/// The JSON text of `env` if it is the step command `instance` awaits,
/// which the transition that sent it encoded into the instance
/// ([`Awaiting::command`](crate::instance::Awaiting::command)): the same
/// envelope (its step, phase, attempt and creation time), the same text as
/// [`Envelope::to_bytes`] would write.
fn awaited_text<'a, D: SagaData>(instance: &'a SagaInstance<D>, env: &Envelope) -> Option<&'a str> {
    let a = instance.awaiting.as_ref()?;
    let same = env.kind == MessageKind::Command
        && env.phase == Some(a.phase)
        && env.attempt == a.attempt
        && env.timestamp == a.command.timestamp()
        && env.step.as_deref() == instance.steps.get(a.step).map(|r| &*r.name);
    same.then(|| a.command.json())
}

/// An instance as stored in the state topic.
///
/// # Errors
/// [`SagaError::Encode`] if the saga data cannot be serialized (a map
/// with non-string keys, a failing `Serialize` impl).
pub fn encode_state<D: SagaData>(instance: &SagaInstance<D>) -> Result<Vec<u8>, SagaError> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, instance).map_err(|source| SagaError::Encode {
        saga_id: instance.id.clone(),
        what: "saga instance".into(),
        source,
    })?;
    Ok(out)
}

/// An instance read back from the state topic.
///
/// # Errors
/// [`SagaError::CorruptState`] if the bytes are not an instance of this
/// saga's data type.
pub fn decode_state<D: SagaData>(key: &str, bytes: &[u8]) -> Result<SagaInstance<D>, SagaError> {
    let mut instance: SagaInstance<D> =
        crate::message::from_json(bytes).map_err(|source| SagaError::CorruptState {
            saga_id: SagaId::new(key),
            source,
        })?;
    instance.infer_in_flight();
    Ok(instance)
}

/// When saga `key` reached its final status, if `bytes` is its state
/// record and says it completed or was compensated: only the record's id,
/// status and time are decoded, the rest (its data, steps and history,
/// most of the record) is only scanned as JSON, so this costs a fraction
/// of [`decode_state`].
///
/// For a runtime that keeps finished sagas apart from those in progress
/// (a bounded read view, a catalog) without decoding every record. `None`
/// for a saga in progress (parked included, unlike
/// [`SagaStatus::is_settled`](crate::SagaStatus::is_settled)), another
/// key's state, a tombstone's empty value and anything that is not a state
/// record; also for a finished saga's record written with other spacing
/// than [`encode_state`]'s (never by this crate), which [`decode_state`]
/// reads.
///
/// ```
/// use saga_core::driver::{final_at, SagaDriver};
/// use saga_core::{SagaDefinition, SagaId, Step, Timestamp};
///
/// // One local step: the saga completes as it starts.
/// let def = SagaDefinition::<u32>::builder("order")
///     .step(Step::local("check", |_| Ok(())))
///     .build()?;
/// let mut driver = SagaDriver::new(def);
/// driver.restore(0, Vec::new());
/// let (at, mut out) = (Timestamp::from_millis(1_000), Vec::new());
/// driver.start(0, SagaId::new("o-1"), 7, at, &mut out)?;
/// let state = out[0].value.as_deref().expect("the saga's state");
/// assert_eq!(final_at("o-1", state), Some(at));
/// assert_eq!(final_at("o-2", state), None, "another saga's state");
/// assert_eq!(final_at("o-1", b"{}"), None);
/// # Ok::<(), saga_core::SagaError>(())
/// ```
#[must_use]
pub fn final_at(key: &str, bytes: &[u8]) -> Option<Timestamp> {
    if !may_be_final(bytes) {
        return None;
    }
    let head = crate::message::from_json::<StateHead<'_>>(bytes).ok()?;
    (head.status.is_final() && head.id == key).then_some(head.updated_at)
}

/// An operator's request, as written to a saga's reply topic for the
/// worker that owns the saga.
#[derive(Serialize, Deserialize)]
struct OperatorRequest {
    saga_id: SagaId,
    operation: Operation,
}

/// A request to start a saga, as written to its reply topic for the
/// worker that owns its partition.
#[derive(Serialize, Deserialize)]
struct StartRequest<D> {
    saga_id: SagaId,
    data: D,
    /// The trace the saga is started in (also the record's header).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::trace::lenient"
    )]
    trace: Option<TraceContext>,
}

/// The record that asks the owner of saga `id` to apply `operation`: on
/// the saga's reply channel, keyed by the saga id (so it reaches the
/// saga's partition, in order with its replies).
///
/// # Errors
/// [`SagaError::Encode`] if the operation cannot be serialized (its
/// payload).
pub fn operator_record<D: SagaData>(
    def: &SagaDefinition<D>,
    id: &SagaId,
    operation: &Operation,
) -> Result<Record, SagaError> {
    let request = OperatorRequest {
        saga_id: id.clone(),
        operation: operation.clone(),
    };
    let value = serde_json::to_vec(&request).map_err(|source| SagaError::Encode {
        saga_id: id.clone(),
        what: "operator request".into(),
        source,
    })?;
    Ok(Record::new(
        def.reply_channel(),
        id.as_str(),
        Some(value),
        RecordKind::Operator,
    ))
}

/// The record that asks the owner of saga `id`'s partition to start it
/// with `data` (if it does not exist yet): on the saga's reply channel,
/// keyed by the saga id. Only the owner writes a saga's state.
///
/// # Errors
/// [`SagaError::Encode`] if `data` cannot be serialized.
pub fn start_record<D: SagaData>(
    def: &SagaDefinition<D>,
    id: &SagaId,
    data: &D,
) -> Result<Record, SagaError> {
    start_record_traced(def, id, data, None)
}

/// Like [`start_record`], for a saga started in trace `trace` (the
/// caller's span: the saga's `saga.start` span becomes its child). The
/// trace travels in the request and as the record's
/// [`TRACEPARENT_HEADER`](crate::TRACEPARENT_HEADER) header.
///
/// # Errors
/// [`SagaError::Encode`] if `data` cannot be serialized.
pub fn start_record_traced<D: SagaData>(
    def: &SagaDefinition<D>,
    id: &SagaId,
    data: &D,
    trace: Option<TraceContext>,
) -> Result<Record, SagaError> {
    let request = StartRequest {
        saga_id: id.clone(),
        data,
        trace,
    };
    let value = serde_json::to_vec(&request).map_err(|source| SagaError::Encode {
        saga_id: id.clone(),
        what: "start request".into(),
        source,
    })?;
    Ok(Record::new(
        def.reply_channel(),
        id.as_str(),
        Some(value),
        RecordKind::Start,
    )
    .with_traceparent(trace))
}

/// An instance in progress and its partition. The instance is shared
/// (`Arc`) with whoever keeps a view for reads: a transition makes a new
/// one, so nothing is copied when the batch commits.
struct Owned<D> {
    partition: u32,
    instance: Arc<SagaInstance<D>>,
}

/// How a partition's restore went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Restored {
    /// Instances installed (running, compensating or parked).
    pub sagas: usize,
    /// Settled sagas whose state is kept until their retention ends.
    pub settled: usize,
    /// Records that could not be read: (key, why). They are skipped. Of a
    /// settled saga's record only its id, status and time are decoded: the
    /// rest is not checked here (a read of the saga fails instead).
    pub corrupt: Vec<(String, String)>,
}

/// What one record fed to [`SagaDriver::restore_record`] turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoredRecord {
    /// A saga in progress (running, compensating or parked): installed,
    /// and handed to the restore's `seen`.
    InProgress,
    /// A settled saga: remembered by id until its retention ends. Only its
    /// id, status and time are decoded; the rest of the record is only
    /// scanned as JSON.
    Settled,
    /// A tombstone: the key holds nothing.
    Deleted,
    /// A record that cannot be read: skipped, and reported by
    /// [`SagaDriver::restore_end`] unless a later record of its key
    /// replaces it.
    Unreadable,
}

/// What a restore needs of a settled saga's state record: the rest of it
/// (its data, steps and history, most of the record) is scanned as JSON,
/// not decoded.
#[derive(Deserialize)]
struct StateHead<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    status: crate::instance::SagaStatus,
    updated_at: Timestamp,
}

/// Whether a state record may be a settled saga's: it holds the status of
/// a completed or compensated saga as [`SagaInstance`] writes it. Text
/// that merely contains it (in the saga's data) is read for its head and
/// found not final; a record written with other spacing is decoded in
/// full, which reads it as settled if its data still reads (else it is
/// unreadable, as every record was before heads were read).
fn may_be_final(bytes: &[u8]) -> bool {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static COMPLETED: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(r#""status":{"status":"completed"}"#));
    static COMPENSATED: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(r#""status":{"status":"compensated"}"#));
    COMPLETED.find(bytes).is_some() || COMPENSATED.find(bytes).is_some()
}

/// A change the open batch made to the driver's indexes (not to a saga
/// itself, which `undo` keeps), to undo.
enum IndexUndo {
    /// A settled saga's state was deleted in the batch.
    Expired(SagaId, u32, Timestamp),
    /// A due timer left the timer index (its saga in this partition): if
    /// its transition failed and was dead-lettered, the saga did not
    /// change, so only this brings the timer back.
    Fired(Timestamp, SagaId, TimerId, u32),
}

impl IndexUndo {
    fn partition(&self) -> u32 {
        match self {
            IndexUndo::Expired(_, p, _) | IndexUndo::Fired(_, _, _, p) => *p,
        }
    }
}

/// An instance as the driver keeps it until its next transition (seconds,
/// or as long as a step takes): shared, and without the spare room its
/// history was given for the lines a transition adds (up to four lines
/// per saga in flight).
fn kept<D>(mut instance: SagaInstance<D>) -> Arc<SagaInstance<D>> {
    instance.history.shrink_to_fit();
    Arc::new(instance)
}

/// Runs one saga type for a runtime worker, without I/O.
///
/// The worker owns some partitions of the saga's topics. For them the
/// driver keeps every saga still in progress in memory, with an index of
/// their timers; a saga that settles (completed or compensated) leaves
/// memory when its batch commits, and its state is deleted (a tombstone in
/// the state topic) once the settled retention has passed. In between,
/// starting it again is a no-op (starts are idempotent) and replies to it
/// are only checked for their type. Every input (a reply, a due timer, a
/// start, an operator request) turns into [`Record`]s to write in the open
/// batch, and the driver remembers what the batch changed so that
/// [`SagaDriver::rolled_back`] can undo it when the batch's transaction
/// aborts. Errors never stop it: an input it cannot handle (or whose
/// records would exceed the record size limit) becomes a dead letter on
/// the saga's dead-letter channel.
///
/// The contract with the runtime around it (see the module docs):
/// [`restore`](SagaDriver::restore) a partition before feeding its records,
/// [`release`](SagaDriver::release) it when it goes, and end each batch with
/// [`committed`](SagaDriver::committed) or [`rolled_back`](SagaDriver::rolled_back).
pub struct SagaDriver<D> {
    def: SagaDefinition<D>,
    state_topic: String,
    max_record_bytes: usize,
    settled_retention: Duration,
    owned: BTreeSet<u32>,
    sagas: FastMap<SagaId, Owned<D>>,
    timers: BTreeSet<(Timestamp, SagaId, TimerId)>,
    /// Settled sagas: their partition and when they settled.
    settled: FastMap<SagaId, (u32, Timestamp)>,
    /// The settled sagas by when they settled, with their partition (a
    /// release goes by it without looking each saga up).
    settled_order: BTreeSet<(Timestamp, SagaId, u32)>,
    /// The value of each saga changed in the open batch before the batch.
    undo: FastMap<SagaId, Option<Owned<D>>>,
    index_undo: Vec<IndexUndo>,
    /// The timer the last `on_due` call fired, for `reject_due`.
    last_fired: Option<(Timestamp, SagaId, TimerId)>,
    /// Partitions being restored record by record: the keys whose latest
    /// record so far cannot be read, and why.
    restoring: HashMap<u32, BTreeMap<String, String>>,
    /// Sagas of owned partitions whose latest state record cannot be
    /// read: their partition and why. A start of one is refused, not
    /// written over the record.
    unreadable: FastMap<SagaId, (u32, String)>,
    metrics: metrics::SagaMetrics,
}

impl<D: SagaData> std::fmt::Debug for SagaDriver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaDriver")
            .field("saga", &self.def.name())
            .field("owned", &self.owned)
            .field("sagas", &self.sagas.len())
            .field("settled", &self.settled.len())
            .field("timers", &self.timers.len())
            .finish_non_exhaustive()
    }
}

impl<D: SagaData> SagaDriver<D> {
    /// A driver for `def`, owning no partition yet, with the
    /// [`DEFAULT_MAX_RECORD_BYTES`] limit and the
    /// [`DEFAULT_SETTLED_RETENTION`].
    pub fn new(def: SagaDefinition<D>) -> Self {
        Self {
            state_topic: state_topic(def.name()),
            metrics: metrics::SagaMetrics::new(def.name()),
            def,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            settled_retention: DEFAULT_SETTLED_RETENTION,
            owned: BTreeSet::new(),
            sagas: FastMap::default(),
            timers: BTreeSet::new(),
            settled: FastMap::default(),
            settled_order: BTreeSet::new(),
            undo: FastMap::default(),
            index_undo: Vec::new(),
            last_fired: None,
            restoring: HashMap::new(),
            unreadable: FastMap::default(),
        }
    }

    /// The largest record (key and value) the driver writes: a transition
    /// whose state or messages would be larger is not applied (its input is
    /// dead-lettered), and a dead letter too large is written with a
    /// truncated copy of its original.
    pub fn with_max_record_bytes(mut self, limit: usize) -> Self {
        self.max_record_bytes = limit.max(1024);
        self
    }

    /// How long a settled saga's state stays readable (and a second start
    /// of its id is a no-op) before it is deleted.
    pub fn with_settled_retention(mut self, retention: Duration) -> Self {
        self.settled_retention = retention;
        self
    }

    /// The saga definition.
    pub fn definition(&self) -> &SagaDefinition<D> {
        &self.def
    }

    /// The topics the worker consumes: the saga's reply channels.
    pub fn input_topics(&self) -> Vec<String> {
        self.def.reply_channels()
    }

    /// The state topic ([`state_topic`]).
    pub fn state_topic(&self) -> &str {
        &self.state_topic
    }

    /// Whether the worker owns `partition` (restored and not released).
    pub fn owns(&self, partition: u32) -> bool {
        self.owned.contains(&partition)
    }

    /// The partitions owned.
    pub fn owned(&self) -> impl Iterator<Item = u32> + '_ {
        self.owned.iter().copied()
    }

    /// Takes `partition` with the latest record of each saga in it, as read
    /// from the state topic (key, bytes). Sagas in progress are installed;
    /// settled ones are only remembered until their retention ends (the
    /// state of those past it is deleted at the next
    /// [`on_due`](SagaDriver::on_due)). Records that cannot be read are
    /// skipped and reported (of a settled saga's record only its id,
    /// status and time are decoded).
    pub fn restore(
        &mut self,
        partition: u32,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Restored {
        self.restore_with(partition, records, |_| {})
    }

    /// Like [`SagaDriver::restore`], handing `seen` every saga in
    /// progress read, for a runtime that keeps a view for reads (sharing
    /// the instance, not a copy). Settled sagas are not decoded (the
    /// driver keeps only their ids): a runtime that wants the latest of
    /// them in its view feeds the records one by one
    /// ([`SagaDriver::restore_record`] says which were settled) and
    /// decodes those with [`decode_state`].
    pub fn restore_with(
        &mut self,
        partition: u32,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
        mut seen: impl FnMut(&Arc<SagaInstance<D>>),
    ) -> Restored {
        self.restore_begin(partition);
        for (key, bytes) in records {
            self.restore_record(partition, &key, Some(&bytes), &mut seen);
        }
        self.restore_end(partition)
    }

    /// Starts taking `partition` record by record, as the state topic is
    /// read (a restore that does not collect the topic first): feed every
    /// record in the topic's order with [`SagaDriver::restore_record`],
    /// then call [`SagaDriver::restore_end`]. A restore abandoned half way
    /// is dropped with [`SagaDriver::release`].
    pub fn restore_begin(&mut self, partition: u32) {
        self.restoring.insert(partition, BTreeMap::new());
        // What an earlier restore of it found unreadable is read again.
        self.unreadable.retain(|_, (p, _)| *p != partition);
    }

    /// One record of a partition being restored (`value` `None`: a
    /// tombstone). A key's later record replaces what its earlier ones
    /// installed, so older versions and deleted sagas may be fed too.
    /// `seen` gets the instance read if it is in progress. A settled
    /// saga's record is not decoded beyond its id, status and time (most
    /// of what a partition holds after a while is sagas settled within the
    /// retention); the answer says what the record was.
    pub fn restore_record(
        &mut self,
        partition: u32,
        key: &str,
        value: Option<&[u8]>,
        mut seen: impl FnMut(&Arc<SagaInstance<D>>),
    ) -> RestoredRecord {
        if let Some(corrupt) = self.restoring.get_mut(&partition) {
            corrupt.remove(key);
        }
        let id = SagaId::new(key);
        self.put(&id, None);
        self.forget_settled(&id);
        if !self.unreadable.is_empty() {
            self.unreadable.remove(&id);
        }
        let Some(bytes) = value else {
            return RestoredRecord::Deleted;
        };
        // A saga in progress, another key's state or an unreadable record
        // is decoded in full (which says why it cannot be read). Only a
        // record that says it is completed or compensated, as an instance
        // writes its status, is read for its head first: a saga in
        // progress is not read twice.
        if let Some(at) = final_at(key, bytes) {
            self.remember_settled(partition, id, at);
            return RestoredRecord::Settled;
        }
        let decoded = decode_state::<D>(key, bytes).and_then(|instance| {
            if instance.id.as_str() == key {
                Ok(kept(instance))
            } else {
                // Last-wins goes by key: an instance under another key
                // could outlive its key's tombstone.
                Err(SagaError::Runtime {
                    what: format!("the state under key `{key}` is saga `{}`'s", instance.id),
                    source: "key and saga id differ".into(),
                })
            }
        });
        match decoded {
            Ok(instance) if instance.status.is_final() => {
                // A settled saga's record written with other spacing (the
                // head of a record this crate writes always reads).
                self.remember_settled(partition, instance.id.clone(), instance.updated_at);
                RestoredRecord::Settled
            }
            Ok(instance) => {
                seen(&instance);
                let id = instance.id.clone();
                self.put(
                    &id,
                    Some(Owned {
                        partition,
                        instance,
                    }),
                );
                RestoredRecord::InProgress
            }
            Err(e) => {
                self.restoring
                    .entry(partition)
                    .or_default()
                    .insert(key.to_owned(), e.to_string());
                RestoredRecord::Unreadable
            }
        }
    }

    /// Ends the restore of `partition`: the driver owns it. Records whose
    /// latest version cannot be read were skipped; they are reported.
    pub fn restore_end(&mut self, partition: u32) -> Restored {
        let corrupt = self.restoring.remove(&partition).unwrap_or_default();
        self.owned.insert(partition);
        for (key, e) in &corrupt {
            tracing::error!(saga = %self.def.name(), partition, key, error = %e, "unreadable saga state: skipped");
            self.unreadable
                .insert(SagaId::new(key), (partition, e.clone()));
        }
        let report = Restored {
            sagas: self
                .sagas
                .values()
                .filter(|o| o.partition == partition)
                .count(),
            settled: self
                .settled
                .values()
                .filter(|(p, _)| *p == partition)
                .count(),
            corrupt: corrupt.into_iter().collect(),
        };
        tracing::debug!(saga = %self.def.name(), partition, sagas = report.sagas, settled = report.settled, "partition restored");
        report
    }

    /// Gives up `partitions`: their sagas leave memory.
    pub fn release(&mut self, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        // One pass over each index, not a removal per saga: a partition
        // remembers every saga settled within the retention (75 minutes
        // of its traffic by default), and a rebalance or shutdown
        // waits for this.
        let undo = &mut self.undo;
        self.sagas.retain(|id, o| {
            let keep = !partitions.contains(&o.partition);
            if !keep {
                undo.remove(id);
            }
            keep
        });
        let sagas = &self.sagas;
        self.timers.retain(|(_, id, _)| sagas.contains_key(id));
        self.settled.retain(|_, (p, _)| !partitions.contains(p));
        self.unreadable.retain(|_, (p, _)| !partitions.contains(p));
        self.settled_order
            .retain(|(_, _, p)| !partitions.contains(p));
        // Settled sagas the open batch deleted: a rollback after the
        // release must not bring back those of a partition given up.
        self.index_undo
            .retain(|undo| !partitions.contains(&undo.partition()));
        for p in partitions {
            self.owned.remove(p);
            self.restoring.remove(p);
        }
    }

    /// The instance `id`, as the open batch left it, while it is in
    /// progress (a settled saga has left memory: read it from the store).
    pub fn get(&self, id: &SagaId) -> Option<&SagaInstance<D>> {
        self.sagas.get(id).map(|o| &*o.instance)
    }

    /// Whether saga `id` settled and its state is still kept.
    pub fn is_settled(&self, id: &SagaId) -> bool {
        self.settled.contains_key(id)
    }

    /// Every instance in progress in the owned partitions, as the open
    /// batch left them.
    pub fn instances(&self) -> impl Iterator<Item = &SagaInstance<D>> + '_ {
        self.sagas.values().map(|o| &*o.instance)
    }

    /// The instances in progress in `partition`, shared (for a runtime's
    /// read view).
    pub fn instances_in(&self, partition: u32) -> impl Iterator<Item = &Arc<SagaInstance<D>>> + '_ {
        self.sagas
            .values()
            .filter(move |o| o.partition == partition)
            .map(|o| &o.instance)
    }

    /// How many sagas the driver holds: in progress, and settled (ids only).
    pub fn len(&self) -> (usize, usize) {
        (self.sagas.len(), self.settled.len())
    }

    /// Starts saga `id` with `data` in `partition` (the partition its id
    /// maps to, which the worker owns): writes its state and first
    /// messages. Idempotent: if the saga exists (in progress, or settled
    /// within the retention) nothing is written and this returns `false`.
    ///
    /// # Errors
    /// [`SagaError::Encode`] if its data cannot be serialized,
    /// [`SagaError::RecordTooLarge`] if its state or a message is over the
    /// record size limit, [`SagaError::CorruptState`] if the saga's state
    /// record (read when its partition was restored) cannot be read: a
    /// new saga would overwrite it. Nothing is written then.
    pub fn start(
        &mut self,
        partition: u32,
        id: SagaId,
        data: D,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) -> Result<bool, SagaError> {
        self.start_traced(partition, id, data, None, now, out)
    }

    /// Like [`SagaDriver::start`], continuing trace `parent` (the
    /// caller's span) or, without one, starting a new trace: the
    /// `saga.start` span is linked to it ([`link_span`]) and the saga
    /// keeps the span's context ([`SagaInstance::trace`]).
    ///
    /// # Errors
    /// As [`SagaDriver::start`].
    pub fn start_traced(
        &mut self,
        partition: u32,
        id: SagaId,
        data: D,
        parent: Option<TraceContext>,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) -> Result<bool, SagaError> {
        if self.sagas.contains_key(&id) || self.settled.contains_key(&id) {
            tracing::debug!(saga = %self.def.name(), saga_id = %id, "start of an existing saga: nothing to do");
            return Ok(false);
        }
        // Nearly always empty: a start does not hash its id once more.
        if let Some((_, why)) = (!self.unreadable.is_empty())
            .then(|| self.unreadable.get(&id))
            .flatten()
        {
            // The saga exists: a new one would overwrite its record.
            return Err(SagaError::CorruptState {
                saga_id: id,
                source: serde::de::Error::custom(why),
            });
        }
        let span = tracing::info_span!("saga.start", saga_id = %id, saga = %self.def.name(), step = "", attempt = 0u32, trace_id = tracing::field::Empty, span_id = tracing::field::Empty, parent_span_id = tracing::field::Empty);
        let trace = link_span(&span, parent.as_ref());
        let _g = span.enter();
        let t = self.def.start_traced(id.clone(), data, now, Some(trace))?;
        let records = self.records_of(&t)?;
        out.extend(records);
        self.metrics.transition(None, &t);
        self.change(
            &id,
            Owned {
                partition,
                instance: kept(t.instance),
            },
        );
        Ok(true)
    }

    /// Applies `operation` to saga `id` (the worker owns it).
    ///
    /// # Errors
    /// [`SagaError::UnknownSaga`] if the driver does not hold `id`,
    /// [`SagaError::InvalidAction`] if the action does not apply
    /// ([`Operation::check`]; a settled saga takes none),
    /// [`SagaError::Encode`] or [`SagaError::RecordTooLarge`] if the new
    /// state cannot be written.
    pub fn operate(
        &mut self,
        id: &SagaId,
        operation: Operation,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) -> Result<(), SagaError> {
        let Some(owned) = self.sagas.get(id) else {
            if self.settled.contains_key(id) {
                return Err(SagaError::InvalidAction {
                    saga_id: id.clone(),
                    action: operation.action.to_string(),
                    status: "settled".into(),
                });
            }
            return Err(SagaError::UnknownSaga {
                saga_id: id.clone(),
                message_id: MessageId::new(format!("{id}/operator/{}", operation.action)),
            });
        };
        let partition = owned.partition;
        let span = tracing::info_span!("saga.operate", saga_id = %id, saga = %self.def.name(), action = %operation.action, trace_id = tracing::field::Empty, span_id = tracing::field::Empty, parent_span_id = tracing::field::Empty);
        let trace = owned
            .instance
            .trace
            .map(|parent| link_span(&span, Some(&parent)));
        let _g = span.enter();
        let send = trace.or(owned.instance.trace);
        let t =
            self.def
                .handle_sending_in(&owned.instance, Input::Operator(operation), now, send)?;
        self.apply(id, partition, t, out)
    }

    /// Handles one record read from a reply topic of a partition the worker
    /// owns: a reply, a start request, an operator's request. What cannot
    /// be handled (not an envelope, a reply to an unknown saga, a payload
    /// of the wrong type, an unknown record kind) is dead-lettered with the
    /// reason and the record's origin.
    pub fn on_record(&mut self, rec: &Incoming<'_>, now: Timestamp, out: &mut Vec<Record>) {
        if !self.owns(rec.partition) {
            tracing::error!(saga = %self.def.name(), topic = rec.topic, partition = rec.partition, "record of a partition the driver does not own: skipped");
            return;
        }
        let Some(value) = rec.value else {
            return self.poison(
                rec,
                "an empty record (tombstone) on a reply topic".into(),
                now,
                out,
            );
        };
        match RecordKind::from_header(rec.kind) {
            Ok(RecordKind::Message) => match rec.envelope() {
                Ok(env) => self.on_reply(rec, env, now, out),
                Err(e) => self.poison(rec, format!("not an envelope: {e}"), now, out),
            },
            Ok(RecordKind::Start) => match crate::message::from_json::<StartRequest<D>>(value) {
                Ok(req) => {
                    let parent = crate::trace::from_header(rec.traceparent).or(req.trace);
                    let started =
                        self.start_traced(rec.partition, req.saga_id, req.data, parent, now, out);
                    if let Err(e) = started {
                        self.poison(rec, format!("start refused: {e}"), now, out);
                    }
                }
                Err(e) => self.poison(rec, format!("not a start request: {e}"), now, out),
            },
            Ok(RecordKind::Operator) => match crate::message::from_json::<OperatorRequest>(value) {
                Ok(req) => {
                    if let Err(e) = self.operate(&req.saga_id, req.operation, now, out) {
                        self.poison(rec, format!("operator request refused: {e}"), now, out);
                    }
                }
                Err(e) => self.poison(rec, format!("not an operator request: {e}"), now, out),
            },
            Ok(kind) => self.poison(rec, format!("a {kind} record on a reply topic"), now, out),
            Err(kind) => self.poison(rec, format!("unknown record kind `{kind}`"), now, out),
        }
    }

    /// When the next timer is due, or the next settled saga's state is to
    /// be deleted.
    pub fn next_due(&self) -> Option<Timestamp> {
        let timer = self.timers.iter().next().map(|(at, _, _)| *at);
        let expiry = self
            .settled_order
            .iter()
            .next()
            .map(|(at, _, _)| at.saturating_add(self.settled_retention));
        match (timer, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Does the work due at `now`: fires the earliest due timer, or deletes
    /// the state of settled sagas past their retention (a bounded number
    /// at a time). `false` if nothing was due.
    pub fn on_due(&mut self, now: Timestamp, out: &mut Vec<Record>) -> bool {
        self.last_fired = None;
        if self.expire(now, out) {
            return true;
        }
        let Some((at, id, timer)) = self.timers.iter().next().cloned() else {
            return false;
        };
        if at > now {
            return false;
        }
        let Some(partition) = self.take_timer(at, &id, &timer) else {
            return true;
        };
        self.last_fired = Some((at, id.clone(), timer.clone()));
        let Some(owned) = self.sagas.get(&id) else {
            return true;
        };
        let span = tracing::info_span!("saga.timer", saga_id = %id, saga = %self.def.name(), timer = %timer, trace_id = tracing::field::Empty, span_id = tracing::field::Empty, parent_span_id = tracing::field::Empty);
        let trace = owned
            .instance
            .trace
            .map(|parent| link_span(&span, Some(&parent)));
        let _g = span.enter();
        let send = trace.or(owned.instance.trace);
        match self
            .def
            .handle_sending_in(&owned.instance, Input::Timer(timer.clone()), now, send)
        {
            Ok(t) => {
                if let Err(e) = self.apply(&id, partition, t, out) {
                    let original = self.stand_in(&id, &format!("timer `{timer}`"), now);
                    self.dead_letter(original, "timer", e.to_string(), now, None, out);
                }
            }
            Err(e) => {
                // Refused (the saga's code panicked, it does not fit the
                // definition): the timer is dead-lettered, not dropped in
                // silence, and a rollback arms it again (`IndexUndo`).
                tracing::error!(saga_id = %id, %timer, error = %e, "timer refused: dead-lettered");
                let original = self.stand_in(&id, &format!("timer `{timer}`"), now);
                self.dead_letter(original, "timer", e.to_string(), now, None, out);
            }
        }
        true
    }

    /// Dead-letters the timer the last [`on_due`](Self::on_due) call
    /// fired, without firing it again, with reason `why`: for a runtime
    /// whose broker refused what firing it produced (a record over the
    /// broker's size limit), so that the timer is not fired for ever. The
    /// saga is left as it was (the timer is dead-lettered, as a timer whose
    /// transition fails is), and a rollback arms the timer again.
    ///
    /// Returns the timer's partition; `None` if there is nothing to
    /// reject: the last call fired no timer, or the timer is no longer
    /// armed (its saga moved on, its partition was released).
    pub fn reject_due(&mut self, why: &str, now: Timestamp, out: &mut Vec<Record>) -> Option<u32> {
        let (at, id, timer) = self.last_fired.clone()?;
        if !self.timers.contains(&(at, id.clone(), timer.clone())) {
            return None;
        }
        let partition = self.take_timer(at, &id, &timer)?;
        let original = self.stand_in(&id, &format!("timer `{timer}`"), now);
        let reason = format!("firing it produced a record the broker refuses: {why}");
        self.dead_letter(original, "timer", reason, now, None, out);
        Some(partition)
    }

    /// The partition of the saga whose timer the last
    /// [`on_due`](Self::on_due) call fired, if it fired one and the saga is
    /// still kept: for a runtime whose broker refused what firing it
    /// wrote, to stop that partition when the refused record is the
    /// saga's state (see [`reject_due`](Self::reject_due) for the others).
    pub fn due_partition(&self) -> Option<u32> {
        let (_, id, _) = self.last_fired.as_ref()?;
        self.sagas.get(id).map(|o| o.partition)
    }

    /// Takes timer `(at, id, timer)` out of the index for the open batch
    /// (a rollback arms it again): the partition of its saga, `None` if
    /// the saga is not kept (nothing to fire then).
    fn take_timer(&mut self, at: Timestamp, id: &SagaId, timer: &TimerId) -> Option<u32> {
        self.timers.remove(&(at, id.clone(), timer.clone()));
        let partition = self.sagas.get(id)?.partition;
        self.index_undo
            .push(IndexUndo::Fired(at, id.clone(), timer.clone(), partition));
        Some(partition)
    }

    /// Deletes the state of up to 500 settled sagas past their retention.
    fn expire(&mut self, now: Timestamp, out: &mut Vec<Record>) -> bool {
        let mut done = 0;
        while done < 500 {
            let Some((at, id, partition)) = self.settled_order.iter().next().cloned() else {
                break;
            };
            if at.saturating_add(self.settled_retention) > now {
                break;
            }
            self.forget_settled(&id);
            out.push(
                Record::new(&self.state_topic, id.as_str(), None, RecordKind::SagaState)
                    .on_partition(partition),
            );
            self.index_undo.push(IndexUndo::Expired(id, partition, at));
            done += 1;
        }
        done > 0
    }

    /// The open batch committed: its changes are durable. `seen` gets
    /// every saga the batch changed (a settled one for the last time
    /// before it leaves memory), shared rather than copied.
    pub fn committed(&mut self, mut seen: impl FnMut(&Arc<SagaInstance<D>>)) {
        self.index_undo.clear();
        self.last_fired = None;
        let changed: Vec<SagaId> = self.undo.drain().map(|(id, _)| id).collect();
        for id in changed {
            let Some(owned) = self.sagas.get(&id) else {
                continue;
            };
            seen(&owned.instance);
            if owned.instance.status.is_final() {
                let (partition, at) = (owned.partition, owned.instance.updated_at);
                self.put(&id, None);
                self.remember_settled(partition, id, at);
            }
        }
    }

    /// The open batch aborted: every saga it changed goes back to what it
    /// was before, timers and settled states included.
    pub fn rolled_back(&mut self) {
        for (id, old) in std::mem::take(&mut self.undo) {
            self.put(&id, old);
        }
        for undo in std::mem::take(&mut self.index_undo).into_iter().rev() {
            match undo {
                IndexUndo::Expired(id, partition, at) => self.remember_settled(partition, id, at),
                IndexUndo::Fired(at, id, timer, _) => {
                    // Armed again if the saga, as the rollback left it,
                    // still waits on it (a transition that was undone
                    // brought its timers back already).
                    let armed = self.sagas.get(&id).is_some_and(|o| {
                        o.instance
                            .timers
                            .iter()
                            .any(|t| t.fire_at == at && t.id == timer)
                    });
                    if armed {
                        self.timers.insert((at, id, timer));
                    }
                }
            }
        }
    }

    fn remember_settled(&mut self, partition: u32, id: SagaId, at: Timestamp) {
        self.settled_order.insert((at, id.clone(), partition));
        self.settled.insert(id, (partition, at));
    }

    fn forget_settled(&mut self, id: &SagaId) {
        if let Some((partition, at)) = self.settled.remove(id) {
            self.settled_order.remove(&(at, id.clone(), partition));
        }
    }

    /// Replaces saga `id` (or removes it), keeping the timer index in step.
    fn put(&mut self, id: &SagaId, new: Option<Owned<D>>) {
        if let Some(old) = self.sagas.get(id) {
            for t in &old.instance.timers {
                self.timers.remove(&(t.fire_at, id.clone(), t.id.clone()));
            }
        }
        match new {
            Some(o) => {
                for t in &o.instance.timers {
                    self.timers.insert((t.fire_at, id.clone(), t.id.clone()));
                }
                self.sagas.insert(id.clone(), o);
            }
            None => {
                self.sagas.remove(id);
            }
        }
    }

    /// Like `put`, remembering the value before the batch for a rollback
    /// (moved there, not copied).
    fn change(&mut self, id: &SagaId, new: Owned<D>) {
        if self.undo.contains_key(id) {
            self.put(id, Some(new));
            return;
        }
        if let Some(old) = self.sagas.get(id) {
            for t in &old.instance.timers {
                self.timers.remove(&(t.fire_at, id.clone(), t.id.clone()));
            }
        }
        for t in &new.instance.timers {
            self.timers.insert((t.fire_at, id.clone(), t.id.clone()));
        }
        let old = self.sagas.insert(id.clone(), new);
        self.undo.insert(id.clone(), old);
    }

    fn on_reply(
        &mut self,
        rec: &Incoming<'_>,
        env: Envelope,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) {
        let id = env.saga_id.clone();
        let Some(owned) = self.sagas.get(&id) else {
            if self.settled.contains_key(&id) {
                // A late or repeated reply to a settled saga: nothing to do,
                // unless it is malformed.
                if let Err(e) = self.def.check_reply(&env) {
                    self.dead_letter(env, rec.topic, e.to_string(), now, Some(rec.origin()), out);
                }
                return;
            }
            let e = SagaError::UnknownSaga {
                saga_id: id,
                message_id: env.id.clone(),
            };
            return self.dead_letter(env, rec.topic, e.to_string(), now, Some(rec.origin()), out);
        };
        let partition = owned.partition;
        let inst = &owned.instance;
        let (step, attempt) = match &inst.awaiting {
            // A saga that does not fit the definition names no step (the
            // engine refuses the reply: it is dead-lettered).
            Some(a) => (
                self.def
                    .steps()
                    .get(a.step)
                    .map_or("", |s| s.name())
                    .to_owned(),
                a.attempt,
            ),
            None => (inst.current_step().unwrap_or("").to_owned(), 0),
        };
        let span = tracing::info_span!("saga.reply", saga_id = %id, saga = %self.def.name(), step = %step, attempt, trace_id = tracing::field::Empty, span_id = tracing::field::Empty, parent_span_id = tracing::field::Empty);
        // The replier's span is the parent, if it is in the saga's trace.
        let parent = match (env.traceparent, inst.trace) {
            (Some(r), Some(i)) if r.trace_id() == i.trace_id() => Some(r),
            (_, Some(i)) => Some(i),
            (r, None) => r,
        };
        let trace = parent.map(|p| link_span(&span, Some(&p)));
        let _g = span.enter();
        // A reply to the awaited step: how long the step took (its name
        // is `step`, the awaited step's).
        let latency = match &inst.awaiting {
            Some(a) if env.step.as_deref() == Some(step.as_str()) => {
                Some(now.saturating_since(a.command.timestamp()))
            }
            _ => None,
        };
        // The reply goes to the engine as it is, not a copy: the rare
        // dead letter reads it again from the record.
        match self
            .def
            .handle_sending_in(inst, Input::Reply(env), now, trace.or(inst.trace))
        {
            Ok(t) => {
                if t.handled == Handled::Applied {
                    if let Some(d) = latency {
                        self.metrics.step_latency(&step, d.as_secs_f64());
                    }
                }
                if let Err(e) = self.apply(&id, partition, t, out) {
                    let env = self.reread(rec, now);
                    self.dead_letter(env, rec.topic, e.to_string(), now, Some(rec.origin()), out);
                }
            }
            Err(e) => {
                let env = self.reread(rec, now);
                self.dead_letter(env, rec.topic, e.to_string(), now, Some(rec.origin()), out);
            }
        }
    }

    /// The envelope of a reply record, read again from its bytes (it was
    /// read once already, so only a record changed since would fall back
    /// to the poison stand-in).
    fn reread(&self, rec: &Incoming<'_>, now: Timestamp) -> Envelope {
        // As first read: the header's trace wins over the JSON field.
        rec.envelope()
            .unwrap_or_else(|_| rec.as_poison(self.def.name(), now))
    }

    /// Writes a transition and keeps its instance; an ignored input
    /// changes nothing. (The messages it sends carry the context of the
    /// span that handled the input, when there is one: the engine was
    /// given it.)
    fn apply(
        &mut self,
        id: &SagaId,
        partition: u32,
        t: Transition<D>,
        out: &mut Vec<Record>,
    ) -> Result<(), SagaError> {
        if let Handled::Ignored(why) = t.handled {
            tracing::debug!(saga_id = %id, %why, "input ignored");
            return Ok(());
        }
        let records = self.records_of(&t)?;
        let before = self.sagas.get(id).map(|o| o.instance.status.clone());
        self.metrics.transition(before.as_ref(), &t);
        out.extend(records);
        self.change(
            id,
            Owned {
                partition,
                instance: kept(t.instance),
            },
        );
        Ok(())
    }

    /// The records of one transition: the new state, then the effects;
    /// refused whole if one of them is over the size limit.
    fn records_of(&self, t: &Transition<D>) -> Result<Vec<Record>, SagaError> {
        let state = encode_state(&t.instance)?;
        let mut records = Vec::with_capacity(1 + t.effects.len());
        records.push(Record::new(
            &self.state_topic,
            t.instance.id.as_str(),
            Some(state),
            RecordKind::SagaState,
        ));
        for effect in &t.effects {
            match effect {
                Effect::Send(env) => records.push(match awaited_text(&t.instance, env) {
                    // The command the instance keeps, encoded once already:
                    // its text is the record's value.
                    Some(json) => Record::message_text(env, json),
                    None => Record::message(env),
                }),
                Effect::DeadLetter(d) => {
                    let limit = self.max_record_bytes.saturating_sub(RECORD_OVERHEAD);
                    records.push(Record::message(&d.to_envelope_within(limit)));
                }
                _ => {}
            }
        }
        let limit = self.max_record_bytes.saturating_sub(RECORD_OVERHEAD);
        if let Some(big) = records.iter().find(|r| r.size() > limit) {
            return Err(SagaError::RecordTooLarge {
                topic: big.topic.clone(),
                key: big.key.clone(),
                size: big.size(),
                limit,
            });
        }
        Ok(records)
    }

    /// Dead-letters `rec` without handling it, with reason `why`: for a
    /// runtime whose broker refuses what handling it produced (a record
    /// over the broker's size limit), so the partition goes on.
    pub fn reject(&mut self, rec: &Incoming<'_>, why: &str, now: Timestamp, out: &mut Vec<Record>) {
        let original = self.reread(rec, now);
        let reason = format!("its handling produced a record the broker refuses: {why}");
        self.dead_letter(original, rec.topic, reason, now, Some(rec.origin()), out);
    }

    fn poison(&self, rec: &Incoming<'_>, reason: String, now: Timestamp, out: &mut Vec<Record>) {
        let original = rec.as_poison(self.def.name(), now);
        self.dead_letter(original, rec.topic, reason, now, Some(rec.origin()), out);
    }

    /// A stand-in message for an input that is not a message (a timer).
    fn stand_in(&self, id: &SagaId, what: &str, now: Timestamp) -> Envelope {
        Envelope::event(
            MessageId::new(format!("{id}/{what}")),
            format!("{}.timers", self.def.name()),
            id.clone(),
            self.def.name(),
            serde_json::Value::String(what.to_owned()),
            now,
        )
    }

    fn dead_letter(
        &self,
        original: Envelope,
        from: &str,
        reason: String,
        now: Timestamp,
        origin: Option<RecordOrigin>,
        out: &mut Vec<Record>,
    ) {
        let saga = self.def.name();
        tracing::warn!(saga, saga_id = %original.saga_id, %reason, "dead-lettering an input the saga cannot handle");
        metrics::dead_letter(saga);
        let mut dead = DeadLetter::new(
            self.def.dead_letter_channel(),
            saga,
            original,
            now,
            0,
            format!("unprocessable input from `{from}`"),
            reason,
        );
        dead.origin = origin;
        let limit = self.max_record_bytes.saturating_sub(RECORD_OVERHEAD);
        out.push(Record::message(&dead.to_envelope_within(limit)));
    }
}

#[cfg(test)]
mod tests {
    use crate::driver::tests::tombstones;
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::definition::Step;
    use crate::retry::RetryPolicy;

    #[derive(Clone, Debug, Default, Serialize, Deserialize)]
    struct Job {
        /// Makes the data fail to serialize.
        #[serde(serialize_with = "refuse", default)]
        poisoned: bool,
        /// Makes the data large.
        #[serde(default)]
        padding: String,
    }

    fn refuse<S: serde::Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        if *v {
            Err(serde::ser::Error::custom("this data cannot be stored"))
        } else {
            s.serialize_bool(false)
        }
    }

    const T0: Timestamp = Timestamp::from_millis(1_000_000);

    fn definition() -> SagaDefinition<Job> {
        SagaDefinition::<Job>::builder("job")
            .step(
                Step::remote("call", "svc")
                    .command(|_: &Job| "CALL")
                    .on_reply(|_, _: String| Ok(()))
                    .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2))
                    .timeout(Duration::from_secs(5)),
            )
            .build()
            .unwrap()
    }

    /// The latest state record of saga `id` among `out`.
    fn state_record(out: &[Record], id: &str) -> Vec<u8> {
        out.iter()
            .rev()
            .find(|r| r.key == id && r.kind == RecordKind::SagaState)
            .and_then(|r| r.value.clone())
            .expect("a state record")
    }

    fn driver() -> SagaDriver<Job> {
        let mut d = SagaDriver::new(definition()).with_settled_retention(Duration::from_secs(60));
        d.restore(0, Vec::new());
        d
    }

    fn incoming<'a>(value: &'a [u8], kind: Option<&'a [u8]>) -> Incoming<'a> {
        Incoming {
            topic: "job.replies",
            partition: 0,
            offset: 7,
            key: Some(b"j-1"),
            value: Some(value),
            kind,
            traceparent: None,
        }
    }

    #[test]
    fn state_records_leave_defaults_out_but_keep_what_older_readers_need() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(out[0].value.as_deref().unwrap()).unwrap();
        let step = &state["steps"][0];
        // Left out at their default, and read back as it.
        assert!(
            step.get("last_error").is_none() && step.get("executions").is_none(),
            "{step}"
        );
        assert!(state.get("failure").is_none(), "{state}");
        let mut settled = d.get(&SagaId::new("j-1")).unwrap().clone();
        settled.awaiting = None;
        let text = String::from_utf8(encode_state(&settled).unwrap()).unwrap();
        assert!(!text.contains("awaiting"), "{text}");
        // Read back, and as earlier versions wrote it: the same instance.
        let old = text.replacen(r#""timers""#, r#""awaiting":null,"timers""#, 1);
        assert!(old.contains(r#""awaiting":null"#), "{old}");
        for written in [&text, &old] {
            let back = decode_state::<Job>("j-1", written.as_bytes()).unwrap();
            assert_eq!(encode_state(&back).unwrap(), text.as_bytes());
        }
        // Earlier versions of the crate fail without these: always written.
        for field in ["timers", "event_seq"] {
            assert!(state.get(field).is_some(), "`{field}` missing: {state}");
        }
        assert!(step.get("compensation_attempts").is_some(), "{step}");
        let back = decode_state::<Job>("j-1", out[0].value.as_deref().unwrap()).unwrap();
        assert_eq!(back.steps[0].executions, 0);
        assert_eq!(back.failure, None);
    }

    fn dead_letters(out: &[Record]) -> Vec<DeadLetter> {
        out.iter()
            .filter(|r| r.topic == "job.dlq")
            .map(|r| {
                let env = Envelope::from_bytes(r.value.as_deref().unwrap()).unwrap();
                DeadLetter::from_envelope(&env).unwrap()
            })
            .collect()
    }

    /// `out` is one dead letter, for an input refused because its saga
    /// does not fit the definition, and no state.
    fn only_a_mismatch_dead_letter(out: &[Record]) {
        let dead = dead_letters(out);
        assert_eq!((dead.len(), out.len()), (1, 1), "{out:?}");
        assert!(
            dead[0].last_error.contains("does not fit its definition"),
            "{}",
            dead[0].last_error
        );
    }

    /// The reply to the command `out` holds.
    fn reply_to(out: &[Record], payload: &str) -> Vec<u8> {
        let command = out
            .iter()
            .find(|r| r.topic == "svc")
            .map(|r| Envelope::from_bytes(r.value.as_deref().unwrap()).unwrap())
            .unwrap();
        command
            .reply(crate::message::ReplyOutcome::Success, payload.into(), T0)
            .unwrap()
            .to_bytes()
    }

    #[test]
    fn a_start_writes_the_state_then_the_command_and_a_second_start_is_a_no_op() {
        let mut d = driver();
        let mut out = Vec::new();
        let created = d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out);
        assert!(created.unwrap());
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].topic.as_str(), out[0].kind),
            ("job.state", RecordKind::SagaState)
        );
        assert_eq!(
            (out[1].topic.as_str(), out[1].kind),
            ("svc", RecordKind::Message)
        );
        assert!(d.get(&SagaId::new("j-1")).is_some());
        assert_eq!(
            d.next_due(),
            Some(T0.saturating_add(Duration::from_secs(5)))
        );
        let mut seen = Vec::new();
        d.committed(|i| seen.push(i.id.clone()));
        assert_eq!(seen, vec![SagaId::new("j-1")]);
        let mut again = Vec::new();
        let created = d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut again);
        assert!(!created.unwrap(), "a second start is a no-op");
        assert!(again.is_empty());
    }

    #[test]
    fn a_step_command_record_is_the_envelope_as_it_encodes_each_attempt() {
        let mut d = driver();
        let mut out = Vec::new();
        let commands = |out: &[Record]| -> Vec<Record> {
            out.iter().filter(|r| r.topic == "svc").cloned().collect()
        };
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        d.committed(|_| {});
        let first = commands(&out);
        let first_kept = d.get(&SagaId::new("j-1")).unwrap().awaiting.clone();
        // The attempt times out, then its backoff sends the second.
        let deadline = T0.saturating_add(Duration::from_secs(5));
        out.clear();
        assert!(d.on_due(deadline, &mut out));
        d.committed(|_| {});
        assert!(commands(&out).is_empty(), "no command while backing off");
        out.clear();
        assert!(d.on_due(deadline.saturating_add(Duration::from_secs(1)), &mut out));
        d.committed(|_| {});
        let second = commands(&out);
        let second_kept = d.get(&SagaId::new("j-1")).unwrap().awaiting.clone();
        for (records, kept, attempt) in [(first, first_kept, 1), (second, second_kept, 2)] {
            assert_eq!(records.len(), 1);
            let r = &records[0];
            let env = Envelope::from_bytes(r.value.as_deref().unwrap()).unwrap();
            assert_eq!(env.attempt, attempt);
            assert_eq!(env.step.as_deref(), Some("call"));
            // Byte for byte what the envelope encodes to.
            assert_eq!(r.value.as_deref(), Some(&env.to_bytes()[..]));
            assert_eq!(
                (r.key.as_str(), r.kind, r.partition, r.traceparent),
                (env.key(), RecordKind::Message, None, env.traceparent)
            );
            // The instance keeps the command as sent, trace included.
            let kept = kept.unwrap().command;
            assert_eq!(kept.json().as_bytes(), &env.to_bytes()[..]);
        }
    }

    /// The driver is built before any recorder is in use here: its counts
    /// must still reach the recorder in use when the saga runs.
    #[cfg(feature = "metrics")]
    #[test]
    fn metrics_reach_the_recorder_in_use_even_one_installed_after_the_driver() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let mut d = driver();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            let mut out = Vec::new();
            d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
                .unwrap();
            let reply = reply_to(&out, "done");
            out.clear();
            d.on_record(&incoming(&reply, None), T0, &mut out);
        });
        let mut seen = std::collections::BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let value = match value {
                DebugValue::Counter(n) => n,
                DebugValue::Histogram(samples) => samples.len() as u64,
                DebugValue::Gauge(_) => continue,
            };
            seen.insert(format!("{}{{{}}}", key.name(), labels.join(",")), value);
        }
        let expected = [
            ("saga_started_total{saga=job}", 1),
            ("saga_completed_total{saga=job}", 1),
            ("saga_duration_seconds{saga=job,status=completed}", 1),
            ("saga_step_latency_seconds{saga=job,step=call}", 1),
        ];
        for (name, count) in expected {
            assert_eq!(seen.get(name), Some(&count), "{name} in {seen:?}");
        }
        // A series appears with its first count.
        assert_eq!(seen.get("saga_compensated_total{saga=job}"), None);
    }

    #[test]
    fn a_start_request_is_applied_by_the_owner_once() {
        let def = definition();
        let request = start_record(&def, &SagaId::new("j-2"), &Job::default()).unwrap();
        assert_eq!(
            (request.topic.as_str(), request.kind),
            ("job.replies", RecordKind::Start)
        );
        let mut owner = driver();
        let value = request.value.unwrap();
        let mut out = Vec::new();
        owner.on_record(&incoming(&value, Some(b"start")), T0, &mut out);
        assert!(owner.get(&SagaId::new("j-2")).is_some());
        assert_eq!(out.len(), 2, "its state and its first command");
        out.clear();
        owner.on_record(&incoming(&value, Some(b"start")), T0, &mut out);
        assert!(out.is_empty(), "the same request again writes nothing");
    }

    #[test]
    fn data_that_cannot_be_stored_is_an_error_and_nothing_is_written() {
        let mut d = driver();
        let mut out = Vec::new();
        let poisoned = Job {
            poisoned: true,
            ..Job::default()
        };
        let err = d
            .start(0, SagaId::new("j-3"), poisoned, T0, &mut out)
            .unwrap_err();
        assert!(matches!(err, SagaError::Encode { .. }), "{err}");
        let big = Job {
            padding: "x".repeat(5_000),
            ..Job::default()
        };
        let mut d = driver().with_max_record_bytes(4_096);
        let err = d
            .start(0, SagaId::new("j-4"), big, T0, &mut out)
            .unwrap_err();
        assert!(
            matches!(err, SagaError::RecordTooLarge { ref topic, .. } if topic == "job.state"),
            "{err}"
        );
        assert!(out.is_empty());
        assert!(d.get(&SagaId::new("j-3")).is_none() && d.get(&SagaId::new("j-4")).is_none());
    }

    #[test]
    fn timers_fire_at_their_time_and_an_abort_rearms_them() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        d.committed(|_| {});
        let deadline = T0.saturating_add(Duration::from_secs(5));
        assert!(!d.on_due(T0, &mut out), "nothing is due before its time");
        out.clear();
        assert!(d.on_due(deadline, &mut out));
        // The attempt timed out: a backoff timer replaces the deadline.
        let backoff = deadline.saturating_add(Duration::from_secs(1));
        assert_eq!(d.next_due(), Some(backoff));
        assert_eq!(out.len(), 1, "the new state");
        // The batch aborts: the saga and its timers are as before it.
        d.rolled_back();
        assert_eq!(d.next_due(), Some(deadline));
        assert_eq!(d.get(&SagaId::new("j-1")).unwrap().steps[0].attempts, 1);
    }

    #[test]
    fn a_settled_saga_leaves_memory_and_its_state_is_deleted_after_the_retention() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        d.committed(|_| {});
        let reply = reply_to(&out, "done");
        out.clear();
        d.on_record(&incoming(&reply, None), T0, &mut out);
        let mut last = None;
        d.committed(|i| last = Some(i.status.clone()));
        assert_eq!(last, Some(crate::SagaStatus::Completed));
        assert!(d.get(&SagaId::new("j-1")).is_none(), "it left memory");
        assert!(d.is_settled(&SagaId::new("j-1")));
        // A repeated reply is ignored quietly; a malformed one is a dead letter.
        out.clear();
        d.on_record(&incoming(&reply, None), T0, &mut out);
        assert!(out.is_empty());
        let mut bad = Envelope::from_bytes(&reply).unwrap();
        bad.payload = serde_json::json!({"not": "a string"});
        d.on_record(&incoming(&bad.to_bytes(), None), T0, &mut out);
        assert_eq!(dead_letters(&out).len(), 1);
        // Past the retention, a tombstone deletes its state.
        let expiry = T0.saturating_add(Duration::from_secs(60));
        assert_eq!(d.next_due(), Some(expiry));
        out.clear();
        assert!(d.on_due(expiry, &mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(
            (
                out[0].topic.as_str(),
                out[0].value.as_ref(),
                out[0].partition
            ),
            ("job.state", None, Some(0))
        );
        // An abort keeps the state until the next try.
        d.rolled_back();
        assert!(d.is_settled(&SagaId::new("j-1")));
        assert!(d.on_due(expiry, &mut out));
        d.committed(|_| {});
        assert!(!d.is_settled(&SagaId::new("j-1")));
        assert_eq!(d.next_due(), None);
    }

    #[test]
    fn inputs_that_cannot_be_handled_become_dead_letters_with_their_origin() {
        let mut d = driver();
        let mut out = Vec::new();
        d.on_record(&incoming(b"not json", None), T0, &mut out);
        d.on_record(&incoming(b"{}", Some(b"bogus")), T0, &mut out);
        d.on_record(&incoming(b"garbage", Some(b"state")), T0, &mut out);
        d.on_record(&incoming(b"garbage", Some(b"operator")), T0, &mut out);
        d.on_record(&incoming(b"garbage", Some(b"start")), T0, &mut out);
        let mut reply = Envelope::event(
            MessageId::new("ghost/call/forward/1/reply"),
            "job.replies",
            SagaId::new("ghost"),
            "job",
            serde_json::Value::Null,
            T0,
        );
        reply.kind = crate::message::MessageKind::Reply;
        reply.step = Some("call".into());
        d.on_record(&incoming(&reply.to_bytes(), None), T0, &mut out);
        let dead = dead_letters(&out);
        let errors: Vec<&str> = dead.iter().map(|d| d.last_error.as_str()).collect();
        assert_eq!(dead.len(), 6, "{errors:?}");
        assert!(errors[0].starts_with("not an envelope"), "{errors:?}");
        assert_eq!(errors[1], "unknown record kind `bogus`");
        assert_eq!(errors[2], "a state record on a reply topic");
        assert!(
            errors[3].starts_with("not an operator request"),
            "{errors:?}"
        );
        assert!(errors[4].starts_with("not a start request"), "{errors:?}");
        assert!(errors[5].contains("no saga instance `ghost`"), "{errors:?}");
        assert_eq!(dead[0].original.id.as_str(), "job.replies/0/7");
        assert!(dead
            .iter()
            .all(|d| d.origin == Some(RecordOrigin::new("job.replies", 0, 7))));
    }

    #[test]
    fn a_reply_the_saga_refuses_is_dead_lettered_as_it_was_read() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        let cmd = out
            .iter()
            .filter(|r| r.topic == "svc")
            .map(|r| Envelope::from_bytes(r.value.as_deref().unwrap()).unwrap())
            .next()
            .unwrap();
        // The step's replies are strings: a number is a decode error.
        let reply = cmd
            .reply(
                crate::message::ReplyOutcome::Success,
                serde_json::json!(42),
                T0,
            )
            .unwrap();
        out.clear();
        d.on_record(&incoming(&reply.to_bytes(), None), T0, &mut out);
        let dead = dead_letters(&out);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].original, reply);
        assert!(
            dead[0].last_error.contains("reply"),
            "{}",
            dead[0].last_error
        );
        assert_eq!(dead[0].origin, Some(RecordOrigin::new("job.replies", 0, 7)));
    }

    #[test]
    fn an_oversized_poison_record_is_dead_lettered_truncated() {
        let mut d = driver().with_max_record_bytes(4_096);
        let mut out = Vec::new();
        let garbage = vec![b'z'; 20_000];
        d.on_record(&incoming(&garbage, None), T0, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].size() <= 4_096, "{} bytes", out[0].size());
        let dead = dead_letters(&out).remove(0);
        assert!(dead.truncated_from.unwrap() > 20_000);
        assert!(dead.last_error.starts_with("not an envelope"));
        assert_eq!(dead.origin, Some(RecordOrigin::new("job.replies", 0, 7)));
    }

    #[test]
    fn releasing_a_partition_forgets_its_sagas_and_timers() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        d.committed(|_| {});
        d.release(&[0]);
        assert!(!d.owns(0));
        assert!(d.get(&SagaId::new("j-1")).is_none());
        assert_eq!(d.next_due(), None);
        // Restored from what was written, it comes back with its timer.
        let state = out[0].value.clone().unwrap();
        let report = d.restore(
            0,
            vec![("j-1".into(), state), ("bad".into(), b"{".to_vec())],
        );
        assert_eq!(report.sagas, 1);
        assert_eq!(report.corrupt.len(), 1);
        assert!(d.next_due().is_some());
    }

    #[test]
    fn a_command_awaited_in_a_record_written_before_in_flight_existed_is_in_flight() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        let state = String::from_utf8(state_record(&out, "j-1")).unwrap();
        let old = state.replacen(r#""in_flight":true,"#, "", 1);
        assert_ne!(old, state, "{state}");
        let back = decode_state::<Job>("j-1", old.as_bytes()).unwrap();
        assert!(back.awaiting.as_ref().unwrap().in_flight, "{back:?}");
        // Its deadline then fails the attempt, which is retried.
        let mut fresh = driver();
        fresh.release(&[0]);
        fresh.restore(0, vec![("j-1".to_owned(), old.into_bytes())]);
        let mut out = Vec::new();
        assert!(fresh.on_due(T0.saturating_add(Duration::from_secs(5)), &mut out));
        let saga = fresh.get(&SagaId::new("j-1")).unwrap();
        assert!(
            saga.timers
                .iter()
                .any(|t| matches!(t.kind, crate::instance::TimerKind::Backoff { step: 0, .. })),
            "{saga:?}"
        );

        // A judged attempt waiting for its back-off stays judged.
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-2"), Job::default(), T0, &mut out)
            .unwrap();
        let command = Envelope::from_bytes(
            out.iter()
                .find(|r| r.topic == "svc")
                .unwrap()
                .value
                .as_deref()
                .unwrap(),
        )
        .unwrap();
        let failure = crate::message::ReplyOutcome::failure(crate::ErrorClass::Retryable, "busy");
        let reply = command
            .reply(failure, serde_json::Value::Null, T0)
            .unwrap()
            .to_bytes();
        let mut incoming = incoming(&reply, None);
        incoming.key = Some(b"j-2");
        d.on_record(&incoming, T0, &mut out);
        let judged = state_record(&out, "j-2");
        let back = decode_state::<Job>("j-2", &judged).unwrap();
        assert!(!back.awaiting.as_ref().unwrap().in_flight, "{back:?}");
    }

    #[test]
    fn a_start_of_a_saga_whose_state_cannot_be_read_is_refused_not_written_over_it() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        // Its record, as another build might have written it.
        let state = String::from_utf8(state_record(&out, "j-1")).unwrap();
        let unreadable = state.replacen(r#""poisoned":false"#, r#""poisoned":"yes""#, 1);
        assert_ne!(unreadable, state);
        let mut fresh = driver();
        fresh.release(&[0]);
        let report = fresh.restore(0, vec![("j-1".to_owned(), unreadable.into_bytes())]);
        assert_eq!(report.corrupt.len(), 1, "{report:?}");

        let mut out = Vec::new();
        let err = fresh
            .start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap_err();
        assert!(
            matches!(&err, SagaError::CorruptState { saga_id, .. } if saga_id.as_str() == "j-1"),
            "{err}"
        );
        assert!(out.is_empty(), "nothing written: {out:?}");
        // Other sagas start as ever.
        assert!(fresh
            .start(0, SagaId::new("j-2"), Job::default(), T0, &mut out)
            .unwrap());
        // Another partition's unreadable saga stays refused when this one
        // is given up.
        let other = state.replace("j-1", "k-1");
        let other = other.replacen(r#""poisoned":false"#, r#""poisoned":1"#, 1);
        fresh.restore(1, vec![("k-1".to_owned(), other.into_bytes())]);
        // A partition given up and restored with a readable record (an
        // operator's repair) holds the saga again.
        fresh.release(&[0]);
        assert_eq!(fresh.unreadable.len(), 1);
        assert!(fresh
            .start(1, SagaId::new("k-1"), Job::default(), T0, &mut Vec::new())
            .is_err());
        fresh.restore(0, vec![("j-1".to_owned(), state.into_bytes())]);
        assert!(fresh.get(&SagaId::new("j-1")).is_some());
        assert!(!fresh
            .start(0, SagaId::new("j-1"), Job::default(), T0, &mut Vec::new())
            .unwrap());
    }

    #[test]
    fn releasing_one_partition_keeps_the_other_partitions_sagas_timers_and_expiry() {
        let mut d = driver();
        let mut out = Vec::new();
        for id in ["run-0", "done-0", "run-1", "done-1"] {
            d.start(0, SagaId::new(id), Job::default(), T0, &mut out)
                .unwrap();
        }
        let state = |id: &str, settled: bool| {
            let bytes = state_record(&out, id);
            let mut instance: SagaInstance<Job> = serde_json::from_slice(&bytes).unwrap();
            if settled {
                instance.status = crate::SagaStatus::Completed;
                instance.timers.clear();
                instance.updated_at = T0;
            }
            serde_json::to_vec(&instance).unwrap()
        };
        let mut fresh =
            SagaDriver::new(definition()).with_settled_retention(Duration::from_secs(60));
        for p in [0, 1] {
            let records = vec![
                (format!("run-{p}"), state(&format!("run-{p}"), false)),
                (format!("done-{p}"), state(&format!("done-{p}"), true)),
            ];
            let report = fresh.restore(p, records);
            assert_eq!((report.sagas, report.settled), (1, 1), "{report:?}");
        }
        fresh.release(&[0]);
        assert!(!fresh.owns(0) && fresh.owns(1));
        assert!(fresh.get(&SagaId::new("run-0")).is_none());
        assert!(!fresh.is_settled(&SagaId::new("done-0")));
        assert!(fresh.get(&SagaId::new("run-1")).is_some());
        assert!(fresh.is_settled(&SagaId::new("done-1")));
        assert_eq!(fresh.len(), (1, 1));
        assert_eq!(fresh.timers.len(), 1, "only partition 1's saga's timer");
        // Past the retention, only partition 1's settled saga is deleted,
        // in its own partition.
        let mut expired = Vec::new();
        assert!(fresh.on_due(T0.saturating_add(Duration::from_secs(61)), &mut expired));
        assert_eq!(tombstones(&expired), [("done-1", Some(1))]);
        assert!(!fresh.is_settled(&SagaId::new("done-1")));
    }

    #[test]
    fn a_reply_to_a_saga_recorded_with_more_steps_is_dead_lettered_not_a_panic() {
        // Recorded by a definition whose second step was the remote one.
        let longer = SagaDefinition::<Job>::builder("job")
            .step(Step::<Job>::local("prepare", |_| Ok(())))
            .step(
                Step::remote("call", "svc")
                    .command(|_: &Job| "CALL")
                    .on_reply(|_, _: String| Ok(())),
            )
            .build()
            .unwrap();
        let mut v1 = SagaDriver::new(longer);
        v1.restore(0, Vec::new());
        let mut out = Vec::new();
        v1.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        let reply = reply_to(&out, "ok");
        // Restored by a deployment with one step: the reply is refused.
        let mut v2 = SagaDriver::new(definition());
        let report = v2.restore(0, vec![("j-1".to_owned(), state_record(&out, "j-1"))]);
        assert_eq!(report.sagas, 1, "{report:?}");
        let mut out = Vec::new();
        v2.on_record(&incoming(&reply, None), T0, &mut out);
        only_a_mismatch_dead_letter(&out);
    }

    #[test]
    fn a_timer_the_engine_refuses_is_dead_lettered() {
        let mut out = Vec::new();
        driver()
            .start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        // Restored by a deployment that renamed the step.
        let renamed = SagaDefinition::<Job>::builder("job")
            .step(
                Step::remote("call-v2", "svc")
                    .command(|_: &Job| "CALL")
                    .on_reply(|_, _: String| Ok(()))
                    .timeout(Duration::from_secs(5)),
            )
            .build()
            .unwrap();
        let mut d = SagaDriver::new(renamed);
        d.restore(0, vec![("j-1".to_owned(), state_record(&out, "j-1"))]);
        let due = d.next_due().expect("the step's timeout");
        let mut out = Vec::new();
        assert!(d.on_due(due, &mut out));
        only_a_mismatch_dead_letter(&out);
        d.rolled_back();
        assert_eq!(d.next_due(), Some(due), "armed again by a rollback");
    }

    #[test]
    fn a_rollback_arms_again_a_timer_whose_transition_failed() {
        // A saga waiting on its step, whose data can no longer be stored.
        let mut out = Vec::new();
        driver()
            .start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        let mut state: serde_json::Value =
            serde_json::from_slice(&state_record(&out, "j-1")).unwrap();
        state["data"]["poisoned"] = serde_json::json!(true);
        let mut d =
            SagaDriver::<Job>::new(definition()).with_settled_retention(Duration::from_secs(60));
        let report = d.restore(
            0,
            vec![("j-1".to_owned(), serde_json::to_vec(&state).unwrap())],
        );
        assert_eq!(report.sagas, 1, "{report:?}");
        let due = d.next_due().expect("the step's timeout");
        // Its timeout fires in a batch: the transition cannot be encoded,
        // so it is dead-lettered. Then the batch aborts.
        let mut out = Vec::new();
        assert!(d.on_due(due, &mut out));
        assert!(out.iter().any(|r| r.topic == "job.dlq"), "a dead letter");
        assert_eq!(d.next_due(), None, "taken while the batch is open");
        d.rolled_back();
        assert_eq!(d.next_due(), Some(due), "armed again by the rollback");
        // Committed, it stays taken (its dead letter is written).
        let mut out = Vec::new();
        assert!(d.on_due(due, &mut out));
        d.committed(|_| {});
        assert_eq!(d.next_due(), None);
    }

    #[test]
    fn a_timer_whose_records_were_refused_is_dead_lettered_not_fired_again() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        d.committed(|_| {});
        let due = d.next_due().expect("the step's timeout");
        // Nothing fired yet: nothing to reject.
        let mut out = Vec::new();
        assert_eq!(d.reject_due("refused", due, &mut out), None);
        assert!(out.is_empty());
        assert_eq!(d.due_partition(), None);
        // It fires (the step's retry is armed), the broker refuses a
        // record of the batch, and the batch aborts.
        assert!(d.on_due(due, &mut out));
        assert!(!out.is_empty());
        d.rolled_back();
        assert_eq!(d.next_due(), Some(due), "armed again by the rollback");
        assert_eq!(d.due_partition(), Some(0));
        // Rejected instead: a dead letter with the broker's reason, the
        // saga left as it was.
        let before = d.get(&SagaId::new("j-1")).unwrap().clone();
        let mut out = Vec::new();
        assert_eq!(d.reject_due("too large", due, &mut out), Some(0));
        assert_eq!(out.len(), 1, "only the dead letter: {out:?}");
        assert_eq!(out[0].topic, "job.dlq");
        let dead = DeadLetter::from_envelope(
            &Envelope::from_bytes(out[0].value.as_deref().unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(dead.original.saga_id.as_str(), "j-1");
        assert!(
            dead.last_error.contains("broker refuses: too large"),
            "{}",
            dead.last_error
        );
        assert_eq!(d.get(&SagaId::new("j-1")).unwrap().version, before.version);
        assert_eq!(d.next_due(), None, "taken while the batch is open");
        // That batch aborts too (the broker away): the timer is back, and
        // rejected again.
        d.rolled_back();
        assert_eq!(d.next_due(), Some(due));
        let mut out = Vec::new();
        assert_eq!(d.reject_due("too large", due, &mut out), Some(0));
        d.committed(|_| {});
        assert_eq!(d.next_due(), None, "not fired again");
        assert_eq!(d.reject_due("too large", due, &mut Vec::new()), None);
    }

    #[test]
    fn a_refused_timer_is_not_rejected_once_its_partition_is_released() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, &mut out)
            .unwrap();
        d.committed(|_| {});
        let due = d.next_due().unwrap();
        assert!(d.on_due(due, &mut Vec::new()));
        d.rolled_back();
        d.release(&[0]);
        let mut out = Vec::new();
        assert_eq!(d.reject_due("too large", due, &mut out), None);
        assert!(out.is_empty());
    }

    #[test]
    fn a_rollback_after_a_release_does_not_bring_back_the_released_partitions_expired_sagas() {
        let mut d =
            SagaDriver::<Job>::new(definition()).with_settled_retention(Duration::from_secs(60));
        let settled = |id: &str| {
            let mut out = Vec::new();
            let mut scratch = driver();
            scratch
                .start(0, SagaId::new(id), Job::default(), T0, &mut out)
                .unwrap();
            let mut state: serde_json::Value =
                serde_json::from_slice(&state_record(&out, id)).unwrap();
            state["status"] = serde_json::json!({"status": "completed"});
            state["timers"] = serde_json::json!([]);
            state["updated_at"] = serde_json::json!(T0.as_millis());
            (id.to_owned(), serde_json::to_vec(&state).unwrap())
        };
        for p in [0, 1] {
            let report = d.restore(p, vec![settled(&format!("done-{p}"))]);
            assert_eq!(report.settled, 1, "{report:?}");
        }
        // The open batch deletes both, past their retention, then
        // partition 0 goes and the batch aborts.
        let mut out = Vec::new();
        assert!(d.on_due(T0.saturating_add(Duration::from_secs(61)), &mut out));
        assert_eq!(d.len(), (0, 0));
        d.release(&[0]);
        d.rolled_back();
        assert!(
            !d.is_settled(&SagaId::new("done-0")),
            "released, not restored by the rollback"
        );
        assert!(
            d.is_settled(&SagaId::new("done-1")),
            "the kept partition's deletion undone"
        );
        assert_eq!(d.len(), (0, 1));
        // Its deletion is due again, in its own partition only.
        let mut again = Vec::new();
        assert!(d.on_due(T0.saturating_add(Duration::from_secs(61)), &mut again));
        assert_eq!(tombstones(&again), [("done-1", Some(1))]);
    }

    #[test]
    fn a_settled_state_is_restored_from_its_id_status_and_time_alone() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("s"), Job::default(), T0, &mut out)
            .unwrap();
        let mut settled: serde_json::Value =
            serde_json::from_slice(&state_record(&out, "s")).unwrap();
        settled["status"] = serde_json::json!({"status": "completed"});
        let settled_at = T0.saturating_add(Duration::from_secs(1));
        settled["updated_at"] = serde_json::json!(settled_at.as_millis());
        // The rest is not read: not even data of another type.
        settled["data"] = serde_json::json!("not a job");
        let settled = serde_json::to_vec(&settled).unwrap();
        let mut fresh = SagaDriver::<Job>::new(definition());
        fresh.restore_begin(0);
        assert_eq!(
            fresh.restore_record(0, "s", Some(&settled), |_| panic!("not decoded")),
            RestoredRecord::Settled
        );
        // Under another key it is read in full, and refused.
        assert_eq!(
            fresh.restore_record(0, "t", Some(&settled), |_| panic!("not decoded")),
            RestoredRecord::Unreadable
        );
        let report = fresh.restore_end(0);
        assert_eq!((report.sagas, report.settled), (0, 1), "{report:?}");
        assert!(fresh.is_settled(&SagaId::new("s")));
        let corrupt: Vec<&str> = report.corrupt.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(corrupt, ["t"]);
        // Its retention runs from when it settled (not when it started),
        // as its record says.
        assert_eq!(
            fresh.next_due(),
            Some(settled_at.saturating_add(DEFAULT_SETTLED_RETENTION))
        );
        // Under its own key but cut short, or with more after it:
        // unreadable, not settled.
        let cut = &settled[..settled.len() - 1];
        let mut trailing = settled.clone();
        trailing.extend_from_slice(b" {}");
        for bad in [cut, &trailing[..]] {
            let mut other = SagaDriver::<Job>::new(definition());
            other.restore_begin(0);
            assert_eq!(
                other.restore_record(0, "s", Some(bad), |_| panic!("not decoded")),
                RestoredRecord::Unreadable
            );
            assert!(!other.is_settled(&SagaId::new("s")));
        }
    }

    #[test]
    fn only_the_records_of_completed_and_compensated_sagas_are_read_for_their_head() {
        let def = definition();
        let mut inst = def
            .start(SagaId::new("s"), Job::default(), T0)
            .unwrap()
            .instance;
        inst.updated_at = T0.saturating_add(Duration::from_secs(3));
        for (status, settled) in [
            (crate::SagaStatus::Running, false),
            (crate::SagaStatus::Compensating, false),
            (
                crate::SagaStatus::Parked {
                    reason: "stuck".into(),
                },
                false,
            ),
            (crate::SagaStatus::Completed, true),
            (crate::SagaStatus::Compensated, true),
        ] {
            inst.status = status;
            let bytes = encode_state(&inst).unwrap();
            assert_eq!(may_be_final(&bytes), settled, "{}", inst.status);
            let at = settled.then_some(inst.updated_at);
            assert_eq!(final_at("s", &bytes), at, "{}", inst.status);
            assert_eq!(final_at("t", &bytes), None, "another key");
        }
    }

    #[test]
    fn a_restore_hands_sagas_in_progress_and_parked_to_seen_and_reads_escaped_ids() {
        let mut d = driver();
        let mut out = Vec::new();
        let id = "quote\"d-\u{e9}";
        d.start(0, SagaId::new(id), Job::default(), T0, &mut out)
            .unwrap();
        let running = state_record(&out, id);
        assert!(
            std::str::from_utf8(&running)
                .unwrap()
                .contains(r#"quote\"d"#),
            "an escaped id"
        );
        let mut parked: SagaInstance<Job> = serde_json::from_slice(&running).unwrap();
        parked.status = crate::SagaStatus::Parked {
            reason: "stuck".into(),
        };
        let parked = serde_json::to_vec(&parked).unwrap();
        let mut settled: SagaInstance<Job> = serde_json::from_slice(&running).unwrap();
        settled.status = crate::SagaStatus::Compensated;
        settled.timers.clear();
        // Data that does not read: only the head can say it is settled.
        let mut settled = serde_json::to_value(&settled).unwrap();
        settled["data"] = serde_json::json!("not a job");
        let settled = serde_json::to_vec(&settled).unwrap();
        let mut fresh = SagaDriver::<Job>::new(definition());
        fresh.restore_begin(0);
        let mut seen = Vec::new();
        let mut feed = |d: &mut SagaDriver<Job>, value: &[u8]| {
            d.restore_record(0, id, Some(value), |i| seen.push(i.status.name()))
        };
        assert_eq!(feed(&mut fresh, &running), RestoredRecord::InProgress);
        assert_eq!(feed(&mut fresh, &parked), RestoredRecord::InProgress);
        assert_eq!(feed(&mut fresh, &settled), RestoredRecord::Settled);
        assert_eq!(seen, ["running", "parked"]);
        fresh.restore_end(0);
        assert!(fresh.is_settled(&SagaId::new(id)));
    }

    #[test]
    fn a_restore_fed_record_by_record_keeps_each_keys_latest_record() {
        let mut d = driver();
        let mut out = Vec::new();
        for id in ["a", "b", "c", "d"] {
            d.start(0, SagaId::new(id), Job::default(), T0, &mut out)
                .unwrap();
        }
        let state = |id: &str| state_record(&out, id);
        let mut settled: SagaInstance<Job> = serde_json::from_slice(&state("b")).unwrap();
        settled.status = crate::SagaStatus::Completed;
        let settled = serde_json::to_vec(&settled).unwrap();

        let mut fresh = driver();
        fresh.release(&[0]);
        fresh.restore_begin(0);
        let mut seen = 0;
        let mut feed = |d: &mut SagaDriver<Job>, key: &str, value: Option<&[u8]>| {
            d.restore_record(0, key, value, |_| seen += 1)
        };
        use RestoredRecord::{Deleted, InProgress, Settled, Unreadable};
        // a: written twice, the later wins; b: in progress, then settled;
        // c: deleted by a tombstone; d: readable, then unreadable.
        let answers = [
            feed(&mut fresh, "a", Some(&state("a"))),
            feed(&mut fresh, "b", Some(&state("b"))),
            feed(&mut fresh, "c", Some(&state("c"))),
            feed(&mut fresh, "d", Some(&state("d"))),
            feed(&mut fresh, "e", Some(b"{")),
            feed(&mut fresh, "a", Some(&state("a"))),
            feed(&mut fresh, "b", Some(&settled)),
            feed(&mut fresh, "c", None),
            feed(&mut fresh, "d", Some(b"not json")),
            feed(&mut fresh, "e", Some(&state("a")[..0])),
            feed(&mut fresh, "e", None),
            // f: a key holding another saga's state.
            feed(&mut fresh, "f", Some(&state("a"))),
        ];
        assert_eq!(
            answers,
            [
                InProgress, InProgress, InProgress, InProgress, Unreadable, InProgress, Settled,
                Deleted, Unreadable, Unreadable, Deleted, Unreadable
            ]
        );
        assert!(!fresh.owns(0), "not before the end");
        let report = fresh.restore_end(0);
        assert!(fresh.owns(0));
        assert_eq!(
            seen, 5,
            "the sagas in progress read; the settled one is not decoded"
        );
        assert_eq!((report.sagas, report.settled), (1, 1), "{report:?}");
        assert!(fresh.get(&SagaId::new("a")).is_some());
        assert!(fresh.get(&SagaId::new("b")).is_none() && fresh.is_settled(&SagaId::new("b")));
        assert!(fresh.get(&SagaId::new("c")).is_none() && !fresh.is_settled(&SagaId::new("c")));
        assert!(
            fresh.get(&SagaId::new("d")).is_none(),
            "its latest record is unreadable"
        );
        let corrupt: Vec<&str> = report.corrupt.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(corrupt, ["d", "f"], "e was deleted after it was unreadable");
        // Only a's timer is armed (b settled, c and d gone).
        assert_eq!(fresh.timers.len(), 1);
    }

    #[test]
    fn an_abandoned_record_by_record_restore_is_dropped_by_release() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("a"), Job::default(), T0, &mut out)
            .unwrap();
        let mut fresh = driver();
        fresh.release(&[0]);
        fresh.restore_begin(0);
        fresh.restore_record(0, "a", out[0].value.as_deref(), |_| {});
        fresh.release(&[0]);
        assert!(!fresh.owns(0));
        assert!(fresh.get(&SagaId::new("a")).is_none());
        assert_eq!(fresh.next_due(), None);
    }

    #[test]
    fn a_start_record_carries_its_trace_to_the_owner_which_starts_the_saga_in_it() {
        let parent =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let def = definition();
        let rec =
            start_record_traced(&def, &SagaId::new("j-1"), &Job::default(), Some(parent)).unwrap();
        // As a header (for the runtime) and in the request (for runtimes
        // without headers).
        assert_eq!(rec.traceparent, Some(parent));
        let value = rec.value.clone().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(json["trace"], parent.to_string());

        // The owner reads it without the header: the request's field.
        let mut d = driver();
        let mut out = Vec::new();
        d.on_record(&incoming(&value, Some(b"start")), T0, &mut out);
        let inst = d.get(&SagaId::new("j-1")).unwrap();
        let trace = inst.trace.unwrap();
        assert_eq!(trace.trace_id(), parent.trace_id());
        let command = out.iter().find(|r| r.topic == "svc").unwrap();
        assert_eq!(
            command.traceparent.map(|t| t.trace_id()),
            Some(parent.trace_id())
        );

        // With a header, the header wins.
        let other = TraceContext::root();
        let header = other.to_header();
        let mut d = driver();
        let mut out = Vec::new();
        let mut rec = incoming(&value, Some(b"start"));
        rec.traceparent = Some(&header);
        d.on_record(&rec, T0, &mut out);
        let inst = d.get(&SagaId::new("j-1")).unwrap();
        assert_eq!(inst.trace.unwrap().trace_id(), other.trace_id());

        // A start record from before traces: a new trace.
        let old = start_record(&def, &SagaId::new("j-1"), &Job::default()).unwrap();
        assert_eq!(old.traceparent, None);
        let mut d = driver();
        let mut out = Vec::new();
        d.on_record(
            &incoming(old.value.as_deref().unwrap(), Some(b"start")),
            T0,
            &mut out,
        );
        assert!(d.get(&SagaId::new("j-1")).unwrap().trace.is_some());
    }

    #[test]
    fn a_reply_from_a_span_of_the_trace_keeps_the_saga_in_its_trace() {
        let parent = TraceContext::root();
        let mut d = driver();
        let mut out = Vec::new();
        d.start_traced(
            0,
            SagaId::new("j-1"),
            Job::default(),
            Some(parent),
            T0,
            &mut out,
        )
        .unwrap();
        let reply = reply_to(&out, "ok");
        let mut env = Envelope::from_bytes(&reply).unwrap();
        let replier = parent.child();
        env.traceparent = Some(replier);
        let mut out = Vec::new();
        d.on_record(&incoming(&env.to_bytes(), None), T0, &mut out);
        let inst = d.get(&SagaId::new("j-1"));
        // One step: the saga completed; its state (and no further
        // message) was written, still in the trace.
        assert!(inst.is_none() || inst.unwrap().trace.is_some());
        let state = out.iter().find(|r| r.topic == "job.state").unwrap();
        let back = decode_state::<Job>("j-1", state.value.as_deref().unwrap()).unwrap();
        assert_eq!(back.trace.map(|t| t.trace_id()), Some(parent.trace_id()));
    }
}
