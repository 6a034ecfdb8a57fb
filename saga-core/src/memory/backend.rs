//! What survives a "crash" of the in-memory runtime: partitioned logs,
//! consumer-group offsets and compacted tables, like a Kafka cluster.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::Notify;

use crate::driver::{partition_for, Incoming, Record, RecordKind, PARTICIPANT_STATE_KEY};
use crate::message::{DeadLetter, Envelope};

/// Default number of partitions per channel.
pub const DEFAULT_PARTITIONS: u32 = 3;

/// One record in a log.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    pub(crate) key: String,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) kind: Option<&'static str>,
}

impl Stored {
    pub(crate) fn incoming<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        offset: u64,
    ) -> Incoming<'a> {
        Incoming {
            topic,
            partition,
            offset,
            key: Some(self.key.as_bytes()),
            value: self.value.as_deref(),
            kind: self.kind.map(str::as_bytes),
            traceparent: None,
        }
    }
}

#[derive(Default)]
pub(crate) struct State {
    /// Message logs: topic → partition → records.
    logs: HashMap<String, Vec<Vec<Stored>>>,
    /// Next offset to read per (group, topic, partition).
    offsets: HashMap<(String, String, u32), u64>,
    /// Compacted topics (saga state, ledgers): the latest value per key.
    tables: HashMap<String, Vec<BTreeMap<String, Vec<u8>>>>,
    duplicating: HashSet<String>,
}

struct Shared {
    partitions: u32,
    state: Mutex<State>,
    notify: Notify,
}

/// What survives a crash of the in-memory runtime: the channels (each
/// split into partitions by key, like Kafka topics), consumer-group
/// offsets, and the compacted topics holding saga state and participant
/// ledgers. Cheap to clone (shared).
///
/// Drop an [`InMemoryRuntime`](crate::InMemoryRuntime) and build another
/// over the same backend to simulate a crash and a restart.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("partitions", &self.shared.partitions)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    fn log(&mut self, partitions: u32, topic: &str) -> &mut Vec<Vec<Stored>> {
        self.logs
            .entry(topic.to_owned())
            .or_insert_with(|| vec![Vec::new(); partitions as usize])
    }

    /// Writes one record: compacted kinds to their table, the rest appended
    /// to their log (twice while `duplicate_deliveries` is on for it).
    pub(crate) fn write(&mut self, partitions: u32, rec: Record) {
        let p = rec
            .partition
            .unwrap_or_else(|| partition_for(&rec.key, partitions))
            .min(partitions - 1) as usize;
        match rec.kind {
            RecordKind::SagaState | RecordKind::Ledger | RecordKind::ParticipantState => {
                let table = &mut self
                    .tables
                    .entry(rec.topic)
                    .or_insert_with(|| vec![BTreeMap::new(); partitions as usize])[p];
                match rec.value {
                    Some(v) => table.insert(rec.key, v),
                    None => table.remove(&rec.key),
                };
            }
            _ => {
                let times = if self.duplicating.contains(&rec.topic) {
                    2
                } else {
                    1
                };
                let stored = Stored {
                    key: rec.key,
                    value: rec.value,
                    kind: rec.kind.header(),
                };
                let log = &mut self.log(partitions, &rec.topic)[p];
                for _ in 1..times {
                    log.push(stored.clone());
                }
                log.push(stored);
            }
        }
    }

    /// The next unread record for `group` on any of `topics` at partition `p`.
    pub(crate) fn next(
        &self,
        group: &str,
        topics: &[String],
        p: u32,
    ) -> Option<(String, u64, Stored)> {
        topics.iter().find_map(|t| {
            let log = self.logs.get(t)?.get(p as usize)?;
            let off = self.offset(group, t, p);
            log.get(off as usize).map(|r| (t.clone(), off, r.clone()))
        })
    }

    fn offset(&self, group: &str, topic: &str, p: u32) -> u64 {
        self.offsets
            .get(&(group.to_owned(), topic.to_owned(), p))
            .copied()
            .unwrap_or(0)
    }

    /// Marks `offset` of `topic`/`p` consumed by `group`.
    pub(crate) fn commit(&mut self, group: &str, topic: &str, p: u32, offset: u64) {
        self.offsets
            .insert((group.to_owned(), topic.to_owned(), p), offset + 1);
    }

    pub(crate) fn table(&self, topic: &str, p: u32) -> Vec<(String, Vec<u8>)> {
        self.tables
            .get(topic)
            .and_then(|t| t.get(p as usize))
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    pub(crate) fn table_get(&self, topic: &str, key: &str) -> Option<Vec<u8>> {
        self.tables
            .get(topic)?
            .iter()
            .find_map(|t| t.get(key).cloned())
    }

    /// Every record of `topic`'s table.
    pub(crate) fn table_values(&self, topic: &str) -> Vec<(String, Vec<u8>)> {
        self.tables
            .get(topic)
            .map(|ps| {
                ps.iter()
                    .flat_map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first `n` records of `topic`'s table in key order whose keys
    /// come after `after` (from the first without): a copy of at most `n`
    /// records of each partition, not of the table.
    pub(crate) fn table_after(
        &self,
        topic: &str,
        after: Option<&str>,
        n: usize,
    ) -> Vec<(String, Vec<u8>)> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let Some(partitions) = self.tables.get(topic) else {
            return Vec::new();
        };
        let mut first: Vec<(&String, &Vec<u8>)> = partitions
            .iter()
            .flat_map(|t| t.range::<str, _>((from, Bound::Unbounded)).take(n))
            .collect();
        first.sort_unstable_by(|a, b| a.0.cmp(b.0));
        first
            .into_iter()
            .take(n)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl MemoryBackend {
    /// A backend with [`DEFAULT_PARTITIONS`] partitions per channel.
    pub fn new() -> Self {
        Self::with_partitions(DEFAULT_PARTITIONS)
    }

    /// A backend with `partitions` partitions per channel (at least 1).
    pub fn with_partitions(partitions: u32) -> Self {
        Self {
            shared: Arc::new(Shared {
                partitions: partitions.max(1),
                state: Mutex::new(State::default()),
                notify: Notify::new(),
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section writes at its end, so a lock poisoned by a
        // panic elsewhere still guards consistent data.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes everything waiting for new records or state.
    pub(crate) fn notify(&self) {
        self.shared.notify.notify_waiters();
    }

    /// A future that completes at the next [`MemoryBackend::notify`].
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.notify.notified()
    }

    /// What [`MemoryBackend::notify`] wakes.
    pub(crate) fn notifier(&self) -> &Notify {
        &self.shared.notify
    }

    /// Partitions per channel.
    pub fn partitions(&self) -> u32 {
        self.shared.partitions
    }

    /// The partition a key maps to (Kafka's murmur2 partitioner, as every
    /// runtime places a saga's records).
    pub fn partition_for(&self, key: &str) -> u32 {
        partition_for(key, self.shared.partitions)
    }

    /// Appends a message to its channel (partitioned by its key), as a
    /// producer outside the runtime would.
    pub fn publish(&self, env: Envelope) {
        self.publish_raw(&env.channel.clone(), env.key(), Some(env.to_bytes()), None);
    }

    /// Appends a raw record to `topic`, with `header` as its record-kind
    /// header: to test how the runtime treats records that are not what
    /// they should be.
    pub fn publish_raw(
        &self,
        topic: &str,
        key: &str,
        value: Option<Vec<u8>>,
        header: Option<&'static str>,
    ) {
        let n = self.partitions();
        let p = partition_for(key, n) as usize;
        {
            let mut st = self.lock();
            let stored = Stored {
                key: key.to_owned(),
                value,
                kind: header,
            };
            st.log(n, topic)[p].push(stored);
        }
        self.notify();
    }

    /// Every message ever written to `channel`, partition by partition, each
    /// in order (records that are not envelopes are left out).
    pub fn messages(&self, channel: &str) -> Vec<Envelope> {
        let st = self.lock();
        st.logs
            .get(channel)
            .map(|ps| {
                ps.iter()
                    .flatten()
                    .filter(|r| r.kind.is_none())
                    .filter_map(|r| Envelope::from_bytes(r.value.as_deref()?).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The dead letters on `channel`, oldest first.
    pub fn dead_letters(&self, channel: &str) -> Vec<DeadLetter> {
        let mut dead: Vec<DeadLetter> = self
            .messages(channel)
            .iter()
            .filter_map(|e| DeadLetter::from_envelope(e).ok())
            .collect();
        dead.sort_by_key(|d| d.failure_timestamp);
        dead
    }

    /// Records on `channel` not yet consumed by `group` (consumer lag).
    pub fn lag(&self, group: &str, channel: &str) -> u64 {
        let st = self.lock();
        let Some(ps) = st.logs.get(channel) else {
            return 0;
        };
        ps.iter()
            .enumerate()
            .map(|(p, log)| (log.len() as u64).saturating_sub(st.offset(group, channel, p as u32)))
            .sum()
    }

    /// The last persisted state snapshot of partition `partition` of
    /// participant `name`
    /// ([`Participant::snapshot`](crate::Participant::snapshot)).
    pub fn participant_state(&self, name: &str, partition: u32) -> Option<Value> {
        let st = self.lock();
        st.table(&crate::driver::ledger_topic(name), partition)
            .into_iter()
            .find(|(k, _)| k == PARTICIPANT_STATE_KEY)
            .and_then(|(_, v)| serde_json::from_slice(&v).ok())
    }

    /// Commands of participant `name` waiting for a local retry.
    pub fn pending_retries(&self, name: &str) -> usize {
        let st = self.lock();
        st.table_values(&crate::driver::ledger_topic(name))
            .iter()
            .filter(|(k, _)| k != PARTICIPANT_STATE_KEY)
            .filter_map(|(_, v)| serde_json::from_slice::<Value>(v).ok())
            .filter(|v| v["state"] == "retrying")
            .count()
    }

    /// Fault injection: while on, every message written to `channel` is
    /// delivered twice (as after a redelivery).
    pub fn duplicate_deliveries(&self, channel: &str, on: bool) {
        let mut st = self.lock();
        if on {
            st.duplicating.insert(channel.to_owned());
        } else {
            st.duplicating.remove(channel);
        }
    }

    /// Writes `records` and marks the input consumed, atomically: the
    /// in-memory equivalent of a committed transaction.
    pub(crate) fn commit(
        &self,
        st: &mut State,
        records: Vec<Record>,
        consumed: Option<(&str, &str, u32, u64)>,
    ) {
        let n = self.partitions();
        for r in records {
            st.write(n, r);
        }
        if let Some((group, topic, p, offset)) = consumed {
            st.commit(group, topic, p, offset);
        }
    }
}
