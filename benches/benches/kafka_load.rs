//! Load generator: the saga engine on Kafka against the bare minimum, a
//! hand-written rdkafka transactional consume→produce pipeline moving the
//! same messages through the same number of transactions, in the same run.
//!
//! ```sh
//! scripts/kafka/broker.sh start
//! export KAFKA_BOOTSTRAP_SERVERS=$(scripts/kafka/broker.sh address)
//! cargo bench -p saga-benches --bench kafka_load -- --sagas 2000 --concurrency 200
//! ```
//!
//! Per saga the engine makes three transactions (start: state + command;
//! participant: reply + ledger; orchestrator: state + event). The baseline
//! makes the same three hops with two records each and no saga logic. Both
//! use batches of 500 messages or 100 ms. It prints throughput (sagas/s and
//! messages/s), latency percentiles from acceptance to the final message
//! (p50/p99), and the ratio. Loopback only; bounded by `--sagas`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use saga_core::*;
use saga_kafka::{ensure_topics, KafkaConfig, KafkaRuntime, TopicSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Saga engine on Kafka vs a bare rdkafka transactional pipeline")]
struct Args {
    /// Sagas (and baseline messages) to move.
    #[arg(long, default_value_t = 2000)]
    sagas: usize,
    /// Sagas started at once (open starts).
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Partitions per topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Ignored (cargo bench passes it).
    #[arg(long)]
    bench: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Report {
    name: &'static str,
    items: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Report {
    fn rate(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64()
    }
    fn print(&mut self) {
        self.latencies.sort();
        println!(
            "{:<28} {:>6} in {:>7.2} s = {:>8.0}/s   p50 {:>6.0} ms   p99 {:>6.0} ms",
            self.name,
            self.items,
            self.elapsed.as_secs_f64(),
            self.rate(),
            percentile(&self.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&self.latencies, 0.99).as_secs_f64() * 1e3,
        );
    }
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

fn now_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

/// One transactional hop: read `from`, write two records per message (to
/// `to` and to a side "state" topic), commit offsets and output together.
fn hop(
    bootstrap: &str,
    ns: &str,
    from: &str,
    to: &str,
    n: usize,
) -> Result<(), rdkafka::error::KafkaError> {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", format!("{ns}-{from}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[from])?;
    let producer: BaseProducer = client(bootstrap)
        .set("transactional.id", format!("{ns}-{from}-tx"))
        .set("linger.ms", "5")
        .create()?;
    producer.init_transactions(Timeout::After(Duration::from_secs(30)))?;
    let state = format!("{ns}.state");
    let mut moved = 0;
    while moved < n {
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut batch = Vec::new();
        while batch.len() < 500 && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(10)) {
                Some(Ok(m)) => batch.push((
                    m.partition(),
                    m.offset(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                )),
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        if batch.is_empty() {
            continue;
        }
        producer.begin_transaction()?;
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        for (p, off, key, payload) in &batch {
            let key = key.clone().unwrap_or_default();
            let payload = payload.clone().unwrap_or_default();
            let _ = producer.send(BaseRecord::to(to).key(&key).payload(&payload));
            let _ = producer.send(BaseRecord::to(&state).key(&key).payload(&payload));
            let e = offsets.entry(*p).or_insert(*off);
            *e = (*e).max(*off);
            producer.poll(Duration::ZERO);
        }
        let mut tpl = TopicPartitionList::new();
        for (p, off) in offsets {
            tpl.add_partition_offset(from, p, Offset::Offset(off + 1))?;
        }
        let meta = consumer.group_metadata().expect("group metadata");
        producer.send_offsets_to_transaction(
            &tpl,
            &meta,
            Timeout::After(Duration::from_secs(30)),
        )?;
        producer.commit_transaction(Timeout::After(Duration::from_secs(60)))?;
        moved += batch.len();
    }
    Ok(())
}

fn baseline(bootstrap: &str, ns: &str, n: usize) -> Report {
    let (a, b, c) = (format!("{ns}.a"), format!("{ns}.b"), format!("{ns}.c"));
    let started = Instant::now();
    let hops: Vec<_> = [(a.clone(), b.clone()), (b.clone(), c.clone())]
        .into_iter()
        .map(|(from, to)| {
            let (bs, ns) = (bootstrap.to_owned(), ns.to_owned());
            std::thread::spawn(move || hop(&bs, &ns, &from, &to, n).expect("baseline hop"))
        })
        .collect();
    // The "start" transactions: 500 per transaction, two records each.
    let producer: BaseProducer = client(bootstrap)
        .set("transactional.id", format!("{ns}-start-tx"))
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    producer
        .init_transactions(Timeout::After(Duration::from_secs(30)))
        .expect("init");
    let state = format!("{ns}.state");
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        producer.begin_transaction().expect("begin");
        for i in chunk {
            let key = format!("m-{i}");
            let payload = now_micros().to_string();
            let _ = producer.send(BaseRecord::to(&a).key(&key).payload(&payload));
            let _ = producer.send(BaseRecord::to(&state).key(&key).payload(&payload));
            producer.poll(Duration::ZERO);
        }
        producer
            .commit_transaction(Timeout::After(Duration::from_secs(60)))
            .expect("commit");
    }
    // The final consumer measures latency from the embedded start time.
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", format!("{ns}-sink"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    consumer.subscribe(&[c.as_str()]).expect("subscribe");
    let mut latencies = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(600);
    while latencies.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            let sent: u128 = m
                .payload()
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            latencies.push(Duration::from_micros(
                (now_micros().saturating_sub(sent)) as u64,
            ));
        }
    }
    let elapsed = started.elapsed();
    for h in hops {
        let _ = h.join();
    }
    Report {
        name: "bare rdkafka pipeline",
        items: latencies.len(),
        elapsed,
        latencies,
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Job {
    n: usize,
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

async fn engine(
    bootstrap: &str,
    ns: &str,
    n: usize,
    concurrency: usize,
    partitions: i32,
) -> Report {
    let requests = format!("{ns}.work.requests");
    let events = format!("{ns}.events");
    let cfg = KafkaConfig::new(bootstrap).app(ns).partitions(partitions);
    ensure_topics(&cfg, &[TopicSpec::messages(&events)])
        .await
        .expect("topics");
    let saga = SagaDefinition::<Job>::builder(format!("{ns}-job"))
        .step(
            Step::remote("work", &requests)
                .command(|j: &Job| json!({ "n": j.n }))
                .pivot(),
        )
        .on_completed({
            let events = events.clone();
            move |ctx| ctx.emit(events.clone(), &json!({"type": "DONE"}))
        })
        .build()
        .expect("saga");
    let runtime = KafkaRuntime::new(cfg).expect("runtime");
    runtime
        .participant(
            &requests,
            ParticipantPolicy::new(format!("{ns}-worker")),
            Worker,
        )
        .await
        .expect("participant");
    let accepted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let done: Arc<Mutex<Vec<Duration>>> = Arc::default();
    {
        let (accepted, done) = (accepted.clone(), done.clone());
        runtime
            .projection(&format!("{ns}-sink"), &[events.as_str()], move |e| {
                if let Some(t) = accepted.lock().unwrap().get(e.saga_id.as_str()) {
                    done.lock().unwrap().push(t.elapsed());
                }
            })
            .await
            .expect("projection");
    }
    let jobs = runtime.saga(saga).await.expect("saga");
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (jobs, accepted) = (&jobs, accepted.clone());
            async move {
                let id = format!("job-{i}");
                let t = Instant::now();
                jobs.start(id.clone(), Job { n: i }).await.expect("start");
                // Latency counts from the moment the start was accepted.
                accepted.lock().unwrap().insert(id, t);
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    let deadline = Instant::now() + Duration::from_secs(600);
    while done.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    runtime.shutdown().await;
    let latencies = done.lock().unwrap().clone();
    Report {
        name: "saga engine (saga-kafka)",
        items: latencies.len(),
        elapsed,
        latencies,
    }
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
    let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") else {
        eprintln!("kafka_load: set KAFKA_BOOTSTRAP_SERVERS (e.g. `scripts/kafka/broker.sh start`); nothing measured");
        return;
    };
    let ns = format!("load-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let cfg = KafkaConfig::new(&bootstrap).partitions(args.partitions);
    let specs: Vec<TopicSpec> = ["a", "b", "c", "state"]
        .iter()
        .map(|t| TopicSpec::messages(format!("{ns}.{t}")))
        .collect();
    ensure_topics(&cfg, &specs).await.expect("baseline topics");
    println!(
        "moving {} sagas / messages over {} partitions at {bootstrap}",
        args.sagas, args.partitions
    );
    let (bs, ns2, n) = (bootstrap.clone(), ns.clone(), args.sagas);
    let mut base = tokio::task::spawn_blocking(move || baseline(&bs, &ns2, n))
        .await
        .expect("baseline");
    let mut eng = engine(
        &bootstrap,
        &ns,
        args.sagas,
        args.concurrency,
        args.partitions,
    )
    .await;
    base.print();
    eng.print();
    println!(
        "engine / baseline throughput: {:.2}   (p50 latency ratio {:.2})",
        eng.rate() / base.rate(),
        percentile(&eng.latencies, 0.5).as_secs_f64()
            / percentile(&base.latencies, 0.5).as_secs_f64().max(1e-9)
    );
}
