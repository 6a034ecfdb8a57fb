//! The orchestrator on Kafka: the saga driver in a worker, and the handle
//! that starts, reads and operates its sagas.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::driver::{
    decode_state, operator_record, partition_for, state_topic, wait_settled, Incoming, Record,
    SagaDriver, SagaService,
};
use saga_core::{
    MessageId, Operation, Page, SagaData, SagaDefinition, SagaError, SagaId, SagaInstance,
    SagaQuery, Timestamp,
};
use tokio::sync::Notify;

use crate::config::KafkaConfig;
use crate::error::Error;
use crate::store::read_key;
use crate::worker::{Processor, Request};

/// The committed instances of the partitions a worker owns, shared with
/// the handle for reads.
pub(crate) struct View<D> {
    pub map: Mutex<HashMap<SagaId, SagaInstance<D>>>,
    pub notify: Notify,
}

impl<D> View<D> {
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SagaId, SagaInstance<D>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a handle asks of its worker.
pub(crate) enum SagaRequest<D> {
    Start {
        id: SagaId,
        data: D,
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
}

impl<D: SagaData> SagaProc<D> {
    pub(crate) fn new(
        def: SagaDefinition<D>,
        partitions: u32,
        view: Arc<View<D>>,
        requests: mpsc::Receiver<SagaRequest<D>>,
    ) -> Self {
        Self {
            driver: SagaDriver::new(def),
            partitions,
            view,
            requests,
        }
    }
}

/// Maps a runtime error onto the caller's error.
pub(crate) fn unavailable(what: &str, e: Error) -> SagaError {
    match e {
        Error::Shutdown => SagaError::Shutdown,
        e => SagaError::Unavailable {
            what: what.to_owned(),
            source: Box::new(e),
        },
    }
}

impl<D: SagaData> Processor for SagaProc<D> {
    fn topics(&self) -> Vec<String> {
        self.driver.input_topics()
    }

    fn state_topic(&self) -> &str {
        self.driver.state_topic()
    }

    fn restore(&mut self, partition: u32, records: Vec<(String, Vec<u8>)>) {
        let report = self.driver.restore(partition, records);
        let mut view = self.view.lock();
        for inst in self.driver.instances() {
            view.insert(inst.id.clone(), inst.clone());
        }
        drop(view);
        self.view.notify.notify_waiters();
        tracing::info!(saga = %self.driver.definition().name(), partition, sagas = report.sagas, corrupt = report.corrupt.len(), "state restored");
    }

    fn release(&mut self, partitions: &[u32]) {
        let gone: Vec<SagaId> = self
            .view
            .lock()
            .keys()
            .filter(|id| partitions.contains(&partition_for(id.as_str(), self.partitions)))
            .cloned()
            .collect();
        let mut view = self.view.lock();
        for id in gone {
            view.remove(&id);
        }
        drop(view);
        self.driver.release(partitions);
    }

    fn on_message(&mut self, msg: &Incoming<'_>, now: Timestamp, out: &mut Vec<Record>) {
        self.driver.on_record(msg, now, out);
    }

    fn next_due(&self) -> Option<Timestamp> {
        self.driver.next_due()
    }

    fn on_due(&mut self, now: Timestamp, out: &mut Vec<Record>) -> bool {
        self.driver.on_due(now, out)
    }

    fn take_request(&mut self) -> Option<Request> {
        loop {
            match self.requests.try_recv().ok()? {
                SagaRequest::Start { id, data, done } => {
                    let partition = partition_for(id.as_str(), self.partitions);
                    let mut out = Vec::new();
                    // The owner of the saga's partition may be another
                    // instance: announce the saga on its reply topics.
                    match self.driver.start(
                        partition,
                        id.clone(),
                        data,
                        Timestamp::now(),
                        true,
                        &mut out,
                    ) {
                        Ok(()) => {
                            // At least once, the state and its
                            // announcements are written before the first
                            // command: else a fast participant's reply
                            // could reach the owner before the saga does.
                            let barrier = 1 + self.driver.definition().reply_channels().len();
                            return Some(Request {
                                out,
                                barrier,
                                done: Box::new(move |r| {
                                    let _ = done.send(
                                        r.map(|()| id)
                                            .map_err(|e| unavailable("starting the saga", e)),
                                    );
                                }),
                            });
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                        }
                    }
                }
                SagaRequest::Write { records, done } => {
                    return Some(Request {
                        out: records,
                        barrier: 0,
                        done: Box::new(move |r| {
                            let _ = done.send(r.map_err(|e| unavailable("writing the request", e)));
                        }),
                    });
                }
            }
        }
    }

    fn committed(&mut self) {
        let changed = self.driver.committed();
        let mut view = self.view.lock();
        for id in changed {
            match self.driver.get(&id) {
                Some(inst) => view.insert(id, inst.clone()),
                None => view.remove(&id),
            };
        }
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
}

impl<D: SagaData> KafkaSagas<D> {
    async fn write(&self, records: Vec<Record>) -> Result<(), SagaError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.requests
            .send(SagaRequest::Write { records, done })
            .map_err(|_| SagaError::Shutdown)?;
        result.await.map_err(|_| SagaError::Shutdown)?
    }
}

#[async_trait]
impl<D: SagaData> SagaService<D> for KafkaSagas<D> {
    fn definition(&self) -> &SagaDefinition<D> {
        &self.def
    }

    /// Starts saga `id`: in one transaction of this process's worker, its
    /// state, its announcement on the reply topics (for the owner of its
    /// partition) and its first messages. `AlreadyExists` is checked among
    /// the sagas this process owns.
    async fn start(&self, id: SagaId, data: D) -> Result<SagaId, SagaError> {
        if self.view.lock().contains_key(&id) {
            return Err(SagaError::AlreadyExists { saga_id: id });
        }
        let (done, result) = tokio::sync::oneshot::channel();
        self.requests
            .send(SagaRequest::Start { id, data, done })
            .map_err(|_| SagaError::Shutdown)?;
        result.await.map_err(|_| SagaError::Shutdown)?
    }

    /// From this process's owned partitions, or else read from the state
    /// topic (only the partition `id` maps to, up to its last stable offset).
    async fn get(&self, id: &SagaId) -> Result<Option<SagaInstance<D>>, SagaError> {
        if let Some(i) = self.view.lock().get(id) {
            return Ok(Some(i.clone()));
        }
        let cfg = self.cfg.clone();
        let topic = state_topic(self.def.name());
        let key = id.as_str().to_owned();
        let record = tokio::task::spawn_blocking(move || read_key(&cfg, &topic, &key))
            .await
            .map_err(|_| SagaError::Shutdown)?
            .map_err(|e| unavailable("reading the saga's state", e))?;
        match record {
            Some((_, v)) if !v.is_empty() => decode_state(id.as_str(), &v).map(Some),
            _ => Ok(None),
        }
    }

    /// The sagas of the partitions this process owns.
    async fn list(&self, query: &SagaQuery) -> Result<Page<SagaInstance<D>>, SagaError> {
        let all: Vec<SagaInstance<D>> = self.view.lock().values().cloned().collect();
        Ok(query.page(all, Timestamp::now()))
    }

    /// Checks the saga is parked, then writes the request for its owner,
    /// which applies it when it consumes it.
    async fn operate(&self, id: &SagaId, operation: Operation) -> Result<(), SagaError> {
        let inst = self.get(id).await?.ok_or_else(|| SagaError::UnknownSaga {
            saga_id: id.clone(),
            message_id: MessageId::new(format!("{id}/operator/{}", operation.action)),
        })?;
        if !inst.status.is_parked() {
            return Err(SagaError::InvalidAction {
                saga_id: id.clone(),
                action: operation.action.to_string(),
                status: inst.status.to_string(),
            });
        }
        self.write(vec![operator_record(&self.def, id, &operation)])
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
            let local = self.view.lock().get(id).cloned();
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
