//! The in-memory runtime: registration, the saga handles, shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::definition::{SagaData, SagaDefinition};
use crate::driver::{decode_state, state_topic, ParticipantDriver, Registry, SagaDriver};
use crate::engine::Operation;
use crate::error::SagaError;
use crate::health::{Health, HealthBoard};
use crate::ids::SagaId;
use crate::instance::SagaInstance;
use crate::memory::backend::MemoryBackend;
use crate::memory::clock::Clock;
use crate::memory::worker::{
    ParticipantWorker, ProjectionWorker, Request, SagaWorker, SharedHandler,
};
use crate::message::{DeadLetter, Envelope};
use crate::participant::{Participant, ParticipantPolicy};
use crate::runtime::{Page, Runtime, SagaHandle, SagaQuery, SagaService};

/// The embedded runtime: sagas, participants and projections as tokio
/// tasks over a [`MemoryBackend`], one worker per partition of each, so
/// different sagas run in parallel while each saga's messages stay in
/// order. Must be used inside a tokio runtime.
///
/// Each input is handled and committed in one critical section that
/// reads it, runs the driver, writes its records and marks it consumed.
/// Dropping the runtime stops its workers between two such sections, as a
/// crash would; a new runtime over the same backend resumes every saga,
/// timers included. [`Runtime::shutdown`] stops them and waits.
pub struct InMemoryRuntime {
    backend: MemoryBackend,
    clock: Clock,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    registry: Registry,
    health: HealthBoard,
}

impl std::fmt::Debug for InMemoryRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryRuntime")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl InMemoryRuntime {
    /// A runtime over `backend` on the system clock.
    pub fn new(backend: MemoryBackend) -> Self {
        Self::with_clock(backend, Clock::system())
    }

    /// A runtime over `backend` on `clock` (share one clock across a
    /// crash and restart so persisted timers keep their meaning).
    pub fn with_clock(backend: MemoryBackend, clock: Clock) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            backend,
            clock,
            stop,
            tasks: Mutex::new(Vec::new()),
            registry: Registry::default(),
            health: HealthBoard::new(),
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

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

#[async_trait]
impl Runtime for InMemoryRuntime {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn saga<D: SagaData>(&self, def: SagaDefinition<D>) -> Result<SagaHandle<D>, SagaError> {
        if self.stopped() {
            return Err(SagaError::Shutdown);
        }
        self.registry.add_saga(&def)?;
        let mut workers = Vec::new();
        for p in 0..self.backend.partitions() {
            let (tx, rx) = mpsc::unbounded_channel();
            workers.push(tx);
            let worker = SagaWorker {
                driver: SagaDriver::new(def.clone()),
                backend: self.backend.clone(),
                clock: self.clock,
                partition: p,
                requests: rx,
            };
            self.spawn(worker.run(self.stop.subscribe()));
        }
        Ok(SagaHandle::new(MemorySagas {
            state_topic: state_topic(def.name()),
            def,
            backend: self.backend.clone(),
            clock: self.clock,
            workers,
        }))
    }

    async fn participant<P: Participant>(
        &self,
        channel: &str,
        policy: ParticipantPolicy,
        participant: P,
    ) -> Result<(), SagaError> {
        if self.stopped() {
            return Err(SagaError::Shutdown);
        }
        self.registry.add_participant(channel, &policy)?;
        let participant = Arc::new(participant);
        for p in 0..self.backend.partitions() {
            let worker = ParticipantWorker {
                driver: ParticipantDriver::new(channel, policy.clone(), participant.clone()),
                backend: self.backend.clone(),
                clock: self.clock,
                partition: p,
                health: self.health.clone(),
            };
            self.spawn(worker.run(self.stop.subscribe()));
        }
        Ok(())
    }

    async fn projection<F>(
        &self,
        group: &str,
        channels: &[&str],
        handler: F,
    ) -> Result<(), SagaError>
    where
        F: FnMut(&Envelope) + Send + 'static,
    {
        if self.stopped() {
            return Err(SagaError::Shutdown);
        }
        let handler: SharedHandler = Arc::new(Mutex::new(handler));
        for p in 0..self.backend.partitions() {
            let worker = ProjectionWorker {
                handler: handler.clone(),
                backend: self.backend.clone(),
                group: group.to_owned(),
                channels: channels.iter().map(|c| (*c).to_owned()).collect(),
                partition: p,
            };
            self.spawn(worker.run(self.stop.subscribe()));
        }
        Ok(())
    }

    async fn publish(&self, envelopes: Vec<Envelope>) -> Result<(), SagaError> {
        if self.stopped() {
            return Err(SagaError::Shutdown);
        }
        {
            let mut st = self.backend.lock();
            let records = envelopes
                .iter()
                .map(crate::driver::Record::message)
                .collect();
            self.backend.commit(&mut st, records, None);
        }
        self.backend.notify();
        Ok(())
    }

    async fn dead_letters(&self, channel: &str) -> Result<Vec<DeadLetter>, SagaError> {
        Ok(self.backend.dead_letters(channel))
    }

    fn health(&self) -> Health {
        self.health.health()
    }

    async fn shutdown(&self) {
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

/// One saga type on the in-memory runtime.
struct MemorySagas<D> {
    def: SagaDefinition<D>,
    state_topic: String,
    backend: MemoryBackend,
    clock: Clock,
    /// The worker of each partition.
    workers: Vec<mpsc::UnboundedSender<Request<D>>>,
}

impl<D: SagaData> MemorySagas<D> {
    fn worker(&self, id: &SagaId) -> &mpsc::UnboundedSender<Request<D>> {
        &self.workers[self.backend.partition_for(id.as_str()) as usize]
    }

    fn load(&self, id: &SagaId) -> Result<Option<SagaInstance<D>>, SagaError> {
        let bytes = self
            .backend
            .lock()
            .table_get(&self.state_topic, id.as_str());
        bytes.map(|b| decode_state(id.as_str(), &b)).transpose()
    }
}

#[async_trait]
impl<D: SagaData> SagaService<D> for MemorySagas<D> {
    fn definition(&self) -> &SagaDefinition<D> {
        &self.def
    }

    async fn start(&self, id: SagaId, data: D) -> Result<SagaId, SagaError> {
        self.start_traced(id, data, None).await
    }

    async fn start_traced(
        &self,
        id: SagaId,
        data: D,
        trace: Option<crate::trace::TraceContext>,
    ) -> Result<SagaId, SagaError> {
        let (done, result) = oneshot::channel();
        self.worker(&id)
            .send(Request::Start {
                id,
                data,
                trace,
                done,
            })
            .map_err(|_| SagaError::Shutdown)?;
        result.await.map_err(|_| SagaError::Shutdown)?
    }

    async fn get(&self, id: &SagaId) -> Result<Option<SagaInstance<D>>, SagaError> {
        self.load(id)
    }

    async fn list(&self, query: &SagaQuery) -> Result<Page<SagaInstance<D>>, SagaError> {
        // Records are read in id order from the page's start, a few at a
        // time, and decoded one by one until the page is full: a page
        // costs the records it goes through, not the whole table.
        const CHUNK: usize = 256;
        let now = self.clock.now();
        let mut items: Vec<SagaInstance<D>> = Vec::new();
        let mut from = query.after.as_ref().map(|a| a.as_str().to_owned());
        loop {
            let records =
                self.backend
                    .lock()
                    .table_after(&self.state_topic, from.as_deref(), CHUNK);
            let Some((last, _)) = records.last() else {
                return Ok(Page {
                    items,
                    next: None,
                    as_of: None,
                });
            };
            from = Some(last.clone());
            for (key, bytes) in &records {
                // As the Kafka catalog: a record that does not read (or
                // whose data type panics reading it) is left out.
                let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    decode_state::<D>(key, bytes)
                }));
                let instance = match read {
                    Ok(Ok(instance)) if instance.id.as_str() == key => instance,
                    Ok(Ok(instance)) => {
                        tracing::warn!(saga = %self.def.name(), key, named = %instance.id, "the listing skips a state record that names another saga than its key");
                        continue;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(saga = %self.def.name(), key, error = %e, "the listing skips an unreadable state record");
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(saga = %self.def.name(), key, "the listing skips a state record whose decoding panicked");
                        continue;
                    }
                };
                if !query.matches(&instance, now) {
                    continue;
                }
                if items.len() == query.limit {
                    let next = items.last().map(|i| i.id.clone());
                    return Ok(Page {
                        items,
                        next,
                        as_of: None,
                    });
                }
                items.push(instance);
            }
        }
    }

    async fn operate(&self, id: &SagaId, operation: Operation) -> Result<(), SagaError> {
        let (done, result) = oneshot::channel();
        self.worker(id)
            .send(Request::Operate {
                id: id.clone(),
                operation,
                done,
            })
            .map_err(|_| SagaError::Shutdown)?;
        result.await.map_err(|_| SagaError::Shutdown)?
    }

    async fn wait_settled(
        &self,
        id: &SagaId,
        timeout: Duration,
    ) -> Result<SagaInstance<D>, SagaError> {
        crate::driver::wait_settled(id, timeout, self.backend.notifier(), || async {
            if self.workers.iter().all(|w| w.is_closed()) {
                return Err(SagaError::Shutdown);
            }
            self.load(id)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::definition::Step;
    use crate::driver::{Record, RecordKind};
    use crate::instance::SagaStatus;
    use crate::runtime::StatusFilter;

    fn one_local_step() -> SagaDefinition<Value> {
        SagaDefinition::<Value>::builder("listed")
            .step(Step::<Value>::local("mark", |ctx| {
                ctx.data_mut()["marked"] = json!(true);
                Ok(())
            }))
            .build()
            .unwrap()
    }

    async fn listed(sagas: &SagaHandle<Value>, query: SagaQuery) -> Vec<Vec<String>> {
        let mut pages = Vec::new();
        let mut query = query;
        loop {
            let page = sagas.list(&query).await.unwrap();
            pages.push(page.items.iter().map(|i| i.id.to_string()).collect());
            match page.next {
                Some(next) => query = query.after(next),
                None => return pages,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_pages_in_id_order_and_skips_a_record_it_cannot_read() {
        let rt = InMemoryRuntime::new(MemoryBackend::with_partitions(3));
        let sagas = rt.saga(one_local_step()).await.unwrap();
        for n in [5, 1, 4, 2, 3] {
            let id = SagaId::new(format!("s-{n}"));
            sagas.start(id.clone(), json!({})).await.unwrap();
            sagas
                .wait_settled(&id, Duration::from_secs(5))
                .await
                .unwrap();
        }
        // A record another build wrote, which this one cannot read, and
        // one that names another saga than its key.
        let topic = state_topic("listed");
        let renamed = sagas.get(&SagaId::new("s-1")).await.unwrap().unwrap();
        let partitions = rt.backend().partitions();
        {
            let mut st = rt.backend().lock();
            st.write(
                partitions,
                Record::new(
                    &topic,
                    "s-25",
                    Some(b"{\"not\": \"a saga\"}".to_vec()),
                    RecordKind::SagaState,
                ),
            );
            st.write(
                partitions,
                // s-1's state under another key.
                Record::new(
                    &topic,
                    "s-35",
                    Some(crate::driver::encode_state(&renamed).unwrap()),
                    RecordKind::SagaState,
                ),
            );
        }

        let pages = listed(&sagas, SagaQuery::all().limit(2)).await;
        assert_eq!(pages, [vec!["s-1", "s-2"], vec!["s-3", "s-4"], vec!["s-5"]]);
        assert!(matches!(
            sagas.get(&SagaId::new("s-25")).await,
            Err(SagaError::CorruptState { .. })
        ));

        // Filters apply before the page fills; a full last page ends it.
        let completed = SagaQuery::all().status(StatusFilter::Completed).limit(5);
        assert_eq!(
            listed(&sagas, completed).await,
            [vec!["s-1", "s-2", "s-3", "s-4", "s-5"]]
        );
        let page = sagas
            .list(&SagaQuery::all().after(SagaId::new("s-3")).limit(1))
            .await
            .unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].id.as_str(), "s-4");
        assert_eq!(page.items[0].status, SagaStatus::Completed);
        assert_eq!(page.next, Some(SagaId::new("s-4")));
        assert!(sagas
            .list(&SagaQuery::all().status(StatusFilter::Parked))
            .await
            .unwrap()
            .items
            .is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn pages_read_across_the_listings_chunks_miss_and_repeat_nothing() {
        let rt = InMemoryRuntime::new(MemoryBackend::with_partitions(3));
        let sagas = rt.saga(one_local_step()).await.unwrap();
        let id = SagaId::new("model");
        sagas.start(id.clone(), json!({})).await.unwrap();
        let model = sagas
            .wait_settled(&id, Duration::from_secs(5))
            .await
            .unwrap();
        // 700 more records, every third one parked: more than two of the
        // listing's reads of 256.
        let topic = state_topic("listed");
        let partitions = rt.backend().partitions();
        let mut parked = Vec::new();
        {
            let mut st = rt.backend().lock();
            for n in 0..700 {
                let mut inst = model.clone();
                inst.id = SagaId::new(format!("c-{n:03}"));
                if n % 3 == 0 {
                    inst.status = SagaStatus::Parked {
                        reason: "a test".into(),
                    };
                    parked.push(inst.id.to_string());
                }
                let bytes = crate::driver::encode_state(&inst).unwrap();
                st.write(
                    partitions,
                    Record::new(&topic, inst.id.as_str(), Some(bytes), RecordKind::SagaState),
                );
            }
        }
        let all: Vec<String> = listed(&sagas, SagaQuery::all().limit(99)).await.concat();
        let mut expected: Vec<String> = (0..700).map(|n| format!("c-{n:03}")).collect();
        expected.push("model".into());
        assert_eq!(all, expected);
        let pages = listed(
            &sagas,
            SagaQuery::all().status(StatusFilter::Parked).limit(100),
        )
        .await;
        assert_eq!(
            pages.iter().map(Vec::len).collect::<Vec<_>>(),
            [100, 100, 34]
        );
        assert_eq!(pages.concat(), parked);
    }
}
