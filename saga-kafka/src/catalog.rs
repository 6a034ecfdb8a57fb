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

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use saga_core::driver::decode_state;
use saga_core::{Page, SagaData, SagaId, SagaInstance, SagaQuery, Timestamp};

use crate::config::KafkaConfig;
use crate::context::{denied, Quiet};
use crate::saga::ViewMap;

/// How often the catalog checks it is current.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The catalog of one saga type.
pub(crate) struct Catalog<D> {
    state: Mutex<State<D>>,
    stop: Arc<AtomicBool>,
    started: AtomicBool,
    notify: tokio::sync::Notify,
}

struct State<D> {
    map: ViewMap<D>,
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
                map: ViewMap::new(),
                as_of: None,
                error: None,
            }),
            stop: Arc::new(AtomicBool::new(false)),
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
                {
                    let s = self.lock();
                    if s.as_of.is_some() {
                        return Ok(());
                    }
                    if let Some(e) = &s.error {
                        return Err(e.clone());
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
    /// view, for the partitions it owns) taking precedence.
    pub(crate) fn page(
        &self,
        query: &SagaQuery,
        fresher: &[Arc<SagaInstance<D>>],
        now: Timestamp,
    ) -> Page<SagaInstance<D>> {
        let s = self.lock();
        let own: std::collections::HashSet<&SagaId> = fresher.iter().map(|i| &i.id).collect();
        let all = fresher.iter().map(|i| &**i).chain(
            s.map
                .sagas
                .values()
                .filter(|i| !own.contains(&i.id))
                .map(|i| &**i),
        );
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
            s.map = ViewMap::new();
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
                    let mut s = self.lock();
                    match m.payload().filter(|v| !v.is_empty()) {
                        None => s.map.remove(&id),
                        // A record that does not decode, or names another
                        // saga than its key, is not listed (restores refuse
                        // it the same way).
                        Some(v) => match decode_state::<D>(key, v) {
                            Ok(inst) if inst.id == id => s.map.put(&Arc::new(inst)),
                            Ok(_) | Err(_) => {
                                s.map.remove(&id);
                                tracing::warn!(
                                    topic,
                                    key,
                                    "the saga catalog skips an unreadable state record"
                                );
                            }
                        },
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
