//! Reading compacted topics (saga state, participant ledgers) back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::error::{Error, Result};

/// The latest committed value of every key of every partition in `partitions` of `topic`
/// (all partitions if `None`), with its partition, in first-seen order.
pub(crate) fn read_latest(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: Option<&[i32]>,
) -> Result<Vec<(i32, String, Vec<u8>)>> {
    let consumer: BaseConsumer = cfg
        .reader_config()
        .create()
        .map_err(|e| Error::client(format!("creating a reader of `{topic}`"), e))?;
    let parts: Vec<i32> = match partitions {
        Some(p) => p.to_vec(),
        None => all_partitions(&consumer, topic)?,
    };
    read_partitions(&consumer, topic, &parts)
}

/// The latest committed value of `key` in `topic`: reads only the
/// partition the key hashes to (murmur2, as the producers partition).
pub(crate) fn read_key(
    cfg: &KafkaConfig,
    topic: &str,
    key: &str,
) -> Result<Option<(i32, Vec<u8>)>> {
    let consumer: BaseConsumer = cfg
        .reader_config()
        .create()
        .map_err(|e| Error::client(format!("creating a reader of `{topic}`"), e))?;
    let n = all_partitions(&consumer, topic)?.len();
    if n == 0 {
        return Ok(None);
    }
    let p = partition_of(key.as_bytes(), n);
    Ok(read_partitions(&consumer, topic, &[p])?
        .into_iter()
        .find(|(_, k, _)| k == key)
        .map(|(p, _, v)| (p, v)))
}

fn all_partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| Error::client(format!("reading metadata of `{topic}`"), e))?;
    Ok(md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), which
/// the producers' `murmur2_random` partitioner uses for keyed records.
pub(crate) fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of `key` among `n`, as the Java client and librdkafka's
/// `murmur2_random` partitioner compute it.
pub(crate) fn partition_of(key: &[u8], n: usize) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) as usize % n) as i32
}

fn read_partitions(
    consumer: &BaseConsumer,
    topic: &str,
    parts: &[i32],
) -> Result<Vec<(i32, String, Vec<u8>)>> {
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| Error::client("building an assignment", e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| Error::client(format!("assigning `{topic}`"), e))?;
    let mut left: std::collections::BTreeSet<i32> = parts.iter().copied().collect();
    let mut index: HashMap<(i32, String), usize> = HashMap::new();
    let mut out: Vec<(i32, String, Vec<u8>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !left.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Topic {
                topic: topic.into(),
                reason: format!("could not read partitions {left:?} to their end within 60 s"),
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(RdError::PartitionEOF(p))) => {
                left.remove(&p);
            }
            Some(Err(e)) => tracing::warn!(topic, error = %e, "error while reading"),
            Some(Ok(m)) => {
                let Some(key) = m.key() else { continue };
                let key = String::from_utf8_lossy(key).into_owned();
                let value = m.payload().unwrap_or(&[]).to_vec();
                // Per partition: a key hashes to one partition, but reserved
                // keys (a participant's shard snapshot) exist in each.
                match index.get(&(m.partition(), key.clone())) {
                    Some(&i) => out[i] = (m.partition(), key, value),
                    None => {
                        index.insert((m.partition(), key.clone()), out.len());
                        out.push((m.partition(), key, value));
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::murmur2;

    #[test]
    fn murmur2_matches_kafka() {
        // Kafka's UtilsTest vectors (as signed Java ints).
        for (key, want) in [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, want, "{key}");
        }
    }
}
