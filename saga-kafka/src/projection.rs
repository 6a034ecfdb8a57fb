//! Projections: plain event consumers (analytics, read models).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use saga_core::{Envelope, HealthBoard, Timestamp};

use crate::config::KafkaConfig;
use crate::context::{denied, Lagging};
use crate::error::{Error, Result};
use crate::worker::{StatsInner, WorkerHandle, RUN, UNAUTHORIZED_PAUSE};

pub(crate) fn spawn<F>(
    cfg: Arc<KafkaConfig>,
    group: &str,
    channels: &[&str],
    mut handler: F,
    health: HealthBoard,
    stats: Arc<StatsInner>,
) -> Result<WorkerHandle>
where
    F: FnMut(&Envelope) + Send + 'static,
{
    let channels_owned: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
    let subscribe = {
        let (cfg, group) = (cfg.clone(), group.to_owned());
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        move || -> Result<BaseConsumer<Lagging>> {
            let consumer: BaseConsumer<Lagging> = cfg
                .consumer_config(&group)
                .create_with_context(Lagging::new(&group, &channels))
                .map_err(|e| {
                    Error::client(format!("creating the consumer of group `{group}`"), e)
                })?;
            let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
            consumer
                .subscribe(&refs)
                .map_err(|e| Error::client(format!("subscribing to {channels:?}"), e))?;
            Ok(consumer)
        }
    };
    let mut consumer = subscribe()?;
    let stop = Arc::new(AtomicU8::new(RUN));
    let flag = stop.clone();
    let group = group.to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("saga-kafka-projection-{group}"))
        .spawn(move || {
            // The next offset per (topic, partition), committed now and
            // then (a map: the client's list finds entries by scanning).
            let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
            let commit = |consumer: &BaseConsumer<Lagging>, next: &mut BTreeMap<(String, i32), i64>| {
                let mut tpl = TopicPartitionList::new();
                for ((topic, partition), offset) in std::mem::take(next) {
                    let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset));
                }
                if tpl.count() > 0 {
                    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                        tracing::warn!(group = %group, error = %e, "offset commit failed");
                    }
                }
            };
            let mut last = Instant::now();
            let mut refused = false;
            let mut refused_checked = Instant::now();
            let mut refused_topic = false;
            let topics: Vec<String> = channels_owned.clone();
            while flag.load(Ordering::SeqCst) == RUN {
                match consumer.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        if std::mem::take(&mut refused) {
                            health.clear(&group, None);
                        }
                        // The runtime's own records on a saga's reply
                        // topics (start and operator requests) are not
                        // messages.
                        let runtime_record = m.headers().is_some_and(|h| {
                            h.iter().any(|h| h.key == saga_core::driver::RECORD_KIND_HEADER)
                        });
                        if !runtime_record {
                            match Envelope::from_bytes(m.payload().unwrap_or(&[])) {
                                Ok(env) => handler(&env),
                                Err(e) => tracing::warn!(group = %group, topic = m.topic(), offset = m.offset(), error = %e, "not an envelope: skipped"),
                            }
                        }
                        match next.get_mut(&(m.topic().to_owned(), m.partition())) {
                            Some(o) => *o = m.offset() + 1,
                            None => {
                                next.insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
                            }
                        }
                    }
                    Some(Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_))) => {
                        // Unusable (a static member fenced): join again with
                        // a new consumer; what was not committed is read again.
                        tracing::error!(group = %group, error = %e, "fatal consumer error: joining the group again");
                        next.clear();
                        loop {
                            std::thread::sleep(Duration::from_secs(1));
                            if flag.load(Ordering::SeqCst) != RUN {
                                return;
                            }
                            match subscribe() {
                                Ok(c) => {
                                    consumer = c;
                                    break;
                                }
                                Err(e) => tracing::warn!(group = %group, error = %e, "cannot create the consumer again: retrying"),
                            }
                        }
                    }
                    Some(Err(e)) => match e.rdkafka_error_code().and_then(denied) {
                        // Reported and counted like a worker's refusal; the
                        // client tries again by itself.
                        Some(kind) => {
                            refused = true;
                            refused_topic = kind == "topic";
                            refused_checked = Instant::now();
                            let resource = match kind {
                                "group" => format!("group `{group}`"),
                                _ => "one of its topics".to_owned(),
                            };
                            let why = format!(
                                "not authorized: {} may not READ {resource} ({e})",
                                cfg.principal()
                            );
                            stats.authorization_failures.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("saga_kafka_authorization_failures_total", "component" => group.clone())
                                .increment(1);
                            health.report(&group, None, why, Timestamp::now());
                            std::thread::sleep(UNAUTHORIZED_PAUSE);
                        }
                        None => tracing::warn!(group = %group, error = %e, "consumer error"),
                    },
                    None => {}
                }
                // On a quiet topic no message says a refusal is over: its
                // metadata does.
                if refused && refused_topic && refused_checked.elapsed() >= UNAUTHORIZED_PAUSE {
                    refused_checked = Instant::now();
                    if crate::worker::topics_readable(&consumer, &topics) {
                        refused = false;
                        health.clear(&group, None);
                    }
                }
                if !next.is_empty() && last.elapsed() >= cfg.batch_timeout {
                    commit(&consumer, &mut next);
                    last = Instant::now();
                }
            }
            commit(&consumer, &mut next);
        })
        .map_err(|e| Error::Config {
            key: "thread".into(),
            reason: format!("cannot spawn a projection thread: {e}"),
        })?;
    // It polls with a short timeout and needs no wakeup.
    Ok(WorkerHandle::new(stop, Arc::default(), thread))
}
