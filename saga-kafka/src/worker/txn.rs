//! One worker's producer and its transactions: begin, produce, commit
//! (with the consumed offsets), abort, the retriable / abortable / fatal
//! error recipe, and the runtime's counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;
use saga_core::driver::{Record, RecordKind, RECORD_KIND_HEADER};
use saga_core::TRACEPARENT_HEADER;

use crate::config::{DeliveryMode, KafkaConfig};
use crate::context::{denied, record_fault, Deliveries};
use crate::error::Error;
use crate::metrics::WorkerMetrics;

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
    pub authorization_failures: AtomicU64,
    pub records_produced: AtomicU64,
    pub bytes_produced: AtomicU64,
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
    /// Messages of transactions not yet committed (exactly once counted
    /// when the batch adds them, although they are produced at its
    /// commit).
    pub pending: u64,
    /// Partitions currently assigned to this runtime's workers (summed over workers).
    pub owned_partitions: u64,
    /// Requests (saga starts, operator actions, publishes) that failed and
    /// were reported to the caller.
    pub failed_requests: u64,
    /// Batches and polls the cluster refused for want of an ACL (also the
    /// counter `saga_kafka_authorization_failures_total`, label
    /// `component`).
    pub authorization_failures: u64,
    /// Records written by committed transactions (at least once: by
    /// batches whose flush and offset commit succeeded), every kind:
    /// messages, state records, ledger entries (also the counter
    /// `saga_kafka_records_produced_total`).
    pub records_produced: u64,
    /// The bytes of those records' keys and values (also the counter
    /// `saga_kafka_bytes_produced_total`).
    pub bytes_produced: u64,
}

impl StatsInner {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            commits: self.commits.load(Ordering::Acquire),
            aborts: self.aborts.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            producer_rebuilds: self.producer_rebuilds.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            owned_partitions: self.owned_partitions.load(Ordering::Relaxed),
            failed_requests: self.failed_requests.load(Ordering::Relaxed),
            authorization_failures: self.authorization_failures.load(Ordering::Relaxed),
            records_produced: self.records_produced.load(Ordering::Relaxed),
            bytes_produced: self.bytes_produced.load(Ordering::Relaxed),
        }
    }
}

pub(crate) type Producer_ = ThreadedProducer<Deliveries>;

/// Waits until every message produced so far is acknowledged or reported failed (or
/// `limit` passed). The producer's own thread serves the reports; without
/// this, the client's flush before a commit waits out a fixed 100 ms poll
/// whenever a message is still in flight, which is most commits.
fn drain(p: &Producer_, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(50);
    while p.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

/// The [`RECORD_KIND_HEADER`] a record is written with: none for saga
/// states and ledger entries. Their topics are compacted and read by key
/// (a restore, the saga catalog), never by header: a state topic holds
/// states only, and a restore tells a ledger topic's entries from the
/// participant's per-partition state by key (the state keeps its `shard`
/// header, for other tools). Half of a saga's records are these, and a
/// header costs the client a list of its own per record, allocated here
/// and freed by librdkafka's thread once delivered.
fn kind_header(kind: RecordKind) -> Option<&'static str> {
    match kind {
        RecordKind::SagaState | RecordKind::Ledger => None,
        other => other.header(),
    }
}

/// The most bytes of records an exactly-once batch holds before it
/// produces them (see [`Txn::send`]). A batch at a steady load holds tens
/// of kilobytes; a full batch (5,000 inputs by default) of kilobyte
/// records passes it.
const HELD_MAX_BYTES: usize = 4 << 20;

/// A worker's producer and the state of its open transaction (exactly
/// once) or batch (at least once).
pub(crate) struct Txn {
    pub(crate) cfg: Arc<KafkaConfig>,
    pub(crate) id: String,
    pub(crate) producer: Option<Producer_>,
    /// A transaction (or batch) is open.
    pub(crate) open: bool,
    /// The open transaction failed: it must be aborted.
    pub(crate) failed: Option<RdError>,
    /// Records of the open transaction (held or produced).
    pub(crate) pending: u64,
    /// Exactly once: records of the open transaction not produced yet
    /// (see [`Txn::send`]), and their keys' and values' bytes.
    held: Vec<Record>,
    held_bytes: usize,
    /// Calls of [`Txn::send`] in the open transaction (one per input, in
    /// order), and where each one's records start in `held`.
    sends: usize,
    held_from: Vec<(usize, usize)>,
    /// The call of [`Txn::send`] whose record the client refused as it is.
    refused_send: Option<usize>,
    pub(crate) stats: Arc<StatsInner>,
    /// The producer's delivery reports.
    deliveries: Deliveries,
    /// A record of the open transaction the client refused as it is: its
    /// topic, and why.
    fault: Option<(String, String)>,
    /// The worker's metric handles.
    pub(crate) metrics: WorkerMetrics,
}

impl Txn {
    pub(crate) fn new(
        cfg: Arc<KafkaConfig>,
        id: String,
        stats: Arc<StatsInner>,
        component: &str,
    ) -> Self {
        Self {
            cfg,
            id,
            producer: None,
            open: false,
            failed: None,
            pending: 0,
            held: Vec::new(),
            held_bytes: 0,
            sends: 0,
            held_from: Vec::new(),
            refused_send: None,
            stats,
            deliveries: Deliveries::default(),
            fault: None,
            metrics: WorkerMetrics::new(component),
        }
    }

    pub(crate) fn eos(&self) -> bool {
        self.cfg.delivery == DeliveryMode::ExactlyOnce
    }

    fn create_producer(&self) -> Result<Producer_, RdError> {
        let txn = self.eos().then_some(self.id.as_str());
        let p: Producer_ = self
            .cfg
            .producer_config(txn)
            .create_with_context(self.deliveries.clone())?;
        if self.eos() {
            self.retry("init_transactions", || {
                p.init_transactions(self.cfg.transaction_timeout)
            })?;
        }
        Ok(p)
    }

    pub(crate) fn ensure_producer(&mut self) -> Result<(), RdError> {
        if self.producer.is_none() {
            self.producer = Some(self.create_producer()?);
        }
        Ok(())
    }

    /// Calls `f` again while it fails with a retriable error, at most
    /// `max_retries` times.
    pub(crate) fn retry<T>(
        &self,
        what: &str,
        mut f: impl FnMut() -> Result<T, RdError>,
    ) -> Result<T, RdError> {
        let mut attempt = 0;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(RdError::Transaction(e))
                    if e.is_retriable() && attempt < self.cfg.max_retries =>
                {
                    attempt += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(transactional_id = %self.id, what, attempt, error = %e, "retriable error: retrying");
                    std::thread::sleep(self.cfg.retry_backoff * attempt);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens a transaction (a batch, at least once) unless one is open.
    pub(crate) fn begin(&mut self) {
        if self.open || self.failed.is_some() {
            return;
        }
        let eos = self.eos();
        let r = self.ensure_producer().and_then(|_| match &self.producer {
            Some(p) if eos => p.begin_transaction(),
            _ => Ok(()),
        });
        match r {
            Ok(()) => self.open = true,
            Err(e) => {
                tracing::warn!(transactional_id = %self.id, error = %e, "cannot begin a transaction");
                self.open = !eos;
                self.failed = Some(e);
            }
        }
    }

    /// Adds `records` to the open transaction. Exactly once they are held
    /// until the commit, which produces them after the consumed offsets are
    /// in the transaction (see [`Txn::commit`]), unless the batch holds
    /// more than [`HELD_MAX_BYTES`]: then what it holds is produced at
    /// once, so a large batch's memory stays bounded and its records flow
    /// while it runs. At least once they are produced at once.
    pub(crate) fn send(&mut self, records: Vec<Record>) {
        if self.failed.is_some() {
            return;
        }
        self.sends += 1;
        if self.eos() {
            if !records.is_empty() {
                self.held_from.push((self.held.len(), self.sends));
            }
            // In the open transaction from now on: counted as pending.
            self.pending += records.len() as u64;
            self.stats
                .pending
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            self.held_bytes += records.iter().map(Record::size).sum::<usize>();
            if self.held.is_empty() {
                self.held = records;
            } else {
                self.held.extend(records);
            }
            if self.held_bytes > HELD_MAX_BYTES {
                self.produce_held();
            }
        } else if self.produce(records, true).is_some() {
            self.refused_send = Some(self.sends);
        }
    }

    /// Produces the records [`Txn::send`] held (exactly once); an error
    /// marks the transaction failed.
    pub(crate) fn produce_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        let from = std::mem::take(&mut self.held_from);
        if let Some(i) = self.produce(held, false) {
            // The call that added the record: the last to start at or
            // before it.
            self.refused_send = from.iter().rev().find(|(at, _)| *at <= i).map(|(_, n)| *n);
        }
    }

    /// Which input of the open transaction (1 for the first) made the
    /// record the client refused as it is, if one was (see
    /// [`Txn::record_fault`]): a batch redone one input at a time need
    /// isolate no input after it.
    pub(crate) fn refused_input(&self) -> Option<usize> {
        self.refused_send
    }

    /// Produces `records` in the open transaction (counting them as
    /// pending if `count_pending`); the first error marks the transaction
    /// failed and drops the rest. Returns the index of a record the client
    /// refused as it is (see [`Txn::record_fault`]).
    fn produce(&mut self, records: Vec<Record>, count_pending: bool) -> Option<usize> {
        let mut refused = None;
        for (i, r) in records.into_iter().enumerate() {
            if self.failed.is_some() {
                break;
            }
            let Some(p) = self.producer.as_ref() else {
                // Only between an abort and the end of its batch; never
                // drop records without failing their transaction.
                self.failed = Some(RdError::Canceled);
                break;
            };
            let mut rec = BaseRecord::to(&r.topic).key(&r.key);
            if let Some(v) = &r.value {
                rec = rec.payload(v);
            }
            // The trace context as text on the stack (55 bytes); the
            // client copies headers into its own list.
            let trace = r.traceparent.map(|t| t.to_header());
            let kind = kind_header(r.kind);
            let count = usize::from(kind.is_some()) + usize::from(trace.is_some());
            if count > 0 {
                let mut headers = OwnedHeaders::new_with_capacity(count);
                if let Some(kind) = kind {
                    headers = headers.insert(Header {
                        key: RECORD_KIND_HEADER,
                        value: Some(kind),
                    });
                }
                if let Some(trace) = &trace {
                    headers = headers.insert(Header {
                        key: TRACEPARENT_HEADER,
                        value: Some(&trace[..]),
                    });
                }
                rec = rec.headers(headers);
            }
            if let Some(partition) = r.partition {
                rec = rec.partition(i32::try_from(partition).unwrap_or(i32::MAX));
            }
            loop {
                match p.send(rec) {
                    Ok(()) => {
                        if count_pending {
                            self.pending += 1;
                            self.stats.pending.fetch_add(1, Ordering::Relaxed);
                        }
                        self.metrics.produced(&r.topic, r.size());
                        break;
                    }
                    Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => {
                        tracing::warn!(transactional_id = %self.id, topic = %r.topic, error = %e, "cannot produce");
                        if e.rdkafka_error_code()
                            == Some(RDKafkaErrorCode::TopicAuthorizationFailed)
                        {
                            let mut d = self
                                .deliveries
                                .denied
                                .lock()
                                .unwrap_or_else(|e| e.into_inner());
                            d.get_or_insert_with(|| r.topic.clone());
                        }
                        if e.rdkafka_error_code().is_some_and(record_fault) {
                            let why = format!(
                                "a record for `{}` of {} bytes cannot be produced: {e}",
                                r.topic,
                                r.size()
                            );
                            self.fault = Some((r.topic.clone(), why));
                            refused = Some(i);
                        }
                        self.failed = Some(e);
                        break;
                    }
                }
            }
        }
        refused
    }

    /// Commits the open transaction with the consumer's `offsets` (exactly
    /// once), or flushes and commits the offsets (at least once).
    ///
    /// Exactly once, the offsets go into the transaction first and the held
    /// records are produced after. Right after a commit the coordinator
    /// still writes that transaction's markers, and it answers the next
    /// transaction's first request with `CONCURRENT_TRANSACTIONS` until
    /// they are written. The client retries adding offsets after
    /// `retry.backoff.ms`, but adding partitions (a transaction's first
    /// produce to each) only after a fixed 20 ms, which about a fifth of
    /// the orchestrator's commits paid under a steady load when records
    /// were produced as they were made. Produced together, the records
    /// also add all their partitions in one request rather than one
    /// request after another.
    pub(crate) fn commit<C: ConsumerContext>(
        &mut self,
        offsets: &TopicPartitionList,
        consumer: Option<&BaseConsumer<C>>,
    ) -> Result<(), RdError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.eos() {
            if offsets.count() > 0 {
                let p = self.producer.as_ref().ok_or(RdError::Canceled)?;
                let consumer = consumer.ok_or(RdError::Canceled)?;
                let gm = consumer.group_metadata().ok_or(RdError::Canceled)?;
                self.retry("send_offsets_to_transaction", || {
                    p.send_offsets_to_transaction(offsets, &gm, self.cfg.transaction_timeout)
                })?;
            }
            self.produce_held();
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            let p = self.producer.as_ref().ok_or(RdError::Canceled)?;
            drain(p, self.cfg.message_timeout);
            self.retry("commit_transaction", || {
                p.commit_transaction(self.cfg.transaction_timeout)
            })?;
        } else {
            let p = self.producer.as_ref().ok_or(RdError::Canceled)?;
            drain(p, self.cfg.message_timeout);
            p.flush(self.cfg.message_timeout)?;
            // A flush ends once nothing is in flight, delivered or not: a
            // record that failed must not have its input's offset
            // committed (the batch is redone instead).
            if let Some(code) = self.deliveries.take_failed() {
                return Err(RdError::MessageProduction(code));
            }
            if let (Some(consumer), true) = (consumer, offsets.count() > 0) {
                consumer.commit(offsets, CommitMode::Sync)?;
            }
        }
        Ok(())
    }

    /// The topic the open transaction was not authorized to write to, if
    /// the cluster said so.
    pub(crate) fn denied_topic(&self) -> Option<String> {
        self.deliveries.take_denied()
    }

    /// Why the open transaction failed, if a record of it was refused as
    /// it is (writing it again would fail again).
    pub(crate) fn record_fault(&mut self) -> Option<(String, String)> {
        self.fault.take().or_else(|| self.deliveries.take_fault())
    }

    /// The open transaction (or batch) of `inputs` committed; the commit
    /// took `secs`; its messages reached the worker at `arrivals`. Counts
    /// it, and what it produced, in the metrics and the runtime's
    /// [`Stats`].
    pub(crate) fn committed(&mut self, inputs: usize, secs: f64, arrivals: &[Instant]) {
        let (records, bytes) = self.metrics.committed(inputs, secs, arrivals);
        // Before the commit count (released, and read first by
        // `snapshot`): a reader that sees the commit sees what it wrote.
        self.stats
            .records_produced
            .fetch_add(records, Ordering::Relaxed);
        self.stats
            .bytes_produced
            .fetch_add(bytes, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Release);
    }

    /// The transaction ended (committed or aborted): forget it.
    pub(crate) fn clear(&mut self) {
        // Counted by `Txn::committed` if it committed.
        self.metrics.forget_pending();
        self.open = false;
        self.failed = None;
        self.fault = None;
        self.held.clear();
        self.held_bytes = 0;
        self.held_from.clear();
        self.sends = 0;
        self.refused_send = None;
        let _ = self.deliveries.take_fault();
        let _ = self.deliveries.take_denied();
        let _ = self.deliveries.take_failed();
        self.stats
            .pending
            .fetch_sub(self.pending, Ordering::Relaxed);
        self.pending = 0;
    }

    /// Aborts the open transaction (or, if the error was fatal or the abort
    /// fails, discards the producer: the next transaction builds a new one
    /// with the same transactional id, fencing the old).
    pub(crate) fn abort(&mut self, cause: &RdError) {
        self.held.clear();
        self.held_bytes = 0;
        self.held_from.clear();
        let fatal = matches!(cause, RdError::Transaction(e) if e.is_fatal());
        let mut rebuild = fatal;
        if !self.eos() && self.open {
            // At least once there is no transaction: count the redone batch.
            self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        }
        if self.eos() && !fatal && self.open {
            if let Some(p) = self.producer.as_ref() {
                // One bounded attempt: a broker that cannot abort now will
                // not be helped by waiting longer; the rebuild fences anyway.
                match p.abort_transaction(self.cfg.transaction_timeout) {
                    Ok(()) => {
                        self.stats.aborts.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(transactional_id = %self.id, error = %e, "abort failed: rebuilding the producer");
                        rebuild = true;
                    }
                }
            }
        }
        if rebuild {
            self.stats.producer_rebuilds.fetch_add(1, Ordering::Relaxed);
            self.producer = None;
        }
    }

    /// Drops the producer: the next transaction builds a new one with the
    /// same transactional id.
    pub(crate) fn discard_producer(&mut self) {
        if self.producer.take().is_some() {
            self.stats.producer_rebuilds.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The caller-facing error of a failed transaction.
    pub(crate) fn error(&self, what: &str, e: &RdError) -> Error {
        self.error_on(what, e, None)
    }

    /// Like [`Txn::error`], knowing the topic a produce was refused on:
    /// an authorization error names the principal, operation and resource.
    pub(crate) fn error_on(&self, what: &str, e: &RdError, topic: Option<&str>) -> Error {
        // A refused record's delivery report may be the only word of it
        // (the commit then fails with "message(s) failed delivery").
        let kind = e
            .rdkafka_error_code()
            .and_then(denied)
            .or(topic.map(|_| "topic"));
        if let Some(kind) = kind {
            let (operation, resource) = match (kind, topic) {
                ("topic", Some(t)) => ("WRITE".to_owned(), format!("topic `{t}`")),
                ("topic", None) => ("WRITE".to_owned(), "a topic written".to_owned()),
                ("transactional id", _) => (
                    "WRITE".to_owned(),
                    format!("transactional id `{}`", self.id),
                ),
                (other, _) => ("use".to_owned(), format!("the {other}")),
            };
            return Error::Authorization {
                principal: self.cfg.principal(),
                operation,
                resource,
                reason: format!("{what}: {e}"),
            };
        }
        Error::Transaction {
            transactional_id: self.id.clone(),
            what: what.into(),
            source: Box::new(e.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction of `delivery` whose producer, when `producer`, is a
    /// plain one towards no broker: what it produces waits in its queue
    /// (`message.max.bytes` of 10,000 bytes).
    fn txn(delivery: DeliveryMode, producer: bool) -> Txn {
        let cfg = KafkaConfig::new("127.0.0.1:1")
            .delivery(delivery)
            .set("message.max.bytes", "10000");
        let mut t = Txn::new(Arc::new(cfg), "t".into(), Arc::default(), "test");
        if producer {
            let p: Producer_ = t
                .cfg
                .producer_config(None)
                .create_with_context(Deliveries::default())
                .unwrap();
            t.producer = Some(p);
        }
        t.open = true;
        t
    }

    fn record(bytes: usize) -> Record {
        Record::new("topic", "key", Some(vec![b'x'; bytes]), RecordKind::Message)
    }

    #[test]
    fn an_exactly_once_batch_holds_its_records_until_it_passes_the_byte_bound() {
        let mut t = txn(DeliveryMode::ExactlyOnce, true);
        t.send(vec![record(1000), record(1000)]);
        t.send(vec![record(1000)]);
        assert_eq!(t.held.len(), 3, "held until the commit");
        assert_eq!(t.pending, 3, "counted as pending when added");
        assert_eq!(t.stats.pending.load(Ordering::Relaxed), 3);
        // Each record is 5,003 bytes with its key: sent until what is held
        // is produced, which must be when it passes the bound.
        let mut n = 0;
        while !t.held.is_empty() && n < 10_000 {
            t.send(vec![record(5000)]);
            n += 1;
        }
        let held_before = |k: usize| 3 * 1003 + k * 5003;
        assert!(held_before(n) > HELD_MAX_BYTES, "{n}");
        assert!(
            held_before(n - 1) <= HELD_MAX_BYTES,
            "held past the bound: {n}"
        );
        assert_eq!(t.held_bytes, 0);
        assert!(t.failed.is_none(), "{:?}", t.failed);
        let queued = t.producer.as_ref().unwrap().in_flight_count();
        // The client's count includes its own requests.
        assert!(queued as usize >= 3 + n, "every record produced: {queued}");
        t.send(vec![record(10)]);
        assert_eq!(t.held.len(), 1, "held again after");
        t.clear();
        assert!(t.held.is_empty(), "a transaction that ends forgets them");
        assert_eq!((t.held_bytes, t.pending, t.sends), (0, 0, 0));
        assert_eq!(t.stats.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_at_least_once_batch_holds_nothing() {
        let mut t = txn(DeliveryMode::AtLeastOnce, true);
        t.send(vec![record(10)]);
        assert!(t.held.is_empty());
        assert_eq!(t.pending, 1, "produced (counted when produced)");
    }

    #[test]
    fn stats_count_the_records_and_bytes_of_committed_transactions_only() {
        let mut t = txn(DeliveryMode::ExactlyOnce, true);
        t.send(vec![record(10), record(20)]);
        t.produce_held();
        t.committed(1, 0.0, &[]);
        t.clear();
        let s = t.stats.snapshot();
        assert_eq!(s.commits, 1);
        assert_eq!(s.records_produced, 2);
        // Keys ("key") and values.
        assert_eq!(s.bytes_produced, 3 + 10 + 3 + 20);
        // A transaction that ends without committing counts nothing.
        t.open = true;
        t.send(vec![record(100)]);
        t.produce_held();
        t.clear();
        t.open = true;
        t.committed(0, 0.0, &[]);
        let s = t.stats.snapshot();
        assert_eq!(
            (s.commits, s.records_produced, s.bytes_produced),
            (2, 2, 36)
        );
    }

    #[test]
    fn stats_count_an_at_least_once_batch_when_it_commits() {
        let mut t = txn(DeliveryMode::AtLeastOnce, true);
        t.send(vec![record(10)]);
        assert_eq!(t.stats.snapshot().records_produced, 0, "not before");
        t.committed(1, 0.0, &[]);
        t.clear();
        let s = t.stats.snapshot();
        assert_eq!((s.records_produced, s.bytes_produced), (1, 13));
    }

    #[test]
    fn held_records_without_a_producer_fail_their_transaction() {
        let mut t = txn(DeliveryMode::ExactlyOnce, false);
        t.send(vec![record(10)]);
        t.produce_held();
        assert!(t.failed.is_some(), "not dropped quietly");
    }

    #[test]
    fn only_records_sharing_a_topic_with_other_kinds_carry_the_kind_header() {
        // Read by key from topics of their own: no header.
        assert_eq!(kind_header(RecordKind::SagaState), None);
        assert_eq!(kind_header(RecordKind::Ledger), None);
        assert_eq!(kind_header(RecordKind::Message), None);
        // On a reply topic beside replies, or beside ledger entries.
        assert_eq!(kind_header(RecordKind::Start), Some("start"));
        assert_eq!(kind_header(RecordKind::Operator), Some("operator"));
        assert_eq!(kind_header(RecordKind::ParticipantState), Some("shard"));
    }

    #[test]
    fn a_record_refused_as_it_is_produced_names_the_input_that_made_it() {
        for delivery in [DeliveryMode::ExactlyOnce, DeliveryMode::AtLeastOnce] {
            let mut t = txn(delivery, true);
            t.send(vec![record(10)]);
            t.send(Vec::new());
            t.send(vec![record(10), record(20_000)]);
            t.send(vec![record(10)]);
            t.produce_held();
            assert!(t.failed.is_some(), "{delivery:?}");
            assert!(t.record_fault().is_some(), "{delivery:?}");
            assert_eq!(t.refused_input(), Some(3), "{delivery:?}");
            t.clear();
            assert_eq!(t.refused_input(), None);
        }
    }
}
