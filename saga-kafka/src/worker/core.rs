//! The batch around a processor: which offsets it consumed, what it
//! produced, the callers waiting on it; commit or abort and redo.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdError;
use rdkafka::{Offset, TopicPartitionList};
use saga_core::driver::Incoming;
use saga_core::Timestamp;

use crate::config::KafkaConfig;
use crate::error::Result;
use crate::store::read_latest;
use crate::worker::txn::{StatsInner, Txn};
use crate::worker::{Processor, Request};

/// A worker's processor with its transaction and the open batch.
pub(crate) struct Core<P> {
    pub(crate) proc: P,
    pub(crate) txn: Txn,
    /// Next offset to commit per (topic, partition).
    offsets: BTreeMap<(String, i32), i64>,
    /// First offset of the open batch per (topic, partition): where to seek back to.
    batch_start: BTreeMap<(String, i32), i64>,
    /// Inputs (messages, timers, requests) in the open batch.
    pub(crate) count: usize,
    pub(crate) owned: BTreeSet<u32>,
    pub(crate) killed: bool,
    /// Exactly once: the callers of requests folded into the open batch,
    /// answered when it commits or aborts.
    pub(crate) waiting: Vec<Box<dyn FnOnce(Result<()>) + Send>>,
}

impl<P: Processor> Core<P> {
    pub(crate) fn new(
        proc: P,
        cfg: Arc<KafkaConfig>,
        txn_id: String,
        stats: Arc<StatsInner>,
    ) -> Self {
        Self {
            proc,
            txn: Txn::new(cfg, txn_id, stats),
            offsets: BTreeMap::new(),
            batch_start: BTreeMap::new(),
            count: 0,
            owned: BTreeSet::new(),
            killed: false,
            waiting: Vec::new(),
        }
    }

    pub(crate) fn cfg(&self) -> &KafkaConfig {
        &self.txn.cfg
    }

    /// Whether a batch is open (or consumed records wait to be committed).
    pub(crate) fn busy(&self) -> bool {
        self.txn.open || self.txn.failed.is_some() || !self.batch_start.is_empty()
    }

    pub(crate) fn handle_message(&mut self, msg: &Incoming<'_>) {
        let key = (msg.topic.to_owned(), msg.partition as i32);
        self.batch_start
            .entry(key.clone())
            .or_insert(msg.offset as i64);
        if !self.owned.contains(&msg.partition) {
            return;
        }
        self.txn.begin();
        if self.txn.failed.is_some() {
            return;
        }
        let mut out = Vec::new();
        self.proc.on_message(msg, Timestamp::now(), &mut out);
        self.txn.send(out);
        self.offsets.insert(key, msg.offset as i64 + 1);
        self.count += 1;
    }

    pub(crate) fn run_due(&mut self) {
        while self.txn.failed.is_none() {
            let now = Timestamp::now();
            match self.proc.next_due() {
                Some(at) if at <= now => {}
                _ => return,
            }
            self.txn.begin();
            if self.txn.failed.is_some() {
                return;
            }
            let mut out = Vec::new();
            if !self.proc.on_due(now, &mut out) {
                return;
            }
            self.txn.send(out);
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

    fn clear_batch(&mut self) {
        self.txn.clear();
        self.offsets.clear();
        self.batch_start.clear();
        self.count = 0;
    }

    /// Commits the open batch; on failure aborts it and, when `rewind`,
    /// seeks back so the batch is redone.
    pub(crate) fn finish_batch<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        rewind: bool,
    ) {
        if !self.txn.open && self.txn.failed.is_none() {
            self.clear_batch();
            return;
        }
        if self.txn.failed.is_none() {
            let mut out = Vec::new();
            self.proc.before_commit(&mut out);
            self.txn.send(out);
        }
        let offsets = self.offsets_tpl();
        match self.txn.commit(&offsets, Some(consumer)) {
            Ok(()) => {
                self.txn.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.proc.committed();
                self.clear_batch();
                self.settle_requests(None);
            }
            Err(e) => {
                tracing::warn!(transactional_id = %self.txn.id, error = %e, "batch failed: aborting and redoing it");
                self.abort(&e);
                self.settle_requests(Some(&e));
                if !self.txn.eos() && rewind {
                    // At least once, nothing is undone on the broker: some
                    // or all of the batch's records (ledgers, saga states,
                    // replies) may be written even though the offsets are
                    // not. Re-read the state those records left, so the
                    // redo deduplicates against it instead of applying a
                    // command again from the rolled-back memory.
                    let parts: Vec<u32> = self
                        .batch_start
                        .keys()
                        .map(|(_, p)| *p as u32)
                        .filter(|p| self.owned.contains(p))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    self.give_up_partitions(&parts);
                    self.take_partitions(&parts);
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

    /// Aborts the open transaction and rolls the processor back.
    pub(crate) fn abort(&mut self, cause: &RdError) {
        self.txn.abort(cause);
        self.proc.rolled_back();
    }

    /// The assignment was lost: drop the open batch without committing.
    pub(crate) fn drop_batch(&mut self) {
        if self.txn.open {
            self.abort(&RdError::Canceled);
        }
        self.clear_batch();
        self.settle_requests(Some(&RdError::Canceled));
    }

    /// Reads the state of `parts` from the processor's compacted topic and
    /// installs it, retrying a few times; the partitions it cannot restore
    /// are not served (and said so).
    pub(crate) fn take_partitions(&mut self, parts: &[u32]) {
        if parts.is_empty() {
            return;
        }
        let topic = self.proc.state_topic().to_owned();
        let ids: Vec<i32> = parts.iter().map(|p| *p as i32).collect();
        let mut tries = 0;
        let records = loop {
            match read_latest(self.cfg(), &topic, Some(&ids)) {
                Ok(r) => break r,
                Err(e) if tries < 10 => {
                    tries += 1;
                    tracing::warn!(topic, error = %e, "cannot restore state: retrying");
                    std::thread::sleep(Duration::from_millis(200 * tries));
                }
                Err(e) => {
                    tracing::error!(topic, error = %e, partitions = ?parts, "cannot restore state: these partitions are not served");
                    return;
                }
            }
        };
        let mut by_partition: BTreeMap<u32, Vec<(String, Vec<u8>)>> =
            parts.iter().map(|p| (*p, Vec::new())).collect();
        for (p, key, value) in records {
            if let Some(v) = by_partition.get_mut(&(p as u32)) {
                v.push((key, value));
            }
        }
        for (p, records) in by_partition {
            self.proc.restore(p, records);
            if self.owned.insert(p) {
                self.txn
                    .stats
                    .owned_partitions
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Forgets `parts` (revoked).
    pub(crate) fn give_up_partitions(&mut self, parts: &[u32]) {
        self.proc.release(parts);
        for p in parts {
            if self.owned.remove(p) {
                self.txn
                    .stats
                    .owned_partitions
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Exactly once: adds a request's records to the open batch (beginning
    /// one if needed); its caller is answered when the batch commits or
    /// aborts. Many requests then share one transaction.
    fn add_request(&mut self, req: Request) {
        self.txn.begin();
        if let Some(e) = self.txn.failed.clone() {
            self.txn
                .stats
                .failed_requests
                .fetch_add(1, Ordering::Relaxed);
            (req.done)(Err(self.txn.error("beginning the transaction", &e)));
            return;
        }
        self.txn.send(req.out);
        self.count += 1;
        self.waiting.push(req.done);
    }

    /// Answers the callers of the requests in the batch that just ended:
    /// `None` if it committed, else the error that aborted it.
    pub(crate) fn settle_requests(&mut self, failure: Option<&RdError>) {
        for done in std::mem::take(&mut self.waiting) {
            match failure {
                None => done(Ok(())),
                Some(e) => {
                    self.txn
                        .stats
                        .failed_requests
                        .fetch_add(1, Ordering::Relaxed);
                    done(Err(self.txn.error("committing the batch", e)));
                }
            }
        }
    }

    /// Takes the pending requests: exactly once they join the open batch;
    /// at least once they run one by one, only while no batch is open
    /// (their records must be flushed in order around a barrier).
    pub(crate) fn serve_requests(&mut self, busy: bool) {
        if self.txn.eos() {
            while let Some(req) = self.proc.take_request() {
                self.add_request(req);
            }
        } else if !busy {
            while let Some(req) = self.proc.take_request() {
                self.run_request(req);
            }
        }
    }

    /// Runs one request in a transaction of its own.
    pub(crate) fn run_request(&mut self, req: Request) {
        let result = match self.request_txn(req.out, req.barrier) {
            Ok(()) => {
                self.txn.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.proc.committed();
                Ok(())
            }
            Err((what, e)) => {
                self.txn
                    .stats
                    .failed_requests
                    .fetch_add(1, Ordering::Relaxed);
                self.abort(&e);
                Err(self.txn.error(what, &e))
            }
        };
        self.clear_batch();
        (req.done)(result);
    }

    fn request_txn(
        &mut self,
        mut out: Vec<saga_core::driver::Record>,
        barrier: usize,
    ) -> std::result::Result<(), (&'static str, RdError)> {
        self.txn.begin();
        if let Some(e) = self.txn.failed.take() {
            return Err(("beginning the transaction", e));
        }
        if !self.txn.eos() && barrier > 0 && barrier < out.len() {
            let rest = out.split_off(barrier);
            self.txn.send(out);
            if let Some(e) = self.txn.failed.take() {
                return Err(("producing", e));
            }
            self.txn.flush().map_err(|e| ("flushing", e))?;
            out = rest;
        }
        self.txn.send(out);
        if let Some(e) = self.txn.failed.take() {
            return Err(("producing", e));
        }
        let none: Option<&BaseConsumer> = None;
        self.txn
            .commit(&TopicPartitionList::new(), none)
            .map_err(|e| ("committing", e))
    }
}
