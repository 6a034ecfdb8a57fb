//! The Kafka runtime: registers sagas, participants and projections and
//! runs each on its own worker thread.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};

use saga_core::{Envelope, Participant, ParticipantPolicy, SagaData, SagaDefinition};
use tokio::sync::Notify;

use crate::admin::{check_copartitioned, ensure_topics_blocking, TopicSpec};
use crate::config::KafkaConfig;
use crate::error::{Error, Result};
use crate::participant::{ledger_topic, ParticipantProc};
use crate::saga::{state_topic, KafkaSagaHandle, SagaProc, View};
use crate::worker::{self, Out, Publisher, Stats, StatsInner, WorkerHandle, KILL, STOP};

/// Runs sagas, participants and projections on Kafka.
///
/// Each registered saga, participant and projection gets a worker thread
/// with its own consumer (and, for sagas and participants, its own
/// producer, transactional in exactly-once mode with the id
/// `<prefix>-<service>-<instance id>`). Must be created inside a tokio
/// runtime. [`KafkaRuntime::shutdown`] commits what is open and stops;
/// [`KafkaRuntime::kill`] stops at once like a crash.
pub struct KafkaRuntime {
    cfg: Arc<KafkaConfig>,
    stats: Arc<StatsInner>,
    workers: Mutex<Vec<WorkerHandle>>,
    publisher: Arc<Publisher>,
}

/// The service name of [`KafkaRuntime::publish`]'s producer: its
/// transactional id is `<prefix>-saga-kafka.publish-<instance id>`.
pub const PUBLISH_SERVICE: &str = "saga-kafka.publish";

impl std::fmt::Debug for KafkaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaRuntime")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl KafkaRuntime {
    /// A runtime with `config` (validated here).
    pub fn new(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let cfg = Arc::new(config);
        let stats = Arc::new(StatsInner::default());
        Ok(Self {
            publisher: Arc::new(Publisher::new(cfg.clone(), PUBLISH_SERVICE, stats.clone())),
            cfg,
            stats,
            workers: Mutex::new(Vec::new()),
        })
    }

    /// Produces `envelopes` as they are (each to its `channel`, keyed by
    /// its saga id, as [`Envelope::to_bytes`]), all or nothing: in one
    /// transaction of this runtime's publisher in exactly-once mode (an
    /// idempotent, flushed write at least once). For operators and tools:
    /// a dead-letter processor re-sending a corrected command, a fallback
    /// event (e.g. an SMS notification), a hand-made reply.
    ///
    /// The publisher's transactional id is
    /// `<prefix>-saga-kafka.publish-<instance id>` (give the service Write
    /// on those topics and on that transactional id); its producer is
    /// created on first use. Calls are serialized. Retriable errors are
    /// retried up to the configured bounds; if the broker still cannot take
    /// the records the transaction is aborted and this returns
    /// [`Error::Transaction`] (exactly once: nothing is visible; at least
    /// once: some records may have been written). The topics must exist.
    /// An empty list writes nothing.
    ///
    /// ```no_run
    /// # async fn demo(runtime: &saga_kafka::KafkaRuntime, dead_letter: saga_core::DeadLetter) -> saga_kafka::Result<()> {
    /// let fixed = dead_letter.original.clone(); // correct the command first
    /// runtime.publish(vec![fixed]).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish(&self, envelopes: Vec<Envelope>) -> Result<()> {
        if envelopes.is_empty() {
            return Ok(());
        }
        let out: Vec<Out> = envelopes
            .iter()
            .map(|e| Out::keyed(e.channel.clone(), e.key(), e.to_bytes()))
            .collect();
        let publisher = self.publisher.clone();
        self.blocking(move || publisher.publish(out)).await
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

    /// Runs saga type `def` as consumer group `saga.<name>`: consumes its
    /// reply topics, keeps its instances in the compacted topic
    /// `<name>.state`, fires their timers. Creates the topics first if the
    /// configuration says so, and checks that the reply and state topics
    /// are co-partitioned.
    pub async fn saga<D: SagaData>(&self, def: SagaDefinition<D>) -> Result<KafkaSagaHandle<D>> {
        let cfg = self.cfg.clone();
        let stats = self.stats.clone();
        let view = Arc::new(View {
            map: Mutex::new(HashMap::new()),
            notify: Notify::new(),
        });
        let (tx, rx) = mpsc::channel();
        let proc = SagaProc::new(def.clone(), cfg.clone(), view.clone(), rx);
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
        let w = self
            .blocking(move || {
                if cfg.create_topics {
                    ensure_topics_blocking(&cfg, &specs)?;
                }
                check_copartitioned(&cfg, &copart)?;
                worker::spawn(cfg, &name, &format!("saga.{name}"), proc, stats)
            })
            .await?;
        self.push(w);
        Ok(KafkaSagaHandle {
            def,
            cfg: self.cfg.clone(),
            view,
            requests: tx,
        })
    }

    /// Runs `participant` on command topic `channel` as consumer group
    /// `policy.name`, with deduplication, retries, timeouts and dead letters
    /// per `policy`; its ledgers live in the compacted topic `<name>.ledger`.
    pub async fn participant<P: Participant>(
        &self,
        channel: &str,
        policy: ParticipantPolicy,
        participant: P,
    ) -> Result<()> {
        let cfg = self.cfg.clone();
        let stats = self.stats.clone();
        let rt = tokio::runtime::Handle::current();
        let name = policy.name.clone();
        let specs = vec![
            TopicSpec::messages(channel),
            TopicSpec::compacted(ledger_topic(&name)),
            TopicSpec::dead_letters(&policy.dead_letter_channel),
        ];
        let copart = vec![channel.to_owned(), ledger_topic(&name)];
        let proc = ParticipantProc::new(
            Arc::new(participant),
            policy,
            channel.to_owned(),
            cfg.clone(),
            rt,
        );
        let w = self
            .blocking(move || {
                if cfg.create_topics {
                    ensure_topics_blocking(&cfg, &specs)?;
                }
                check_copartitioned(&cfg, &copart)?;
                worker::spawn(cfg, &name, &name, proc, stats)
            })
            .await?;
        self.push(w);
        Ok(())
    }

    /// Runs a projection: `handler` sees every committed message on
    /// `channels`, in order per partition, as consumer group `group`.
    /// Offsets are committed after the handler returns (at least once):
    /// deduplicate by [`Envelope::id`](saga_core::Envelope) if that matters.
    pub async fn projection<F>(&self, group: &str, channels: &[&str], handler: F) -> Result<()>
    where
        F: FnMut(&saga_core::Envelope) + Send + 'static,
    {
        let cfg = self.cfg.clone();
        let group = group.to_owned();
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        let w = self
            .blocking(move || {
                if cfg.create_topics {
                    let specs: Vec<TopicSpec> = channels.iter().map(TopicSpec::messages).collect();
                    ensure_topics_blocking(&cfg, &specs)?;
                }
                let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
                crate::projection::spawn(cfg.clone(), &group, &refs, handler)
            })
            .await?;
        self.push(w);
        Ok(())
    }

    async fn stop_all(self, how: u8) {
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in &workers {
            w.stop.store(how, Ordering::SeqCst);
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

    /// Commits every open batch, leaves the consumer groups (their
    /// partitions move to other instances) and stops.
    pub async fn shutdown(self) {
        self.stop_all(STOP).await;
    }

    /// Stops at once without committing, as a crash would: open
    /// transactions stay open on the broker until this instance restarts
    /// with the same instance id (which fences and aborts them) or the
    /// transaction timeout passes. For tests and fault drills.
    pub async fn kill(self) {
        self.stop_all(KILL).await;
    }
}

impl Drop for KafkaRuntime {
    fn drop(&mut self) {
        for w in self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            w.stop.store(STOP, Ordering::SeqCst);
        }
    }
}
