//! The Kafka runtime: registers sagas, participants and projections and
//! runs each on its own worker thread.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};

use async_trait::async_trait;
use saga_core::driver::{ledger_topic, state_topic, ParticipantDriver, Record, Registry};
use saga_core::{
    DeadLetter, Envelope, Health, HealthBoard, Participant, ParticipantPolicy, Runtime, SagaData,
    SagaDefinition, SagaError, SagaHandle,
};

use crate::admin::{
    check_copartitioned, ensure_topics_blocking, partition_counts, preflight, verify_compacted,
    TopicSpec,
};
use crate::config::KafkaConfig;
use crate::error::{Error, Result};
use crate::participant::ParticipantProc;
use crate::saga::{unavailable, within, KafkaSagas, SagaProc, View};
use crate::worker::{self, Publisher, Stats, StatsInner, WorkerHandle, KILL, STOP};

/// Runs sagas, participants and projections on Kafka.
///
/// Each registered saga, participant and projection gets a worker thread
/// with its own consumer (and, for sagas and participants, its own
/// producer, transactional in exactly-once mode with the id
/// `<prefix>-<service>-<instance id>`). Must be created inside a tokio
/// runtime. [`Runtime::shutdown`] commits what is open and stops;
/// [`KafkaRuntime::kill`] stops at once like a crash.
pub struct KafkaRuntime {
    cfg: Arc<KafkaConfig>,
    stats: Arc<StatsInner>,
    workers: Mutex<Vec<WorkerHandle>>,
    /// The stop flags of the saga handles' catalogs: their readers stop
    /// with the runtime, whoever still holds a handle.
    catalogs: Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>,
    publisher: Arc<Publisher>,
    registry: Registry,
    health: HealthBoard,
    /// Whether the cluster took this runtime's credentials once.
    connected: Arc<std::sync::atomic::AtomicBool>,
}

/// The service name of [`Runtime::publish`]'s producer: its transactional
/// id is `<prefix>-saga-kafka.publish-<instance id>`.
pub(crate) const PUBLISH_SERVICE: &str = "saga-kafka.publish";

impl std::fmt::Debug for KafkaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaRuntime")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Checks the credentials once per runtime ([`preflight`]).
fn connect(cfg: &KafkaConfig, connected: &std::sync::atomic::AtomicBool) -> Result<()> {
    use std::sync::atomic::Ordering;
    if !connected.load(Ordering::Acquire) && preflight(cfg)? {
        connected.store(true, Ordering::Release);
    }
    Ok(())
}

/// Creates `specs` if the configuration says so, else checks that they
/// all exist; then checks that the compacted ones that were there already
/// are compacted (co-partitioning is checked next).
fn setup_topics(cfg: &KafkaConfig, specs: &[TopicSpec]) -> Result<()> {
    if cfg.create_topics {
        let existing = ensure_topics_blocking(cfg, specs)?;
        let existing: Vec<TopicSpec> = specs
            .iter()
            .filter(|s| existing.contains(&s.name))
            .cloned()
            .collect();
        verify_compacted(cfg, &existing)
    } else {
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        partition_counts(cfg, &names)?;
        verify_compacted(cfg, specs)
    }
}

fn refused(what: &str, e: Error) -> SagaError {
    match e {
        Error::Shutdown => SagaError::Shutdown,
        e @ (Error::Config { .. }
        | Error::Topic { .. }
        | Error::Authentication { .. }
        | Error::Authorization { .. }) => SagaError::Runtime {
            what: what.to_owned(),
            source: Box::new(e),
        },
        e => unavailable(what, e),
    }
}

impl KafkaRuntime {
    /// A runtime with `config`.
    ///
    /// # Errors
    /// [`Error::Config`] if the configuration is invalid (no bootstrap
    /// servers, a message timeout not below the transaction timeout).
    pub fn new(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let cfg = Arc::new(config);
        let stats = Arc::new(StatsInner::default());
        let health = HealthBoard::new();
        Ok(Self {
            publisher: Arc::new(Publisher::new(
                cfg.clone(),
                PUBLISH_SERVICE,
                stats.clone(),
                health.clone(),
            )),
            cfg,
            stats,
            workers: Mutex::new(Vec::new()),
            catalogs: Mutex::new(Vec::new()),
            registry: Registry::default(),
            health,
            connected: Arc::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.cfg
    }

    /// Transaction counters of this runtime's workers.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|_| Error::Shutdown)?
    }

    fn push(&self, w: WorkerHandle) {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
    }

    fn stop_catalogs(&self) {
        for stop in self
            .catalogs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            stop.store(true, Ordering::Release);
        }
    }

    async fn stop_all(&self, how: u8) {
        self.stop_catalogs();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in &workers {
            w.signal(how);
        }
        let _ = tokio::task::spawn_blocking(move || {
            for mut w in workers {
                if let Some(t) = w.thread.take() {
                    let _ = t.join();
                }
            }
        })
        .await;
    }

    /// Stops at once without committing, as a crash would: open
    /// transactions stay open on the broker until this instance restarts
    /// with the same instance id (which fences and aborts them) or the
    /// transaction timeout passes. For tests and fault drills.
    pub async fn kill(self) {
        self.stop_all(KILL).await;
    }
}

#[async_trait]
impl Runtime for KafkaRuntime {
    fn name(&self) -> &'static str {
        "kafka"
    }

    /// Runs saga type `def` as consumer group `saga.<name>`: consumes its
    /// reply topics, keeps its instances in the compacted topic
    /// `<name>.state`, fires their timers. Creates the topics first if the
    /// configuration says so, and checks that the reply and state topics
    /// are co-partitioned.
    async fn saga<D: SagaData>(&self, def: SagaDefinition<D>) -> Result<SagaHandle<D>, SagaError> {
        self.registry.add_saga(&def)?;
        let registered = def.name().to_owned();
        let cfg = self.cfg.clone();
        let connected = self.connected.clone();
        let stats = self.stats.clone();
        let health = self.health.clone();
        let view = Arc::new(View::new());
        let (tx, rx) = mpsc::channel();
        let wakeup = Arc::new(worker::Wakeup::default());
        let alarm = wakeup.clone();
        let name = def.name().to_owned();
        let mut copart = def.reply_channels();
        copart.push(state_topic(&name));
        let mut specs: Vec<TopicSpec> = copart[..copart.len() - 1]
            .iter()
            .chain(def.command_channels().iter())
            .map(TopicSpec::messages)
            .collect();
        specs.push(TopicSpec::compacted(state_topic(&name)));
        specs.push(TopicSpec::dead_letters(def.dead_letter_channel()));
        for step in def.steps() {
            if let Some(ch) = step.own_dead_letter_channel() {
                specs.push(TopicSpec::dead_letters(ch));
            }
        }
        let (def2, view2) = (def.clone(), view.clone());
        let w = self
            .blocking(move || {
                connect(&cfg, &connected)?;
                setup_topics(&cfg, &specs)?;
                let partitions = check_copartitioned(&cfg, &copart)?;
                let proc = SagaProc::new(def2, &cfg, partitions as u32, view2, rx);
                worker::spawn(
                    cfg,
                    &name,
                    &format!("saga.{name}"),
                    proc,
                    alarm,
                    stats,
                    health,
                )
            })
            .await
            .map_err(|e| refused("starting the saga's worker", e));
        let w = w.inspect_err(|_| self.registry.forget(&registered))?;
        self.push(w);
        let catalog = Arc::new(crate::catalog::Catalog::new());
        self.catalogs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(catalog.stop_flag());
        Ok(SagaHandle::new(KafkaSagas {
            def,
            cfg: self.cfg.clone(),
            view,
            requests: tx,
            wakeup,
            catalog,
        }))
    }

    /// Runs `participant` on command topic `channel` as consumer group
    /// `policy.name`; its ledger lives in the compacted topic
    /// `<name>.ledger`.
    async fn participant<P: Participant>(
        &self,
        channel: &str,
        policy: ParticipantPolicy,
        participant: P,
    ) -> Result<(), SagaError> {
        if let Some(t) = policy
            .timeout
            .filter(|t| *t >= self.cfg.transaction_timeout)
        {
            return Err(SagaError::Runtime {
                what: format!("registering participant `{}`", policy.name),
                source: Box::new(Error::Config {
                    key: "ParticipantPolicy::timeout".into(),
                    reason: format!(
                        "{t:?} is not below the transaction timeout ({:?}): a handler runs inside the open transaction",
                        self.cfg.transaction_timeout
                    ),
                }),
            });
        }
        // Without a timeout of its own, an attempt is cut off after half
        // the transaction's time: the handler runs while its batch is open.
        let limit = self.cfg.transaction_timeout / 2;
        if policy.timeout.is_none() {
            tracing::info!(participant = %policy.name, limit = ?limit, "no handler timeout: attempts are cut off after the runtime's limit");
        }
        self.registry.add_participant(channel, &policy)?;
        let registered = policy.name.clone();
        let cfg = self.cfg.clone();
        let connected = self.connected.clone();
        let stats = self.stats.clone();
        let health = self.health.clone();
        let rt = tokio::runtime::Handle::current();
        let name = policy.name.clone();
        let specs = vec![
            TopicSpec::messages(channel),
            TopicSpec::compacted(ledger_topic(&name)),
            TopicSpec::dead_letters(&policy.dead_letter_channel),
        ];
        let copart = vec![channel.to_owned(), ledger_topic(&name)];
        let driver = ParticipantDriver::new(channel, policy, Arc::new(participant))
            .with_max_record_bytes(self.cfg.max_record_bytes);
        let proc = ParticipantProc::new(driver, rt, limit);
        let w = self
            .blocking(move || {
                connect(&cfg, &connected)?;
                setup_topics(&cfg, &specs)?;
                check_copartitioned(&cfg, &copart)?;
                worker::spawn(cfg, &name, &name, proc, Arc::default(), stats, health)
            })
            .await
            .map_err(|e| refused("starting the participant's worker", e));
        let w = w.inspect_err(|_| self.registry.forget(&registered))?;
        self.push(w);
        Ok(())
    }

    /// Offsets are committed after the handler returns (at least once).
    async fn projection<F>(
        &self,
        group: &str,
        channels: &[&str],
        handler: F,
    ) -> Result<(), SagaError>
    where
        F: FnMut(&Envelope) + Send + 'static,
    {
        let cfg = self.cfg.clone();
        let connected = self.connected.clone();
        let (health, stats) = (self.health.clone(), self.stats.clone());
        let group = group.to_owned();
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        let w = self
            .blocking(move || {
                connect(&cfg, &connected)?;
                let specs: Vec<TopicSpec> = channels.iter().map(TopicSpec::messages).collect();
                setup_topics(&cfg, &specs)?;
                let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
                crate::projection::spawn(cfg.clone(), &group, &refs, handler, health, stats)
            })
            .await
            .map_err(|e| refused("starting the projection", e))?;
        self.push(w);
        Ok(())
    }

    /// In one transaction of this runtime's publisher in exactly-once mode
    /// (an idempotent, flushed write at least once): its transactional id
    /// is `<prefix>-saga-kafka.publish-<instance id>` (give the service
    /// Write on those topics and on that transactional id). Calls are
    /// serialized; the topics must exist. At least once, a failed call may
    /// have written some of the records.
    async fn publish(&self, envelopes: Vec<Envelope>) -> Result<(), SagaError> {
        if envelopes.is_empty() {
            return Ok(());
        }
        let out: Vec<Record> = envelopes.iter().map(Record::message).collect();
        let publisher = self.publisher.clone();
        let work = self.blocking(move || publisher.publish(out));
        within(self.cfg.request_timeout, "publishing", work)
            .await
            .map_err(|e| unavailable("publishing", e))
    }

    /// Reads the whole topic `channel` (up to its last stable offset).
    async fn dead_letters(&self, channel: &str) -> Result<Vec<DeadLetter>, SagaError> {
        let cfg = self.cfg.clone();
        let topic = channel.to_owned();
        let limit = cfg.request_timeout.max(std::time::Duration::from_secs(30));
        let records = self
            .blocking(move || crate::store::read_all(&cfg, &topic, limit))
            .await
            .map_err(|e| unavailable("reading the dead letters", e))?;
        let mut dead: Vec<DeadLetter> = records
            .iter()
            .filter_map(|v| Envelope::from_bytes(v).ok())
            .filter_map(|e| DeadLetter::from_envelope(&e).ok())
            .collect();
        dead.sort_by_key(|d| d.failure_timestamp);
        Ok(dead)
    }

    /// Partitions that cannot be restored or whose state cannot be
    /// written (paused), and workers whose batches keep failing (the
    /// broker out of reach).
    fn health(&self) -> Health {
        self.health.health()
    }

    /// Commits every open batch and stops. Without static membership the
    /// consumers leave their groups (their partitions move to other
    /// instances at once); with it (the default) they move after the
    /// session timeout, unless this instance comes back before.
    async fn shutdown(&self) {
        self.stop_all(STOP).await;
        // Short-lived clients still closing finish before the process
        // may exit.
        crate::aside::closed(std::time::Duration::from_secs(2)).await;
    }
}

impl Drop for KafkaRuntime {
    fn drop(&mut self) {
        self.stop_catalogs();
        for w in self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            w.signal(STOP);
        }
    }
}
