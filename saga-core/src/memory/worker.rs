//! The in-memory runtime's workers: thin shells that feed the drivers from
//! the backend, one per partition, each input handled and committed in one
//! critical section (the in-memory equivalent of a Kafka transaction).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use crate::definition::SagaData;
use crate::driver::{ParticipantDriver, Record, SagaDriver};
use crate::engine::Operation;
use crate::error::SagaError;
use crate::health::HealthBoard;
use crate::ids::{SagaId, Timestamp};
use crate::memory::backend::MemoryBackend;
use crate::memory::clock::Clock;
use crate::message::Envelope;

/// A request for the worker that owns a saga.
pub(crate) enum Request<D> {
    Start {
        id: SagaId,
        data: D,
        trace: Option<crate::trace::TraceContext>,
        done: oneshot::Sender<Result<SagaId, SagaError>>,
    },
    Operate {
        id: SagaId,
        operation: Operation,
        done: oneshot::Sender<Result<(), SagaError>>,
    },
}

/// Sleeps until `at` on `clock`, or forever without a time.
async fn sleep_until(clock: Clock, at: Option<Timestamp>) {
    match at {
        Some(at) => tokio::time::sleep_until(clock.instant_at(at)).await,
        None => std::future::pending().await,
    }
}

pub(crate) struct SagaWorker<D> {
    pub(crate) driver: SagaDriver<D>,
    pub(crate) backend: MemoryBackend,
    pub(crate) clock: Clock,
    pub(crate) partition: u32,
    pub(crate) requests: mpsc::UnboundedReceiver<Request<D>>,
}

impl<D: SagaData> SagaWorker<D> {
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let records = self
            .backend
            .lock()
            .table(self.driver.state_topic(), self.partition);
        self.driver.restore(self.partition, records);
        let mut requests_open = true;
        loop {
            let backend = self.backend.clone();
            let notified = backend.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.step() {
                self.backend.notify();
                // Between two inputs: where a dropped runtime's abort stops
                // the worker (a crash between two atomic sections).
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = sleep_until(self.clock, self.driver.next_due()) => {}
                req = self.requests.recv(), if requests_open => match req {
                    Some(req) => self.serve(req),
                    None => requests_open = false,
                },
                _ = stop.changed() => return,
            }
        }
    }

    /// Handles one due timer or one record, and commits. Returns whether
    /// there was one.
    fn step(&mut self) -> bool {
        let now = self.clock.now();
        let group = self.driver.definition().name().to_owned();
        let topics = self.driver.input_topics();
        let mut st = self.backend.lock();
        let mut out = Vec::new();
        if self.driver.on_due(now, &mut out) {
            self.backend.commit(&mut st, out, None);
            self.driver.committed(|_| {});
            return true;
        }
        let Some((topic, offset, rec)) = st.next(&group, &topics, self.partition) else {
            return false;
        };
        self.driver
            .on_record(&rec.incoming(&topic, self.partition, offset), now, &mut out);
        self.backend
            .commit(&mut st, out, Some((&group, &topic, self.partition, offset)));
        self.driver.committed(|_| {});
        true
    }

    fn serve(&mut self, req: Request<D>) {
        let now = self.clock.now();
        let mut out: Vec<Record> = Vec::new();
        let backend = self.backend.clone();
        let mut st = backend.lock();
        match req {
            Request::Start {
                id,
                data,
                trace,
                done,
            } => {
                let result = self
                    .driver
                    .start_traced(self.partition, id.clone(), data, trace, now, &mut out)
                    .map(|_| id);
                self.finish(&mut st, out, result.is_ok());
                let _ = done.send(result);
            }
            Request::Operate {
                id,
                operation,
                done,
            } => {
                let result = self.driver.operate(&id, operation, now, &mut out);
                self.finish(&mut st, out, result.is_ok());
                let _ = done.send(result);
            }
        }
        drop(st);
        backend.notify();
    }

    fn finish(&mut self, st: &mut crate::memory::backend::State, out: Vec<Record>, ok: bool) {
        if ok {
            self.backend.commit(st, out, None);
            self.driver.committed(|_| {});
        } else {
            self.driver.rolled_back();
        }
    }
}

/// What a participant worker found to do under the lock.
enum Job {
    /// Run this attempt, then commit it (with this input consumed).
    Run(Box<crate::driver::Attempt>, Option<(String, u64)>),
    /// An input handled without the handler, committed already.
    Done,
}

pub(crate) struct ParticipantWorker {
    pub(crate) driver: ParticipantDriver,
    pub(crate) backend: MemoryBackend,
    pub(crate) clock: Clock,
    pub(crate) partition: u32,
    pub(crate) health: HealthBoard,
}

impl ParticipantWorker {
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let records = self
            .backend
            .lock()
            .table(self.driver.ledger_topic(), self.partition);
        if let Err(e) = self.driver.restore(self.partition, records) {
            // Not served: reported until the runtime stops.
            let name = self.driver.policy().name.clone();
            self.health
                .report(&name, Some(self.partition), e.to_string(), self.clock.now());
            let _ = stop.changed().await;
            return;
        }
        let group = self.driver.policy().name.clone();
        let topics = [self.driver.channel().to_owned()];
        loop {
            let backend = self.backend.clone();
            let notified = backend.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.clock.now();
            let mut out = Vec::new();
            // Under the lock: a due retry, or the next command; what needs
            // no handler (a duplicate, a poison record) commits at once.
            let job = {
                let mut st = self.backend.lock();
                if let Some(attempt) = self.driver.take_due(now, &mut out) {
                    Some(Job::Run(Box::new(attempt), None))
                } else if let Some((topic, offset, rec)) = st.next(&group, &topics, self.partition)
                {
                    let incoming = rec.incoming(&topic, self.partition, offset);
                    match self.driver.on_record(&incoming, now, &mut out) {
                        Some(attempt) => Some(Job::Run(Box::new(attempt), Some((topic, offset)))),
                        None => {
                            let consumed =
                                Some((group.as_str(), topic.as_str(), self.partition, offset));
                            self.backend
                                .commit(&mut st, std::mem::take(&mut out), consumed);
                            self.driver.committed();
                            Some(Job::Done)
                        }
                    }
                } else {
                    if !out.is_empty() {
                        self.backend.commit(&mut st, std::mem::take(&mut out), None);
                        self.driver.committed();
                    }
                    None
                }
            };
            let (attempt, consumed) = match job {
                Some(Job::Run(attempt, consumed)) => (*attempt, consumed),
                Some(Job::Done) => {
                    self.backend.notify();
                    // Between two inputs: where a dropped runtime's abort
                    // stops the worker.
                    tokio::task::yield_now().await;
                    continue;
                }
                None => {
                    tokio::select! {
                    _ = &mut notified => {}
                    _ = sleep_until(self.clock, self.driver.next_due()) => {}
                    _ = stop.changed() => return,
                    }
                    continue;
                }
            };
            // The handler runs outside the lock; a crash (the runtime
            // dropped) before the commit below leaves the command unread.
            let started = tokio::time::Instant::now();
            let result = attempt.run(now).await;
            let took = started.elapsed();
            let mut st = self.backend.lock();
            self.driver
                .finish(attempt, result, took, self.clock.now(), &mut out);
            if let Err((_, e)) = self.driver.before_commit(&mut out) {
                // The participant's state cannot be written: nothing of
                // the attempt commits, and the partition stops here,
                // reported, until the runtime restarts.
                self.driver.rolled_back();
                let name = self.driver.policy().name.clone();
                self.health
                    .report(&name, Some(self.partition), e.to_string(), self.clock.now());
                drop(st);
                let _ = stop.changed().await;
                return;
            }
            let consumed = consumed
                .as_ref()
                .map(|(topic, offset)| (group.as_str(), topic.as_str(), self.partition, *offset));
            self.backend.commit(&mut st, out, consumed);
            self.driver.committed();
            drop(st);
            self.backend.notify();
        }
    }
}

/// A projection's handler, shared by its partitions' workers.
pub(crate) type SharedHandler = Arc<Mutex<dyn FnMut(&Envelope) + Send>>;

/// A projection's worker for one partition: the handler sees every
/// envelope on its channels, in order; offsets are committed after it.
pub(crate) struct ProjectionWorker {
    pub(crate) handler: SharedHandler,
    pub(crate) backend: MemoryBackend,
    pub(crate) group: String,
    pub(crate) channels: Vec<String>,
    pub(crate) partition: u32,
}

impl ProjectionWorker {
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            let backend = self.backend.clone();
            let notified = backend.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = self
                .backend
                .lock()
                .next(&self.group, &self.channels, self.partition);
            if let Some((topic, offset, rec)) = next {
                match rec.value.as_deref().map(Envelope::from_bytes) {
                    Some(Ok(env)) if rec.kind.is_none() => {
                        (self.handler.lock().unwrap_or_else(|e| e.into_inner()))(&env)
                    }
                    _ => {
                        tracing::debug!(group = %self.group, topic, offset, "not a message: skipped")
                    }
                }
                self.backend
                    .lock()
                    .commit(&self.group, &topic, self.partition, offset);
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = stop.changed() => return,
            }
        }
    }
}
