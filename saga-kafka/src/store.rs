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
        None => {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .map_err(|e| Error::client(format!("reading metadata of `{topic}`"), e))?;
            md.topics()
                .first()
                .map(|t| t.partitions().iter().map(|p| p.id()).collect())
                .unwrap_or_default()
        }
    };
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
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
