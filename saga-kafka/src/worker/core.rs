//! The batch around a processor: which offsets it consumed, what it
//! produced, the callers waiting on it; commit or abort and redo.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdError;
use rdkafka::{Offset, TopicPartitionList};
use saga_core::driver::Incoming;
use saga_core::{HealthBoard, Timestamp};

use crate::config::KafkaConfig;
use crate::context::denied;
use crate::error::Result;
use crate::metrics::AbortCause;
use crate::store::read_stream;
use crate::worker::txn::{StatsInner, Txn};
use crate::worker::{Processor, Request};

/// How long a worker the cluster refused for want of an ACL waits before
/// trying again.
pub(crate) const UNAUTHORIZED_PAUSE: Duration = Duration::from_secs(5);

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
    pub(crate) health: HealthBoard,
    /// Assigned partitions whose state is not restored yet: paused, and
    /// when to try again.
    restoring: BTreeMap<u32, (u32, Instant)>,
    /// Partitions stopped for good (their state cannot be written): paused.
    stalled: BTreeSet<u32>,
    /// Inputs still to run one per batch, after a batch failed because
    /// the broker refused one of its records.
    isolate: usize,
    /// Per (topic, partition), the message whose records the broker
    /// refuses (offset, why): it is dead-lettered instead of handled.
    poison: BTreeMap<(String, i32), (i64, String)>,
    /// Why the broker refused the records of the due work (a timer, a
    /// local retry) that a batch of its own made: it is dead-lettered, in
    /// a batch of its own, instead of done again.
    poison_due: Option<String>,
    /// The only input of the open batch, while it has only one.
    single: Option<Single>,
    /// The positions (1-based) of the open batch's inputs that are due
    /// work.
    due_at: Vec<usize>,
    /// Of the inputs still to run one per batch (`isolate`), how many are
    /// due work: while some are, due work goes first.
    isolate_due: usize,
    /// Batches failed in a row.
    failures: u32,
    /// The consumer group (for messages).
    pub(crate) group: String,
    /// The topic the failing batch was refused, while its callers are told.
    denied_topic: Option<String>,
    /// The kind of resource the consumer was refused, until it recovers.
    consumer_denied: Option<&'static str>,
    /// When the consumer's topics were last checked after a refusal.
    pub(crate) denied_checked: Instant,
    /// Records of partitions being restored that were fetched before the
    /// pause took effect, in order: handled once the state is in.
    held: BTreeMap<u32, Vec<Held>>,
    /// When each message of the open batch reached the worker, for
    /// `saga_kafka_message_seconds` (the buffer is reused).
    arrivals: Vec<Instant>,
}

/// The only input of a batch: the one at fault if the broker refuses a
/// record of the batch.
enum Single {
    /// A message: its topic, partition and offset.
    Message(String, i32, i64),
    /// Due work (a timer, a local retry).
    Due,
    /// Due work whose records the broker refused, dead-lettered: its
    /// partition.
    Rejected(u32),
}

/// A copy of a consumed record, held until its partition is restored.
struct Held {
    topic: String,
    partition: u32,
    offset: u64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    kind: Option<Vec<u8>>,
    traceparent: Option<Vec<u8>>,
}

impl Held {
    fn of(msg: &Incoming<'_>) -> Self {
        Self {
            topic: msg.topic.to_owned(),
            partition: msg.partition,
            offset: msg.offset,
            key: msg.key.map(<[u8]>::to_vec),
            value: msg.value.map(<[u8]>::to_vec),
            kind: msg.kind.map(<[u8]>::to_vec),
            traceparent: msg.traceparent.map(<[u8]>::to_vec),
        }
    }

    fn incoming(&self) -> Incoming<'_> {
        Incoming {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            kind: self.kind.as_deref(),
            traceparent: self.traceparent.as_deref(),
        }
    }
}

impl<P: Processor> Core<P> {
    pub(crate) fn new(
        proc: P,
        cfg: Arc<KafkaConfig>,
        txn_id: String,
        stats: Arc<StatsInner>,
        health: HealthBoard,
    ) -> Self {
        let component = proc.name().to_owned();
        Self {
            proc,
            txn: Txn::new(cfg, txn_id, stats, &component),
            offsets: BTreeMap::new(),
            batch_start: BTreeMap::new(),
            count: 0,
            owned: BTreeSet::new(),
            killed: false,
            waiting: Vec::new(),
            health,
            restoring: BTreeMap::new(),
            stalled: BTreeSet::new(),
            isolate: 0,
            poison: BTreeMap::new(),
            poison_due: None,
            single: None,
            due_at: Vec::new(),
            isolate_due: 0,
            failures: 0,
            group: String::new(),
            denied_topic: None,
            consumer_denied: None,
            denied_checked: Instant::now(),
            held: BTreeMap::new(),
            arrivals: Vec::new(),
        }
    }

    /// Whether batches run one input each (after a record was refused).
    pub(crate) fn isolating(&self) -> bool {
        self.isolate > 0 || self.poison_due.is_some()
    }

    /// Whether due work opens the next batch, alone: due work of a batch
    /// being redone one input at a time (behind the redone messages, which
    /// are always there to open a batch, it would only ever join a full
    /// batch again), or due work the broker refused, to dead-letter.
    pub(crate) fn due_first(&self) -> bool {
        self.isolate_due > 0 || self.poison_due.is_some()
    }

    pub(crate) fn cfg(&self) -> &KafkaConfig {
        &self.txn.cfg
    }

    /// Whether a batch is open (or consumed records wait to be committed).
    pub(crate) fn busy(&self) -> bool {
        self.txn.open || self.txn.failed.is_some() || !self.batch_start.is_empty()
    }

    pub(crate) fn handle_message(&mut self, msg: &Incoming<'_>) {
        if !self.owned.contains(&msg.partition) {
            if self.restoring.contains_key(&msg.partition) {
                // Fetched before the pause took effect: the consumer's
                // position is past it, so it is kept for after the restore.
                self.held
                    .entry(msg.partition)
                    .or_default()
                    .push(Held::of(msg));
            }
            // Else a partition given up or stopped: its next owner reads
            // it from the committed offset.
            return;
        }
        let key = (msg.topic.to_owned(), msg.partition as i32);
        // (A copy of the key only for a partition's first input of the batch.)
        if !self.batch_start.contains_key(&key) {
            self.batch_start.insert(key.clone(), msg.offset as i64);
        }
        self.txn.begin();
        if self.txn.failed.is_some() {
            return;
        }
        let (topic, partition, offset) = (msg.topic, msg.partition as i32, msg.offset as i64);
        if self.count == 0 {
            self.txn.metrics.refresh();
        }
        if self.count == 0 {
            self.single = Some(Single::Message(topic.to_owned(), partition, offset));
        }
        self.arrivals.push(Instant::now());
        let now = Timestamp::now();
        let mut out = Vec::new();
        // The poison mark stays until the batch that rejects it commits.
        let poisoned = if self.poison.is_empty() {
            None
        } else {
            self.poison.get(&key)
        };
        match poisoned {
            Some((o, why)) if *o == offset => {
                tracing::error!(topic, partition, offset, %why, "input whose records the broker refuses: dead-lettered alone");
                let why = why.clone();
                self.proc.reject(msg, &why, now, &mut out);
            }
            _ => self.proc.on_message(msg, now, &mut out),
        }
        self.txn.send(out);
        self.offsets.insert(key, offset + 1);
        self.count += 1;
    }

    /// Runs the due work (timers, local retries) in the open batch, or
    /// opens one for it. While isolating a refused record, one input per
    /// batch: due work only opens a batch. Due work the broker refused is
    /// dead-lettered first.
    pub(crate) fn run_due(&mut self) {
        while self.txn.failed.is_none() {
            if self.isolating() && self.count > 0 {
                // One input per batch while isolating a refused record.
                return;
            }
            let now = Timestamp::now();
            if let Some(why) = self.poison_due.clone() {
                self.txn.begin();
                if self.txn.failed.is_some() {
                    return;
                }
                let mut out = Vec::new();
                match self.proc.reject_due(&why, now, &mut out) {
                    Some(partition) => {
                        tracing::error!(partition, %why, "due work whose records the broker refuses: dead-lettered alone");
                        self.single = Some(Single::Rejected(partition));
                        self.txn.send(out);
                        self.count += 1;
                        self.due_at.push(self.count);
                        return;
                    }
                    // Gone meanwhile (its partition was released).
                    None => self.poison_due = None,
                }
            }
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
            if self.count == 0 {
                self.single = Some(Single::Due);
            }
            self.txn.send(out);
            self.count += 1;
            self.due_at.push(self.count);
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
        self.single = None;
        self.due_at.clear();
        self.arrivals.clear();
    }

    /// Commits the open batch; on failure aborts it and, when `rewind`,
    /// seeks back so the batch is redone. A batch that failed because the
    /// broker refused one of its records is redone one input at a time,
    /// and the input at fault is dead-lettered alone.
    pub(crate) fn finish_batch<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        rewind: bool,
    ) {
        if !self.txn.open && self.txn.failed.is_none() {
            self.clear_batch();
            return;
        }
        self.txn.metrics.refresh();
        if self.txn.failed.is_none() {
            let mut out = Vec::new();
            match self.proc.before_commit(&mut out) {
                Ok(()) => self.txn.send(out),
                Err((partition, why)) => {
                    self.abort(&RdError::Canceled, AbortCause::RecordRefused);
                    self.settle_requests(Some(&RdError::Canceled));
                    if rewind {
                        self.redo(consumer);
                    }
                    self.clear_batch();
                    self.stall(consumer, partition, &why);
                    return;
                }
            }
        }
        let offsets = self.offsets_tpl();
        let started = Instant::now();
        match self.txn.commit(&offsets, Some(consumer)) {
            Ok(()) => {
                let took = started.elapsed().as_secs_f64();
                self.txn.committed(self.count, took, &self.arrivals);
                // Due work that fired a timer or ran a retry (not only
                // deleted expired state): what a failed batch's due input
                // was, re-armed by its rollback.
                let fired = !self.due_at.is_empty() && self.proc.due_partition().is_some();
                self.proc.committed();
                // One input of those to isolate: a message, or due work
                // while some of those are due work. (Requests are not
                // redone; deleting expired state that fell due since
                // isolates nothing.)
                if !self.batch_start.is_empty() {
                    self.isolate = self.isolate.saturating_sub(1);
                } else if fired && self.isolate_due > 0 {
                    self.isolate_due -= 1;
                    self.isolate = self.isolate.saturating_sub(1);
                }
                self.isolate_due = self.isolate_due.min(self.isolate);
                if matches!(self.single, Some(Single::Rejected(_))) {
                    self.poison_due = None;
                }
                let offsets = &self.offsets;
                self.poison
                    .retain(|key, (o, _)| offsets.get(key).is_none_or(|next| next <= o));
                if self.failures > 0 {
                    self.failures = 0;
                    // A refusal of the consumer stays until the consumer
                    // recovers (a message or an assignment).
                    if self.consumer_denied.is_none() {
                        self.health.clear(self.proc.name(), None);
                    }
                }
                self.clear_batch();
                self.settle_requests(None);
            }
            Err(e) => {
                let fault = self.txn.record_fault();
                tracing::warn!(transactional_id = %self.txn.id, error = %e, fault = ?fault, "batch failed: aborting and redoing it");
                let topic = self.txn.denied_topic();
                let denied = e
                    .rdkafka_error_code()
                    .and_then(denied)
                    .or(topic.as_ref().map(|_| "topic"));
                if let Some(kind) = denied {
                    self.denied_topic.clone_from(&topic);
                    self.unauthorized(kind, &e, topic);
                } else {
                    self.failures += 1;
                }
                if self.failures >= 3 && denied.is_none() {
                    let why = format!("{} batches failed in a row: {e}", self.failures);
                    self.health
                        .report(self.proc.name(), None, why, Timestamp::now());
                }
                let refused = fault.is_some();
                let mut stall = None;
                let mut reread = None;
                match (fault, self.single.take()) {
                    (Some((topic, why)), Some(Single::Message(t, p, o))) if self.count == 1 => {
                        if topic == self.proc.state_topic() {
                            // The input's own state is what the broker
                            // refuses: its partition cannot go on.
                            stall = Some((p as u32, why));
                        } else {
                            self.poison.insert((t, p), (o, why));
                        }
                    }
                    (Some((topic, why)), Some(Single::Due)) if self.count == 1 => {
                        let partition = self.proc.due_partition();
                        match partition {
                            // As for a message: its own state is what the
                            // broker refuses, its partition cannot go on.
                            Some(p) if topic == self.proc.state_topic() => stall = Some((p, why)),
                            _ => {
                                // Done again it would fail again (and
                                // rejoin full batches, failing them):
                                // dead-lettered instead.
                                tracing::warn!(transactional_id = %self.txn.id, %why, "the broker refused the records of due work: dead-lettering it");
                                self.poison_due = Some(why);
                                // At least once, some of its records may
                                // be written: a saga's partition is read
                                // again, as a redone message's is.
                                if !self.txn.eos() && self.proc.reread_refused_due() {
                                    reread = partition;
                                }
                            }
                        }
                    }
                    (Some((_, why)), Some(Single::Rejected(p))) if self.count == 1 => {
                        // Even its dead letter is refused: the partition
                        // cannot go on.
                        self.poison_due = None;
                        stall = Some((p, why));
                    }
                    (Some(_), _) => {
                        // Inputs after the one whose record the client
                        // refused as it was made need no isolating.
                        let upto = self
                            .txn
                            .refused_input()
                            .map_or(self.count, |n| n.min(self.count));
                        self.isolate = upto.max(1);
                        // The due inputs among them (those after the
                        // one refused as it was made need no isolating).
                        let upto = self.isolate;
                        self.isolate_due = self.due_at.iter().filter(|&&i| i <= upto).count();
                        tracing::warn!(transactional_id = %self.txn.id, inputs = self.isolate, "the broker refused a record: redoing the batch one input at a time");
                    }
                    (None, _) => {}
                }
                let cause = if denied.is_some() {
                    AbortCause::NotAuthorized
                } else if refused {
                    AbortCause::RecordRefused
                } else {
                    cause_of(&e)
                };
                self.abort(&e, cause);
                if refused || denied.is_some() {
                    // A refused record leaves a gap in the idempotent
                    // producer's sequence numbers; a refused topic stays
                    // refused in the client's metadata for minutes after
                    // the ACL is granted: start afresh.
                    self.txn.discard_producer();
                }
                self.settle_requests(Some(&e));
                self.denied_topic = None;
                if rewind {
                    self.redo(consumer);
                    if let Some(p) = reread.filter(|p| self.owned.contains(p)) {
                        self.give_up_partitions(&[p]);
                        self.assigned(consumer, &[p]);
                    }
                }
                self.clear_batch();
                if let Some((p, why)) = stall {
                    self.stall(consumer, p, &why);
                }
                if denied.is_some() {
                    std::thread::sleep(UNAUTHORIZED_PAUSE);
                } else if self.failures >= 2 {
                    // Do not spin on a batch that keeps failing (the broker
                    // away, a record it keeps refusing): back off a little.
                    let pause = 50u64.saturating_mul(1 << self.failures.min(7));
                    std::thread::sleep(Duration::from_millis(pause.min(5_000)));
                }
            }
        }
    }

    /// The cluster refused this worker for want of an ACL (`kind`: the
    /// resource kind of the error; `topic`: the topic a produce was
    /// refused on, if known). Reported at once, naming the principal, the
    /// operation and the resource, and counted; the caller waits
    /// [`UNAUTHORIZED_PAUSE`] before trying again, so the worker recovers
    /// by itself once the ACL is granted (and the problem clears with the
    /// next commit).
    pub(crate) fn unauthorized(&mut self, kind: &str, e: &RdError, topic: Option<String>) {
        self.failures = self.failures.max(1);
        self.report_denied(kind, e, topic);
    }

    /// The consumer was refused (its group, a topic it reads): reported
    /// like [`Core::unauthorized`], until [`Core::consumer_ok`].
    pub(crate) fn consumer_denied(&mut self, kind: &'static str, e: &RdError) {
        self.consumer_denied = Some(kind);
        self.denied_checked = Instant::now();
        self.report_denied(kind, e, None);
    }

    /// Whether a refusal of the consumer is due for a check of its topics
    /// (on a quiet topic no message tells it is over).
    /// Only a topic's refusal: a group's ends with an assignment.
    pub(crate) fn recheck_due(&self) -> bool {
        self.consumer_denied == Some("topic") && self.denied_checked.elapsed() >= UNAUTHORIZED_PAUSE
    }

    /// The consumer works (a message came, partitions were assigned, its
    /// topics' metadata answers again): a refusal it reported is over.
    pub(crate) fn consumer_ok(&mut self) {
        if self.consumer_denied.take().is_some() && self.failures == 0 {
            self.health.clear(self.proc.name(), None);
        }
    }

    fn report_denied(&mut self, kind: &str, e: &RdError, topic: Option<String>) {
        let principal = self.cfg().principal();
        let (operation, resource) = match (kind, topic) {
            ("topic", Some(t)) => ("WRITE", format!("topic `{t}`")),
            ("topic", None) => ("READ", "one of its topics".to_owned()),
            ("group", _) => ("READ", format!("group `{}`", self.group)),
            ("transactional id", _) => ("WRITE", format!("transactional id `{}`", self.txn.id)),
            _ => ("IDEMPOTENT_WRITE", "the cluster".to_owned()),
        };
        let why = format!(
            "not authorized: {principal} may not {operation} {resource} ({e}); trying again every {}s",
            UNAUTHORIZED_PAUSE.as_secs()
        );
        self.txn
            .stats
            .authorization_failures
            .fetch_add(1, Ordering::Relaxed);
        self.txn.metrics.refresh();
        self.txn.metrics.unauthorized();
        self.health
            .report(self.proc.name(), None, why, Timestamp::now());
    }

    /// The open batch did not commit: its inputs are read again. At least
    /// once, nothing is undone on the broker: some or all of the batch's
    /// records (ledgers, saga states, replies) may be written although the
    /// offsets are not, so the state of its partitions is read back too,
    /// and the redo deduplicates against it instead of applying a command
    /// again from the rolled-back memory.
    fn redo<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        self.rewind(consumer);
        if !self.txn.eos() {
            let parts: Vec<u32> = self
                .batch_start
                .keys()
                .map(|(_, p)| *p as u32)
                .filter(|p| self.owned.contains(p))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            self.give_up_partitions(&parts);
            self.assigned(consumer, &parts);
        }
    }

    /// Seeks the consumed partitions of the open batch back to its start.
    fn rewind<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        for ((t, p), o) in &self.batch_start {
            if let Err(e) = consumer.seek(t, *p, Offset::Offset(*o), Duration::from_secs(10)) {
                tracing::warn!(topic = %t, partition = p, error = %e, "cannot seek back");
            }
        }
    }

    /// Every topic the processor consumes, for `parts`.
    fn tpl_of(&self, parts: &[u32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for topic in self.proc.topics() {
            for p in parts {
                tpl.add_partition(&topic, *p as i32);
            }
        }
        tpl
    }

    /// Partitions assigned (or to read again): paused until their state
    /// is restored by [`Core::restore_due`].
    pub(crate) fn assigned<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[u32],
    ) {
        if parts.is_empty() {
            return;
        }
        self.consumer_ok();
        if let Err(e) = consumer.pause(&self.tpl_of(parts)) {
            tracing::warn!(partitions = ?parts, error = %e, "cannot pause partitions: their records are skipped until restored");
        }
        let now = Instant::now();
        for p in parts {
            self.stalled.remove(p);
            self.restoring.insert(*p, (0, now));
        }
    }

    /// Restores the partitions waiting for their state whose turn it is:
    /// reads the compacted topic (bounded in time), installs the state,
    /// seeks to the committed offsets and resumes them. A failure is
    /// reported to the health board and tried again later, with backoff.
    pub(crate) fn restore_due<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .restoring
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(p, _)| *p)
            .collect();
        if due.is_empty() {
            return;
        }
        let topic = self.proc.state_topic().to_owned();
        let ids: Vec<i32> = due.iter().map(|p| *p as i32).collect();
        let started = Instant::now();
        let cfg = self.txn.cfg.clone();
        for p in &due {
            self.proc.restore_begin(*p);
        }
        // Each record goes to the processor as it is read: nothing of the
        // topic is collected first.
        let mut sizes: BTreeMap<u32, usize> = due.iter().map(|p| (*p, 0)).collect();
        let proc = &mut self.proc;
        let result = read_stream(&cfg, &topic, &ids, cfg.restore_timeout, |p, key, value| {
            if let Some(n) = sizes.get_mut(&(p as u32)) {
                *n += 1;
                proc.restore_record(p as u32, key, value);
            }
        });
        if let Err(e) = result {
            // What was read of them is dropped; they are read again later.
            self.proc.release(&due);
            for p in &due {
                if let Some((tries, at)) = self.restoring.get_mut(p) {
                    *tries += 1;
                    let backoff = Duration::from_millis(500 * 2u64.pow((*tries).min(6)));
                    *at = Instant::now() + backoff;
                }
                self.health.report(
                    self.proc.name(),
                    Some(*p),
                    format!("cannot restore the partition's state from `{topic}`: {e}"),
                    Timestamp::now(),
                );
            }
            return;
        }
        let mut taken = Vec::new();
        for p in due.iter().copied() {
            if let Err(why) = self.proc.restore_end(p) {
                // Retrying cannot fix the state: the partition stays
                // paused and reported until it is assigned again.
                self.proc.release(&[p]);
                self.restoring.remove(&p);
                self.stalled.insert(p);
                self.health
                    .report(self.proc.name(), Some(p), why, Timestamp::now());
                continue;
            }
            taken.push(p);
            self.restoring.remove(&p);
            if self.owned.insert(p) {
                self.txn
                    .stats
                    .owned_partitions
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.health.clear(self.proc.name(), Some(p));
        }
        for p in &due {
            if !taken.contains(p) {
                self.held.remove(p);
            }
        }
        if taken.is_empty() {
            return;
        }
        // What was fetched before the pause, first, in order.
        for p in &taken {
            for rec in self.held.remove(p).unwrap_or_default() {
                self.handle_message(&rec.incoming());
            }
        }
        if let Err(e) = consumer.resume(&self.tpl_of(&taken)) {
            for p in &taken {
                let why = format!("restored but cannot be resumed: {e}");
                self.health
                    .report(self.proc.name(), Some(*p), why, Timestamp::now());
            }
        }
        tracing::info!(topic, records = ?sizes, took_ms = started.elapsed().as_millis() as u64, "partitions restored and resumed");
    }

    /// `partition` cannot go on (its state, or the dead letter of an input
    /// whose records are refused, cannot be written): it is given up,
    /// paused and reported until the partition is assigned again.
    fn stall<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, partition: u32, why: &str) {
        tracing::error!(
            partition,
            why,
            "partition stopped: a record it must write cannot be written"
        );
        self.give_up_partitions(&[partition]);
        let _ = consumer.pause(&self.tpl_of(&[partition]));
        self.stalled.insert(partition);
        self.health
            .report(self.proc.name(), Some(partition), why, Timestamp::now());
    }

    /// Aborts the open transaction (for `why`, counted if one was open)
    /// and rolls the processor back.
    pub(crate) fn abort(&mut self, cause: &RdError, why: AbortCause) {
        if self.txn.open {
            self.txn.metrics.aborted(why);
        }
        self.txn.abort(cause);
        self.proc.rolled_back();
    }

    /// The assignment was lost: drop the open batch without committing.
    pub(crate) fn drop_batch(&mut self) {
        if self.txn.open {
            self.abort(&RdError::Canceled, AbortCause::Rebalance);
        }
        self.clear_batch();
        self.settle_requests(Some(&RdError::Canceled));
    }

    /// Forgets `parts` (revoked).
    pub(crate) fn give_up_partitions(&mut self, parts: &[u32]) {
        self.proc.release(parts);
        for p in parts {
            self.restoring.remove(p);
            self.held.remove(p);
            self.stalled.remove(p);
            self.health.clear(self.proc.name(), Some(*p));
            if self.owned.remove(p) {
                self.txn
                    .stats
                    .owned_partitions
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Forgets every partition (the worker stops).
    pub(crate) fn give_up_all(&mut self) {
        let mut all: BTreeSet<u32> = self.owned.iter().copied().collect();
        all.extend(self.restoring.keys().copied());
        all.extend(self.stalled.iter().copied());
        let all: Vec<u32> = all.into_iter().collect();
        self.give_up_partitions(&all);
        self.health.clear_component(self.proc.name());
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
                    done(Err(self.txn.error_on(
                        "committing the batch",
                        e,
                        self.denied_topic.as_deref(),
                    )));
                }
            }
        }
    }

    /// Takes the pending requests: exactly once they join the open batch;
    /// at least once they run together in a flush of their own, only while
    /// no batch is open (a batch that fails is redone from the topics, which
    /// must not take a request's changes with it).
    pub(crate) fn serve_requests<C: ConsumerContext>(
        &mut self,
        busy: bool,
        consumer: &BaseConsumer<C>,
    ) {
        if self.txn.eos() {
            while let Some(req) = self.proc.take_request() {
                self.add_request(req);
            }
        } else if !busy {
            let max = self.cfg().batch_max_messages;
            let mut reqs = Vec::new();
            while reqs.len() < max {
                match self.proc.take_request() {
                    Some(req) => reqs.push(req),
                    None => break,
                }
            }
            if !reqs.is_empty() {
                self.run_requests(reqs, Some(consumer));
            }
        }
    }

    /// Runs one request in a transaction of its own.
    pub(crate) fn run_request(&mut self, req: Request) {
        self.run_requests(vec![req], None::<&BaseConsumer>);
    }

    /// Runs requests in one transaction (at least once: one flush) of
    /// their own, each request's records in order; every caller gets the
    /// outcome. At least once, a failed flush may have written some of
    /// their records, which the rollback took out of memory: the owned
    /// partitions' state is read again (as for a failed batch).
    fn run_requests<C: ConsumerContext>(
        &mut self,
        reqs: Vec<Request>,
        consumer: Option<&BaseConsumer<C>>,
    ) {
        self.txn.metrics.refresh();
        let inputs = reqs.len();
        let started = Instant::now();
        let mut out = Vec::new();
        let mut callers = Vec::with_capacity(reqs.len());
        for req in reqs {
            out.extend(req.out);
            callers.push(req.done);
        }
        let result = match self.request_txn(out) {
            Ok(()) => {
                let took = started.elapsed().as_secs_f64();
                self.txn.committed(inputs, took, &[]);
                self.proc.committed();
                Ok(())
            }
            Err((what, e)) => {
                self.txn
                    .stats
                    .failed_requests
                    .fetch_add(callers.len() as u64, Ordering::Relaxed);
                let denied_topic = self.txn.denied_topic();
                let not_authorized =
                    denied_topic.is_some() || e.rdkafka_error_code().and_then(denied).is_some();
                let cause = if not_authorized {
                    AbortCause::NotAuthorized
                } else if self.txn.record_fault().is_some() {
                    AbortCause::RecordRefused
                } else {
                    cause_of(&e)
                };
                self.abort(&e, cause);
                if not_authorized {
                    self.txn.discard_producer();
                }
                Err((what, e, denied_topic))
            }
        };
        self.clear_batch();
        if let (Err(_), Some(consumer), false) = (&result, consumer, self.txn.eos()) {
            let parts: Vec<u32> = self.owned.iter().copied().collect();
            self.give_up_partitions(&parts);
            self.assigned(consumer, &parts);
        }
        for done in callers {
            done(
                result
                    .clone()
                    .map_err(|(what, e, topic)| self.txn.error_on(what, &e, topic.as_deref())),
            );
        }
    }

    fn request_txn(
        &mut self,
        out: Vec<saga_core::driver::Record>,
    ) -> std::result::Result<(), (&'static str, RdError)> {
        self.txn.begin();
        if let Some(e) = self.txn.failed.take() {
            return Err(("beginning the transaction", e));
        }
        self.txn.send(out);
        self.txn.produce_held();
        if let Some(e) = self.txn.failed.take() {
            return Err(("producing", e));
        }
        let none: Option<&BaseConsumer> = None;
        self.txn
            .commit(&TopicPartitionList::new(), none)
            .map_err(|e| ("committing", e))
    }
}

/// Why a batch whose commit failed with `e` is aborted, when neither an
/// ACL nor a refused record is to blame.
fn cause_of(e: &RdError) -> AbortCause {
    match e {
        RdError::Transaction(t) if t.is_fatal() => AbortCause::Fatal,
        _ => AbortCause::CommitFailed,
    }
}
