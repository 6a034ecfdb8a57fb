//! The orchestrator: runs a saga definition on its reply topics, keeps its
//! instances in a compacted state topic, fires their timers.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::{
    record_step_latency, record_transition, DeadLetter, Effect, Envelope, Handled, Input,
    MessageId, OperatorAction, SagaData, SagaDefinition, SagaError, SagaId, SagaInstance,
    SagaStatus, TimerId, Timestamp,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::KafkaConfig;
use crate::error::{Error, Result};
use crate::store::{read_key, read_latest};
use crate::worker::{Incoming, Out, Processor, Request};

/// The state topic of saga type `saga`.
pub fn state_topic(saga: &str) -> String {
    format!("{saga}.state")
}

const STATE: &str = "state";
const OPERATOR: &str = "operator";

#[derive(Serialize, Deserialize)]
struct OperatorRecord {
    saga_id: SagaId,
    action: OperatorAction,
}

/// The instances a worker owns, shared with the handle for reads.
pub(crate) struct View<D> {
    pub map: Mutex<HashMap<SagaId, SagaInstance<D>>>,
    pub notify: Notify,
}

pub(crate) struct SagaProc<D> {
    def: SagaDefinition<D>,
    state_topic: String,
    sagas: HashMap<SagaId, (i32, SagaInstance<D>)>,
    timers: BTreeSet<(Timestamp, SagaId, TimerId)>,
    undo: HashMap<SagaId, Option<(i32, SagaInstance<D>)>>,
    view: Arc<View<D>>,
    requests: mpsc::Receiver<Request>,
    cfg: Arc<KafkaConfig>,
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl<D: SagaData> SagaProc<D> {
    pub(crate) fn new(
        def: SagaDefinition<D>,
        cfg: Arc<KafkaConfig>,
        view: Arc<View<D>>,
        requests: mpsc::Receiver<Request>,
    ) -> Self {
        Self {
            state_topic: state_topic(def.name()),
            def,
            sagas: HashMap::new(),
            timers: BTreeSet::new(),
            undo: HashMap::new(),
            view,
            requests,
            cfg,
        }
    }

    /// Replaces saga `id` (or removes it), keeping the timer index in step.
    fn put(&mut self, id: &SagaId, new: Option<(i32, SagaInstance<D>)>) {
        if let Some((_, old)) = self.sagas.get(id) {
            for t in &old.timers {
                self.timers.remove(&(t.fire_at, id.clone(), t.id.clone()));
            }
        }
        match new {
            Some((p, inst)) => {
                for t in &inst.timers {
                    self.timers.insert((t.fire_at, id.clone(), t.id.clone()));
                }
                self.sagas.insert(id.clone(), (p, inst));
            }
            None => {
                self.sagas.remove(id);
            }
        }
    }

    /// Like `put`, remembering the value before the batch for a rollback.
    fn change(&mut self, id: &SagaId, new: (i32, SagaInstance<D>)) {
        if !self.undo.contains_key(id) {
            let old = self.sagas.get(id).cloned();
            self.undo.insert(id.clone(), old);
        }
        self.put(id, Some(new));
    }

    fn dead_letter(
        &self,
        env: &Envelope,
        topic: &str,
        reason: String,
        now: Timestamp,
        out: &mut Vec<Out>,
    ) {
        let saga = self.def.name();
        tracing::warn!(saga, saga_id = %env.saga_id, %reason, "dead-lettering an input the saga cannot handle");
        let dead = DeadLetter {
            id: MessageId::new(format!("{}/dead-letter", env.id)),
            channel: self.def.dead_letter_channel().to_owned(),
            source: saga.to_owned(),
            original: env.clone(),
            failure_timestamp: now,
            retry_count: 0,
            reason: format!("unprocessable message from `{topic}`"),
            last_error: reason,
        };
        let e = dead.to_envelope();
        out.push(Out {
            topic: e.channel.clone(),
            key: e.key().to_owned(),
            payload: e.to_bytes(),
            record: None,
            partition: None,
        });
    }

    fn handle(
        &mut self,
        id: &SagaId,
        input: Input,
        now: Timestamp,
        topic: &str,
        out: &mut Vec<Out>,
    ) {
        let saga = self.def.name().to_owned();
        let Some((part, inst)) = self.sagas.get(id).cloned() else {
            if let Input::Reply(env) = &input {
                let e = SagaError::UnknownSaga {
                    saga_id: id.clone(),
                    message_id: env.id.clone(),
                };
                self.dead_letter(env, topic, e.to_string(), now, out);
            }
            return;
        };
        let (step, attempt) = match &inst.awaiting {
            Some(a) => (self.def.steps()[a.step].name().to_owned(), a.attempt),
            None => (
                inst.steps
                    .get(inst.cursor)
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                inst.steps.get(inst.cursor).map(|s| s.attempts).unwrap_or(0),
            ),
        };
        let span = tracing::info_span!("saga_kafka.handle", saga_id = %id, saga = %saga, step = %step, attempt);
        let _g = span.enter();
        let latency = match (&input, &inst.awaiting) {
            (Input::Reply(env), Some(a)) if env.step == a.command.step => Some((
                a.command.step.clone().unwrap_or_default(),
                now.saturating_since(a.command.timestamp),
            )),
            _ => None,
        };
        match self.def.handle(&inst, input.clone(), now) {
            Ok(t) => {
                if let Handled::Ignored(why) = t.handled {
                    tracing::debug!(why, "input ignored");
                    return;
                }
                if let Some((step, d)) = latency {
                    record_step_latency(&saga, &step, d.as_secs_f64());
                }
                record_transition(Some(&inst.status), &t);
                self.emit(&t.instance, &t.effects, out);
                self.change(id, (part, t.instance));
            }
            Err(e) => {
                if let Input::Reply(env) = &input {
                    self.dead_letter(env, topic, e.to_string(), now, out);
                } else {
                    tracing::warn!(error = %e, "input rejected");
                }
            }
        }
    }

    /// The records of one transition: the effects and the new state.
    fn emit(&self, inst: &SagaInstance<D>, effects: &[Effect], out: &mut Vec<Out>) {
        Emitter { def: &self.def }.emit(inst, effects, false, out);
    }
}

impl<D: SagaData> Processor for SagaProc<D> {
    fn topics(&self) -> Vec<String> {
        self.def.reply_channels()
    }

    fn restore(&mut self, partitions: &[i32]) -> Result<()> {
        let records = read_latest(&self.cfg, &self.state_topic, Some(partitions))?;
        let shared = self.view.clone();
        let mut view = shared.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for (p, key, value) in records {
            if value.is_empty() {
                continue;
            }
            match serde_json::from_slice::<SagaInstance<D>>(&value) {
                Ok(inst) => {
                    view.insert(inst.id.clone(), inst.clone());
                    self.put(&SagaId::new(key), Some((p, inst)));
                    n += 1;
                }
                Err(e) => {
                    tracing::error!(saga_id = %key, error = %e, "corrupt saga state: skipped")
                }
            }
        }
        drop(view);
        self.view.notify.notify_waiters();
        tracing::info!(saga = %self.def.name(), partitions = ?partitions, sagas = n, timers = self.timers.len(), "state restored");
        Ok(())
    }

    fn release(&mut self, partitions: &[i32]) {
        let gone: Vec<SagaId> = self
            .sagas
            .iter()
            .filter(|(_, (p, _))| partitions.contains(p))
            .map(|(id, _)| id.clone())
            .collect();
        let shared = self.view.clone();
        let mut view = shared.map.lock().unwrap_or_else(|e| e.into_inner());
        for id in gone {
            view.remove(&id);
            self.put(&id, None);
        }
    }

    fn on_message(&mut self, msg: &Incoming<'_>, now: Timestamp, out: &mut Vec<Out>) {
        match msg.record.as_deref() {
            Some(STATE) => match serde_json::from_slice::<SagaInstance<D>>(msg.payload) {
                Ok(inst) => {
                    let newer = self
                        .sagas
                        .get(&inst.id)
                        .is_none_or(|(_, cur)| inst.version > cur.version);
                    if newer {
                        let id = inst.id.clone();
                        self.change(&id, (msg.partition, inst));
                    }
                }
                Err(e) => {
                    tracing::error!(topic = msg.topic, offset = msg.offset, error = %e, "corrupt state snapshot: skipped")
                }
            },
            Some(OPERATOR) => match serde_json::from_slice::<OperatorRecord>(msg.payload) {
                Ok(op) => self.handle(&op.saga_id, Input::Operator(op.action), now, msg.topic, out),
                Err(e) => {
                    tracing::error!(topic = msg.topic, offset = msg.offset, error = %e, "corrupt operator record: skipped")
                }
            },
            _ => match Envelope::from_bytes(msg.payload) {
                Ok(env) => {
                    let id = env.saga_id.clone();
                    self.handle(&id, Input::Reply(env), now, msg.topic, out);
                }
                Err(e) => {
                    // Not an envelope: wrap the raw bytes for the dead letter.
                    let env = Envelope::event(
                        MessageId::new(format!("{}/{}/{}", msg.topic, msg.partition, msg.offset)),
                        msg.topic,
                        SagaId::new(""),
                        self.def.name(),
                        serde_json::Value::String(
                            String::from_utf8_lossy(msg.payload).into_owned(),
                        ),
                        now,
                    );
                    self.dead_letter(&env, msg.topic, format!("not an envelope: {e}"), now, out);
                }
            },
        }
    }

    fn next_due(&self) -> Option<Timestamp> {
        self.timers.iter().next().map(|(at, _, _)| *at)
    }

    fn on_due(&mut self, now: Timestamp, out: &mut Vec<Out>) -> bool {
        let Some((at, id, tid)) = self.timers.iter().next().cloned() else {
            return false;
        };
        if at > now {
            return false;
        }
        self.timers.remove(&(at, id.clone(), tid.clone()));
        let topic = format!("{}.timers", self.def.name());
        self.handle(&id, Input::Timer(tid), now, &topic, out);
        true
    }

    fn take_request(&mut self) -> Option<Request> {
        self.requests.try_recv().ok()
    }

    fn committed(&mut self) {
        let mut view = self.view.map.lock().unwrap_or_else(|e| e.into_inner());
        for id in self.undo.keys() {
            match self.sagas.get(id) {
                Some((_, inst)) => view.insert(id.clone(), inst.clone()),
                None => view.remove(id),
            };
        }
        drop(view);
        self.undo.clear();
        self.view.notify.notify_waiters();
    }

    fn rolled_back(&mut self) {
        for (id, old) in std::mem::take(&mut self.undo) {
            self.put(&id, old);
        }
        // Timers the batch fired are re-armed from the restored instances;
        // timers of untouched sagas were never removed.
        self.timers = self
            .sagas
            .iter()
            .flat_map(|(id, (_, i))| {
                i.timers
                    .iter()
                    .map(move |t| (t.fire_at, id.clone(), t.id.clone()))
            })
            .collect();
    }
}

/// A handle on one saga type running on a [`KafkaRuntime`](crate::KafkaRuntime):
/// start instances, read them, act on parked ones. Cheap to clone.
pub struct KafkaSagaHandle<D> {
    pub(crate) def: SagaDefinition<D>,
    pub(crate) cfg: Arc<KafkaConfig>,
    pub(crate) view: Arc<View<D>>,
    pub(crate) requests: mpsc::Sender<Request>,
}

impl<D> Clone for KafkaSagaHandle<D> {
    fn clone(&self) -> Self {
        Self {
            def: self.def.clone(),
            cfg: self.cfg.clone(),
            view: self.view.clone(),
            requests: self.requests.clone(),
        }
    }
}

impl<D: SagaData> std::fmt::Debug for KafkaSagaHandle<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSagaHandle")
            .field("saga", &self.def.name())
            .finish_non_exhaustive()
    }
}

impl<D: SagaData> KafkaSagaHandle<D> {
    /// The saga definition.
    pub fn definition(&self) -> &SagaDefinition<D> {
        &self.def
    }

    async fn submit(&self, out: Vec<Out>, barrier: usize) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = Request {
            out,
            barrier,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        };
        self.requests.send(req).map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Starts saga `id` with `data`: in one transaction, writes its state
    /// and its first messages (e.g. an `ORDER_CREATED` event and a
    /// `RESERVE` command).
    ///
    /// If the broker cannot take the transaction after bounded retries it
    /// is aborted, nothing is visible, and this returns
    /// [`Error::Transaction`]: retry later (an HTTP API answers 5xx).
    /// Fails with [`SagaError::AlreadyExists`] if this process knows `id`
    /// already (an id started on another instance is not checked: use
    /// unique ids).
    pub async fn start(&self, id: impl Into<SagaId>, data: D) -> Result<SagaId> {
        let id = id.into();
        let span = tracing::info_span!("saga_kafka.start", saga_id = %id, saga = %self.def.name(), step = "", attempt = 0u32);
        let _g = span.enter();
        if self.lock_view().contains_key(&id) {
            return Err(SagaError::AlreadyExists { saga_id: id }.into());
        }
        let t = self.def.start(id.clone(), data, Timestamp::now())?;
        let mut out = Vec::new();
        Emitter { def: &self.def }.emit(&t.instance, &t.effects, true, &mut out);
        drop(_g);
        // At least once, the state and its snapshots on the reply topics are
        // written before the first command: else a fast participant's reply
        // can reach the reply partition ahead of the snapshot, and the owner,
        // not knowing the saga yet, dead-letters it (the step then times
        // out and is answered again).
        let barrier = 1 + self.def.reply_channels().len();
        self.submit(out, barrier).await?;
        record_transition(None, &t);
        Ok(id)
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, HashMap<SagaId, SagaInstance<D>>> {
        self.view.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instance `id`: from this process's owned partitions, or else read
    /// from the state topic (only the partition `id` hashes to, up to its
    /// last stable offset). `None` if it does not exist.
    pub async fn get(&self, id: &SagaId) -> Result<Option<SagaInstance<D>>> {
        if let Some(i) = self.lock_view().get(id) {
            return Ok(Some(i.clone()));
        }
        let cfg = self.cfg.clone();
        let topic = state_topic(self.def.name());
        let key = id.as_str().to_owned();
        let record = tokio::task::spawn_blocking(move || read_key(&cfg, &topic, &key))
            .await
            .map_err(|_| Error::Shutdown)??;
        if let Some((p, v)) = record {
            if !v.is_empty() {
                return serde_json::from_slice(&v)
                    .map(Some)
                    .map_err(|e| Error::CorruptRecord {
                        topic: state_topic(self.def.name()),
                        partition: p,
                        offset: -1,
                        reason: e.to_string(),
                    });
            }
        }
        Ok(None)
    }

    /// Every instance in the partitions this process owns.
    pub fn owned(&self) -> Vec<SagaInstance<D>> {
        let mut v: Vec<_> = self.lock_view().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Asks the saga's owner to apply an operator action to parked saga
    /// `id`. Returns once the request is durably written; the owner applies
    /// it when it consumes it.
    pub async fn operate(&self, id: &SagaId, action: OperatorAction) -> Result<()> {
        let inst = self.get(id).await?.ok_or_else(|| SagaError::UnknownSaga {
            saga_id: id.clone(),
            message_id: MessageId::new(format!("operator/{action:?}")),
        })?;
        if !matches!(inst.status, SagaStatus::Parked { .. }) {
            return Err(SagaError::InvalidAction {
                saga_id: id.clone(),
                action: format!("{action:?}").to_lowercase(),
                status: inst.status.to_string(),
            }
            .into());
        }
        let rec = OperatorRecord {
            saga_id: id.clone(),
            action,
        };
        self.submit(
            vec![Out {
                topic: self.def.reply_channel().to_owned(),
                key: id.as_str().to_owned(),
                payload: json(&rec),
                record: Some(OPERATOR),
                partition: None,
            }],
            0,
        )
        .await
    }

    /// Waits until saga `id` is completed, compensated or parked, for at most `timeout`.
    pub async fn wait_settled(&self, id: &SagaId, timeout: Duration) -> Result<SagaInstance<D>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut next_read = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            let notified = self.view.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let local = self.lock_view().get(id).cloned();
            let inst = match local {
                Some(i) => Some(i),
                None if tokio::time::Instant::now() >= next_read => {
                    next_read = tokio::time::Instant::now() + Duration::from_millis(500);
                    self.get(id).await?
                }
                None => None,
            };
            if let Some(i) = inst {
                if i.status.is_settled() {
                    return Ok(i);
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Error::WaitTimeout { saga_id: id.clone() });
                }
            }
        }
    }
}

struct Emitter<'a, D> {
    def: &'a SagaDefinition<D>,
}

impl<D: SagaData> Emitter<'_, D> {
    fn emit(&self, inst: &SagaInstance<D>, effects: &[Effect], snapshot: bool, out: &mut Vec<Out>) {
        let key = inst.id.as_str().to_owned();
        let state = json(inst);
        out.push(Out {
            topic: state_topic(self.def.name()),
            key: key.clone(),
            payload: state.clone(),
            record: None,
            partition: None,
        });
        // A start's snapshot tells the owner of the saga's partition about
        // it, ahead of any reply in that partition.
        for ch in self.def.reply_channels().into_iter().filter(|_| snapshot) {
            out.push(Out {
                topic: ch,
                key: key.clone(),
                payload: state.clone(),
                record: Some(STATE),
                partition: None,
            });
        }
        for e in effects {
            let env = match e {
                Effect::Send(env) => env.clone(),
                Effect::DeadLetter(d) => d.to_envelope(),
                Effect::ScheduleTimer(_) | Effect::CancelTimer(_) => continue,
            };
            out.push(Out {
                topic: env.channel.clone(),
                key: env.key().to_owned(),
                payload: env.to_bytes(),
                record: None,
                partition: None,
            });
        }
    }
}
