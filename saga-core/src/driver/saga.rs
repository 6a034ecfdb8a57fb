//! The saga driver: the instances of one saga type in the partitions a
//! runtime worker owns, their timers, and the undo log of the open batch.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::definition::{SagaData, SagaDefinition};
use crate::driver::metrics;
use crate::driver::record::{Incoming, Record, RecordKind};
use crate::engine::{Effect, Handled, Input, Operation, Transition};
use crate::error::SagaError;
use crate::ids::{MessageId, SagaId, Timestamp};
use crate::instance::{SagaInstance, TimerId};
use crate::message::{DeadLetter, Envelope};

/// The state topic of saga type `saga`: `<saga>.state`, compacted, keyed
/// by saga id, co-partitioned with the saga's reply topics.
pub fn state_topic(saga: &str) -> String {
    format!("{saga}.state")
}

/// An instance as stored in the state topic.
///
/// # Errors
/// [`SagaError::Encode`] if the saga data cannot be serialized (a map
/// with non-string keys, a failing `Serialize` impl).
pub fn encode_state<D: SagaData>(instance: &SagaInstance<D>) -> Result<Vec<u8>, SagaError> {
    serde_json::to_vec(instance).map_err(|source| SagaError::Encode {
        saga_id: instance.id.clone(),
        what: "saga instance".into(),
        source,
    })
}

/// An instance read back from the state topic.
///
/// # Errors
/// [`SagaError::CorruptState`] if the bytes are not an instance of this
/// saga's data type.
pub fn decode_state<D: SagaData>(key: &str, bytes: &[u8]) -> Result<SagaInstance<D>, SagaError> {
    serde_json::from_slice(bytes).map_err(|source| SagaError::CorruptState {
        saga_id: SagaId::new(key),
        source,
    })
}

/// An operator's request, as written to a saga's reply topic for the
/// worker that owns the saga.
#[derive(Serialize, Deserialize)]
struct OperatorRequest {
    saga_id: SagaId,
    operation: Operation,
}

/// The record that asks the owner of saga `id` to apply `operation`: on
/// the saga's reply channel, keyed by the saga id (so it reaches the
/// saga's partition, in order with its replies).
pub fn operator_record<D: SagaData>(
    def: &SagaDefinition<D>,
    id: &SagaId,
    operation: &Operation,
) -> Record {
    let request = OperatorRequest {
        saga_id: id.clone(),
        operation: operation.clone(),
    };
    // A struct of strings and plain enums always serializes.
    let value = serde_json::to_vec(&request).unwrap_or_default();
    Record::new(
        def.reply_channel(),
        id.as_str(),
        Some(value),
        RecordKind::Operator,
    )
}

#[derive(Clone)]
struct Owned<D> {
    partition: u32,
    instance: SagaInstance<D>,
}

/// How a partition's restore went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Restored {
    /// Instances installed.
    pub sagas: usize,
    /// Records that could not be read: (key, why). They are skipped.
    pub corrupt: Vec<(String, String)>,
}

/// Runs one saga type for a runtime worker, without I/O.
///
/// The worker owns some partitions of the saga's topics. For them the
/// driver keeps every instance in memory with an index of their timers,
/// turns each input (a reply, a due timer, a start, an operator request)
/// into [`Record`]s to write in the open batch, and remembers what the batch
/// changed so that [`SagaDriver::rolled_back`] can undo it when the batch's
/// transaction aborts. Errors never stop it: an input it cannot handle
/// becomes a dead letter on the saga's dead-letter channel.
///
/// The contract with the runtime around it (see the module docs):
/// [`restore`](SagaDriver::restore) a partition before feeding its records,
/// [`release`](SagaDriver::release) it when it goes, and end each batch with
/// [`committed`](SagaDriver::committed) or [`rolled_back`](SagaDriver::rolled_back).
pub struct SagaDriver<D> {
    def: SagaDefinition<D>,
    state_topic: String,
    owned: BTreeSet<u32>,
    sagas: HashMap<SagaId, Owned<D>>,
    timers: BTreeSet<(Timestamp, SagaId, TimerId)>,
    /// The value of each saga changed in the open batch before the batch.
    undo: HashMap<SagaId, Option<Owned<D>>>,
}

impl<D: SagaData> std::fmt::Debug for SagaDriver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaDriver")
            .field("saga", &self.def.name())
            .field("owned", &self.owned)
            .field("sagas", &self.sagas.len())
            .field("timers", &self.timers.len())
            .finish_non_exhaustive()
    }
}

impl<D: SagaData> SagaDriver<D> {
    /// A driver for `def`, owning no partition yet.
    pub fn new(def: SagaDefinition<D>) -> Self {
        Self {
            state_topic: state_topic(def.name()),
            def,
            owned: BTreeSet::new(),
            sagas: HashMap::new(),
            timers: BTreeSet::new(),
            undo: HashMap::new(),
        }
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
    /// from the state topic (key, bytes). Records that cannot be read are
    /// skipped and reported.
    pub fn restore(
        &mut self,
        partition: u32,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Restored {
        self.owned.insert(partition);
        let mut report = Restored::default();
        for (key, bytes) in records {
            match decode_state::<D>(&key, &bytes) {
                Ok(instance) => {
                    let id = instance.id.clone();
                    self.put(
                        &id,
                        Some(Owned {
                            partition,
                            instance,
                        }),
                    );
                    report.sagas += 1;
                }
                Err(e) => {
                    tracing::error!(saga = %self.def.name(), partition, key, error = %e, "unreadable saga state: skipped");
                    report.corrupt.push((key, e.to_string()));
                }
            }
        }
        tracing::debug!(saga = %self.def.name(), partition, sagas = report.sagas, "partition restored");
        report
    }

    /// Gives up `partitions`: their sagas leave memory.
    pub fn release(&mut self, partitions: &[u32]) {
        let gone: Vec<SagaId> = self
            .sagas
            .iter()
            .filter(|(_, o)| partitions.contains(&o.partition))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.undo.remove(&id);
            self.put(&id, None);
        }
        for p in partitions {
            self.owned.remove(p);
        }
    }

    /// The instance `id`, as the open batch left it.
    pub fn get(&self, id: &SagaId) -> Option<&SagaInstance<D>> {
        self.sagas.get(id).map(|o| &o.instance)
    }

    /// Every instance in the owned partitions, as the open batch left them.
    pub fn instances(&self) -> impl Iterator<Item = &SagaInstance<D>> + '_ {
        self.sagas.values().map(|o| &o.instance)
    }

    /// Starts saga `id` with `data` in `partition` (the partition its id
    /// maps to): writes its state and first messages. The driver keeps the
    /// instance if it owns `partition`; otherwise the owner learns of it
    /// from the state written, which `announce` also writes on every reply
    /// channel (for runtimes where any instance may start any saga: the
    /// owner sees it there before any reply).
    ///
    /// # Errors
    /// [`SagaError::AlreadyExists`] if the driver holds `id`;
    /// [`SagaError::Encode`] if its data cannot be serialized (nothing is
    /// written then).
    pub fn start(
        &mut self,
        partition: u32,
        id: SagaId,
        data: D,
        now: Timestamp,
        announce: bool,
        out: &mut Vec<Record>,
    ) -> Result<(), SagaError> {
        if self.sagas.contains_key(&id) {
            return Err(SagaError::AlreadyExists { saga_id: id });
        }
        let span = tracing::info_span!("saga.start", saga_id = %id, saga = %self.def.name(), step = "", attempt = 0u32);
        let _g = span.enter();
        let t = self.def.start(id.clone(), data, now)?;
        let state = encode_state(&t.instance)?;
        if announce {
            for channel in self.def.reply_channels() {
                out.push(Record::new(
                    channel,
                    id.as_str(),
                    Some(state.clone()),
                    RecordKind::SagaState,
                ));
            }
        }
        self.write(&t, state, out);
        metrics::transition(None, &t);
        if self.owns(partition) {
            self.change(
                &id,
                Owned {
                    partition,
                    instance: t.instance,
                },
            );
        }
        Ok(())
    }

    /// Applies `operation` to saga `id` (the worker owns it).
    ///
    /// # Errors
    /// [`SagaError::UnknownSaga`] if the driver does not hold `id`,
    /// [`SagaError::InvalidAction`] if the saga is not parked,
    /// [`SagaError::Encode`] if its data cannot be serialized.
    pub fn operate(
        &mut self,
        id: &SagaId,
        operation: Operation,
        now: Timestamp,
        out: &mut Vec<Record>,
    ) -> Result<(), SagaError> {
        let Some(owned) = self.sagas.get(id) else {
            return Err(SagaError::UnknownSaga {
                saga_id: id.clone(),
                message_id: MessageId::new(format!("{id}/operator/{}", operation.action)),
            });
        };
        let partition = owned.partition;
        let t = self
            .def
            .handle(&owned.instance, Input::Operator(operation), now)?;
        self.apply(id, partition, t, out)
    }

    /// Handles one record read from a reply topic of a partition the worker
    /// owns: a reply, a saga's state announced by a start, an operator's
    /// request. What cannot be handled (not an envelope, a reply to an
    /// unknown saga, a payload of the wrong type, an unknown record kind)
    /// is dead-lettered with the reason.
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
            Ok(RecordKind::Message) => match Envelope::from_bytes(value) {
                Ok(env) => self.on_reply(rec, env, now, out),
                Err(e) => self.poison(rec, format!("not an envelope: {e}"), now, out),
            },
            Ok(RecordKind::SagaState) => {
                let key = rec
                    .key
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                match decode_state::<D>(&key, value) {
                    Ok(instance) => self.adopt(rec.partition, instance),
                    Err(e) => self.poison(rec, e.to_string(), now, out),
                }
            }
            Ok(RecordKind::Operator) => match serde_json::from_slice::<OperatorRequest>(value) {
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

    /// When the next timer is due.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.timers.iter().next().map(|(at, _, _)| *at)
    }

    /// Fires the earliest timer due at `now`; `false` if none is due.
    pub fn on_due(&mut self, now: Timestamp, out: &mut Vec<Record>) -> bool {
        let Some((at, id, timer)) = self.timers.iter().next().cloned() else {
            return false;
        };
        if at > now {
            return false;
        }
        self.timers.remove(&(at, id.clone(), timer.clone()));
        let Some(owned) = self.sagas.get(&id) else {
            return true;
        };
        let partition = owned.partition;
        match self
            .def
            .handle(&owned.instance, Input::Timer(timer.clone()), now)
        {
            Ok(t) => {
                if let Err(e) = self.apply(&id, partition, t, out) {
                    let original = self.stand_in(&id, &format!("timer `{timer}`"), now);
                    self.dead_letter(original, "timer", e.to_string(), now, out);
                }
            }
            Err(e) => tracing::error!(saga_id = %id, %timer, error = %e, "timer rejected"),
        }
        true
    }

    /// The open batch committed: its changes are durable. Returns the ids
    /// of the sagas it changed.
    pub fn committed(&mut self) -> Vec<SagaId> {
        self.undo.drain().map(|(id, _)| id).collect()
    }

    /// The open batch aborted: every saga it changed goes back to what it
    /// was before, timers included.
    pub fn rolled_back(&mut self) {
        for (id, old) in std::mem::take(&mut self.undo) {
            self.put(&id, old);
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

    /// Like `put`, remembering the value before the batch for a rollback.
    fn change(&mut self, id: &SagaId, new: Owned<D>) {
        if !self.undo.contains_key(id) {
            let old = self.sagas.get(id).cloned();
            self.undo.insert(id.clone(), old);
        }
        self.put(id, Some(new));
    }

    /// A saga's state seen on a reply topic: a start made by another
    /// worker (or a later copy of one this worker has).
    fn adopt(&mut self, partition: u32, instance: SagaInstance<D>) {
        let newer = self
            .sagas
            .get(&instance.id)
            .is_none_or(|cur| instance.version > cur.instance.version);
        if newer {
            let id = instance.id.clone();
            self.change(
                &id,
                Owned {
                    partition,
                    instance,
                },
            );
        }
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
            let e = SagaError::UnknownSaga {
                saga_id: id,
                message_id: env.id.clone(),
            };
            return self.dead_letter(env, rec.topic, e.to_string(), now, out);
        };
        let partition = owned.partition;
        let inst = &owned.instance;
        let (step, attempt) = match &inst.awaiting {
            Some(a) => (self.def.steps()[a.step].name().to_owned(), a.attempt),
            None => (inst.current_step().unwrap_or("").to_owned(), 0),
        };
        let span = tracing::info_span!("saga.reply", saga_id = %id, saga = %self.def.name(), step = %step, attempt);
        let _g = span.enter();
        let latency = match &inst.awaiting {
            Some(a) if env.step == a.command.step => Some((
                a.command.step.clone().unwrap_or_default(),
                now.saturating_since(a.command.timestamp),
            )),
            _ => None,
        };
        match self.def.handle(inst, Input::Reply(env.clone()), now) {
            Ok(t) => {
                if t.handled == Handled::Applied {
                    if let Some((step, d)) = latency {
                        metrics::step_latency(self.def.name(), &step, d.as_secs_f64());
                    }
                }
                if let Err(e) = self.apply(&id, partition, t, out) {
                    self.dead_letter(env, rec.topic, e.to_string(), now, out);
                }
            }
            Err(e) => self.dead_letter(env, rec.topic, e.to_string(), now, out),
        }
    }

    /// Writes a transition and keeps its instance; an ignored input
    /// changes nothing.
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
        let state = encode_state(&t.instance)?;
        let before = self.sagas.get(id).map(|o| o.instance.status.clone());
        metrics::transition(before.as_ref(), &t);
        self.write(&t, state, out);
        self.change(
            id,
            Owned {
                partition,
                instance: t.instance,
            },
        );
        Ok(())
    }

    /// The records of one transition: the new state, then the effects.
    fn write(&self, t: &Transition<D>, state: Vec<u8>, out: &mut Vec<Record>) {
        out.push(Record::new(
            &self.state_topic,
            t.instance.id.as_str(),
            Some(state),
            RecordKind::SagaState,
        ));
        for effect in &t.effects {
            match effect {
                Effect::Send(env) => out.push(Record::message(env)),
                Effect::DeadLetter(d) => out.push(Record::message(&d.to_envelope())),
                _ => {}
            }
        }
    }

    fn poison(&self, rec: &Incoming<'_>, reason: String, now: Timestamp, out: &mut Vec<Record>) {
        let original = rec.as_poison(self.def.name(), now);
        self.dead_letter(original, rec.topic, reason, now, out);
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
        out: &mut Vec<Record>,
    ) {
        let saga = self.def.name();
        tracing::warn!(saga, saga_id = %original.saga_id, %reason, "dead-lettering an input the saga cannot handle");
        metrics::dead_letter(saga);
        let dead = DeadLetter::new(
            self.def.dead_letter_channel(),
            saga,
            original,
            now,
            0,
            format!("unprocessable input from `{from}`"),
            reason,
        );
        out.push(Record::message(&dead.to_envelope()));
    }
}

#[cfg(test)]
mod tests {
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
    }

    fn refuse<S: serde::Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        if *v {
            Err(serde::ser::Error::custom("this data cannot be stored"))
        } else {
            s.serialize_bool(false)
        }
    }

    const T0: Timestamp = Timestamp::from_millis(1_000_000);

    fn driver() -> SagaDriver<Job> {
        let def = SagaDefinition::<Job>::builder("job")
            .step(
                Step::remote("call", "svc")
                    .command(|_: &Job| "CALL")
                    .retry(RetryPolicy::fixed(Duration::from_secs(1)).with_max_attempts(2))
                    .timeout(Duration::from_secs(5)),
            )
            .build()
            .unwrap();
        let mut d = SagaDriver::new(def);
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
        }
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

    #[test]
    fn a_start_writes_the_state_then_the_command_and_keeps_the_saga() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, false, &mut out)
            .unwrap();
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
        assert_eq!(d.committed(), vec![SagaId::new("j-1")]);
        let again = d.start(0, SagaId::new("j-1"), Job::default(), T0, false, &mut out);
        assert!(matches!(again, Err(SagaError::AlreadyExists { .. })));
    }

    #[test]
    fn a_start_in_a_partition_owned_elsewhere_is_announced_not_kept() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(1, SagaId::new("j-2"), Job::default(), T0, true, &mut out)
            .unwrap();
        assert!(d.get(&SagaId::new("j-2")).is_none());
        let announced: Vec<&Record> = out
            .iter()
            .filter(|r| r.kind == RecordKind::SagaState && r.topic == "job.replies")
            .collect();
        assert_eq!(announced.len(), 1, "on the reply channel, for the owner");
        // The owner adopts it from there.
        let mut owner = driver();
        let value = announced[0].value.clone().unwrap();
        owner.on_record(&incoming(&value, Some(b"state")), T0, &mut out);
        assert!(owner.get(&SagaId::new("j-2")).is_some());
    }

    #[test]
    fn data_that_cannot_be_stored_is_an_error_and_nothing_is_written() {
        let mut d = driver();
        let mut out = Vec::new();
        let err = d
            .start(
                0,
                SagaId::new("j-3"),
                Job { poisoned: true },
                T0,
                false,
                &mut out,
            )
            .unwrap_err();
        assert!(matches!(err, SagaError::Encode { .. }), "{err}");
        assert!(out.is_empty());
        assert!(d.get(&SagaId::new("j-3")).is_none());
    }

    #[test]
    fn timers_fire_at_their_time_and_an_abort_rearms_them() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, false, &mut out)
            .unwrap();
        d.committed();
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
    fn inputs_that_cannot_be_handled_become_dead_letters() {
        let mut d = driver();
        let mut out = Vec::new();
        d.on_record(&incoming(b"not json", None), T0, &mut out);
        d.on_record(&incoming(b"{}", Some(b"bogus")), T0, &mut out);
        d.on_record(&incoming(b"garbage", Some(b"state")), T0, &mut out);
        d.on_record(&incoming(b"garbage", Some(b"operator")), T0, &mut out);
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
        assert_eq!(dead.len(), 5, "{errors:?}");
        assert!(errors[0].starts_with("not an envelope"), "{errors:?}");
        assert_eq!(errors[1], "unknown record kind `bogus`");
        assert!(errors[2].contains("is corrupt"), "{errors:?}");
        assert!(
            errors[3].starts_with("not an operator request"),
            "{errors:?}"
        );
        assert!(errors[4].contains("no saga instance `ghost`"), "{errors:?}");
        assert_eq!(dead[0].original.id.as_str(), "job.replies/0/7");
    }

    #[test]
    fn releasing_a_partition_forgets_its_sagas_and_timers() {
        let mut d = driver();
        let mut out = Vec::new();
        d.start(0, SagaId::new("j-1"), Job::default(), T0, false, &mut out)
            .unwrap();
        d.committed();
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
}
