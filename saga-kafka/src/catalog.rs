//! A read-only view of every saga of one type, on every partition, for
//! queries ([`SagaHandle::list`](saga_core::SagaHandle::list)).
//!
//! A worker knows only the sagas of the partitions it owns. The catalog
//! follows the whole compacted state topic instead: one reader (no group
//! membership, nothing committed) assigned every partition, read from the
//! beginning once and then tailed, keeping the sagas not settled and the
//! most recently settled ones (as the worker's view does). It is started
//! by the first query of a handle and stops with the handle or with its
//! runtime, whichever goes first. Its freshness
//! is the last time every partition had been read to its end
//! ([`Page::as_of`](saga_core::Page::as_of)).
//!
//! The reader keeps each saga's latest record as its bytes: a saga's state
//! is written at each of its transitions, and most versions are replaced
//! before anyone asks. Of a record only whether it is settled is read (its
//! head, with [`final_at`]); a query decodes the records kept that are
//! not decoded yet, once each, most of them without holding the catalog's
//! lock (the reader goes on meanwhile) and the last few read meanwhile
//! under it. A record that does not read is then forgotten, with a
//! warning. A settled saga's record written with other spacing than this
//! crate writes is found settled only when a query decodes it, and joins
//! the settled ones then (not in the order read).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use saga_core::driver::{decode_state, final_at};
use saga_core::{Page, SagaData, SagaId, SagaInstance, SagaQuery, Timestamp};

use crate::config::KafkaConfig;
use crate::context::{denied, Quiet};
use crate::saga::SETTLED_IN_VIEW;

/// How often the catalog checks it is current.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// How many undecoded records a query decodes while holding the catalog's
/// lock (more are decoded without it first).
const UNDER_LOCK: usize = 256;

/// The catalog of one saga type.
pub(crate) struct Catalog<D> {
    state: Mutex<State<D>>,
    /// Held by the query decoding the records read since the last one.
    decoding: Mutex<()>,
    stop: Arc<AtomicBool>,
    started: AtomicBool,
    notify: tokio::sync::Notify,
}

struct State<D> {
    map: CatalogMap<D>,
    /// When every partition was last read to its end.
    as_of: Option<Timestamp>,
    /// Why the reader cannot follow the topic, if it cannot.
    error: Option<String>,
}

impl<D> Catalog<D> {
    /// Stops the reader (at its next poll).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// The flag that stops the reader, for the runtime to set when it
    /// shuts down.
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Whether the reader was stopped (no query is answered after that).
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

impl<D: SagaData> Catalog<D> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                map: CatalogMap::new(""),
                as_of: None,
                error: None,
            }),
            stop: Arc::new(AtomicBool::new(false)),
            decoding: Mutex::new(()),
            started: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<D>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts following `topic` unless already started.
    pub(crate) fn ensure_started(self: &Arc<Self>, cfg: &Arc<KafkaConfig>, topic: &str) {
        if self.stopped() || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let cfg = cfg.clone();
        let topic = topic.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("saga-kafka-catalog-{topic}"))
            .spawn(move || me.follow(&cfg, &topic));
        if let Err(e) = spawned {
            self.lock().error = Some(format!("cannot start the catalog's reader: {e}"));
            self.started.store(false, Ordering::Release);
        }
    }

    /// Waits (at most `limit`) until the catalog has read every partition
    /// to its end once.
    pub(crate) async fn caught_up(&self, limit: Duration) -> Result<(), String> {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                // Not waiting for the lock on an async thread: a query may
                // hold it while it builds a page; look again at the tick.
                {
                    let locked = match self.state.try_lock() {
                        Ok(s) => Some(s),
                        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                        Err(std::sync::TryLockError::WouldBlock) => None,
                    };
                    if let Some(s) = locked {
                        if s.as_of.is_some() {
                            return Ok(());
                        }
                        if let Some(e) = &s.error {
                            return Err(e.clone());
                        }
                    }
                }
                if self.stopped() {
                    return Err("the runtime shut down".to_owned());
                }
                // The stop flag is set without a wake-up: look again soon.
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
        };
        tokio::time::timeout(limit, wait).await.unwrap_or_else(|_| {
            Err(format!(
                "the state topic was not read to its end within {limit:?}"
            ))
        })
    }

    /// The page of `query`, the instances of `fresher` (the worker's own
    /// view, for the partitions it owns) taking precedence. Decodes the
    /// records read since the last query (blocking: call it off the async
    /// threads).
    pub(crate) fn page(
        &self,
        query: &SagaQuery,
        fresher: &[Arc<SagaInstance<D>>],
        now: Timestamp,
    ) -> Page<SagaInstance<D>> {
        // One query decodes at a time, with the state unlocked: the reader
        // goes on meanwhile, and a second query finds the work done.
        let one = self.decoding.lock().unwrap_or_else(|e| e.into_inner());
        // Rounds while the reader adds many records (a first read of a
        // busy topic); the last few are decoded under the lock.
        for _ in 0..3 {
            let todo = self.lock().map.undecoded();
            if todo.len() <= UNDER_LOCK {
                break;
            }
            let decoded = decode(todo);
            self.lock().map.install(decoded);
        }
        let mut s = self.lock();
        s.map.decode_all();
        drop(one);
        let own: HashSet<&SagaId> = fresher.iter().map(|i| &i.id).collect();
        let all = fresher
            .iter()
            .map(|i| &**i)
            .chain(s.map.decoded().filter(|i| !own.contains(&i.id)));
        query.page(all, now).with_as_of(s.as_of)
    }

    /// The reader's loop: (re)reads the topic and tails it until stopped.
    fn follow(&self, cfg: &KafkaConfig, topic: &str) {
        while !self.stop.load(Ordering::Acquire) {
            if let Err(e) = self.read(cfg, topic) {
                tracing::warn!(topic, error = %e, "the saga catalog cannot follow the state topic: trying again in 5 s");
                self.lock().error = Some(e);
                self.notify.notify_waiters();
                let again = Instant::now() + Duration::from_secs(5);
                while Instant::now() < again && !self.stopped() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn caught_up_now(&self) {
        let was_unknown = {
            let mut s = self.lock();
            let was = s.as_of.is_none();
            s.as_of = Some(Timestamp::now());
            s.error = None;
            was
        };
        if was_unknown {
            self.notify.notify_waiters();
        }
    }

    /// Whether every partition has been read up to its high watermark
    /// (`None`: the partition count changed, the topic must be read again).
    fn current(
        &self,
        consumer: &BaseConsumer<Quiet>,
        topic: &str,
        parts: &[i32],
    ) -> Result<Option<bool>, String> {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        let now_parts = md.topics().first().map_or(0, |t| t.partitions().len());
        if now_parts != parts.len() {
            return Ok(None);
        }
        let positions = consumer.position().map_err(|e| e.to_string())?;
        for p in parts {
            let (_, high) = consumer
                .fetch_watermarks(topic, *p, Duration::from_secs(2))
                .map_err(|e| e.to_string())?;
            let at = positions
                .find_partition(topic, *p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(0);
            // An invalid position (nothing read yet) is behind unless the
            // partition is empty.
            if at.max(0) < high {
                return Ok(Some(false));
            }
        }
        Ok(Some(true))
    }

    fn read(&self, cfg: &KafkaConfig, topic: &str) -> Result<(), String> {
        let consumer: BaseConsumer<Quiet> = cfg
            .reader_config()
            .create_with_context(Quiet)
            .map_err(|e| format!("creating the catalog's reader: {e}"))?;
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| format!("reading metadata of `{topic}`: {e}"))?;
        let parts: Vec<i32> = md
            .topics()
            .first()
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if parts.is_empty() {
            return Err(format!(
                "topic `{topic}` has no partitions (does it exist?)"
            ));
        }
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(|e| e.to_string())?;
        }
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        // Read from the beginning: what an earlier pass kept is replaced.
        {
            let mut s = self.lock();
            s.map = s.map.renewed(topic);
            s.as_of = None;
            s.error = None;
        }
        let mut at_end: BTreeSet<i32> = BTreeSet::new();
        let mut next_check = Instant::now() + CHECK_EVERY;
        while !self.stop.load(Ordering::Acquire) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    at_end.remove(&m.partition());
                    let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                        continue;
                    };
                    let id = SagaId::new(key);
                    let value = m.payload().filter(|v| !v.is_empty());
                    // Only the head: the rest is decoded by a query.
                    let settled = value.and_then(|v| final_at(key, v)).is_some();
                    let mut s = self.lock();
                    match value {
                        None => s.map.remove(&id),
                        Some(v) => s.map.put_raw(id, v, settled),
                    }
                }
                Some(Err(RdError::PartitionEOF(p))) => {
                    at_end.insert(p);
                    if at_end.len() == parts.len() {
                        self.caught_up_now();
                    }
                }
                Some(Err(e)) if e.rdkafka_error_code().and_then(denied).is_some() => {
                    return Err(format!(
                        "not authorized: {} may not READ `{topic}`: {e}",
                        cfg.principal()
                    ));
                }
                Some(Err(e)) => tracing::debug!(topic, error = %e, "catalog reader"),
                None => {}
            }
            // Freshness is claimed only on evidence: every few seconds the
            // positions are compared with the broker's high watermarks (a
            // broker out of reach leaves `as_of` where it was). A changed
            // partition count reads the topic again.
            if Instant::now() >= next_check {
                next_check = Instant::now() + CHECK_EVERY;
                match self.current(&consumer, topic, &parts) {
                    Ok(Some(true)) => self.caught_up_now(),
                    Ok(Some(false)) => {}
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        tracing::debug!(topic, error = %e, "the saga catalog cannot check its freshness")
                    }
                }
            }
        }
        Ok(())
    }
}

/// A saga's latest record, as the catalog keeps it.
enum Slot<D> {
    /// Not decoded yet (no query has read it), and the number of the put
    /// that wrote it (a decode outside the lock installs its result only
    /// if no later record replaced it meanwhile).
    Raw(Arc<[u8]>, u64),
    Read(Arc<SagaInstance<D>>),
}

/// Records taken out to decode: the saga, its put, its bytes.
type Undecoded = Vec<(SagaId, u64, Arc<[u8]>)>;

/// Decoded records: the saga, its put, and the instance or why it does
/// not read.
type Decoded<D> = Vec<(SagaId, u64, Result<Arc<SagaInstance<D>>, String>)>;

/// The sagas of the whole state topic: every saga not settled, and the
/// last [`SETTLED_IN_VIEW`] settled ones read.
struct CatalogMap<D> {
    /// The state topic (for the logs).
    topic: String,
    /// Each saga's latest record, and whether it is settled.
    sagas: HashMap<SagaId, (bool, Slot<D>), foldhash::fast::RandomState>,
    /// Settled sagas in `sagas` (flagged `true`), oldest first.
    settled: VecDeque<SagaId>,
    /// How many slots are [`Slot::Raw`].
    raw: usize,
    /// Records put so far.
    puts: u64,
}

impl<D: SagaData> CatalogMap<D> {
    fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            sagas: HashMap::default(),
            settled: VecDeque::new(),
            raw: 0,
            puts: 0,
        }
    }

    /// An empty map for a new read of `topic`, numbering its puts after
    /// this one's: a decode taken out of this map before the read began
    /// again must not match a record of the new one.
    fn renewed(&self, topic: &str) -> Self {
        Self {
            puts: self.puts,
            ..Self::new(topic)
        }
    }

    /// Keeps `bytes` as saga `id`'s latest record, `settled` if its head
    /// says so ([`final_at`]).
    fn put_raw(&mut self, id: SagaId, bytes: &[u8], settled: bool) {
        self.puts += 1;
        let slot = Slot::Raw(bytes.into(), self.puts);
        let was = self.sagas.insert(id.clone(), (settled, slot));
        if !matches!(was, Some((_, Slot::Raw(..)))) {
            self.raw += 1;
        }
        self.settled_changed(id, was.is_some_and(|(s, _)| s), settled);
    }

    /// Keeps the settled queue in step with saga `id`'s new status.
    fn settled_changed(&mut self, id: SagaId, was_settled: bool, settled: bool) {
        if !settled && was_settled {
            // Started again after its retention: it is live.
            self.settled.retain(|s| *s != id);
        }
        if settled && !was_settled {
            self.settled.push_back(id);
            while self.settled.len() > SETTLED_IN_VIEW {
                if let Some(old) = self.settled.pop_front() {
                    self.forget(&old);
                }
            }
        }
    }

    /// Drops `id`'s slot (not its place in the settled queue).
    fn forget(&mut self, id: &SagaId) -> Option<bool> {
        let (settled, slot) = self.sagas.remove(id)?;
        if matches!(slot, Slot::Raw(..)) {
            self.raw -= 1;
        }
        Some(settled)
    }

    /// Forgets `id` (its tombstone was read, or its record does not read).
    fn remove(&mut self, id: &SagaId) {
        if self.forget(id) == Some(true) {
            self.settled.retain(|s| s != id);
        }
    }

    /// The records not decoded yet (their bytes shared, not copied).
    fn undecoded(&self) -> Undecoded {
        if self.raw == 0 {
            return Vec::new();
        }
        self.sagas
            .iter()
            .filter_map(|(id, (_, slot))| match slot {
                Slot::Raw(bytes, put) => Some((id.clone(), *put, bytes.clone())),
                Slot::Read(_) => None,
            })
            .collect()
    }

    /// Installs what [`decode`] made of [`CatalogMap::undecoded`], where no
    /// later record replaced it. A record that does not read, or names
    /// another saga than its key, is forgotten (restores refuse it the same
    /// way).
    fn install(&mut self, decoded: Decoded<D>) {
        let mut unreadable = Vec::new();
        for (id, put, result) in decoded {
            let Some((settled, slot)) = self.sagas.get_mut(&id) else {
                continue;
            };
            if !matches!(slot, Slot::Raw(_, p) if *p == put) {
                continue;
            }
            match result {
                Ok(inst) => {
                    // A settled saga's record written with other spacing
                    // than this crate's is found settled only now.
                    let late = inst.status.is_final() && !*settled;
                    *settled |= late;
                    *slot = Slot::Read(inst);
                    self.raw -= 1;
                    if late {
                        self.settled_changed(id, false, true);
                    }
                }
                Err(why) => unreadable.push((id, why)),
            }
        }
        for (id, why) in unreadable {
            tracing::warn!(topic = %self.topic, key = %id, error = %why, "the saga catalog skips an unreadable state record");
            self.remove(&id);
        }
    }

    /// Decodes every record not decoded yet, in place.
    fn decode_all(&mut self) {
        let todo = self.undecoded();
        if !todo.is_empty() {
            self.install(decode(todo));
        }
    }

    /// The instances decoded (all of them after [`CatalogMap::decode_all`]).
    fn decoded(&self) -> impl Iterator<Item = &SagaInstance<D>> + '_ {
        self.sagas.values().filter_map(|(_, slot)| match slot {
            Slot::Read(inst) => Some(&**inst),
            Slot::Raw(..) => None,
        })
    }
}

/// Decodes records taken out of the map. A panic in the data type's
/// `Deserialize` makes its record unreadable, not the query fail.
fn decode<D: SagaData>(todo: Undecoded) -> Decoded<D> {
    todo.into_iter()
        .map(|(id, put, bytes)| {
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                decode_state::<D>(id.as_str(), &bytes)
            }));
            let result = match read {
                Ok(Ok(inst)) if inst.id == id => Ok(Arc::new(inst)),
                Ok(Ok(inst)) => Err(format!("the record is saga `{}`'s", inst.id)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("decoding it panicked".to_owned()),
            };
            (id, put, result)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use saga_core::driver::encode_state;
    use saga_core::{SagaDefinition, SagaStatus, Step};

    #[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Job {
        n: u64,
    }

    fn definition() -> SagaDefinition<Job> {
        SagaDefinition::<Job>::builder("job")
            .step(Step::remote("call", "svc").command(|_: &Job| "CALL"))
            .build()
            .unwrap()
    }

    fn catalog() -> CatalogMap<Job> {
        CatalogMap::new("job.state")
    }

    /// Saga `id`'s state record with `status` and `n` in its data.
    fn state(id: &str, status: SagaStatus, n: u64) -> Vec<u8> {
        let mut inst = definition()
            .start(SagaId::new(id), Job { n }, Timestamp::from_millis(1_000))
            .unwrap()
            .instance;
        if status.is_settled() {
            inst.timers.clear();
            inst.awaiting = None;
        }
        inst.status = status;
        encode_state(&inst).unwrap()
    }

    /// Puts a record as the reader does.
    fn put(map: &mut CatalogMap<Job>, id: &str, value: Option<&[u8]>) {
        let id = SagaId::new(id);
        match value {
            None => map.remove(&id),
            Some(v) => {
                let settled = final_at(id.as_str(), v).is_some();
                map.put_raw(id, v, settled);
            }
        }
    }

    /// The sagas listed, by id, with their status and data.
    fn listed(map: &mut CatalogMap<Job>) -> Vec<(String, SagaStatus, u64)> {
        map.decode_all();
        let mut all: Vec<_> = map
            .decoded()
            .map(|i| (i.id.to_string(), i.status.clone(), i.data.n))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn read(map: &CatalogMap<Job>, id: &str) -> Arc<SagaInstance<Job>> {
        match &map.sagas[&SagaId::new(id)].1 {
            Slot::Read(inst) => inst.clone(),
            Slot::Raw(..) => panic!("`{id}` not decoded"),
        }
    }

    #[test]
    fn a_query_lists_each_sagas_latest_record_and_forgets_unreadable_ones() {
        let (running, done) = (SagaStatus::Running, SagaStatus::Completed);
        let mut map = catalog();
        // a: three versions; b: unreadable, then readable; c: readable,
        // then unreadable; d: another saga's state under its key; e:
        // deleted before any query.
        put(&mut map, "a", Some(&state("a", running.clone(), 1)));
        put(&mut map, "a", Some(&state("a", running.clone(), 2)));
        put(&mut map, "b", Some(b"{"));
        put(&mut map, "a", Some(&state("a", done.clone(), 3)));
        put(&mut map, "b", Some(&state("b", running.clone(), 4)));
        put(&mut map, "c", Some(&state("c", running.clone(), 5)));
        put(&mut map, "c", Some(b"not json"));
        put(&mut map, "d", Some(&state("x", running.clone(), 6)));
        put(&mut map, "e", Some(&state("e", done.clone(), 7)));
        put(&mut map, "e", None);
        assert_eq!(map.raw, 4, "a, b, c and d wait for a query");
        assert_eq!(
            listed(&mut map),
            [
                ("a".to_owned(), done.clone(), 3),
                ("b".to_owned(), running.clone(), 4)
            ]
        );
        // Unreadable records leave the map (before a query they stayed).
        let mut kept: Vec<&str> = map.sagas.keys().map(SagaId::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["a", "b"]);
        assert_eq!(map.settled, [SagaId::new("a")]);
        assert_eq!(map.raw, 0);
        // Decoded once: a later query keeps the instance it decoded, and
        // decodes only what was read since.
        let a = read(&map, "a");
        put(&mut map, "b", Some(&state("b", done.clone(), 8)));
        assert_eq!(map.raw, 1);
        assert_eq!(listed(&mut map)[1], ("b".to_owned(), done, 8));
        assert!(Arc::ptr_eq(&a, &read(&map, "a")), "`a` decoded again");
    }

    #[test]
    fn a_decode_replaced_meanwhile_is_not_installed() {
        let mut map = catalog();
        put(&mut map, "a", Some(&state("a", SagaStatus::Running, 1)));
        // A query takes the record out, and a newer one is read while it
        // decodes.
        let decoded = decode::<Job>(map.undecoded());
        put(&mut map, "a", Some(&state("a", SagaStatus::Running, 2)));
        map.install(decoded);
        assert_eq!(map.raw, 1, "the newer record still waits");
        assert_eq!(listed(&mut map)[0].2, 2);
        // A record deleted while it decodes stays deleted.
        put(&mut map, "b", Some(&state("b", SagaStatus::Running, 3)));
        let decoded = decode::<Job>(map.undecoded());
        put(&mut map, "b", None);
        map.install(decoded);
        assert!(!map.sagas.contains_key(&SagaId::new("b")));
        assert_eq!(map.raw, 0);
    }

    #[test]
    fn a_decode_taken_before_the_topic_is_read_again_does_not_match_the_new_reads_records() {
        let mut map = catalog();
        put(&mut map, "x", Some(&state("x", SagaStatus::Running, 0)));
        put(&mut map, "a", Some(&state("a", SagaStatus::Running, 1)));
        let decoded = decode::<Job>(map.undecoded());
        // The reader starts over (a changed partition count, an error):
        // the same saga's newer record takes the same place in the order.
        let mut map = map.renewed("job.state");
        put(&mut map, "y", Some(&state("y", SagaStatus::Running, 0)));
        put(&mut map, "a", Some(&state("a", SagaStatus::Completed, 2)));
        map.install(decoded);
        assert_eq!(map.raw, 2, "nothing installed");
        let a = listed(&mut map)
            .into_iter()
            .find(|(id, ..)| id == "a")
            .unwrap();
        assert_eq!(a, ("a".to_owned(), SagaStatus::Completed, 2));
    }

    #[test]
    fn a_decode_replaced_by_an_unreadable_record_removes_only_that_record() {
        let mut map = catalog();
        put(&mut map, "a", Some(b"{"));
        let decoded = decode::<Job>(map.undecoded());
        put(&mut map, "a", Some(&state("a", SagaStatus::Running, 1)));
        map.install(decoded);
        assert_eq!(listed(&mut map), [("a".to_owned(), SagaStatus::Running, 1)]);
    }

    #[test]
    fn a_page_prefers_the_workers_own_view_and_lists_what_the_reader_kept() {
        let catalog = Catalog::<Job>::new();
        {
            let mut s = catalog.lock();
            s.map = s.map.renewed("job.state");
            for (id, n) in [("mine", 1), ("theirs", 2)] {
                put(&mut s.map, id, Some(&state(id, SagaStatus::Running, n)));
            }
            // More than a query decodes under the lock.
            for i in 0..UNDER_LOCK + 10 {
                let id = format!("t-{i:04}");
                put(&mut s.map, &id, Some(&state(&id, SagaStatus::Running, 0)));
            }
        }
        let own: Arc<SagaInstance<Job>> = Arc::new(
            definition()
                .start(
                    SagaId::new("mine"),
                    Job { n: 10 },
                    Timestamp::from_millis(2_000),
                )
                .unwrap()
                .instance,
        );
        let query = SagaQuery::all().limit(1_000);
        let page = catalog.page(&query, &[own], Timestamp::from_millis(3_000));
        let n = |id: &str| {
            page.items
                .iter()
                .find(|i| i.id.as_str() == id)
                .map(|i| i.data.n)
        };
        assert_eq!(page.items.len(), UNDER_LOCK + 12);
        assert_eq!(n("mine"), Some(10), "the worker's own, fresher version");
        assert_eq!(n("theirs"), Some(2));
        assert_eq!(catalog.lock().map.raw, 0);
    }

    #[test]
    fn only_the_last_settled_sagas_are_kept_and_sagas_in_progress_all_are() {
        let mut map = catalog();
        put(
            &mut map,
            "live",
            Some(&state("live", SagaStatus::Running, 0)),
        );
        // Settled, then started again after its retention: live.
        put(
            &mut map,
            "again",
            Some(&state("again", SagaStatus::Completed, 0)),
        );
        put(
            &mut map,
            "again",
            Some(&state("again", SagaStatus::Running, 1)),
        );
        let done = String::from_utf8(state("s", SagaStatus::Compensated, 0)).unwrap();
        for i in 0..SETTLED_IN_VIEW + 5 {
            // The same record with the saga's own id, under its key.
            let id = format!("s-{i:05}");
            let text = done.replacen(r#""id":"s""#, &format!(r#""id":"{id}""#), 1);
            put(&mut map, &id, Some(text.as_bytes()));
        }
        assert_eq!(map.settled.len(), SETTLED_IN_VIEW);
        assert_eq!(map.sagas.len(), SETTLED_IN_VIEW + 2);
        assert_eq!(map.raw, SETTLED_IN_VIEW + 2, "evicted before any query");
        let all = listed(&mut map);
        assert_eq!(all.len(), SETTLED_IN_VIEW + 2, "every record reads");
        let ids: HashSet<&str> = all.iter().map(|(id, ..)| id.as_str()).collect();
        assert!(ids.contains("live") && ids.contains("again"));
        assert!(!ids.contains("s-00004"), "among the oldest settled");
        let newest = format!("s-{:05}", SETTLED_IN_VIEW + 4);
        assert!(ids.contains("s-00005") && ids.contains(newest.as_str()));
        // A tombstone of a settled saga leaves room for one more.
        put(&mut map, "s-00005", None);
        assert_eq!(map.settled.len(), SETTLED_IN_VIEW - 1);
    }

    #[test]
    fn a_settled_record_that_does_not_read_gives_up_its_place_among_the_settled() {
        let mut map = catalog();
        // Its head reads (settled), its data does not.
        let mut bad: serde_json::Value =
            serde_json::from_slice(&state("bad", SagaStatus::Completed, 1)).unwrap();
        bad["data"] = serde_json::json!("not a job");
        put(&mut map, "bad", Some(&serde_json::to_vec(&bad).unwrap()));
        put(&mut map, "ok", Some(&state("ok", SagaStatus::Completed, 2)));
        assert_eq!(map.settled.len(), 2);
        assert_eq!(listed(&mut map).len(), 1);
        assert_eq!(map.settled, [SagaId::new("ok")]);
        assert!(!map.sagas.contains_key(&SagaId::new("bad")));
    }

    #[test]
    fn a_settled_record_written_with_other_spacing_counts_as_settled_once_decoded() {
        let mut map = catalog();
        let compact = state("p", SagaStatus::Completed, 1);
        let value: serde_json::Value = serde_json::from_slice(&compact).unwrap();
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        put(&mut map, "p", Some(&pretty));
        assert!(map.settled.is_empty(), "its head is not read as settled");
        assert_eq!(listed(&mut map).len(), 1);
        assert_eq!(map.settled, [SagaId::new("p")], "settled once decoded");
        assert!(matches!(
            map.sagas[&SagaId::new("p")],
            (true, Slot::Read(_))
        ));
        // Started again: it leaves the settled queue.
        put(&mut map, "p", Some(&state("p", SagaStatus::Running, 2)));
        assert!(map.settled.is_empty());
        assert_eq!(listed(&mut map)[0].1, SagaStatus::Running);
    }

    #[derive(Clone, Debug, serde::Serialize)]
    struct Touchy;

    impl<'de> serde::Deserialize<'de> for Touchy {
        fn deserialize<De: serde::Deserializer<'de>>(_: De) -> Result<Self, De::Error> {
            panic!("a data type whose Deserialize panics")
        }
    }

    #[test]
    fn a_record_whose_data_panics_as_it_decodes_is_forgotten_not_fatal() {
        let good = state("a", SagaStatus::Running, 1);
        let mut map = CatalogMap::<Touchy>::new("job.state");
        map.put_raw(SagaId::new("a"), &good, false);
        map.decode_all();
        assert!(map.sagas.is_empty());
        assert_eq!(map.raw, 0);
    }
}
