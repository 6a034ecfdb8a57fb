//! The orchestrator on Kafka: the saga driver in a worker, and the handle
//! that starts, reads and operates its sagas.

use std::collections::{HashMap, VecDeque};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::driver::{
    decode_state, operator_record, partition_for, start_record_traced, state_topic, wait_settled,
    Incoming, Record, RestoredRecord, SagaDriver, SagaService,
};
use saga_core::{
    MessageId, Operation, Page, SagaData, SagaDefinition, SagaError, SagaId, SagaInstance,
    SagaQuery, Timestamp, TraceContext,
};
use tokio::sync::Notify;

use crate::catalog::Catalog;
use crate::config::KafkaConfig;
use crate::error::Error;
use crate::store::read_key;
use crate::worker::{Processor, Request};

/// How many settled sagas a view keeps for reads after they leave the
/// driver (the most recent ones).
pub(crate) const SETTLED_IN_VIEW: usize = 10_000;

/// The committed instances of the partitions a worker owns (and the most
/// recently settled ones), shared with the handle for reads.
pub(crate) struct View<D> {
    map: Mutex<ViewMap<D>>,
    pub notify: Notify,
}

struct ViewMap<D> {
    /// Shared with the driver: a commit adds a reference, not a copy.
    sagas: HashMap<SagaId, Arc<SagaInstance<D>>, foldhash::fast::RandomState>,
    /// Settled sagas in `sagas`, oldest first.
    settled: VecDeque<SagaId>,
}

impl<D: Clone> View<D> {
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(ViewMap {
                sagas: HashMap::default(),
                settled: VecDeque::new(),
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ViewMap<D>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instances of the view (references, not copies).
    fn snapshot(&self) -> Vec<Arc<SagaInstance<D>>> {
        self.lock().sagas.values().cloned().collect()
    }

    fn get(&self, id: &SagaId) -> Option<SagaInstance<D>> {
        self.lock().sagas.get(id).map(|i| (**i).clone())
    }
}

impl<D: Clone> ViewMap<D> {
    pub(crate) fn put(&mut self, inst: &Arc<SagaInstance<D>>) {
        let settled = inst.status.is_final();
        let was = self.sagas.insert(inst.id.clone(), inst.clone());
        let was_settled = was.is_some_and(|w| w.status.is_final());
        if !settled && was_settled {
            // The id was started again after its retention: it is live.
            self.settled.retain(|id| *id != inst.id);
        }
        if settled && !was_settled {
            self.settled.push_back(inst.id.clone());
            while self.settled.len() > SETTLED_IN_VIEW {
                if let Some(old) = self.settled.pop_front() {
                    self.sagas.remove(&old);
                }
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(&SagaId) -> bool) {
        self.sagas.retain(|id, _| keep(id));
        self.settled.retain(|id| keep(id));
    }
}

/// What a handle asks of its worker.
pub(crate) enum SagaRequest<D> {
    Start {
        id: SagaId,
        data: D,
        trace: Option<TraceContext>,
        done: tokio::sync::oneshot::Sender<Result<SagaId, SagaError>>,
    },
    Write {
        records: Vec<Record>,
        done: tokio::sync::oneshot::Sender<Result<(), SagaError>>,
    },
}

/// The worker's processor: the saga driver, fed from the reply topics.
pub(crate) struct SagaProc<D> {
    driver: SagaDriver<D>,
    partitions: u32,
    view: Arc<View<D>>,
    requests: mpsc::Receiver<SagaRequest<D>>,
    /// A request received by `has_request`, not taken yet.
    next: Option<SagaRequest<D>>,
    /// Partitions being restored: the latest settled records read (key,
    /// state), decoded for the view when the restore ends.
    restoring: HashMap<u32, VecDeque<(String, Vec<u8>)>>,
}

impl<D: SagaData> SagaProc<D> {
    pub(crate) fn new(
        def: SagaDefinition<D>,
        cfg: &KafkaConfig,
        partitions: u32,
        view: Arc<View<D>>,
        requests: mpsc::Receiver<SagaRequest<D>>,
    ) -> Self {
        Self {
            driver: SagaDriver::new(def)
                .with_max_record_bytes(cfg.max_record_bytes)
                .with_settled_retention(cfg.settled_retention),
            partitions,
            view,
            requests,
            next: None,
            restoring: HashMap::new(),
        }
    }

    /// A start request: the owner of the saga's partition starts it in
    /// this batch; another process's partition gets a start record on the
    /// saga's reply channel, which its owner applies (only the owner
    /// writes a saga's state).
    fn start(
        &mut self,
        id: SagaId,
        data: D,
        trace: Option<TraceContext>,
        done: tokio::sync::oneshot::Sender<Result<SagaId, SagaError>>,
    ) -> Option<Request> {
        let partition = partition_for(id.as_str(), self.partitions);
        let mut out = Vec::new();
        let made = if self.driver.owns(partition) {
            self.driver
                .start_traced(
                    partition,
                    id.clone(),
                    data,
                    trace,
                    Timestamp::now(),
                    &mut out,
                )
                .map(|_| ())
        } else {
            start_record_traced(self.driver.definition(), &id, &data, trace).map(|r| out.push(r))
        };
        if let Err(e) = made {
            let _ = done.send(Err(e));
            return None;
        }
        Some(Request {
            out,
            done: Box::new(move |r| {
                let _ = done.send(
                    r.map(|()| id)
                        .map_err(|e| unavailable("starting the saga", e)),
                );
            }),
        })
    }
}

/// Maps a runtime error onto the caller's error.
pub(crate) fn unavailable(what: &str, e: Error) -> SagaError {
    match e {
        Error::Shutdown => SagaError::Shutdown,
        // Trying again does not help until the configuration or the ACLs change.
        e @ (Error::Authentication { .. } | Error::Authorization { .. }) => SagaError::Runtime {
            what: what.to_owned(),
            source: Box::new(e),
        },
        e => SagaError::Unavailable {
            what: what.to_owned(),
            source: Box::new(e),
        },
    }
}

impl<D: SagaData> Processor for SagaProc<D> {
    fn name(&self) -> &str {
        self.driver.definition().name()
    }

    fn topics(&self) -> Vec<String> {
        self.driver.input_topics()
    }

    fn state_topic(&self) -> &str {
        self.driver.state_topic()
    }

    fn restore_begin(&mut self, partition: u32) {
        self.restoring.insert(partition, VecDeque::new());
        self.driver.restore_begin(partition);
    }

    fn restore_record(&mut self, partition: u32, key: &str, value: Option<&[u8]>) {
        // Settled sagas stay readable from the view (the most recent
        // ones), though the driver keeps only their ids and does not
        // decode them: the latest settled records read are kept, and
        // decoded once the restore ends.
        let settled = self.driver.restore_record(partition, key, value, |_| {});
        if let (RestoredRecord::Settled, Some(bytes)) = (settled, value) {
            let recent = self.restoring.entry(partition).or_default();
            // Once the queue is full, the oldest record's buffers hold the
            // newest.
            let (mut k, mut v) = if recent.len() >= SETTLED_IN_VIEW {
                recent.pop_front().unwrap_or_default()
            } else {
                Default::default()
            };
            k.clear();
            k.push_str(key);
            v.clear();
            v.extend_from_slice(bytes);
            recent.push_back((k, v));
        }
    }

    fn restore_end(&mut self, partition: u32) -> Result<(), String> {
        let report = self.driver.restore_end(partition);
        // The view gets the partition once it is read to its end: readers
        // never see a version a later record replaced.
        let recent: Vec<Arc<SagaInstance<D>>> = self
            .restoring
            .remove(&partition)
            .unwrap_or_default()
            .into_iter()
            // Not if a later record deleted it or started it again.
            .filter(|(key, _)| self.driver.is_settled(&SagaId::new(key.as_str())))
            .filter_map(|(key, bytes)| match decode_state::<D>(&key, &bytes) {
                Ok(inst) => Some(Arc::new(inst)),
                Err(e) => {
                    tracing::warn!(saga = %self.driver.definition().name(), partition, key, error = %e, "a settled saga's state does not read: not in the view (reads of it fail too)");
                    None
                }
            })
            .collect();
        let mut view = self.view.lock();
        for inst in &recent {
            view.put(inst);
        }
        for inst in self.driver.instances_in(partition) {
            view.put(inst);
        }
        drop(view);
        self.view.notify.notify_waiters();
        tracing::info!(saga = %self.driver.definition().name(), partition, sagas = report.sagas, settled = report.settled, corrupt = report.corrupt.len(), "state restored");
        Ok(())
    }

    fn release(&mut self, partitions: &[u32]) {
        for p in partitions {
            self.restoring.remove(p);
        }
        let n = self.partitions;
        self.view
            .lock()
            .retain(|id| !partitions.contains(&partition_for(id.as_str(), n)));
        self.driver.release(partitions);
    }

    fn on_message(&mut self, msg: &Incoming<'_>, now: Timestamp, out: &mut Vec<Record>) {
        self.driver.on_record(msg, now, out);
    }

    fn reject(&mut self, msg: &Incoming<'_>, why: &str, now: Timestamp, out: &mut Vec<Record>) {
        self.driver.reject(msg, why, now, out);
    }

    fn next_due(&self) -> Option<Timestamp> {
        self.driver.next_due()
    }

    fn on_due(&mut self, now: Timestamp, out: &mut Vec<Record>) -> bool {
        self.driver.on_due(now, out)
    }

    fn reject_due(&mut self, why: &str, now: Timestamp, out: &mut Vec<Record>) -> Option<u32> {
        self.driver.reject_due(why, now, out)
    }

    fn due_partition(&self) -> Option<u32> {
        self.driver.due_partition()
    }

    fn reread_refused_due(&self) -> bool {
        true
    }

    fn has_request(&mut self) -> bool {
        if self.next.is_none() {
            self.next = self.requests.try_recv().ok();
        }
        self.next.is_some()
    }

    fn take_request(&mut self) -> Option<Request> {
        loop {
            let next = match self.next.take() {
                Some(r) => r,
                None => self.requests.try_recv().ok()?,
            };
            match next {
                // A caller that gave up (its request timed out) is not
                // served late: it was told the start may not happen.
                SagaRequest::Start { done, .. } if done.is_closed() => {}
                SagaRequest::Start {
                    id,
                    data,
                    trace,
                    done,
                } => {
                    if let Some(req) = self.start(id, data, trace, done) {
                        return Some(req);
                    }
                }
                SagaRequest::Write { done, .. } if done.is_closed() => {}
                SagaRequest::Write { records, done } => {
                    return Some(Request {
                        out: records,
                        done: Box::new(move |r| {
                            let _ = done.send(r.map_err(|e| unavailable("writing the request", e)));
                        }),
                    });
                }
            }
        }
    }

    fn committed(&mut self) {
        let mut view = self.view.lock();
        self.driver.committed(|inst| view.put(inst));
        drop(view);
        self.view.notify.notify_waiters();
    }

    fn rolled_back(&mut self) {
        self.driver.rolled_back();
    }
}

/// One saga type on Kafka (what a [`SagaHandle`](saga_core::SagaHandle) holds).
pub(crate) struct KafkaSagas<D> {
    pub(crate) def: SagaDefinition<D>,
    pub(crate) cfg: Arc<KafkaConfig>,
    pub(crate) view: Arc<View<D>>,
    pub(crate) requests: mpsc::Sender<SagaRequest<D>>,
    /// Wakes the worker when a request is queued.
    pub(crate) wakeup: Arc<crate::worker::Wakeup>,
    /// Every partition's sagas, for queries.
    pub(crate) catalog: Arc<Catalog<D>>,
}

impl<D> Drop for KafkaSagas<D> {
    fn drop(&mut self) {
        self.catalog.stop();
    }
}

/// Waits for `work` at most `limit`.
///
/// # Errors
/// [`Error::TimedOut`] after `limit`; else `work`'s error.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(Error::TimedOut {
            what: what.to_owned(),
            after: limit,
        })
    })
}

impl<D: SagaData> KafkaSagas<D> {
    /// Asks the worker, and waits for its answer at most the request timeout.
    async fn ask<T>(
        &self,
        what: &str,
        request: SagaRequest<D>,
        answer: tokio::sync::oneshot::Receiver<Result<T, SagaError>>,
    ) -> Result<T, SagaError> {
        self.requests
            .send(request)
            .map_err(|_| SagaError::Shutdown)?;
        self.wakeup.wake();
        match tokio::time::timeout(self.cfg.request_timeout, answer).await {
            Ok(answer) => answer.map_err(|_| SagaError::Shutdown)?,
            Err(_) => Err(unavailable(
                what,
                Error::TimedOut {
                    what: what.to_owned(),
                    after: self.cfg.request_timeout,
                },
            )),
        }
    }
}

#[async_trait]
impl<D: SagaData> SagaService<D> for KafkaSagas<D> {
    fn definition(&self) -> &SagaDefinition<D> {
        &self.def
    }

    /// Starts saga `id`, idempotently: the worker that owns its partition
    /// starts it in its next transaction (its state and first messages);
    /// when another process owns it, a start record goes to that owner.
    /// Waits at most the request timeout.
    async fn start(&self, id: SagaId, data: D) -> Result<SagaId, SagaError> {
        self.start_traced(id, data, None).await
    }

    /// Like `start`, in trace `trace` (a start record for another
    /// process's partition carries it, in its value and as its
    /// `traceparent` header).
    async fn start_traced(
        &self,
        id: SagaId,
        data: D,
        trace: Option<TraceContext>,
    ) -> Result<SagaId, SagaError> {
        // In progress here: nothing to do. (A settled one is left to its
        // owner, which knows whether its retention has ended.)
        if self.view.get(&id).is_some_and(|i| !i.status.is_final()) {
            return Ok(id);
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        self.ask(
            "starting the saga",
            SagaRequest::Start {
                id,
                data,
                trace,
                done,
            },
            answer,
        )
        .await
    }

    /// From this process's view (its owned partitions' sagas and the most
    /// recently settled ones), or else read from the state topic (only the
    /// partition `id` maps to, up to its last stable offset), within the
    /// request timeout.
    async fn get(&self, id: &SagaId) -> Result<Option<SagaInstance<D>>, SagaError> {
        if let Some(i) = self.view.get(id) {
            return Ok(Some(i));
        }
        let cfg = self.cfg.clone();
        let topic = state_topic(self.def.name());
        let key = id.as_str().to_owned();
        let limit = cfg.request_timeout;
        let read = async move {
            tokio::task::spawn_blocking(move || read_key(&cfg, &topic, &key, limit))
                .await
                .map_err(|_| Error::Shutdown)?
        };
        let record = within(limit, "reading the saga's state", read)
            .await
            .map_err(|e| unavailable("reading the saga's state", e))?;
        match record {
            Some((_, v)) if !v.is_empty() => decode_state(id.as_str(), &v).map(Some),
            _ => Ok(None),
        }
    }

    /// With [`SagaQuery::local`], the sagas of the partitions this process
    /// owns (and the ones it settled recently), from its own view. Else the
    /// sagas of every partition: those this process owns from its
    /// own view, the others from the saga type's catalog (started by the
    /// first query: it reads the state topic to its end once, within the
    /// request timeout, then follows it); [`Page::as_of`] says how fresh
    /// the catalog is. It keeps every saga not settled, of every
    /// partition, and about 10,000 settled ones (the last read) in this
    /// process's memory: query from the processes meant to answer
    /// operators. It keeps each saga's latest state as it was read, and a
    /// query decodes those not decoded yet (on a blocking thread):
    /// versions replaced before anyone asked are never decoded. Once the
    /// runtime shut down, such a query is [`SagaError::Shutdown`] (the
    /// catalog stops with it).
    async fn list(&self, query: &SagaQuery) -> Result<Page<SagaInstance<D>>, SagaError> {
        if query.local {
            let own = self.view.snapshot();
            return Ok(query.page(own.iter().map(|i| &**i), Timestamp::now()));
        }
        if self.catalog.stopped() {
            return Err(SagaError::Shutdown);
        }
        self.catalog
            .ensure_started(&self.cfg, &state_topic(self.def.name()));
        self.catalog
            .caught_up(self.cfg.request_timeout)
            .await
            .map_err(|reason| {
                if self.catalog.stopped() {
                    return SagaError::Shutdown;
                }
                unavailable(
                    "listing sagas",
                    Error::TimedOut {
                        what: format!("reading the saga catalog: {reason}"),
                        after: self.cfg.request_timeout,
                    },
                )
            })?;
        let own = self.view.snapshot();
        // The catalog decodes what was read since the last query.
        let (catalog, query) = (self.catalog.clone(), query.clone());
        tokio::task::spawn_blocking(move || catalog.page(&query, &own, Timestamp::now()))
            .await
            .map_err(|e| {
                if e.is_cancelled() {
                    SagaError::Shutdown
                } else {
                    SagaError::Runtime {
                        what: "listing sagas".to_owned(),
                        source: Box::new(e),
                    }
                }
            })
    }

    /// Checks the operation applies ([`Operation::check`]: parked or
    /// stuck, on the step named, an abort before the point of no return), then writes the
    /// request for its owner, which applies it when it consumes it.
    async fn operate(&self, id: &SagaId, operation: Operation) -> Result<(), SagaError> {
        let inst = self.get(id).await?.ok_or_else(|| SagaError::UnknownSaga {
            saga_id: id.clone(),
            message_id: MessageId::new(format!("{id}/operator/{}", operation.action)),
        })?;
        // Checked here too, so the caller hears of a refusal (its owner
        // checks again when it applies the request).
        operation.check(&self.def, &inst)?;
        let records = vec![operator_record(&self.def, id, &operation)?];
        let (done, answer) = tokio::sync::oneshot::channel();
        self.ask(
            "writing the operator's request",
            SagaRequest::Write { records, done },
            answer,
        )
        .await
    }

    /// Sagas this process owns are seen as they commit; others are read
    /// from the state topic at most every 500 ms.
    async fn wait_settled(
        &self,
        id: &SagaId,
        timeout: Duration,
    ) -> Result<SagaInstance<D>, SagaError> {
        let every = Duration::from_millis(500);
        let next_read = Mutex::new(tokio::time::Instant::now() + every);
        let next_read = &next_read;
        wait_settled(id, timeout, &self.view.notify, move || async move {
            let local = self.view.get(id);
            if local.is_some() {
                return Ok(local);
            }
            let now = tokio::time::Instant::now();
            let due = {
                let mut next = next_read.lock().unwrap_or_else(|e| e.into_inner());
                let due = now >= *next;
                if due {
                    *next = now + every;
                }
                due
            };
            if due {
                self.get(id).await
            } else {
                Ok(None)
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saga_core::driver::encode_state;
    use saga_core::{SagaStatus, Step};
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, Default, Serialize, Deserialize)]
    struct Job {
        note: String,
    }

    fn definition() -> SagaDefinition<Job> {
        SagaDefinition::<Job>::builder("job")
            .step(Step::remote("call", "svc").command(|_: &Job| "CALL"))
            .build()
            .unwrap()
    }

    #[test]
    fn a_restore_puts_the_latest_version_of_each_settled_saga_in_the_view() {
        let def = definition();
        let now = Timestamp::now();
        let state = |id: &str, status: SagaStatus, version: u64| {
            let mut inst = def
                .start(SagaId::new(id), Job::default(), now)
                .unwrap()
                .instance;
            inst.status = status;
            inst.version = version;
            if inst.status.is_settled() {
                inst.timers.clear();
                inst.awaiting = None;
            }
            encode_state(&inst).unwrap()
        };
        let done = SagaStatus::Completed;
        let mut bad_data: serde_json::Value =
            serde_json::from_slice(&state("d", done.clone(), 1)).unwrap();
        bad_data["data"] = serde_json::json!("not a job");
        let bad_data = serde_json::to_vec(&bad_data).unwrap();
        let parked = state(
            "f",
            SagaStatus::Parked {
                reason: "stuck".into(),
            },
            3,
        );
        let records: Vec<(&str, Option<Vec<u8>>)> = vec![
            // a: settled twice, the later version counts.
            ("a", Some(state("a", done.clone(), 1))),
            ("a", Some(state("a", done.clone(), 2))),
            // b: settled, then deleted.
            ("b", Some(state("b", done.clone(), 1))),
            ("b", None),
            // c: settled, then started again.
            ("c", Some(state("c", done.clone(), 1))),
            ("c", Some(state("c", SagaStatus::Running, 1))),
            // d: settled, with data that no longer reads.
            ("d", Some(bad_data)),
            // e: settled, then unreadable.
            ("e", Some(state("e", done.clone(), 1))),
            ("e", Some(b"{".to_vec())),
            // f: parked (not settled for good: in progress).
            ("f", Some(parked)),
        ];
        let view = Arc::new(View::new());
        let (_tx, rx) = mpsc::channel();
        let cfg = KafkaConfig::new("127.0.0.1:1");
        let mut proc = SagaProc::new(def.clone(), &cfg, 1, view.clone(), rx);
        proc.restore_begin(0);
        for (key, value) in &records {
            proc.restore_record(0, key, value.as_deref());
        }
        proc.restore_end(0).unwrap();
        let seen = |id: &str| view.get(&SagaId::new(id)).map(|i| (i.status, i.version));
        assert_eq!(seen("a"), Some((done.clone(), 2)));
        assert_eq!(seen("b"), None);
        assert_eq!(seen("c"), Some((SagaStatus::Running, 1)));
        assert_eq!(seen("d"), None, "it does not read: not in the view");
        assert!(
            proc.driver.is_settled(&SagaId::new("d")),
            "but remembered as settled"
        );
        assert_eq!(seen("e"), None);
        assert!(!proc.driver.is_settled(&SagaId::new("e")));
        assert_eq!(
            seen("f"),
            Some((
                SagaStatus::Parked {
                    reason: "stuck".into()
                },
                3
            ))
        );
    }

    #[test]
    fn a_restore_keeps_the_last_settled_sagas_of_a_partition_for_the_view() {
        let def = definition();
        let now = Timestamp::now();
        let settled = |i: usize, note: &str| {
            let job = Job { note: note.into() };
            let mut inst = def
                .start(SagaId::new(format!("s-{i}")), job, now)
                .unwrap()
                .instance;
            inst.status = SagaStatus::Completed;
            inst.timers.clear();
            inst.awaiting = None;
            encode_state(&inst).unwrap()
        };
        let view = Arc::new(View::new());
        let (_tx, rx) = mpsc::channel();
        let cfg = KafkaConfig::new("127.0.0.1:1");
        let mut proc = SagaProc::new(def.clone(), &cfg, 1, view.clone(), rx);
        proc.restore_begin(0);
        // The first record is long; the last one, read into its buffers
        // once the queue is full, is short.
        let n = SETTLED_IN_VIEW + 1;
        for i in 0..n {
            let note = if i == 0 {
                "x".repeat(4_000)
            } else {
                format!("{i}")
            };
            proc.restore_record(0, &format!("s-{i}"), Some(&settled(i, &note)));
        }
        proc.restore_end(0).unwrap();
        let note = |i: usize| {
            view.get(&SagaId::new(format!("s-{i}")))
                .map(|s| s.data.note)
        };
        assert_eq!(note(0), None, "the oldest left the queue");
        assert_eq!(note(1).as_deref(), Some("1"));
        assert_eq!(note(n - 1), Some(format!("{}", n - 1)));
        assert_eq!(view.snapshot().len(), SETTLED_IN_VIEW);
        assert!(
            proc.driver.is_settled(&SagaId::new("s-0")),
            "still remembered"
        );
    }
}
