//! Reading topics back: compacted ones (saga state, participant ledgers)
//! as their latest value per key, and whole topics (dead letters).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::context::Quiet;
use crate::error::{Error, Result};

type Reader = BaseConsumer<Quiet>;

fn reader(cfg: &KafkaConfig, topic: &str) -> Result<Reader> {
    cfg.reader_config()
        .create_with_context(Quiet)
        .map_err(|e| Error::client(format!("creating a reader of `{topic}`"), e))
}

/// The latest committed value of every key of every partition in
/// `partitions` of `topic` (all partitions if `None`), with its partition,
/// in first-seen order; a key whose latest record is a tombstone is left
/// out. Fails if it takes longer than `limit`.
pub(crate) fn read_latest(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: Option<&[i32]>,
    limit: Duration,
) -> Result<Vec<(i32, String, Vec<u8>)>> {
    let deadline = Instant::now() + limit;
    let consumer = reader(cfg, topic)?;
    let parts: Vec<i32> = match partitions {
        Some(p) => p.to_vec(),
        None => all_partitions(&consumer, topic, deadline)?,
    };
    latest(&consumer, topic, &parts, deadline)
}

/// Every committed record value of every partition of `topic`, in offset
/// order per partition (tombstones left out), within `limit`.
pub(crate) fn read_all(cfg: &KafkaConfig, topic: &str, limit: Duration) -> Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + limit;
    let consumer = reader(cfg, topic)?;
    let parts = all_partitions(&consumer, topic, deadline)?;
    let mut out = Vec::new();
    read_to_end(&consumer, topic, &parts, deadline, |m| {
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
    Ok(latest(&consumer, topic, &[p], deadline)?
        .into_iter()
        .find(|(_, k, _)| k == key)
        .map(|(p, _, v)| (p, v)))
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

/// The latest value per (partition, key) of `parts`, in first-seen order.
fn latest(
    consumer: &Reader,
    topic: &str,
    parts: &[i32],
    deadline: Instant,
) -> Result<Vec<(i32, String, Vec<u8>)>> {
    let mut index: HashMap<(i32, String), usize> = HashMap::new();
    let mut out: Vec<Option<(i32, String, Vec<u8>)>> = Vec::new();
    read_to_end(consumer, topic, parts, deadline, |m| {
        let Some(key) = m.key() else { return };
        let key = String::from_utf8_lossy(key).into_owned();
        let value = m.payload().map(<[u8]>::to_vec);
        let slot = index
            .entry((m.partition(), key.clone()))
            .or_insert_with(|| {
                out.push(None);
                out.len() - 1
            });
        out[*slot] = value.map(|v| (m.partition(), key, v));
    })?;
    Ok(out.into_iter().flatten().collect())
}

/// Feeds every committed record of `parts` of `topic`, from the beginning
/// to the last stable offset, to `each` (the reader has
/// `enable.partition.eof`), until `deadline`.
fn read_to_end(
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
            Some(Err(e)) => tracing::warn!(topic, error = %e, "error while reading"),
            Some(Ok(m)) => each(&m),
        }
    }
    Ok(())
}
