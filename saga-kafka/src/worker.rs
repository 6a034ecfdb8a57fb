//! The consume → process → produce loop shared by orchestrators and
//! participants, with its transaction handling (DESIGN.md §3).
//!
//! Each worker runs on its own OS thread, so the blocking librdkafka
//! transaction calls never run on the async executor. The worker's state
//! (the processor, the producer, the open batch) sits behind a mutex that
//! the consumer's rebalance callbacks also take: they run on the worker
//! thread inside `poll`, when the loop does not hold the lock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use saga_core::Timestamp;

use crate::config::{DeliveryMode, KafkaConfig};
use crate::error::{Error, Result};

/// The header that marks the runtime's own records on a topic.
pub(crate) const RECORD_HEADER: &str = "saga-record";

/// A record to produce.
#[derive(Clone, Debug)]
pub(crate) struct Out {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    /// The value of the [`RECORD_HEADER`] header, if any.
    pub record: Option<&'static str>,
    /// An explicit partition (else the key's murmur2 partition).
    pub partition: Option<i32>,
}

impl Out {
    /// A record keyed by `key`, partitioned by its hash.
    pub fn keyed(topic: impl Into<String>, key: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            topic: topic.into(),
            key: key.into(),
            payload,
            record: None,
            partition: None,
        }
    }
}

/// A consumed record.
pub(crate) struct Incoming<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub payload: &'a [u8],
    pub record: Option<String>,
}

/// Something the worker should do in its own transaction, between batches
/// (e.g. starting a saga from an API call).
pub(crate) struct Request {
    pub out: Vec<Out>,
    /// At least once: how many leading records of `out` must be durable
    /// before the rest are sent. Records to different partitions are not
    /// ordered otherwise (exactly once, the transaction orders them for
    /// `read_committed` readers).
    pub barrier: usize,
    pub done: Box<dyn FnOnce(Result<()>) + Send>,
}

/// What a worker runs: the saga orchestrator or a participant.
pub(crate) trait Processor: Send + 'static {
    /// The topics to consume.
    fn topics(&self) -> Vec<String>;
    /// Loads the state of newly assigned partitions.
    fn restore(&mut self, partitions: &[i32]) -> Result<()>;
    /// Forgets the state of partitions that went away.
    fn release(&mut self, partitions: &[i32]);
    /// The batch is about to commit: add the records that must commit with
    /// it (a participant's per-partition state snapshots).
    fn before_commit(&mut self, out: &mut Vec<Out>) {
        let _ = out;
    }
    /// Handles one record inside the open batch.
    fn on_message(&mut self, msg: &Incoming<'_>, now: Timestamp, out: &mut Vec<Out>);
    /// When the next timer or retry is due.
    fn next_due(&self) -> Option<Timestamp>;
    /// Runs one due timer or retry; `false` if nothing was due.
    fn on_due(&mut self, now: Timestamp, out: &mut Vec<Out>) -> bool;
    /// A pending request, if any.
    fn take_request(&mut self) -> Option<Request>;
    /// The batch committed: its changes are durable.
    fn committed(&mut self);
    /// The batch was aborted: undo its in-memory changes.
    fn rolled_back(&mut self);
}

/// Counters of one runtime's transactions (all workers).
#[derive(Debug, Default)]
pub(crate) struct StatsInner {
    pub commits: AtomicU64,
    pub aborts: AtomicU64,
    pub retries: AtomicU64,
    pub producer_rebuilds: AtomicU64,
    pub pending: AtomicU64,
    pub owned_partitions: AtomicU64,
    pub failed_requests: AtomicU64,
}

/// A snapshot of a runtime's transaction counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Batches (and requests) committed.
    pub commits: u64,
    /// Transactions aborted (their batch is redone); at least once, batches
    /// whose flush or offset commit failed (redone, so some of their
    /// messages may be delivered again).
    pub aborts: u64,
    /// Retriable client calls retried.
    pub retries: u64,
    /// Producers rebuilt after a fatal error.
    pub producer_rebuilds: u64,
    /// Messages produced in transactions not yet committed.
    pub pending: u64,
    /// Partitions currently assigned to this runtime's workers (summed over workers).
    pub owned_partitions: u64,
    /// Requests (saga starts) that failed and were reported to the caller.
    pub failed_requests: u64,
}

impl StatsInner {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            commits: self.commits.load(Ordering::Relaxed),
            aborts: self.aborts.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            producer_rebuilds: self.producer_rebuilds.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            owned_partitions: self.owned_partitions.load(Ordering::Relaxed),
            failed_requests: self.failed_requests.load(Ordering::Relaxed),
        }
    }
}

/// How a worker is asked to stop.
pub(crate) const RUN: u8 = 0;
pub(crate) const STOP: u8 = 1;
pub(crate) const KILL: u8 = 2;

type Producer_ = ThreadedProducer<DefaultProducerContext>;

/// The longest a worker waits in `poll` before checking requests and stop flags.
const IDLE_POLL: Duration = Duration::from_millis(20);

struct Core<P> {
    proc: P,
    cfg: Arc<KafkaConfig>,
    txn_id: String,
    producer: Option<Producer_>,
    in_txn: bool,
    failed: Option<RdError>,
    /// Next offset to commit per (topic, partition).
    offsets: BTreeMap<(String, i32), i64>,
    /// First offset of the open batch per (topic, partition): where to seek back to.
    batch_start: BTreeMap<(String, i32), i64>,
    count: usize,
    pending: u64,
    owned: BTreeSet<i32>,
    killed: bool,
    stats: Arc<StatsInner>,
    /// Exactly once: the callers of requests folded into the open batch,
    /// answered when it commits or aborts.
    waiting: Vec<Box<dyn FnOnce(Result<()>) + Send>>,
}

fn tpl_partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let set: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    set.into_iter().collect()
}

impl<P: Processor> Core<P> {
    fn new(proc: P, cfg: Arc<KafkaConfig>, txn_id: String, stats: Arc<StatsInner>) -> Self {
        Self {
            proc,
            cfg,
            txn_id,
            producer: None,
            in_txn: false,
            failed: None,
            offsets: BTreeMap::new(),
            batch_start: BTreeMap::new(),
            count: 0,
            pending: 0,
            owned: BTreeSet::new(),
            killed: false,
            stats,
            waiting: Vec::new(),
        }
    }

    fn eos(&self) -> bool {
        self.cfg.delivery == DeliveryMode::ExactlyOnce
    }

    fn create_producer(&self) -> std::result::Result<Producer_, RdError> {
        let txn = self.eos().then_some(self.txn_id.as_str());
        let p: Producer_ = self.cfg.producer_config(txn).create()?;
        if self.eos() {
            self.retry("init_transactions", || {
                p.init_transactions(self.cfg.transaction_timeout)
            })?;
        }
        Ok(p)
    }

    fn ensure_producer(&mut self) -> std::result::Result<(), RdError> {
        if self.producer.is_none() {
            self.producer = Some(self.create_producer()?);
        }
        Ok(())
    }

    /// Calls `f` again while it fails with a retriable error, at most `max_retries` times.
    fn retry<T>(
        &self,
        what: &str,
        mut f: impl FnMut() -> std::result::Result<T, RdError>,
    ) -> std::result::Result<T, RdError> {
        let mut attempt = 0;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(RdError::Transaction(e))
                    if e.is_retriable() && attempt < self.cfg.max_retries =>
                {
                    attempt += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(transactional_id = %self.txn_id, what, attempt, error = %e, "retriable error: retrying");
                    std::thread::sleep(self.cfg.retry_backoff * attempt);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn begin(&mut self) {
        if self.in_txn || self.failed.is_some() {
            return;
        }
        if !self.eos() {
            if let Err(e) = self.ensure_producer() {
                self.failed = Some(e);
            }
            self.in_txn = true;
            return;
        }
        let r = self.ensure_producer().and_then(|_| {
            let p = self.producer.as_ref().expect("producer ensured above");
            p.begin_transaction()
        });
        match r {
            Ok(()) => self.in_txn = true,
            Err(e) => {
                tracing::warn!(transactional_id = %self.txn_id, error = %e, "cannot begin a transaction");
                self.failed = Some(e);
            }
        }
    }

    fn send(&mut self, out: Vec<Out>) {
        for o in out {
            if self.failed.is_some() {
                return;
            }
            let Some(p) = self.producer.as_ref() else {
                return;
            };
            let headers = o.record.map(|v| {
                OwnedHeaders::new().insert(Header {
                    key: RECORD_HEADER,
                    value: Some(v),
                })
            });
            let mut rec = BaseRecord::to(&o.topic).key(&o.key).payload(&o.payload);
            if let Some(h) = headers {
                rec = rec.headers(h);
            }
            if let Some(p) = o.partition {
                rec = rec.partition(p);
            }
            loop {
                match p.send(rec) {
                    Ok(()) => {
                        self.pending += 1;
                        self.stats.pending.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => {
                        tracing::warn!(transactional_id = %self.txn_id, topic = %o.topic, error = %e, "cannot produce");
                        self.failed = Some(e);
                        break;
                    }
                }
            }
        }
    }

    fn track(&mut self, topic: &str, partition: i32, offset: i64) {
        self.batch_start
            .entry((topic.to_owned(), partition))
            .or_insert(offset);
    }

    fn handle_message(&mut self, msg: &Incoming<'_>) {
        self.track(msg.topic, msg.partition, msg.offset);
        if !self.owned.contains(&msg.partition) {
            return;
        }
        self.begin();
        if self.failed.is_some() {
            return;
        }
        let mut out = Vec::new();
        self.proc.on_message(msg, Timestamp::now(), &mut out);
        self.send(out);
        self.offsets
            .insert((msg.topic.to_owned(), msg.partition), msg.offset + 1);
        self.count += 1;
    }

    fn run_due(&mut self) {
        while self.failed.is_none() {
            let now = Timestamp::now();
            match self.proc.next_due() {
                Some(at) if at <= now => {}
                _ => return,
            }
            self.begin();
            if self.failed.is_some() {
                return;
            }
            let mut out = Vec::new();
            if !self.proc.on_due(now, &mut out) {
                return;
            }
            self.send(out);
            self.count += 1;
        }
    }

    fn offsets_tpl(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &self.offsets {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        tpl
    }

    fn try_commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> std::result::Result<(), RdError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let p = self.producer.as_ref().ok_or(RdError::Canceled)?;
        let tpl = self.offsets_tpl();
        if self.eos() {
            if tpl.count() > 0 {
                let gm = consumer.group_metadata().ok_or(RdError::Canceled)?;
                self.retry("send_offsets_to_transaction", || {
                    p.send_offsets_to_transaction(&tpl, &gm, self.cfg.transaction_timeout)
                })?;
            }
            self.retry("commit_transaction", || {
                p.commit_transaction(self.cfg.transaction_timeout)
            })?;
        } else {
            p.flush(self.cfg.message_timeout)?;
            if tpl.count() > 0 {
                consumer.commit(&tpl, CommitMode::Sync)?;
            }
        }
        Ok(())
    }

    fn clear_batch(&mut self) {
        self.in_txn = false;
        self.failed = None;
        self.offsets.clear();
        self.batch_start.clear();
        self.count = 0;
        self.stats
            .pending
            .fetch_sub(self.pending, Ordering::Relaxed);
        self.pending = 0;
    }

    /// Commits the open batch; on failure aborts it and, with `consumer`,
    /// seeks back so the batch is redone.
    fn finish_batch<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, rewind: bool) {
        if !self.in_txn && self.failed.is_none() {
            self.clear_batch();
            return;
        }
        if self.failed.is_none() {
            let mut out = Vec::new();
            self.proc.before_commit(&mut out);
            self.send(out);
        }
        match self.try_commit(consumer) {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.proc.committed();
                self.clear_batch();
                self.settle_requests(None);
            }
            Err(e) => {
                tracing::warn!(transactional_id = %self.txn_id, error = %e, "batch failed: aborting and redoing it");
                self.abort(&e);
                self.settle_requests(Some(&e));
                if !self.eos() && rewind {
                    // At least once, nothing is undone on the broker: some
                    // or all of the batch's records (ledgers, saga states,
                    // replies) may be written even though the offsets are
                    // not. Re-read the state those records left, so the
                    // redo deduplicates against it instead of applying a
                    // command again from the rolled-back memory.
                    let parts: Vec<i32> = self
                        .batch_start
                        .keys()
                        .map(|(_, p)| *p)
                        .filter(|p| self.owned.contains(p))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    self.proc.release(&parts);
                    if !self.restore_with_retries(&parts) {
                        for p in &parts {
                            if self.owned.remove(p) {
                                self.stats.owned_partitions.fetch_sub(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                if rewind {
                    for ((t, p), o) in &self.batch_start {
                        if let Err(e) =
                            consumer.seek(t, *p, Offset::Offset(*o), Duration::from_secs(10))
                        {
                            tracing::warn!(topic = %t, partition = p, error = %e, "cannot seek back");
                        }
                    }
                }
                self.clear_batch();
            }
        }
    }

    /// Aborts the open transaction (or, if the error was fatal or the abort
    /// fails, discards the producer: the next transaction builds a new one
    /// with the same transactional id, fencing the old) and rolls the
    /// processor back.
    fn abort(&mut self, cause: &RdError) {
        let fatal = matches!(cause, RdError::Transaction(e) if e.is_fatal());
        let mut rebuild = fatal;
        if !self.eos() && self.in_txn {
            // At least once there is no transaction: count the redone batch.
            self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        }
        if self.eos() && !fatal && self.in_txn {
            if let Some(p) = self.producer.as_ref() {
                // One bounded attempt: a broker that cannot abort now will
                // not be helped by waiting longer; the rebuild fences anyway.
                match p.abort_transaction(self.cfg.transaction_timeout) {
                    Ok(()) => {
                        self.stats.aborts.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(transactional_id = %self.txn_id, error = %e, "abort failed: rebuilding the producer");
                        rebuild = true;
                    }
                }
            }
        }
        if rebuild {
            self.stats.producer_rebuilds.fetch_add(1, Ordering::Relaxed);
            self.producer = None;
        }
        self.proc.rolled_back();
    }

    /// Loads the state of `parts`, retrying a few times; `false` if it
    /// cannot (those partitions are then not served).
    fn restore_with_retries(&mut self, parts: &[i32]) -> bool {
        let mut tries = 0;
        loop {
            match self.proc.restore(parts) {
                Ok(()) => return true,
                Err(e) if tries < 10 => {
                    tries += 1;
                    tracing::warn!(error = %e, "cannot restore state: retrying");
                    std::thread::sleep(Duration::from_millis(200 * tries));
                }
                Err(e) => {
                    tracing::error!(error = %e, partitions = ?parts, "cannot restore state: these partitions are not served");
                    return false;
                }
            }
        }
    }

    /// Exactly once: adds a request's records to the open batch (beginning
    /// one if needed); its caller is answered when the batch commits or
    /// aborts. Many starts then share one transaction instead of paying
    /// for one each.
    fn add_request(&mut self, req: Request) {
        self.begin();
        if let Some(e) = self.failed.clone() {
            (req.done)(Err(self.transaction_error("beginning the transaction", &e)));
            return;
        }
        self.send(req.out);
        self.count += 1;
        self.waiting.push(req.done);
    }

    /// Answers the callers of the requests in the batch that just ended:
    /// `None` if it committed, else the error that aborted it.
    fn settle_requests(&mut self, failure: Option<&RdError>) {
        for done in std::mem::take(&mut self.waiting) {
            match failure {
                None => done(Ok(())),
                Some(e) => {
                    self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                    done(Err(self.transaction_error("committing the batch", e)));
                }
            }
        }
    }

    fn transaction_error(&self, what: &str, e: &RdError) -> Error {
        Error::Transaction {
            transactional_id: self.txn_id.clone(),
            what: what.into(),
            source: Box::new(e.clone()),
        }
    }

    /// Takes the pending requests: exactly once they join the open batch;
    /// at least once they run one by one, only while no batch is open
    /// (their records must be flushed in order around a barrier).
    fn serve_requests(&mut self, busy: bool) {
        if self.eos() {
            while let Some(req) = self.proc.take_request() {
                self.add_request(req);
            }
        } else if !busy {
            while let Some(req) = self.proc.take_request() {
                self.run_request(req);
            }
        }
    }

    fn run_request(&mut self, req: Request) {
        let result = self.request_txn(req.out, req.barrier);
        let result = match result {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err((what, e)) => {
                self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                self.abort(&e);
                Err(Error::Transaction {
                    transactional_id: self.txn_id.clone(),
                    what: what.into(),
                    source: Box::new(e),
                })
            }
        };
        self.clear_batch();
        (req.done)(result);
    }

    fn request_txn(
        &mut self,
        mut out: Vec<Out>,
        barrier: usize,
    ) -> std::result::Result<(), (&'static str, RdError)> {
        self.begin();
        if let Some(e) = self.failed.take() {
            return Err(("beginning the transaction", e));
        }
        if !self.eos() && barrier > 0 && barrier < out.len() {
            let rest = out.split_off(barrier);
            self.send(out);
            if let Some(e) = self.failed.take() {
                return Err(("producing", e));
            }
            if let Some(p) = self.producer.as_ref() {
                p.flush(self.cfg.message_timeout)
                    .map_err(|e| ("flushing", e))?;
            }
            out = rest;
        }
        self.send(out);
        if let Some(e) = self.failed.take() {
            return Err(("producing", e));
        }
        let p = self
            .producer
            .as_ref()
            .ok_or(("producing", RdError::Canceled))?;
        if self.eos() {
            self.retry("commit_transaction", || {
                p.commit_transaction(self.cfg.transaction_timeout)
            })
            .map_err(|e| ("committing", e))
        } else {
            p.flush(self.cfg.message_timeout)
                .map_err(|e| ("flushing", e))
        }
    }
}

struct Ctx<P> {
    core: Arc<Mutex<Core<P>>>,
}

fn lock<P>(m: &Mutex<Core<P>>) -> MutexGuard<'_, Core<P>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<P: Processor> ClientContext for Ctx<P> {}

impl<P: Processor> ConsumerContext for Ctx<P> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut c = lock(&self.core);
            if c.killed {
                return;
            }
            if consumer.assignment_lost() {
                if c.in_txn {
                    c.abort(&RdError::Canceled);
                }
                c.clear_batch();
                c.settle_requests(Some(&RdError::Canceled));
            } else {
                c.finish_batch(consumer, false);
            }
            let parts = tpl_partitions(tpl);
            tracing::info!(transactional_id = %c.txn_id, partitions = ?parts, "partitions revoked");
            c.proc.release(&parts);
            for p in &parts {
                if c.owned.remove(p) {
                    c.stats.owned_partitions.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut c = lock(&self.core);
            let parts = tpl_partitions(tpl);
            tracing::info!(transactional_id = %c.txn_id, partitions = ?parts, "partitions assigned: restoring state");
            if !c.restore_with_retries(&parts) {
                return;
            }
            for p in parts {
                if c.owned.insert(p) {
                    c.stats.owned_partitions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A running worker thread.
pub(crate) struct WorkerHandle {
    pub stop: Arc<AtomicU8>,
    pub thread: Option<JoinHandle<()>>,
}

/// Starts a worker for `proc` on its own thread, consuming as `group` with
/// the producer of `service`. Returns once the producer is initialised.
pub(crate) fn spawn<P: Processor>(
    cfg: Arc<KafkaConfig>,
    service: &str,
    group: &str,
    proc: P,
    stats: Arc<StatsInner>,
) -> Result<WorkerHandle> {
    let txn_id = cfg.transactional_id(service);
    let topics = proc.topics();
    let core = Arc::new(Mutex::new(Core::new(
        proc,
        cfg.clone(),
        txn_id.clone(),
        stats,
    )));
    lock(&core)
        .ensure_producer()
        .map_err(|e| Error::client(format!("creating the producer `{txn_id}`"), e))?;
    let consumer: BaseConsumer<Ctx<P>> = cfg
        .consumer_config(group)
        .create_with_context(Ctx { core: core.clone() })
        .map_err(|e| Error::client(format!("creating the consumer of group `{group}`"), e))?;
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&refs)
        .map_err(|e| Error::client(format!("subscribing to {topics:?}"), e))?;
    let stop = Arc::new(AtomicU8::new(RUN));
    let flag = stop.clone();
    let span = tracing::info_span!("saga_kafka.worker", transactional_id = %txn_id, group = %group);
    let thread = std::thread::Builder::new()
        .name(format!("saga-kafka-{service}"))
        .spawn(move || {
            let _g = span.enter();
            run(&core, &consumer, &flag);
            if flag.load(Ordering::SeqCst) == KILL {
                lock(&core).killed = true;
                drop(consumer);
                // Leave the transaction open on the broker, as a crash would.
                let mut c = lock(&core);
                if let Some(p) = c.producer.take() {
                    let _ = p.flush(Duration::from_secs(2));
                    drop(p);
                }
                let pending = c.pending;
                c.stats.pending.fetch_sub(pending, Ordering::Relaxed);
                c.pending = 0;
            } else {
                drop(consumer);
            }
            let mut c = lock(&core);
            let owned = c.owned.len() as u64;
            c.stats.owned_partitions.fetch_sub(owned, Ordering::Relaxed);
            c.owned.clear();
        })
        .map_err(|e| Error::Config {
            key: "thread".into(),
            reason: format!("cannot spawn a worker thread: {e}"),
        })?;
    Ok(WorkerHandle {
        stop,
        thread: Some(thread),
    })
}

fn run<P: Processor>(core: &Arc<Mutex<Core<P>>>, consumer: &BaseConsumer<Ctx<P>>, stop: &AtomicU8) {
    let (max, timeout, linger) = {
        let c = lock(core);
        (
            c.cfg.batch_max_messages,
            c.cfg.batch_timeout,
            c.cfg.start_linger,
        )
    };
    loop {
        match stop.load(Ordering::SeqCst) {
            RUN => {}
            KILL => return,
            _ => {
                lock(core).finish_batch(consumer, true);
                return;
            }
        }
        {
            let mut c = lock(core);
            c.serve_requests(false);
        }
        // The batch's clock starts with its first message, timer or request.
        let mut deadline: Option<Instant> = if lock(core).waiting.is_empty() {
            None
        } else {
            Some(Instant::now() + linger.min(timeout))
        };
        loop {
            let wait = {
                let c = lock(core);
                let mut wait = match deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => timeout,
                }
                .min(IDLE_POLL);
                if let Some(at) = c.proc.next_due() {
                    let ms = at.as_millis().saturating_sub(Timestamp::now().as_millis());
                    wait = wait.min(Duration::from_millis(ms));
                }
                wait
            };
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    let record = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == RECORD_HEADER)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    });
                    let msg = Incoming {
                        topic: m.topic(),
                        partition: m.partition(),
                        offset: m.offset(),
                        payload: m.payload().unwrap_or(&[]),
                        record,
                    };
                    lock(core).handle_message(&msg);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            let mut c = lock(core);
            c.run_due();
            let busy = c.in_txn || c.failed.is_some() || !c.batch_start.is_empty();
            if busy && deadline.is_none() {
                deadline = Some(Instant::now() + timeout);
            }
            let expired = deadline.is_some_and(|d| Instant::now() >= d);
            if c.count >= max || expired || stop.load(Ordering::SeqCst) != RUN {
                break;
            }
            let had_callers = !c.waiting.is_empty();
            c.serve_requests(busy);
            if deadline.is_none() && c.in_txn {
                deadline = Some(Instant::now() + timeout);
            }
            if !had_callers && !c.waiting.is_empty() {
                // Callers are waiting on this batch: end it soon.
                let soon = Instant::now() + linger.min(timeout);
                deadline = Some(deadline.map_or(soon, |d| d.min(soon)));
            }
        }
        if stop.load(Ordering::SeqCst) == KILL {
            return;
        }
        lock(core).finish_batch(consumer, true);
    }
}

/// The processor of a [`Publisher`]: it consumes nothing.
struct NoInput;

impl Processor for NoInput {
    fn topics(&self) -> Vec<String> {
        Vec::new()
    }
    fn restore(&mut self, _: &[i32]) -> Result<()> {
        Ok(())
    }
    fn release(&mut self, _: &[i32]) {}
    fn on_message(&mut self, _: &Incoming<'_>, _: Timestamp, _: &mut Vec<Out>) {}
    fn next_due(&self) -> Option<Timestamp> {
        None
    }
    fn on_due(&mut self, _: Timestamp, _: &mut Vec<Out>) -> bool {
        false
    }
    fn take_request(&mut self) -> Option<Request> {
        None
    }
    fn committed(&mut self) {}
    fn rolled_back(&mut self) {}
}

/// A producer for records that are not the result of consuming anything
/// (`KafkaRuntime::publish`): each call is one transaction (exactly once)
/// or one idempotent, flushed write (at least once), with the workers'
/// retry, abort and rebuild rules. The producer is created on first use.
pub(crate) struct Publisher {
    core: Mutex<Core<NoInput>>,
}

impl Publisher {
    pub(crate) fn new(cfg: Arc<KafkaConfig>, service: &str, stats: Arc<StatsInner>) -> Self {
        let txn_id = cfg.transactional_id(service);
        Self {
            core: Mutex::new(Core::new(NoInput, cfg, txn_id, stats)),
        }
    }

    /// Writes `out` atomically; blocks (call it off the async threads).
    pub(crate) fn publish(&self, out: Vec<Out>) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        lock(&self.core).run_request(Request {
            out,
            barrier: 0,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.recv().map_err(|_| Error::Shutdown)?
    }
}
