//! Load generator: the saga engine on Kafka against the best hand-written
//! rdkafka pipeline for the same work, in the same run.
//!
//! ```sh
//! scripts/kafka/broker.sh start
//! export KAFKA_BOOTSTRAP_SERVERS=$(scripts/kafka/broker.sh address)
//! # as many sagas as it can (burst): throughput
//! cargo bench -p saga-benches --bench kafka_load -- --sagas 20000
//! # a fixed rate: latency
//! cargo bench -p saga-benches --bench kafka_load -- --rate 1000 --duration 30s
//! # memory per in-flight saga and restore time
//! cargo bench -p saga-benches --bench kafka_load -- --inflight 100000
//! ```
//!
//! **The work.** One saga of one remote step: a start (the saga's state
//! and the command, in one transaction), the participant (its reply and
//! its ledger entry, with the command's offset), the orchestrator (the
//! saga's state and a completion event, with the reply's offset). A sink
//! reads the events.
//!
//! **The baseline** makes the same three exactly-once hops with two
//! records each and no saga logic, written as well as we know how: batches
//! of whatever has arrived (up to `--baseline-batch`), in-flight messages
//! drained before each commit (no flush timer), `retry.backoff.ms=5`. Its
//! clock, like the engine's, starts after every consumer group has joined
//! (one warm-up item goes through first).
//!
//! **The figures.** Sagas per second and messages per second (six records
//! per saga), latency from the moment a saga is requested (its scheduled
//! time, at a fixed rate) to the moment the sink sees its event
//! (p50/p95/p99/max), this process's CPU per saga (from `/proc/self/stat`
//! in 10 ms ticks, so runs of a few seconds or more), the bytes of keys
//! and values it wrote per saga (every record: the engine's state records
//! and ledger entries too), the broker's CPU per saga over the same window
//! when its process id is given (`--broker-pid`, a broker on this machine,
//! the whole process: its JIT and garbage collector count too; where it
//! shares the client's cores, its share limits a burst as well), its
//! resident memory at the end of the run (after the baseline in the same
//! process: use `--only engine`, or the memory mode, for memory figures),
//! and the ratio engine / baseline. In a burst the engine keeps
//! `--concurrency` starts awaited at once, while the baseline's source
//! writes open-loop: the engine is the one held back. The
//! last line reads `RESULT mode=… sagas_per_s=… p50_ms=… p99_ms=…
//! cpu_us_per_saga=… baseline_ratio=… start_p50_ms=… bytes_per_saga=…
//! broker_cpu_us_per_saga=…`, for scripts
//! (`scripts/bench.sh`); `start_*` is how long the engine's starts took
//! to be accepted (committed), from when they were due.
//!
//! **Bytes.** The baseline's records are small (a stamp and 40 bytes);
//! the engine's are JSON envelopes and state. `--baseline-value-bytes N`
//! pads the baseline's values to `N` bytes, to see what the engine's
//! record sizes alone cost a pipeline with no saga logic.
//!
//! **The saga catalog.** `--catalog` (with the engine) lists the sagas
//! once the run is over, through a fresh catalog: a reader of the whole
//! state topic, as an operator's first query starts one. It prints how
//! long the first page took (`catalog_list_s`, the reader's start
//! included) and the process's CPU meanwhile (`catalog_cpu_ms`).
//!
//! **The allocator.** By default the process runs on the system
//! allocator, as a user's service does unless it picks one.
//! `--features mimalloc` builds it on mimalloc instead (both sides, the
//! engine and the baseline), to measure what the allocator is worth:
//! `cargo bench -p saga-benches --bench kafka_load --features mimalloc --
//! --sagas 40000`.
//!
//! Loopback only; bounded by `--sagas` or `--duration`.

/// With `--features mimalloc`: the whole process on mimalloc.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use saga_core::*;
use saga_kafka::{ensure_topics, DeliveryMode, KafkaConfig, KafkaRuntime, TopicSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Saga engine on Kafka vs the best bare rdkafka pipeline for the same hops")]
struct Args {
    /// Burst mode: sagas (and baseline items) to move, as fast as they go.
    #[arg(long, default_value_t = 10_000)]
    sagas: usize,
    /// Fixed-rate mode: sagas requested per second (with `--duration`).
    #[arg(long)]
    rate: Option<u64>,
    /// Fixed-rate mode: for how long (`30s`, `500ms`, `2m`).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    duration: Duration,
    /// Burst mode: starts awaited at once.
    #[arg(long, default_value_t = 2_000)]
    concurrency: usize,
    /// Partitions per topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Orchestrator instances (runtimes in one group, each with the saga
    /// and the participant); starts go to them in turn.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Exactly once (transactions) or at least once.
    #[arg(long, value_enum, default_value_t = Delivery::Eos)]
    delivery: Delivery,
    /// Run only one side.
    #[arg(long, value_enum)]
    only: Option<Side>,
    /// The engine's largest batch per transaction (default: the library's).
    #[arg(long)]
    engine_batch: Option<usize>,
    /// How long the engine's open batch waits for more starts after the
    /// first (default: the library's).
    #[arg(long, value_parser = parse_duration)]
    start_linger: Option<Duration>,
    /// A client property for the engine (`--set linger.ms=5`; repeatable),
    /// as `KafkaConfig::set` would.
    #[arg(long = "set", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// The baseline's largest batch per transaction (the best we measured:
    /// 10,000 moves about three times what 2,000 does in a burst).
    #[arg(long, default_value_t = 10_000)]
    baseline_batch: usize,
    /// How long the baseline's batches stay open after their first item
    /// (`0ms`: they take what has arrived and commit).
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    baseline_linger: Duration,
    /// The baseline producers' `compression.type` (default `none`: with
    /// its small records LZ4 made it slower, 35,000–41,500 against
    /// 37,700–50,800 items/s in three alternated runs each).
    #[arg(long, value_enum, default_value_t = Compression::None)]
    baseline_compression: Compression,
    /// The baseline's record values padded (or cut) to this many bytes,
    /// never below the stamp and its colon (default: a stamp and 40 bytes,
    /// about 57), to compare at the engine's record sizes.
    #[arg(long)]
    baseline_value_bytes: Option<usize>,
    /// The broker's process id (a broker on this machine, e.g. `$(scripts/kafka/broker.sh pid)`):
    /// report its CPU per saga over each side's window as well (the whole
    /// process: its JIT and garbage collector, and any other client's
    /// requests, count too).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Memory mode: start this many sagas that stay in flight (their
    /// participant is not running), report RSS per saga, then restore them
    /// in a fresh process and report its time and peak.
    #[arg(long)]
    inflight: Option<usize>,
    /// After the engine's run, list the sagas through a saga catalog (a
    /// reader of the whole state topic, as an operator's query starts):
    /// report how long its first page took and the CPU it cost.
    #[arg(long)]
    catalog: bool,
    /// Internal: restore the sagas of this namespace (memory mode's child).
    #[arg(long, hide = true)]
    restore_ns: Option<String>,
    /// Ignored (cargo bench passes it).
    #[arg(long)]
    bench: bool,
}

/// A producer's `compression.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Compression {
    None,
    Lz4,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Delivery {
    Eos,
    Alo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Side {
    Baseline,
    Engine,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("`{s}`: expected key=value"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit (ms, s, m)"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        other => return Err(format!("`{s}`: unknown unit `{other}` (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// The load: a burst of `n`, or `rate` per second for `duration`.
#[derive(Clone, Copy, Debug)]
enum Load {
    Burst { n: usize, concurrency: usize },
    Rate { per_s: u64, duration: Duration },
}

impl Load {
    fn total(self) -> usize {
        match self {
            Load::Burst { n, .. } => n,
            Load::Rate { per_s, duration } => (per_s as f64 * duration.as_secs_f64()) as usize,
        }
    }

    /// When item `i` is due, after the clock started at `t0`.
    fn due(self, t0: Instant, i: usize) -> Instant {
        match self {
            Load::Burst { .. } => t0,
            Load::Rate { per_s, .. } => t0 + Duration::from_secs_f64(i as f64 / per_s as f64),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Load::Burst { .. } => "burst",
            Load::Rate { .. } => "rate",
        }
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Wall-clock micros of a monotonic instant (for stamps in payloads).
fn micros_at(at: Instant) -> u64 {
    let now = Instant::now();
    let base = now_micros();
    if at <= now {
        base - (now - at).as_micros() as u64
    } else {
        base + (at - now).as_micros() as u64
    }
}

/// This process's CPU time (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    process_cpu("self").unwrap_or_default()
}

/// A process's CPU time (user + system), from `/proc/<pid>/stat`; `None`
/// if it cannot be read (no such process, or not on this machine).
fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), 1-based from 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, in clock ticks (100 per second).
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Some(Duration::from_millis(ticks * 10))
}

/// The CPU process `pid` used since it had used `start` (`None` without
/// either).
fn cpu_since(pid: Option<&str>, start: Option<Duration>) -> Option<Duration> {
    pid.and_then(process_cpu)
        .zip(start)
        .map(|(now, start)| now.saturating_sub(start))
}

/// A line of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What one side did.
struct Report {
    name: &'static str,
    requested: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    cpu: Duration,
    rss: u64,
    /// The engine: how long starts took to be accepted (sorted).
    accepted: Vec<Duration>,
    /// Bytes of keys and values written in the window.
    bytes: u64,
    /// The broker's CPU in the window (with `--broker-pid`).
    broker_cpu: Option<Duration>,
    /// The baseline failed (a hop panicked): the figures count only what
    /// went through.
    failed: bool,
}

impl Report {
    fn done(&self) -> usize {
        self.latencies.len()
    }
    fn rate(&self) -> f64 {
        self.done() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn p(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
    fn cpu_us_per_saga(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.done().max(1) as f64
    }
    fn bytes_per_saga(&self) -> f64 {
        self.bytes as f64 / self.done().max(1) as f64
    }
    fn broker_cpu_us_per_saga(&self) -> Option<f64> {
        self.broker_cpu
            .map(|c| c.as_secs_f64() * 1e6 / self.done().max(1) as f64)
    }
    fn print(&self) {
        println!(
            "{:<22} {:>7}/{:<7} {:>6.2} s {:>8.0} sagas/s {:>8.0} msgs/s  p50 {:>7.1}  p95 {:>7.1}  p99 {:>7.1}  max {:>7.1} ms  cpu {:>6.1} µs/saga  rss {:>5} MB  {:>5.0} B/saga{}",
            self.name,
            self.done(),
            self.requested,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.rate() * 6.0,
            ms(self.p(0.50)),
            ms(self.p(0.95)),
            ms(self.p(0.99)),
            ms(self.p(1.0)),
            self.cpu_us_per_saga(),
            self.rss >> 20,
            self.bytes_per_saga(),
            self.broker_cpu_us_per_saga()
                .map_or(String::new(), |b| format!("  broker cpu {b:>6.1} µs/saga")),
        );
    }
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

fn producer(bootstrap: &str, txn_id: Option<&str>, compression: Compression) -> BaseProducer {
    let mut c = client(bootstrap);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("retry.backoff.ms", "5")
        .set("compression.type", compression.as_str());
    if let Some(id) = txn_id {
        c.set("transactional.id", id);
    }
    let p: BaseProducer = c.create().expect("producer");
    if txn_id.is_some() {
        p.init_transactions(Timeout::After(Duration::from_secs(30)))
            .expect("init_transactions");
    }
    p
}

fn consumer(bootstrap: &str, group: &str, topic: &str) -> BaseConsumer {
    let c: BaseConsumer = client(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    c
}

/// Serves delivery reports until nothing is in flight: the commit after it
/// has nothing to flush, so it does not wait out the client's flush poll.
/// (The client's own `poll` with a timeout spins through its last
/// millisecond, so this serves what is there and sleeps between checks.)
fn drain(p: &BaseProducer) {
    let mut pause = Duration::from_micros(50);
    loop {
        p.poll(Duration::ZERO);
        if p.in_flight_count() == 0 {
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// Commits what `p` produced (with `offsets` of `c`, exactly once).
fn commit(p: &BaseProducer, eos: bool, c: Option<(&BaseConsumer, &TopicPartitionList)>) {
    drain(p);
    if eos {
        if let Some((c, offsets)) = c {
            let meta = c.group_metadata().expect("group metadata");
            p.send_offsets_to_transaction(offsets, &meta, Timeout::After(Duration::from_secs(30)))
                .expect("send_offsets_to_transaction");
        }
        p.commit_transaction(Timeout::After(Duration::from_secs(30)))
            .expect("commit_transaction");
    } else if let Some((c, offsets)) = c {
        c.commit(offsets, rdkafka::consumer::CommitMode::Sync)
            .expect("commit offsets");
    }
}

/// Names of the baseline's topics.
struct Topics {
    a: String,
    b: String,
    c: String,
    state: String,
}

/// A baseline hop panicked (`stop`'s value): the run ends.
const FAILED: usize = 2;

/// One hop: read `from`, write each message to `to` and to the side state
/// topic, commit offsets and output together; stops when `stop` says so.
fn hop(
    bootstrap: &str,
    ns: &str,
    (from, to, state): (&str, &str, &str),
    eos: bool,
    batching: Batching,
    (ready, stop): (&AtomicUsize, &AtomicUsize),
    written: &AtomicU64,
) {
    let c = consumer(bootstrap, &format!("{ns}-{from}"), from);
    let p = producer(
        bootstrap,
        eos.then(|| format!("{ns}-{from}-tx")).as_deref(),
        batching.compression,
    );
    let mut joined = false;
    let mut batch = Vec::with_capacity(batching.max);
    while stop.load(Ordering::Relaxed) == 0 {
        batch.clear();
        // Wait for the first message, then take whatever else arrives
        // within the linger.
        let mut first: Option<Instant> = None;
        let mut wait = Duration::from_millis(20);
        while batch.len() < batching.max {
            match c.poll(wait) {
                Some(Ok(m)) => {
                    batch.push((
                        m.partition(),
                        m.offset(),
                        m.key().map(<[u8]>::to_vec).unwrap_or_default(),
                        m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    ));
                    first.get_or_insert_with(Instant::now);
                }
                Some(Err(e)) => panic!("baseline consumer: {e}"),
                None if first.is_none_or(|f| f.elapsed() >= batching.linger) => break,
                None => {}
            }
            wait = first.map_or(Duration::from_millis(20), |f| {
                batching.linger.saturating_sub(f.elapsed())
            });
        }
        if !joined && c.assignment().is_ok_and(|a| a.count() > 0) {
            joined = true;
            ready.fetch_add(1, Ordering::SeqCst);
        }
        if batch.is_empty() {
            continue;
        }
        if eos {
            p.begin_transaction().expect("begin_transaction");
        }
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        let bytes: usize = batch.iter().map(|(_, _, k, v)| k.len() + v.len()).sum();
        written.fetch_add(2 * bytes as u64, Ordering::Relaxed);
        for (part, off, key, payload) in &batch {
            for topic in [to, state] {
                let mut rec = BaseRecord::to(topic).key(key).payload(payload);
                while let Err((e, back)) = p.send(rec) {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "baseline produce: {e}"
                    );
                    p.poll(Duration::ZERO);
                    std::thread::sleep(Duration::from_millis(1));
                    rec = back;
                }
            }
            let e = offsets.entry(*part).or_insert(*off);
            *e = (*e).max(*off);
        }
        let mut tpl = TopicPartitionList::new();
        for (part, off) in offsets {
            tpl.add_partition_offset(from, part, Offset::Offset(off + 1))
                .expect("offset");
        }
        commit(&p, eos, Some((&c, &tpl)));
    }
}

/// The sink: reads `topic` and records each item's latency from the stamp
/// (wall-clock micros) its payload starts with.
fn sink(
    bootstrap: &str,
    group: &str,
    topic: &str,
    want: usize,
    limit: Duration,
    (ready, stop): (&AtomicUsize, &AtomicUsize),
) -> Vec<Duration> {
    let c = consumer(bootstrap, group, topic);
    let mut out = Vec::with_capacity(want);
    // At least once an item may arrive twice: it counts once.
    let mut seen = std::collections::HashSet::with_capacity(want);
    let mut joined = false;
    let deadline = Instant::now() + limit;
    while out.len() < want && Instant::now() < deadline && stop.load(Ordering::SeqCst) != FAILED {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(20)) {
            if !seen.insert(m.key().map(<[u8]>::to_vec)) {
                continue;
            }
            let stamp: u64 = m
                .payload()
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|s| s.split(':').next()?.parse().ok())
                .unwrap_or(0);
            out.push(Duration::from_micros(now_micros().saturating_sub(stamp)));
            if out.len() == 1 {
                // The warm-up item is through.
                ready.fetch_add(1, Ordering::SeqCst);
            }
        }
        if !joined && c.assignment().is_ok_and(|a| a.count() > 0) {
            joined = true;
            ready.fetch_add(1, Ordering::SeqCst);
        }
    }
    out
}

/// The baseline: a source (the "start" transactions), two hops, a sink.
/// How the baseline batches: at most `max` items, open `linger` after the first.
#[derive(Clone, Copy, Debug)]
struct Batching {
    max: usize,
    linger: Duration,
    compression: Compression,
}

fn baseline(
    bootstrap: &str,
    ns: &str,
    load: Load,
    eos: bool,
    batching: Batching,
    value_bytes: Option<usize>,
    broker_pid: Option<u32>,
) -> Report {
    let t = Arc::new(Topics {
        a: format!("{ns}.a"),
        b: format!("{ns}.b"),
        c: format!("{ns}.c"),
        state: format!("{ns}.state"),
    });
    let ready = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicUsize::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let want = load.total() + 1; // + the warm-up item
    let hops: Vec<_> = [(t.a.clone(), t.b.clone()), (t.b.clone(), t.c.clone())]
        .into_iter()
        .map(|(from, to)| {
            let (bs, ns, t, ready, stop, written) = (
                bootstrap.to_owned(),
                ns.to_owned(),
                t.clone(),
                ready.clone(),
                stop.clone(),
                written.clone(),
            );
            std::thread::spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    hop(
                        &bs,
                        &ns,
                        (&from, &to, &t.state),
                        eos,
                        batching,
                        (&ready, &stop),
                        &written,
                    );
                });
                if std::panic::catch_unwind(run).is_err() {
                    // Its panic is printed: end the run now rather than
                    // let the sink wait out its limit.
                    stop.store(FAILED, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let sink_thread = {
        let (bs, group, topic, ready, stop) = (
            bootstrap.to_owned(),
            format!("{ns}-sink"),
            t.c.clone(),
            ready.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let limit = Duration::from_secs(600);
            sink(&bs, &group, &topic, want, limit, (&ready, &stop))
        })
    };
    let p = producer(
        bootstrap,
        eos.then(|| format!("{ns}-start-tx")).as_deref(),
        batching.compression,
    );
    let send = |i: usize, stamp: u64| {
        let key = format!("m-{i}");
        let mut payload = format!("{stamp}:{}", "x".repeat(40));
        if let Some(n) = value_bytes {
            // Padded or cut to `n` bytes; the sink reads the stamp before
            // the colon.
            payload.truncate(n.max(stamp.to_string().len() + 1));
            let short = n.saturating_sub(payload.len());
            payload.extend(std::iter::repeat_n('x', short));
        }
        written.fetch_add(2 * (key.len() + payload.len()) as u64, Ordering::Relaxed);
        for topic in [&t.a, &t.state] {
            let mut rec = BaseRecord::to(topic).key(&key).payload(&payload);
            while let Err((_, back)) = p.send(rec) {
                p.poll(Duration::ZERO);
                std::thread::sleep(Duration::from_millis(1));
                rec = back;
            }
        }
    };
    let failed = || stop.load(Ordering::SeqCst) == FAILED;
    // Warm-up: one item through every hop, so that every group has joined.
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::SeqCst) < 3 {
        assert!(!failed(), "a baseline hop failed before it joined (above)");
        assert!(
            Instant::now() < deadline,
            "the baseline's consumers did not join their groups in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if eos {
        p.begin_transaction().expect("begin");
    }
    send(usize::MAX, now_micros());
    commit(&p, eos, None);
    while ready.load(Ordering::SeqCst) < 4 {
        assert!(!failed(), "a baseline hop failed in the warm-up (above)");
        assert!(
            Instant::now() < deadline,
            "the baseline's warm-up item did not go through in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let broker = broker_pid.map(|p| p.to_string());
    let broker0 = broker.as_deref().and_then(process_cpu);
    let written0 = written.load(Ordering::Relaxed);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let total = load.total();
    let mut i = 0;
    while i < total && !failed() {
        let now = Instant::now();
        if load.due(t0, i) > now {
            std::thread::sleep(load.due(t0, i) - now);
            continue;
        }
        if eos {
            p.begin_transaction().expect("begin");
        }
        // What is due, and what falls due within the linger.
        let (first, mut n) = (Instant::now(), 0);
        while i < total && n < batching.max {
            let due = load.due(t0, i);
            let now = Instant::now();
            if due > now {
                if due > first + batching.linger {
                    break;
                }
                std::thread::sleep(due - now);
            }
            let stamp = match load {
                Load::Burst { .. } => now_micros(),
                Load::Rate { .. } => micros_at(due),
            };
            send(i, stamp);
            i += 1;
            n += 1;
        }
        commit(&p, eos, None);
    }
    let mut latencies = sink_thread.join().expect("sink");
    let elapsed = t0.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    let broker_cpu = cpu_since(broker.as_deref(), broker0);
    let bytes = written.load(Ordering::Relaxed) - written0;
    let rss = status_bytes("VmRSS");
    stop.store(1, Ordering::SeqCst);
    for h in hops {
        let _ = h.join();
    }
    // The first item seen is the warm-up one.
    if !latencies.is_empty() {
        latencies.remove(0);
    }
    latencies.sort();
    Report {
        name: "bare rdkafka pipeline",
        requested: total,
        elapsed,
        latencies,
        cpu,
        rss,
        accepted: Vec::new(),
        bytes,
        broker_cpu,
        failed: failed(),
    }
}

/// The saga's data: when it was requested (wall-clock micros).
#[derive(Clone, Serialize, Deserialize)]
struct Job {
    t: u64,
}

struct Worker;

#[async_trait::async_trait]
impl Participant for Worker {
    type Command = Value;
    type Reply = Value;
    type Error = StepError;
    async fn handle(&self, command: Value, _: &mut ParticipantContext) -> Result<Value, StepError> {
        Ok(command)
    }
}

fn config(bootstrap: &str, ns: &str, args: &Args, instance: usize) -> KafkaConfig {
    let (partitions, delivery) = (args.partitions, args.delivery);
    let mut cfg = KafkaConfig::new(bootstrap);
    if let Some(max) = args.engine_batch {
        cfg = cfg.batch(max, Duration::from_millis(100));
    }
    if let Some(linger) = args.start_linger {
        cfg = cfg.start_linger(linger);
    }
    for (key, value) in &args.properties {
        cfg = cfg.set(key, value);
    }
    cfg.app(ns)
        .instance_id(instance.to_string())
        .partitions(partitions)
        .delivery(match delivery {
            Delivery::Eos => DeliveryMode::ExactlyOnce,
            Delivery::Alo => DeliveryMode::AtLeastOnce,
        })
}

fn definition(ns: &str, events: &str) -> SagaDefinition<Job> {
    let events = events.to_owned();
    SagaDefinition::<Job>::builder(format!("{ns}-job"))
        .step(
            Step::remote("work", format!("{ns}.work.requests"))
                .command(|j: &Job| json!({ "t": j.t }))
                .pivot(),
        )
        .on_completed(move |ctx| {
            let t = ctx.data().t;
            ctx.emit(events.clone(), &json!({ "t": t }))
        })
        .build()
        .expect("saga")
}

/// Waits until the runtimes own `want` partitions in all, each its share
/// (their workers joined, the group settled, their state restored).
async fn owned(runtimes: &[KafkaRuntime], want: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let share = want / runtimes.len().max(1) as u64;
    let owned = || runtimes.iter().map(|r| r.stats().owned_partitions);
    while owned().sum::<u64>() < want || owned().any(|n| n < share) {
        assert!(
            Instant::now() < deadline,
            "the runtimes did not join their groups in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn engine(bootstrap: &str, ns: &str, load: Load, args: &Args) -> Report {
    let events = format!("{ns}.events");
    let base = config(bootstrap, ns, args, 0);
    ensure_topics(&base, &[TopicSpec::messages(&events)])
        .await
        .expect("topics");
    let done: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut runtimes = Vec::new();
    let mut handles = Vec::new();
    for i in 0..args.instances {
        let rt = KafkaRuntime::new(config(bootstrap, ns, args, i)).expect("runtime");
        rt.participant(
            &format!("{ns}.work.requests"),
            ParticipantPolicy::new(format!("{ns}-worker")),
            Worker,
        )
        .await
        .expect("participant");
        if i == 0 {
            let done = done.clone();
            // At least once a saga's event may arrive twice: it counts once.
            let mut seen = std::collections::HashSet::new();
            rt.projection(&format!("{ns}-sink"), &[events.as_str()], move |e| {
                if !seen.insert(e.saga_id.clone()) {
                    return;
                }
                let t = e.payload.get("t").and_then(Value::as_u64).unwrap_or(0);
                done.lock()
                    .unwrap()
                    .push(Duration::from_micros(now_micros().saturating_sub(t)));
            })
            .await
            .expect("projection");
        }
        handles.push(rt.saga(definition(ns, &events)).await.expect("saga"));
        runtimes.push(rt);
    }
    // Every worker joined and restored, and one saga went all the way.
    owned(&runtimes, 2 * args.partitions as u64).await;
    handles[0]
        .start(SagaId::from("warm-up"), Job { t: now_micros() })
        .await
        .expect("warm-up");
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the warm-up saga did not complete in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done.lock().unwrap().clear();

    let total = load.total();
    let written = || -> u64 { runtimes.iter().map(|r| r.stats().bytes_produced).sum() };
    let broker = args.broker_pid.map(|p| p.to_string());
    let broker0 = broker.as_deref().and_then(process_cpu);
    let written0 = written();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    // How long each start took to be accepted, from when it was due.
    let accepted: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let start = |i: usize, t: u64| {
        let h = handles[i % handles.len()].clone();
        let accepted = accepted.clone();
        async move {
            h.start(format!("job-{i}"), Job { t }).await.expect("start");
            let took = Duration::from_micros(now_micros().saturating_sub(t));
            accepted.lock().unwrap().push(took);
        }
    };
    match load {
        Load::Burst { n, concurrency } => {
            futures::stream::iter(0..n)
                .map(|i| start(i, now_micros()))
                .buffer_unordered(concurrency)
                .collect::<Vec<()>>()
                .await;
        }
        Load::Rate { .. } => {
            let mut tasks = Vec::with_capacity(total);
            let mut i = 0;
            while i < total {
                let due = load.due(t0, i);
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep(due - now).await;
                }
                while i < total && load.due(t0, i) <= Instant::now() {
                    tasks.push(tokio::spawn(start(i, micros_at(load.due(t0, i)))));
                    i += 1;
                }
            }
            for t in tasks {
                t.await.expect("start task");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while done.lock().unwrap().len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    let broker_cpu = cpu_since(broker.as_deref(), broker0);
    let bytes = written().saturating_sub(written0);
    let rss = status_bytes("VmRSS");
    if args.catalog {
        // A fresh catalog reads the whole state topic: every version of
        // every saga's state written in the run.
        let (cpu0, t0) = (cpu_time(), Instant::now());
        let page = handles[0]
            .list(&SagaQuery::all().limit(1))
            .await
            .expect("a catalog page");
        println!(
            "catalog: first page in catalog_list_s={:.2}, catalog_cpu_ms={} ({} listed)",
            t0.elapsed().as_secs_f64(),
            cpu_time().saturating_sub(cpu0).as_millis(),
            page.items.len(),
        );
    }
    for rt in runtimes {
        rt.shutdown().await;
    }
    let mut latencies = done.lock().unwrap().clone();
    latencies.sort();
    let mut accepted = accepted.lock().unwrap().clone();
    accepted.sort();
    Report {
        name: "saga engine",
        requested: total,
        elapsed,
        latencies,
        cpu,
        rss,
        accepted,
        bytes,
        broker_cpu,
        failed: false,
    }
}

/// Memory mode: `n` sagas left in flight; RSS per saga; then a fresh
/// process restores them.
async fn inflight(bootstrap: &str, ns: &str, n: usize, args: &Args) {
    let rt = KafkaRuntime::new(config(bootstrap, ns, args, 0)).expect("runtime");
    let events = format!("{ns}.events");
    ensure_topics(rt.config(), &[TopicSpec::messages(&events)])
        .await
        .expect("topics");
    let jobs = rt.saga(definition(ns, &events)).await.expect("saga");
    owned(std::slice::from_ref(&rt), args.partitions as u64).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = status_bytes("VmRSS");
    let t0 = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let jobs = jobs.clone();
            async move {
                jobs.start(format!("job-{i}"), Job { t: 0 })
                    .await
                    .expect("start")
            }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await;
    let took = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = status_bytes("VmRSS");
    let per = after.saturating_sub(before) as f64 / n as f64;
    println!(
        "{n} sagas in flight (started in {:.1} s): RSS {} MB -> {} MB = {per:.0} bytes per in-flight saga",
        took.as_secs_f64(),
        before >> 20,
        after >> 20
    );
    rt.shutdown().await;
    // The restore, in a process of its own (this one's heap is warm).
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .args(["--bench", "--restore-ns", ns, "--inflight"])
        .arg(n.to_string())
        .arg("--partitions")
        .arg(args.partitions.to_string())
        .arg("--delivery")
        .arg(format!("{:?}", args.delivery).to_lowercase())
        .args(
            args.properties
                .iter()
                .flat_map(|(k, v)| ["--set".to_owned(), format!("{k}={v}")]),
        )
        .output()
        .expect("restore process");
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    let field = |k: &str| -> String {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or("?")
            .to_owned()
    };
    println!(
        "RESULT mode=inflight delivery={:?} sagas={n} bytes_per_inflight_saga={per:.0} restore_s={} restore_peak_mb={} steady_mb={} peak_ratio={}",
        args.delivery,
        field("restore_s"),
        field("peak_mb"),
        field("steady_mb"),
        field("peak_ratio")
    );
}

/// Memory mode's child: restores the namespace's sagas, reports the time
/// and the peak against the steady RSS.
async fn restore_child(bootstrap: &str, ns: &str, n: usize, args: &Args) {
    let rt = KafkaRuntime::new(config(bootstrap, ns, args, 0)).expect("runtime");
    let events = format!("{ns}.events");
    let t0 = Instant::now();
    let jobs = rt.saga(definition(ns, &events)).await.expect("saga");
    owned(std::slice::from_ref(&rt), args.partitions as u64).await;
    let took = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let steady = status_bytes("VmRSS");
    let peak = status_bytes("VmHWM");
    let running = jobs
        .list(&SagaQuery::default().local().limit(n + 1))
        .await
        .map(|l| l.items.len())
        .unwrap_or(0);
    println!(
        "restored {running} sagas in flight: restore_s={:.2} steady_mb={} peak_mb={} peak_ratio={:.2}",
        took.as_secs_f64(),
        steady >> 20,
        peak >> 20,
        peak as f64 / steady.max(1) as f64
    );
    rt.shutdown().await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo test --all-targets` runs bench targets too, with test flags:
    // measure only under `cargo bench` (which passes `--bench`).
    if !std::env::args().any(|a| a == "--bench") {
        println!("kafka_load: a benchmark; run it with `cargo bench --bench kafka_load`");
        return;
    }
    let args = Args::parse();
    if args.catalog && args.only == Some(Side::Baseline) {
        eprintln!(
            "kafka_load: --catalog lists the engine's sagas: it does nothing with --only baseline"
        );
    }
    let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") else {
        eprintln!("kafka_load: set KAFKA_BOOTSTRAP_SERVERS (e.g. `scripts/kafka/broker.sh start`); nothing measured");
        return;
    };
    if let (Some(ns), Some(n)) = (&args.restore_ns, args.inflight) {
        restore_child(&bootstrap, ns, n, &args).await;
        return;
    }
    if let Some(pid) = args.broker_pid {
        if process_cpu(&pid.to_string()).is_none() {
            eprintln!("kafka_load: --broker-pid {pid}: no such process on this machine (/proc/{pid}/stat); nothing measured");
            std::process::exit(2);
        }
    }
    let ns = format!("load-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    if let Some(n) = args.inflight {
        inflight(&bootstrap, &ns, n, &args).await;
        return;
    }
    let load = match args.rate {
        Some(per_s) => Load::Rate {
            per_s: per_s.max(1),
            duration: args.duration,
        },
        None => Load::Burst {
            n: args.sagas,
            concurrency: args.concurrency.max(1),
        },
    };
    let eos = args.delivery == Delivery::Eos;
    println!(
        "{} of {} sagas, {:?}, {} partitions, {} instance(s), at {bootstrap}",
        load.name(),
        load.total(),
        args.delivery,
        args.partitions,
        args.instances
    );
    let base = if args.only != Some(Side::Engine) {
        let cfg = KafkaConfig::new(&bootstrap).partitions(args.partitions);
        let specs: Vec<TopicSpec> = ["a", "b", "c", "state"]
            .iter()
            .map(|t| TopicSpec::messages(format!("{ns}.{t}")))
            .collect();
        ensure_topics(&cfg, &specs).await.expect("baseline topics");
        let batching = Batching {
            max: args.baseline_batch,
            linger: args.baseline_linger,
            compression: args.baseline_compression,
        };
        let (bs, ns2) = (bootstrap.clone(), ns.clone());
        let (value_bytes, broker_pid) = (args.baseline_value_bytes, args.broker_pid);
        let r = tokio::task::spawn_blocking(move || {
            baseline(&bs, &ns2, load, eos, batching, value_bytes, broker_pid)
        })
        .await
        .expect("baseline");
        r.print();
        if r.failed {
            // No RESULT line: a failed run must not count as a measurement.
            eprintln!("kafka_load: the baseline failed (a hop panicked, above); nothing recorded");
            std::process::exit(1);
        }
        Some(r)
    } else {
        None
    };
    let eng = if args.only != Some(Side::Baseline) {
        let r = engine(&bootstrap, &ns, load, &args).await;
        r.print();
        Some(r)
    } else {
        None
    };
    let (main, ratio) = match (&eng, &base) {
        (Some(e), Some(b)) => (e, Some(e.rate() / b.rate().max(1e-9))),
        (Some(e), None) => (e, None),
        (None, Some(b)) => (b, None),
        (None, None) => return,
    };
    if let Some(r) = ratio {
        let b = base.as_ref().map_or(1.0, |b| ms(b.p(0.99)));
        println!(
            "engine / baseline: throughput {r:.2}, p99 {:.2}",
            ms(main.p(0.99)) / b.max(1e-9)
        );
    }
    println!(
        "RESULT mode={} side={} delivery={:?} instances={} partitions={} sagas={} done={} sagas_per_s={:.0} msgs_per_s={:.0} p50_ms={:.1} p95_ms={:.1} p99_ms={:.1} max_ms={:.1} cpu_us_per_saga={:.1} rss_mb={} baseline_sagas_per_s={} baseline_p99_ms={} baseline_ratio={} start_p50_ms={} start_p99_ms={} bytes_per_saga={:.0} broker_cpu_us_per_saga={} baseline_cpu_us_per_saga={} baseline_bytes_per_saga={} baseline_broker_cpu_us_per_saga={}",
        load.name(),
        if eng.is_some() { "engine" } else { "baseline" },
        args.delivery,
        args.instances,
        args.partitions,
        main.requested,
        main.done(),
        main.rate(),
        main.rate() * 6.0,
        ms(main.p(0.50)),
        ms(main.p(0.95)),
        ms(main.p(0.99)),
        ms(main.p(1.0)),
        main.cpu_us_per_saga(),
        main.rss >> 20,
        base.as_ref().map_or("-".into(), |b| format!("{:.0}", b.rate())),
        base.as_ref().map_or("-".into(), |b| format!("{:.1}", ms(b.p(0.99)))),
        ratio.map_or("-".into(), |r| format!("{r:.2}")),
        start_ms(&main.accepted, 0.50),
        start_ms(&main.accepted, 0.99),
        main.bytes_per_saga(),
        per_saga(main.broker_cpu_us_per_saga()),
        per_saga(base.as_ref().map(Report::cpu_us_per_saga)),
        base.as_ref()
            .map_or("-".into(), |b| format!("{:.0}", b.bytes_per_saga())),
        per_saga(base.as_ref().and_then(Report::broker_cpu_us_per_saga)),
    );
}

/// A per-saga figure for the RESULT line (`-` when not measured).
fn per_saga(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// A percentile of how long the engine's starts took to be accepted.
fn start_ms(accepted: &[Duration], p: f64) -> String {
    if accepted.is_empty() {
        "-".into()
    } else {
        format!("{:.1}", ms(percentile(accepted, p)))
    }
}
