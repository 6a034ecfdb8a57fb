//! Reading topics back: compacted ones (saga state, participant ledgers)
//! record by record, or one key's latest value; whole topics (dead letters).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::aside::Aside;
use crate::config::KafkaConfig;
use crate::context::{denied, Quiet};
use crate::error::{Error, Result};

/// A consumer that reads a topic to its end; closed aside (it is in the
/// reader group).
type Reader = Aside<BaseConsumer<Quiet>>;

fn reader(cfg: &KafkaConfig, topic: &str) -> Result<Reader> {
    cfg.read_to_end_config()
        .create_with_context(Quiet)
        .map(Aside::new)
        .map_err(|e| Error::client(format!("creating a reader of `{topic}`"), e))
}

/// Reads `partitions` of `topic` from the beginning to their end (up to
/// the last stable offset), handing every record to `each` in order
/// (partition, key, value; `None` for a tombstone): nothing is collected.
pub(crate) fn read_stream(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: &[i32],
    limit: Duration,
    mut each: impl FnMut(i32, &str, Option<&[u8]>),
) -> Result<()> {
    let deadline = Instant::now() + limit;
    let consumer = reader(cfg, topic)?;
    // The topic's leaders known before the partitions are assigned: for a
    // partition whose leader it does not know yet, librdkafka looks up
    // the starting offset again only after 500 ms.
    all_partitions(&consumer, topic, deadline)?;
    read_to_end(cfg, &consumer, topic, partitions, deadline, |m| {
        let Some(key) = m.key() else { return };
        // The runtime writes UTF-8 keys (saga and message ids); another
        // key could collide with one once made readable: skipped.
        match std::str::from_utf8(key) {
            Ok(key) => each(m.partition(), key, m.payload()),
            Err(_) => {
                tracing::warn!(
                    topic,
                    partition = m.partition(),
                    offset = m.offset(),
                    "a record whose key is not UTF-8: skipped"
                )
            }
        }
    })
}

/// Every value of `topic` (all partitions; each partition's in offset
/// order), within `limit`.
pub(crate) fn read_all(cfg: &KafkaConfig, topic: &str, limit: Duration) -> Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + limit;
    let consumer = reader(cfg, topic)?;
    let parts = all_partitions(&consumer, topic, deadline)?;
    let mut out = Vec::new();
    read_to_end(cfg, &consumer, topic, &parts, deadline, |m| {
        if let Some(v) = m.payload() {
            out.push(v.to_vec());
        }
    })?;
    Ok(out)
}

/// The latest committed value of `key` in `topic`: reads only the
/// partition the key maps to (murmur2, as the producers partition),
/// within `limit`.
pub(crate) fn read_key(
    cfg: &KafkaConfig,
    topic: &str,
    key: &str,
    limit: Duration,
) -> Result<Option<(i32, Vec<u8>)>> {
    let deadline = Instant::now() + limit;
    let consumer = reader(cfg, topic)?;
    let n = all_partitions(&consumer, topic, deadline)?.len();
    if n == 0 {
        return Ok(None);
    }
    let p = saga_core::driver::partition_for(key, n as u32) as i32;
    // Only the key's latest record is kept while the partition is read.
    let mut found = None;
    read_to_end(cfg, &consumer, topic, &[p], deadline, |m| {
        if m.key() == Some(key.as_bytes()) {
            found = m.payload().map(<[u8]>::to_vec);
        }
    })?;
    Ok(found.map(|v| (p, v)))
}

fn all_partitions(consumer: &Reader, topic: &str, deadline: Instant) -> Result<Vec<i32>> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let md = consumer
        .fetch_metadata(Some(topic), left)
        .map_err(|e| Error::client(format!("reading metadata of `{topic}`"), e))?;
    Ok(md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

/// Reads `parts` of `topic` from the beginning up to their end (the last
/// stable offset when the read starts), handing each record to `each` in
/// offset order; fails if that takes past `deadline`.
fn read_to_end(
    cfg: &KafkaConfig,
    consumer: &Reader,
    topic: &str,
    parts: &[i32],
    deadline: Instant,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<()> {
    if parts.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| Error::client("building an assignment", e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| Error::client(format!("assigning `{topic}`"), e))?;
    let mut left: BTreeSet<i32> = parts.iter().copied().collect();
    while !left.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Topic {
                topic: topic.into(),
                reason: format!("could not read partitions {left:?} to their end in time"),
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(RdError::PartitionEOF(p))) => {
                left.remove(&p);
            }
            Some(Err(e)) => {
                if let Some(kind) = e.rdkafka_error_code().and_then(denied) {
                    let resource = match kind {
                        "group" => format!("group `{}`", cfg.reader_group()),
                        _ => format!("topic `{topic}`"),
                    };
                    return Err(Error::Authorization {
                        principal: cfg.principal(),
                        operation: "READ".into(),
                        resource,
                        reason: e.to_string(),
                    });
                }
                tracing::warn!(topic, error = %e, "error while reading")
            }
            Some(Ok(m)) => each(&m),
        }
    }
    Ok(())
}
