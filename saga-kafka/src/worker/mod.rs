//! The consume → process → produce loop shared by orchestrators and
//! participants (see docs/ARCHITECTURE.md, "Kafka transactions").
//!
//! Each worker runs on its own OS thread, so the blocking librdkafka
//! transaction calls never run on the async executor. The worker's state
//! (the processor, its transaction, the open batch: [`core::Core`]) sits
//! behind a mutex that the consumer's rebalance callbacks also take: they
//! run on the worker thread inside `poll`, when the loop does not hold the
//! lock.

mod core;
mod txn;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, TopicPartitionList};
use saga_core::driver::{Incoming, Record, RECORD_KIND_HEADER};
use saga_core::TRACEPARENT_HEADER;
use saga_core::{HealthBoard, Timestamp};

use crate::config::KafkaConfig;
use crate::context::denied;
use crate::error::{Error, Result};
use crate::metrics::LagGauges;

pub(crate) use self::core::{Core, UNAUTHORIZED_PAUSE};
pub use txn::Stats;
pub(crate) use txn::StatsInner;

/// Something a worker should write in its own transaction, between
/// messages (a saga's start, an operator's request, a publish).
pub(crate) struct Request {
    pub out: Vec<Record>,
    pub done: Box<dyn FnOnce(Result<()>) + Send>,
}

/// What a worker runs: the shell around a saga or participant driver.
pub(crate) trait Processor: Send + 'static {
    /// The component's name, for health reports.
    fn name(&self) -> &str;
    /// The topics to consume.
    fn topics(&self) -> Vec<String>;
    /// The compacted topic read back when partitions are assigned.
    fn state_topic(&self) -> &str;
    /// Starts restoring `partition` from the state topic.
    fn restore_begin(&mut self, partition: u32);
    /// One record of the state topic, in order (`None`: a tombstone); a
    /// key's later record replaces its earlier ones.
    fn restore_record(&mut self, partition: u32, key: &str, value: Option<&[u8]>);
    /// Every record of `partition` was read. `Err(why)`: the partition
    /// cannot be served.
    fn restore_end(&mut self, partition: u32) -> std::result::Result<(), String>;
    /// Forgets the state of partitions that went away.
    fn release(&mut self, partitions: &[u32]);
    /// The batch is about to commit: add the records that must commit
    /// with it. `Err((partition, why))`: the batch must not commit, and
    /// that partition cannot go on.
    fn before_commit(&mut self, out: &mut Vec<Record>) -> std::result::Result<(), (u32, String)> {
        let _ = out;
        Ok(())
    }
    /// Handles one record inside the open batch.
    fn on_message(&mut self, msg: &Incoming<'_>, now: Timestamp, out: &mut Vec<Record>);
    /// Dead-letters one record instead of handling it: the records its
    /// handling made cannot be written (`why`).
    fn reject(&mut self, msg: &Incoming<'_>, why: &str, now: Timestamp, out: &mut Vec<Record>);
    /// When the next timer or retry is due.
    fn next_due(&self) -> Option<Timestamp>;
    /// Runs one due timer or retry; `false` if nothing was due.
    fn on_due(&mut self, now: Timestamp, out: &mut Vec<Record>) -> bool;
    /// Dead-letters the timer or retry the last `on_due` ran, instead of
    /// running it again: the records it made cannot be written (`why`).
    /// Its partition; `None` if it is no longer due (nothing to do).
    fn reject_due(&mut self, why: &str, now: Timestamp, out: &mut Vec<Record>) -> Option<u32>;
    /// The partition of the timer or retry the last `on_due` ran, if any.
    fn due_partition(&self) -> Option<u32>;
    /// Whether, at least once, the partition of due work whose records
    /// were refused is read again (some of them may have been written):
    /// yes for a saga, whose rejection writes no state; no for a
    /// participant, whose rejection writes the command's ledger entry
    /// again (and a reply nobody would resend after a read).
    fn reread_refused_due(&self) -> bool {
        false
    }
    /// A pending request, if any.
    fn take_request(&mut self) -> Option<Request>;
    /// Whether a request is pending (without taking it).
    fn has_request(&mut self) -> bool {
        false
    }
    /// The batch committed: its changes are durable.
    fn committed(&mut self);
    /// The batch was aborted: undo its in-memory changes.
    fn rolled_back(&mut self);
}

/// How a worker is asked to stop.
pub(crate) const RUN: u8 = 0;
pub(crate) const STOP: u8 = 1;
pub(crate) const KILL: u8 = 2;

/// The longest an idle worker sleeps without being woken. Input, requests
/// and stops wake it at once ([`Wakeup`]): this only bounds how late it
/// notices what wakes nothing (input queued behind two events that are not
/// messages, which [`poll_now`] does not see past; a retry of a restore
/// that failed).
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Wakes a worker that waits for something to do: its consumer's queue
/// became non-empty (librdkafka calls back from its own thread), a handle
/// queued a request, or the runtime asked it to stop. The worker waits
/// here instead of in the consumer's `poll`, which nothing but input
/// could end early.
#[derive(Debug, Default)]
pub(crate) struct Wakeup {
    woken: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Wakeup {
    /// Wakes the worker (or makes its next wait return at once).
    pub(crate) fn wake(&self) {
        let mut woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        if !*woken {
            *woken = true;
            self.cv.notify_one();
        }
    }

    /// Waits until woken or `timeout` has passed, and takes the wakeup.
    fn wait(&self, timeout: Duration) {
        let woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        let (mut woken, _) = self
            .cv
            .wait_timeout_while(woken, timeout, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        *woken = false;
    }
}

fn tpl_partitions(tpl: &TopicPartitionList) -> Vec<u32> {
    let set: BTreeSet<u32> = tpl
        .elements()
        .iter()
        .map(|e| e.partition() as u32)
        .collect();
    set.into_iter().collect()
}

struct Ctx<P> {
    core: Arc<Mutex<Core<P>>>,
    /// The consumer's lag gauges, set from its statistics.
    lag: Mutex<LagGauges>,
}

fn lock<P>(m: &Mutex<Core<P>>) -> MutexGuard<'_, Core<P>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<P: Processor> ClientContext for Ctx<P> {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::context::log(level, fac, message)
    }

    // A refusal reported here is returned by `poll` as well, where the
    // worker reports it: only logged here (and no lock taken).
    fn error(&self, error: RdError, reason: &str) {
        crate::context::client_error(error, reason)
    }

    fn stats_raw(&self, statistics: &[u8]) {
        // Called from the worker's own `poll`, every `LAG_INTERVAL_MS`.
        self.lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report(statistics);
    }
}

impl<P: Processor> ConsumerContext for Ctx<P> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut c = lock(&self.core);
            if c.killed {
                return;
            }
            if consumer.assignment_lost() {
                c.drop_batch();
            } else {
                c.finish_batch(consumer, false);
            }
            let parts = tpl_partitions(tpl);
            tracing::info!(transactional_id = %c.txn.id, partitions = ?parts, "partitions revoked");
            c.give_up_partitions(&parts);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut c = lock(&self.core);
            let parts = tpl_partitions(tpl);
            tracing::info!(transactional_id = %c.txn.id, partitions = ?parts, "partitions assigned: paused until their state is restored");
            // The restore runs in the worker's loop, not in this callback.
            c.assigned(consumer, &parts);
        }
    }
}

/// A running worker thread.
pub(crate) struct WorkerHandle {
    stop: Arc<AtomicU8>,
    wakeup: Arc<Wakeup>,
    pub thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// The handle of `thread`, which watches `stop` and waits on `wakeup`.
    pub(crate) fn new(stop: Arc<AtomicU8>, wakeup: Arc<Wakeup>, thread: JoinHandle<()>) -> Self {
        Self {
            stop,
            wakeup,
            thread: Some(thread),
        }
    }

    /// Asks the worker to stop ([`STOP`]) or to die ([`KILL`]), at once.
    pub(crate) fn signal(&self, how: u8) {
        self.stop.store(how, Ordering::SeqCst);
        self.wakeup.wake();
    }
}

/// Starts a worker for `proc` on its own thread, consuming as `group` with
/// the producer of `service`; whoever queues requests for `proc` wakes it
/// through `wakeup`. Returns once the producer is initialised.
pub(crate) fn spawn<P: Processor>(
    cfg: Arc<KafkaConfig>,
    service: &str,
    group: &str,
    proc: P,
    wakeup: Arc<Wakeup>,
    stats: Arc<StatsInner>,
    health: HealthBoard,
) -> Result<WorkerHandle> {
    let txn_id = cfg.transactional_id(service);
    let topics = proc.topics();
    let core = Arc::new(Mutex::new(Core::new(
        proc,
        cfg.clone(),
        txn_id.clone(),
        stats,
        health,
    )));
    lock(&core).txn.ensure_producer().map_err(|e| {
        match e.rdkafka_error_code().and_then(denied) {
            Some(kind) => Error::Authorization {
                principal: cfg.principal(),
                operation: "WRITE".into(),
                resource: match kind {
                    "transactional id" => format!("transactional id `{txn_id}`"),
                    other => format!("the {other}"),
                },
                reason: e.to_string(),
            },
            None => Error::client(format!("creating the producer `{txn_id}`"), e),
        }
    })?;
    lock(&core).group = group.to_owned();
    let consumer = subscribe(&cfg, group, &topics, &core, &wakeup)?;
    let stop = Arc::new(AtomicU8::new(RUN));
    let flag = stop.clone();
    let alarm = wakeup.clone();
    let span = tracing::info_span!("saga_kafka.worker", transactional_id = %txn_id, group = %group);
    let group = group.to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("saga-kafka-{service}"))
        .spawn(move || {
            let _g = span.enter();
            let mut consumer = consumer;
            while let Exit::Fatal(e) = run(&core, &consumer, &flag, &alarm) {
                // The consumer cannot go on (a static member fenced, as
                // librdkafka does after some coordinator failovers): drop
                // its batch and partitions and join again with a new one.
                {
                    let mut c = lock(&core);
                    c.drop_batch();
                    c.give_up_all();
                    let name = c.proc.name().to_owned();
                    let why = format!("consumer failed ({e}): joining the group again");
                    c.health.report(&name, None, why, Timestamp::now());
                }
                drop(consumer);
                consumer = loop {
                    if flag.load(Ordering::SeqCst) != RUN {
                        lock(&core).give_up_all();
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    match subscribe(&cfg, &group, &topics, &core, &alarm) {
                        Ok(c) => break c,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot create the consumer again: retrying")
                        }
                    }
                };
                let c = lock(&core);
                let name = c.proc.name().to_owned();
                c.health.clear(&name, None);
            }
            if flag.load(Ordering::SeqCst) == KILL {
                lock(&core).killed = true;
                drop(consumer);
                // Leave the transaction open on the broker, as a crash would.
                let mut c = lock(&core);
                if let Some(p) = c.txn.producer.take() {
                    let _ = rdkafka::producer::Producer::flush(&p, Duration::from_secs(2));
                    drop(p);
                }
                c.txn.clear();
            } else {
                drop(consumer);
            }
            let mut c = lock(&core);
            c.give_up_all();
        })
        .map_err(|e| Error::Config {
            key: "thread".into(),
            reason: format!("cannot spawn a worker thread: {e}"),
        })?;
    Ok(WorkerHandle::new(stop, wakeup, thread))
}

/// A consumer of `topics` in `group`, subscribed, whose rebalances go to
/// `core` and whose input wakes `wakeup`.
fn subscribe<P: Processor>(
    cfg: &KafkaConfig,
    group: &str,
    topics: &[String],
    core: &Arc<Mutex<Core<P>>>,
    wakeup: &Arc<Wakeup>,
) -> Result<BaseConsumer<Ctx<P>>> {
    let mut consumer: BaseConsumer<Ctx<P>> = cfg
        .consumer_config(group)
        .create_with_context(Ctx {
            core: core.clone(),
            lag: Mutex::new(LagGauges::new(group, topics)),
        })
        .map_err(|e| Error::client(format!("creating the consumer of group `{group}`"), e))?;
    let wakeup = wakeup.clone();
    consumer.set_nonempty_callback(move || wakeup.wake());
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&refs)
        .map_err(|e| Error::client(format!("subscribing to {topics:?}"), e))?;
    Ok(consumer)
}

/// Whether the cluster describes every topic of `topics` to this client
/// again (READ implies DESCRIBE: a refused topic answers with an
/// authorization error).
pub(crate) fn topics_readable<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topics: &[String],
) -> bool {
    topics.iter().all(|t| {
        consumer
            .fetch_metadata(Some(t), Duration::from_secs(2))
            .ok()
            .and_then(|md| md.topics().first().map(|m| m.error().is_none()))
            .unwrap_or(false)
    })
}

/// Why a worker's loop ended.
enum Exit {
    /// Asked to stop (or to die).
    Stopped,
    /// The consumer hit a fatal error: it must be replaced.
    Fatal(RdError),
}

fn incoming<'a>(m: &'a rdkafka::message::BorrowedMessage<'a>) -> Incoming<'a> {
    // One pass over the (few) headers, borrowing their values.
    let (mut kind, mut traceparent) = (None, None);
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            if h.key == RECORD_KIND_HEADER {
                kind = h.value;
            } else if h.key == TRACEPARENT_HEADER {
                traceparent = h.value;
            }
        }
    }
    Incoming {
        topic: m.topic(),
        partition: m.partition() as u32,
        offset: m.offset() as u64,
        key: m.key(),
        value: m.payload(),
        kind,
        traceparent,
    }
}

/// What the consumer has queued, without waiting. The client's `poll`
/// also answers nothing after serving an event that is not a message (a
/// rebalance, the statistics every few seconds); input queued behind such
/// an event wakes nobody, so an empty answer is checked once more.
fn poll_now<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
) -> Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>> {
    consumer
        .poll(Duration::ZERO)
        .or_else(|| consumer.poll(Duration::ZERO))
}

fn run<P: Processor>(
    core: &Arc<Mutex<Core<P>>>,
    consumer: &BaseConsumer<Ctx<P>>,
    stop: &AtomicU8,
    wakeup: &Wakeup,
) -> Exit {
    let (max, timeout, linger, idle) = {
        let c = lock(core);
        (
            c.cfg().batch_max_messages,
            c.cfg().batch_timeout,
            c.cfg().start_linger,
            c.cfg().batch_idle,
        )
    };
    loop {
        match stop.load(Ordering::SeqCst) {
            RUN => {}
            KILL => return Exit::Stopped,
            _ => {
                lock(core).finish_batch(consumer, true);
                return Exit::Stopped;
            }
        }
        let isolating = lock(core).isolating();
        let max = if isolating { 1 } else { max };
        // Between batches: partitions due for their restore come first,
        // before requests open the next batch (so load cannot starve them).
        lock(core).restore_due(consumer);
        // A batch that isolates an input takes that input alone: requests
        // wait for the next batch (joining it, they would make it more
        // than one input again, and a refused record could never be
        // pinned on its input).
        if isolating {
            if lock(core).due_first() {
                lock(core).run_due();
            }
        } else {
            lock(core).serve_requests(false, consumer);
        }
        // The batch's clock starts with its first message, timer or request.
        // `deadline` is when the batch stops waiting for more input (its
        // timeout, or sooner with callers waiting: their linger); `hard` is
        // its timeout, when it ends even with input still queued.
        let mut deadline: Option<Instant> = if lock(core).waiting.is_empty() {
            None
        } else {
            Some(Instant::now() + linger.min(timeout))
        };
        let mut hard: Option<Instant> = deadline.map(|_| Instant::now() + timeout);
        loop {
            let wait = {
                let c = lock(core);
                let mut wait = match deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()),
                    None => timeout,
                }
                // While a batch is open, wait `idle` for more input, then
                // commit what there is.
                .min(if c.busy() { idle } else { IDLE_POLL });
                if let Some(at) = c.proc.next_due() {
                    let ms = at.as_millis().saturating_sub(Timestamp::now().as_millis());
                    wait = wait.min(Duration::from_millis(ms));
                }
                wait
            };
            let mut more = false;
            // What is queued first; then, with nothing queued, wait to be
            // woken (input, a request, a stop) or for the time to pass. A
            // full batch takes no more (an isolating batch: one input).
            let full = lock(core).count >= max;
            let polled = if full {
                None
            } else {
                match poll_now(consumer) {
                    None if !wait.is_zero() => {
                        wakeup.wait(wait);
                        poll_now(consumer)
                    }
                    polled => polled,
                }
            };
            match polled {
                Some(Ok(m)) => {
                    let mut c = lock(core);
                    c.consumer_ok();
                    c.handle_message(&incoming(&m));
                    more = true;
                }
                Some(Err(RdError::PartitionEOF(_))) => {}
                Some(Err(e @ RdError::MessageConsumptionFatal(_))) => {
                    tracing::error!(error = %e, "fatal consumer error");
                    return Exit::Fatal(e);
                }
                Some(Err(e)) => match e.rdkafka_error_code().and_then(denied) {
                    Some(kind) => {
                        lock(core).consumer_denied(kind, &e);
                        // The client retries by itself; do not spin on it.
                        std::thread::sleep(UNAUTHORIZED_PAUSE);
                    }
                    None => tracing::warn!(error = %e, "consumer error"),
                },
                None => {}
            }
            if lock(core).recheck_due() {
                let topics = lock(core).proc.topics();
                let readable = topics_readable(consumer, &topics);
                let mut c = lock(core);
                c.denied_checked = Instant::now();
                if readable {
                    c.consumer_ok();
                }
            }
            let mut c = lock(core);
            if !c.busy() {
                // Partitions assigned in this poll's rebalance, or due
                // for another try: restored between batches.
                c.restore_due(consumer);
            }
            c.run_due();
            let busy = c.busy();
            if busy && deadline.is_none() {
                deadline = Some(Instant::now() + timeout);
            }
            if busy && hard.is_none() {
                hard = Some(Instant::now() + timeout);
            }
            if !busy && c.waiting.is_empty() {
                // No batch is open (one may have been committed inside the
                // poll, by a rebalance): its clock starts again.
                deadline = None;
                hard = None;
            }
            let now = Instant::now();
            // Past the deadline the batch waits for nothing more, but input
            // already received still joins it (within its timeout and
            // size): a batch cut at every message would commit far fewer
            // messages than arrive once callers keep it short (a linger of
            // 0), and input would queue without end. Under a steady load a
            // caller may so wait up to the batch timeout.
            let expired =
                hard.is_some_and(|d| now >= d) || (deadline.is_some_and(|d| now >= d) && !more);
            let drained = drained(busy, more, c.proc.has_request(), c.txn.eos());
            if c.count >= max || expired || drained || stop.load(Ordering::SeqCst) != RUN {
                break;
            }
            let had_callers = !c.waiting.is_empty();
            c.serve_requests(busy, consumer);
            if deadline.is_none() && c.txn.open {
                deadline = Some(Instant::now() + timeout);
            }
            if hard.is_none() && c.txn.open {
                hard = Some(Instant::now() + timeout);
            }
            if !had_callers && !c.waiting.is_empty() {
                // Callers are waiting on this batch: end it soon.
                let soon = Instant::now() + linger.min(timeout);
                deadline = Some(deadline.map_or(soon, |d| d.min(soon)));
            }
        }
        if stop.load(Ordering::SeqCst) == KILL {
            return Exit::Stopped;
        }
        lock(core).finish_batch(consumer, true);
    }
}

/// Whether an open batch (`busy`) ends because nothing more came (not
/// `more`): it does, unless requests are pending (`requested`) that join
/// it first, exactly once. At least once requests never join a batch, they
/// run after it ends: a batch that went on with one pending held it back
/// until the batch's timeout or size bound (at 1,000 sagas/s starts took
/// 63–64 ms to be accepted at the median, 13–15 ms since).
fn drained(busy: bool, more: bool, requested: bool, eos: bool) -> bool {
    busy && !more && (!requested || !eos)
}

/// The processor of a [`Publisher`]: it consumes nothing.
struct NoInput;

impl Processor for NoInput {
    fn name(&self) -> &str {
        "publisher"
    }
    fn topics(&self) -> Vec<String> {
        Vec::new()
    }
    fn state_topic(&self) -> &str {
        ""
    }
    fn restore_begin(&mut self, _: u32) {}
    fn restore_record(&mut self, _: u32, _: &str, _: Option<&[u8]>) {}
    fn restore_end(&mut self, _: u32) -> std::result::Result<(), String> {
        Ok(())
    }
    fn release(&mut self, _: &[u32]) {}
    fn on_message(&mut self, _: &Incoming<'_>, _: Timestamp, _: &mut Vec<Record>) {}
    fn reject(&mut self, _: &Incoming<'_>, _: &str, _: Timestamp, _: &mut Vec<Record>) {}
    fn next_due(&self) -> Option<Timestamp> {
        None
    }
    fn on_due(&mut self, _: Timestamp, _: &mut Vec<Record>) -> bool {
        false
    }
    fn reject_due(&mut self, _: &str, _: Timestamp, _: &mut Vec<Record>) -> Option<u32> {
        None
    }
    fn due_partition(&self) -> Option<u32> {
        None
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
    pub(crate) fn new(
        cfg: Arc<KafkaConfig>,
        service: &str,
        stats: Arc<StatsInner>,
        health: HealthBoard,
    ) -> Self {
        let txn_id = cfg.transactional_id(service);
        Self {
            core: Mutex::new(Core::new(NoInput, cfg, txn_id, stats, health)),
        }
    }

    /// Writes `out` atomically; blocks (call it off the async threads).
    pub(crate) fn publish(&self, out: Vec<Record>) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        lock(&self.core).run_request(Request {
            out,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.recv().map_err(|_| Error::Shutdown)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Far longer than any test waits: a wait that lasts this long was not
    /// woken.
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn an_at_least_once_batch_ends_when_input_pauses_even_with_requests_pending() {
        // (busy, more, requested, exactly once)
        assert!(drained(true, false, true, false), "at least once");
        assert!(!drained(true, false, true, true), "exactly once: they join");
        assert!(drained(true, false, false, true));
        assert!(drained(true, false, false, false));
        for eos in [true, false] {
            assert!(!drained(true, true, false, eos), "more input came");
            assert!(!drained(false, false, true, eos), "no batch is open");
        }
    }

    #[test]
    fn a_wakeup_from_another_thread_ends_a_long_wait_early() {
        let wakeup = Arc::new(Wakeup::default());
        let waker = {
            let wakeup = wakeup.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                wakeup.wake();
            })
        };
        let t0 = Instant::now();
        wakeup.wait(LONG);
        assert!(t0.elapsed() < LONG / 2, "woken after {:?}", t0.elapsed());
        waker.join().unwrap();
    }

    #[test]
    fn a_wakeup_before_the_wait_is_kept_and_taken_by_one_wait() {
        let wakeup = Wakeup::default();
        wakeup.wake();
        wakeup.wake();
        let t0 = Instant::now();
        wakeup.wait(LONG);
        assert!(t0.elapsed() < LONG / 2, "the early wakeup was lost");
        // Taken: the next wait sleeps its time out.
        let t0 = Instant::now();
        wakeup.wait(Duration::from_millis(30));
        assert!(t0.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn a_stop_signal_wakes_a_waiting_worker_and_sets_its_flag() {
        let stop = Arc::new(AtomicU8::new(RUN));
        let wakeup = Arc::new(Wakeup::default());
        let (flag, alarm) = (stop.clone(), wakeup.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            while flag.load(Ordering::SeqCst) == RUN {
                alarm.wait(LONG);
            }
            let _ = tx.send(t0.elapsed());
        });
        let mut handle = WorkerHandle::new(stop, wakeup, thread);
        std::thread::sleep(Duration::from_millis(50));
        handle.signal(STOP);
        handle.thread.take().unwrap().join().unwrap();
        let waited = rx.recv().unwrap();
        assert!(waited < LONG / 2, "stopped after {waited:?}");
    }
}
