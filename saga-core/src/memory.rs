//! The embedded in-memory runtime: the default for examples and tests.
//!
//! A [`MemoryBackend`] holds what survives a "crash": append-only channels
//! split into partitions (like Kafka topics), consumer-group offsets, the
//! saga store (instances as JSON, timers included) and participant ledgers.
//! An [`InMemoryRuntime`] runs workers over it: one per partition of each
//! saga, participant and projection, so different sagas run in parallel
//! while each saga's messages stay in order.
//!
//! Each message is handled in one critical section that reads it, runs the
//! pure core, stores the new instance, appends the effects and commits the
//! offset: the in-memory equivalent of a Kafka transaction. Dropping the
//! runtime aborts its workers between two such sections; a new runtime over
//! the same backend resumes every saga, timers included.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::definition::{SagaData, SagaDefinition};
use crate::engine::{Effect, Handled, Input, OperatorAction, Transition};
use crate::error::SagaError;
use crate::ids::{SagaId, Timestamp};
use crate::instance::{SagaInstance, Timer, TimerId};
use crate::message::{DeadLetter, Envelope};
use crate::observe;
use crate::participant::{
    Delivery, DynParticipant, Participant, ParticipantLedger, ParticipantPolicy,
};

/// Default number of partitions per channel.
pub const DEFAULT_PARTITIONS: usize = 3;

/// Virtual-time-friendly wall clock: wall time at creation plus the tokio
/// clock's elapsed time since.
///
/// Under `tokio::time::pause()` it advances only with tokio's virtual time,
/// so tests of backoffs and timeouts never sleep for real. Share one clock
/// (clone it) across runtime restarts so persisted timers keep their meaning.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin_wall: Timestamp,
    origin: tokio::time::Instant,
}

impl Clock {
    /// Starts at the system's wall time.
    pub fn system() -> Self {
        Self::starting_at(Timestamp::now())
    }

    /// Starts at `wall` (e.g. a fixed time in tests).
    pub fn starting_at(wall: Timestamp) -> Self {
        Self {
            origin_wall: wall,
            origin: tokio::time::Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.origin_wall.saturating_add(self.origin.elapsed())
    }

    /// The tokio instant at which wall time `at` is reached.
    pub fn instant_at(&self, at: Timestamp) -> tokio::time::Instant {
        self.origin + at.saturating_since(self.origin_wall)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Vec<Vec<Envelope>>>,
    offsets: HashMap<(String, String, usize), usize>,
    sagas: HashMap<String, HashMap<SagaId, Value>>,
    timers: HashMap<String, BTreeSet<(Timestamp, SagaId, TimerId)>>,
    ledgers: HashMap<String, ParticipantLedger>,
    participant_state: HashMap<(String, usize), Value>,
    duplicating: HashSet<String>,
}

struct Shared {
    partitions: usize,
    state: Mutex<State>,
    notify: Notify,
}

/// What survives a crash of the in-memory runtime: channels, offsets, saga
/// store, participant ledgers. Cheap to clone (shared).
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("partitions", &self.shared.partitions)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn partition_of(key: &str, partitions: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % partitions as u64) as usize
}

impl State {
    fn append(&mut self, partitions: usize, env: Envelope) {
        let p = partition_of(env.key(), partitions);
        let times = if self.duplicating.contains(&env.channel) {
            2
        } else {
            1
        };
        let topic = self
            .topics
            .entry(env.channel.clone())
            .or_insert_with(|| vec![Vec::new(); partitions]);
        for _ in 1..times {
            topic[p].push(env.clone());
        }
        topic[p].push(env);
    }

    /// The next unconsumed message for `group` on any of `channels` at partition `p`.
    fn next(
        &self,
        group: &str,
        channels: &[String],
        p: usize,
    ) -> Option<(String, usize, Envelope)> {
        channels.iter().find_map(|ch| {
            let log = self.topics.get(ch)?.get(p)?;
            let off = self
                .offsets
                .get(&(group.to_owned(), ch.clone(), p))
                .copied()
                .unwrap_or(0);
            log.get(off).map(|e| (ch.clone(), off, e.clone()))
        })
    }

    fn commit(&mut self, group: &str, channel: &str, p: usize, offset: usize) {
        self.offsets
            .insert((group.to_owned(), channel.to_owned(), p), offset + 1);
    }

    fn save_saga(&mut self, saga: &str, id: &SagaId, json: Value, old: &[Timer], new: &[Timer]) {
        self.sagas
            .entry(saga.to_owned())
            .or_default()
            .insert(id.clone(), json);
        let index = self.timers.entry(saga.to_owned()).or_default();
        for t in old {
            index.remove(&(t.fire_at, id.clone(), t.id.clone()));
        }
        for t in new {
            index.insert((t.fire_at, id.clone(), t.id.clone()));
        }
    }
}

impl MemoryBackend {
    /// A backend with [`DEFAULT_PARTITIONS`] partitions per channel.
    pub fn new() -> Self {
        Self::with_partitions(DEFAULT_PARTITIONS)
    }

    /// A backend with `partitions` partitions per channel (at least 1).
    pub fn with_partitions(partitions: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                partitions: partitions.max(1),
                state: Mutex::new(State::default()),
                notify: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in user code while locked leaves the data consistent
        // (every section writes at its end), so a poisoned lock is usable.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Partitions per channel.
    pub fn partitions(&self) -> usize {
        self.shared.partitions
    }

    /// The partition a key maps to.
    pub fn partition_for(&self, key: &str) -> usize {
        partition_of(key, self.shared.partitions)
    }

    /// Appends a message to its channel (partitioned by its key).
    pub fn publish(&self, env: Envelope) {
        self.lock().append(self.shared.partitions, env);
        self.shared.notify.notify_waiters();
    }

    /// Every message ever written to `channel`, partition by partition, each
    /// in order.
    pub fn messages(&self, channel: &str) -> Vec<Envelope> {
        self.lock()
            .topics
            .get(channel)
            .map(|ps| ps.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// The dead letters on `channel`.
    pub fn dead_letters(&self, channel: &str) -> Vec<DeadLetter> {
        self.messages(channel)
            .iter()
            .filter_map(|e| DeadLetter::from_envelope(e).ok())
            .collect()
    }

    /// Messages on `channel` not yet consumed by `group` (consumer lag).
    pub fn lag(&self, group: &str, channel: &str) -> u64 {
        let st = self.lock();
        let Some(ps) = st.topics.get(channel) else {
            return 0;
        };
        ps.iter()
            .enumerate()
            .map(|(p, log)| {
                let off = st
                    .offsets
                    .get(&(group.to_owned(), channel.to_owned(), p))
                    .copied()
                    .unwrap_or(0);
                log.len().saturating_sub(off) as u64
            })
            .sum()
    }

    /// The stored JSON of saga `id` of type `saga`.
    pub fn saga_json(&self, saga: &str, id: &SagaId) -> Option<Value> {
        self.lock().sagas.get(saga)?.get(id).cloned()
    }

    /// The ids of every stored saga of type `saga`.
    pub fn saga_ids(&self, saga: &str) -> Vec<SagaId> {
        let mut ids: Vec<SagaId> = self
            .lock()
            .sagas
            .get(saga)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// The ledger of participant `name` (handled commands and pending retries).
    pub fn ledger(&self, name: &str) -> ParticipantLedger {
        self.lock().ledgers.get(name).cloned().unwrap_or_default()
    }

    /// Fault injection: while on, every message written to `channel` is
    /// delivered twice (as after a redelivery).
    pub fn duplicate_deliveries(&self, channel: &str, on: bool) {
        let mut st = self.lock();
        if on {
            st.duplicating.insert(channel.to_owned());
        } else {
            st.duplicating.remove(channel);
        }
    }

    /// Rebuilds the timer index of saga type `saga` from the stored
    /// instances (what a restarted runtime does).
    fn reindex_timers(&self, saga: &str) {
        let mut st = self.lock();
        let mut index = BTreeSet::new();
        if let Some(sagas) = st.sagas.get(saga) {
            for (id, json) in sagas {
                let timers: Vec<Timer> = json
                    .get("timers")
                    .cloned()
                    .and_then(|t| serde_json::from_value(t).ok())
                    .unwrap_or_default();
                for t in timers {
                    index.insert((t.fire_at, id.clone(), t.id));
                }
            }
        }
        st.timers.insert(saga.to_owned(), index);
    }

    /// Stores a transition and appends its effects, in the caller's critical section.
    fn apply<D: SagaData>(
        &self,
        st: &mut State,
        before: Option<&SagaInstance<D>>,
        t: &Transition<D>,
    ) -> Result<(), SagaError> {
        let json = serde_json::to_value(&t.instance).map_err(|source| SagaError::Encode {
            saga_id: t.instance.id.clone(),
            what: "saga instance".into(),
            source,
        })?;
        let old = before.map(|b| b.timers.as_slice()).unwrap_or(&[]);
        st.save_saga(
            &t.instance.saga,
            &t.instance.id,
            json,
            old,
            &t.instance.timers,
        );
        for effect in &t.effects {
            match effect {
                Effect::Send(env) => st.append(self.shared.partitions, env.clone()),
                Effect::DeadLetter(d) => st.append(self.shared.partitions, d.to_envelope()),
                Effect::ScheduleTimer(_) | Effect::CancelTimer(_) => {}
            }
        }
        observe::record_transition(before.map(|b| &b.status), t);
        Ok(())
    }

    fn load<D: SagaData>(
        st: &State,
        saga: &str,
        id: &SagaId,
    ) -> Result<Option<SagaInstance<D>>, SagaError> {
        match st.sagas.get(saga).and_then(|m| m.get(id)) {
            None => Ok(None),
            Some(json) => serde_json::from_value(json.clone())
                .map(Some)
                .map_err(|source| SagaError::CorruptState {
                    saga_id: id.clone(),
                    source,
                }),
        }
    }
}

/// A handle on one saga type running on an [`InMemoryRuntime`]: start
/// instances, read them, act on parked ones. Cheap to clone.
pub struct SagaHandle<D> {
    def: SagaDefinition<D>,
    backend: MemoryBackend,
    clock: Clock,
}

impl<D> Clone for SagaHandle<D> {
    fn clone(&self) -> Self {
        Self {
            def: self.def.clone(),
            backend: self.backend.clone(),
            clock: self.clock,
        }
    }
}

impl<D: SagaData> SagaHandle<D> {
    /// The saga definition.
    pub fn definition(&self) -> &SagaDefinition<D> {
        &self.def
    }

    /// Starts saga `id` with `data`: stores the instance and sends its first
    /// commands atomically. Fails with [`SagaError::AlreadyExists`] if `id`
    /// was started before.
    pub fn start(&self, id: impl Into<SagaId>, data: D) -> Result<SagaId, SagaError> {
        let id = id.into();
        let mut st = self.backend.lock();
        if st
            .sagas
            .get(self.def.name())
            .is_some_and(|m| m.contains_key(&id))
        {
            return Err(SagaError::AlreadyExists { saga_id: id });
        }
        let t = self.def.start(id.clone(), data, self.clock.now())?;
        self.backend.apply(&mut st, None, &t)?;
        drop(st);
        self.backend.shared.notify.notify_waiters();
        Ok(id)
    }

    /// The instance `id`, if it exists.
    pub fn get(&self, id: &SagaId) -> Result<Option<SagaInstance<D>>, SagaError> {
        MemoryBackend::load(&self.backend.lock(), self.def.name(), id)
    }

    /// Every instance of this saga type.
    pub fn list(&self) -> Result<Vec<SagaInstance<D>>, SagaError> {
        let st = self.backend.lock();
        let mut ids: Vec<&SagaId> = st
            .sagas
            .get(self.def.name())
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| MemoryBackend::load(&st, self.def.name(), id).transpose())
            .collect()
    }

    /// Hands a reply to its saga now, as a worker would, but returns what
    /// goes wrong as a typed error ([`SagaError::UnknownSaga`],
    /// [`SagaError::Decode`], …) instead of dead-lettering the message.
    pub fn deliver(&self, reply: Envelope) -> Result<Handled, SagaError> {
        let mut st = self.backend.lock();
        let id = reply.saga_id.clone();
        let inst: SagaInstance<D> =
            MemoryBackend::load(&st, self.def.name(), &id)?.ok_or_else(|| {
                SagaError::UnknownSaga {
                    saga_id: id.clone(),
                    message_id: reply.id.clone(),
                }
            })?;
        let t = self
            .def
            .handle(&inst, Input::Reply(reply), self.clock.now())?;
        if t.handled == Handled::Applied {
            self.backend.apply(&mut st, Some(&inst), &t)?;
        }
        drop(st);
        self.backend.shared.notify.notify_waiters();
        Ok(t.handled)
    }

    /// Applies an operator action to parked saga `id`.
    pub fn operate(&self, id: &SagaId, action: OperatorAction) -> Result<(), SagaError> {
        let mut st = self.backend.lock();
        let inst: SagaInstance<D> =
            MemoryBackend::load(&st, self.def.name(), id)?.ok_or_else(|| {
                SagaError::UnknownSaga {
                    saga_id: id.clone(),
                    message_id: crate::MessageId::new(format!("operator/{action:?}")),
                }
            })?;
        let t = self
            .def
            .handle(&inst, Input::Operator(action), self.clock.now())?;
        self.backend.apply(&mut st, Some(&inst), &t)?;
        drop(st);
        self.backend.shared.notify.notify_waiters();
        Ok(())
    }

    /// Waits until saga `id` is completed, compensated or parked, for at
    /// most `timeout` (of tokio time: virtual under a paused clock).
    pub async fn wait_settled(
        &self,
        id: &SagaId,
        timeout: Duration,
    ) -> Result<SagaInstance<D>, SagaError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.backend.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(inst) = self.get(id)? {
                if inst.status.is_settled() {
                    return Ok(inst);
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(SagaError::WaitTimeout { saga_id: id.clone() });
                }
            }
        }
    }
}

/// Runs sagas, participants and projections over a [`MemoryBackend`].
///
/// Must be created and used inside a tokio runtime. Dropping it stops its
/// workers at once (a simulated crash); [`InMemoryRuntime::shutdown`] stops
/// them and waits.
pub struct InMemoryRuntime {
    backend: MemoryBackend,
    clock: Clock,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for InMemoryRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryRuntime")
            .field("backend", &self.backend)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl InMemoryRuntime {
    /// A runtime over `backend` with the system clock.
    pub fn new(backend: MemoryBackend) -> Self {
        Self::with_clock(backend, Clock::system())
    }

    /// A runtime over `backend` with `clock` (share it across restarts).
    pub fn with_clock(backend: MemoryBackend, clock: Clock) -> Self {
        Self {
            backend,
            clock,
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &MemoryBackend {
        &self.backend
    }

    /// The clock.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let task = tokio::spawn(fut);
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// Runs saga type `def`: one worker per partition consumes its reply
    /// channels and fires its timers (re-armed from the store). Returns the
    /// handle to start and inspect instances.
    pub fn saga<D: SagaData>(&self, def: SagaDefinition<D>) -> SagaHandle<D> {
        self.backend.reindex_timers(def.name());
        for p in 0..self.backend.partitions() {
            let worker = SagaWorker {
                def: def.clone(),
                backend: self.backend.clone(),
                clock: self.clock,
                channels: def.reply_channels(),
                partition: p,
            };
            let stop = self.stop.subscribe();
            self.spawn(worker.run(stop));
        }
        SagaHandle {
            def,
            backend: self.backend.clone(),
            clock: self.clock,
        }
    }

    /// Runs `participant` on `channel` under `policy`: one worker per
    /// partition, with deduplication, retries, timeouts and dead letters.
    pub fn participant<P: Participant>(
        &self,
        channel: &str,
        policy: ParticipantPolicy,
        participant: P,
    ) {
        let participant: Arc<dyn DynParticipant> = Arc::new(participant);
        for p in 0..self.backend.partitions() {
            let worker = ParticipantWorker {
                participant: participant.clone(),
                policy: policy.clone(),
                backend: self.backend.clone(),
                clock: self.clock,
                channel: channel.to_owned(),
                partition: p,
            };
            // The partition's state as last persisted (a new runtime after a
            // crash resumes from it).
            let snapshot = self
                .backend
                .lock()
                .participant_state
                .get(&(policy.name.clone(), p))
                .cloned();
            participant.restore(p as u32, snapshot);
            let stop = self.stop.subscribe();
            self.spawn(worker.run(stop));
        }
    }

    /// The last persisted snapshot ([`Participant::snapshot`]) of partition
    /// `partition` of participant `name`.
    pub fn participant_state(&self, name: &str, partition: usize) -> Option<Value> {
        self.backend
            .lock()
            .participant_state
            .get(&(name.to_owned(), partition))
            .cloned()
    }

    /// Runs a projection: `handler` sees every message on `channels`, in
    /// order per partition, as consumer group `group`. Offsets are
    /// committed after the handler returns, so after a crash a message may
    /// be seen again: deduplicate by [`Envelope::id`] if that matters.
    pub fn projection<F>(&self, group: &str, channels: &[&str], handler: F)
    where
        F: FnMut(&Envelope) + Send + 'static,
    {
        let handler = Arc::new(Mutex::new(handler));
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        for p in 0..self.backend.partitions() {
            let backend = self.backend.clone();
            let handler = handler.clone();
            let channels = channels.clone();
            let group = group.to_owned();
            let mut stop = self.stop.subscribe();
            self.spawn(async move {
                loop {
                    let notified = backend.shared.notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let next = backend.lock().next(&group, &channels, p);
                    if let Some((ch, off, env)) = next {
                        (handler.lock().unwrap_or_else(|e| e.into_inner()))(&env);
                        backend.lock().commit(&group, &ch, p, off);
                        continue;
                    }
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
    }

    /// Stops every worker and waits for them to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl Drop for InMemoryRuntime {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

struct SagaWorker<D> {
    def: SagaDefinition<D>,
    backend: MemoryBackend,
    clock: Clock,
    channels: Vec<String>,
    partition: usize,
}

impl<D: SagaData> SagaWorker<D> {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            let notified = self.backend.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (worked, next_timer) = self.step();
            if worked {
                self.backend.shared.notify.notify_waiters();
                continue;
            }
            let sleep = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(self.clock.instant_at(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = sleep => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Handles one due timer or one message. Returns whether it did, and
    /// when the next timer of this partition is due.
    fn step(&self) -> (bool, Option<Timestamp>) {
        let now = self.clock.now();
        let saga = self.def.name();
        let mut st = self.backend.lock();
        let parts = self.backend.partitions();
        let mine = |id: &SagaId| partition_of(id.as_str(), parts) == self.partition;
        let mut next_timer = None;
        let mut due = None;
        if let Some(index) = st.timers.get(saga) {
            for (at, id, tid) in index.iter() {
                if !mine(id) {
                    continue;
                }
                if *at <= now {
                    due = Some((id.clone(), tid.clone()));
                } else {
                    next_timer = Some(*at);
                }
                break;
            }
        }
        if let Some((id, tid)) = due {
            if let Some(index) = st.timers.get_mut(saga) {
                index.retain(|(_, i, t)| !(i == &id && t == &tid));
            }
            self.handle(&mut st, &id, Input::Timer(tid), now, None);
            return (true, None);
        }
        if let Some((ch, off, env)) = st.next(saga, &self.channels, self.partition) {
            let id = env.saga_id.clone();
            self.handle(&mut st, &id, Input::Reply(env), now, Some(&ch));
            st.commit(saga, &ch, self.partition, off);
            return (true, None);
        }
        (false, next_timer)
    }

    fn handle(
        &self,
        st: &mut State,
        id: &SagaId,
        input: Input,
        now: Timestamp,
        channel: Option<&str>,
    ) {
        let saga = self.def.name();
        let poison = |st: &mut State, reason: String, input: &Input| {
            tracing::warn!(saga, saga_id = %id, %reason, "dead-lettering an input the saga cannot handle");
            if let Input::Reply(env) = input {
                let dead = DeadLetter {
                    id: crate::MessageId::new(format!("{}/dead-letter", env.id)),
                    channel: self.def.dead_letter_channel().to_owned(),
                    source: saga.to_owned(),
                    original: env.clone(),
                    failure_timestamp: now,
                    retry_count: 0,
                    reason: format!("unprocessable message from `{}`", channel.unwrap_or("")),
                    last_error: reason,
                };
                metrics::counter!("saga_dead_letters_total", "source" => saga.to_owned())
                    .increment(1);
                st.append(self.backend.partitions(), dead.to_envelope());
            }
        };
        let inst: SagaInstance<D> = match MemoryBackend::load(st, saga, id) {
            Ok(Some(i)) => i,
            Ok(None) => {
                let err = match &input {
                    Input::Reply(env) => SagaError::UnknownSaga {
                        saga_id: id.clone(),
                        message_id: env.id.clone(),
                    },
                    _ => return,
                };
                return poison(st, err.to_string(), &input);
            }
            Err(e) => return poison(st, e.to_string(), &input),
        };
        let latency = match (&input, &inst.awaiting) {
            (Input::Reply(env), Some(a))
                if env.step.as_deref() == Some(a.command.step.as_deref().unwrap_or("")) =>
            {
                Some((
                    a.command.step.clone().unwrap_or_default(),
                    now.saturating_since(a.command.timestamp),
                ))
            }
            _ => None,
        };
        match self.def.handle(&inst, input.clone(), now) {
            Ok(t) => {
                if let Handled::Ignored(why) = t.handled {
                    tracing::debug!(saga, saga_id = %id, why, "input ignored");
                    return;
                }
                if let Some((step, d)) = latency {
                    observe::record_step_latency(saga, &step, d.as_secs_f64());
                }
                if let Err(e) = self.backend.apply(st, Some(&inst), &t) {
                    poison(st, e.to_string(), &input);
                }
            }
            Err(e) => poison(st, e.to_string(), &input),
        }
    }
}

struct ParticipantWorker {
    participant: Arc<dyn DynParticipant>,
    policy: ParticipantPolicy,
    backend: MemoryBackend,
    clock: Clock,
    channel: String,
    partition: usize,
}

enum Job {
    Retry(Envelope, u32),
    Fresh(Envelope, u32, usize),
    Idle(Option<Timestamp>),
}

impl ParticipantWorker {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let channels = [self.channel.clone()];
        let group = self.policy.name.clone();
        loop {
            let notified = self.backend.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.clock.now();
            let job = self.next_job(&group, &channels, now);
            let (command, attempt, offset) = match job {
                Job::Retry(c, a) => (c, a, None),
                Job::Fresh(c, a, off) => (c, a, Some(off)),
                Job::Idle(next) => {
                    let sleep = async {
                        match next {
                            Some(at) => tokio::time::sleep_until(self.clock.instant_at(at)).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = sleep => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
            };
            let started = tokio::time::Instant::now();
            let result = self
                .participant
                .attempt(
                    &command,
                    attempt,
                    self.partition as u32,
                    self.policy.timeout,
                    now,
                )
                .await;
            observe::record_attempt(&self.policy.name, &result, started.elapsed().as_secs_f64());
            let done = self.clock.now();
            let mut st = self.backend.lock();
            let ledger = st.ledgers.entry(group.clone()).or_default();
            let participant = self.participant.clone();
            let effects = ledger.record(&self.policy, &command, attempt, result, done, |d| {
                participant.dead_letter_reply(d, done)
            });
            observe::record_dead_letters(&effects);
            for effect in effects {
                match effect {
                    Effect::Send(env) => st.append(self.backend.partitions(), env),
                    Effect::DeadLetter(d) => st.append(self.backend.partitions(), d.to_envelope()),
                    Effect::ScheduleTimer(_) | Effect::CancelTimer(_) => {}
                }
            }
            if let Some(snapshot) = self.participant.snapshot(self.partition as u32) {
                st.participant_state
                    .insert((group.clone(), self.partition), snapshot);
            }
            if let Some(off) = offset {
                st.commit(&group, &self.channel, self.partition, off);
            }
            drop(st);
            self.backend.shared.notify.notify_waiters();
        }
    }

    fn next_job(&self, group: &str, channels: &[String], now: Timestamp) -> Job {
        let parts = self.backend.partitions();
        let mut st = self.backend.lock();
        let ledger = st.ledgers.entry(group.to_owned()).or_default();
        let mine =
            |r: &&crate::PendingRetry| partition_of(r.command.key(), parts) == self.partition;
        if let Some(r) = ledger
            .retries
            .values()
            .filter(mine)
            .filter(|r| r.next_attempt_at <= now)
            .min_by_key(|r| r.next_attempt_at)
        {
            return Job::Retry(r.command.clone(), r.attempts + 1);
        }
        let next_retry = ledger
            .retries
            .values()
            .filter(mine)
            .map(|r| r.next_attempt_at)
            .min();
        loop {
            let Some((ch, off, env)) = st.next(group, channels, self.partition) else {
                return Job::Idle(next_retry);
            };
            let ledger = st.ledgers.entry(group.to_owned()).or_default();
            match ledger.delivery(&env) {
                Delivery::Attempt(n) => return Job::Fresh(env, n, off),
                Delivery::Duplicate(reply) => {
                    tracing::debug!(participant = group, message_id = %env.id, "duplicate command: answering again");
                    if let Some(reply) = reply {
                        st.append(parts, *reply);
                    }
                    st.commit(group, &ch, self.partition, off);
                }
                Delivery::AlreadyScheduled => st.commit(group, &ch, self.partition, off),
            }
        }
    }
}
