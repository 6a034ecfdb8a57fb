//! Wires the services on a runtime.
//!
//! [`Platform`] is the seam between the services and the runtime: what the
//! HTTP API, the demo and the DLQ processor need from it (start an order
//! saga, read orders, publish and read channels, lag). [`MemoryPlatform`]
//! implements it on saga-core's `InMemoryRuntime` (every service in this
//! process); [`KafkaPlatform`] on saga-kafka's `KafkaRuntime`, where a
//! process runs any subset of the services ([`Services`]): all of them
//! (`serve --kafka`), or one each (`order`, `inventory`, `notification`,
//! `analytics`, `dlq`), several instances of one sharing the work through
//! its consumer group.
//!
//! On Kafka, reads that span services come from the log: `GET
//! /orders/{id}` reads the saga's state topic through the handle, the
//! timelines come from a projection over every topic kept by the order
//! process, analytics and the DLQ view are projections that re-read their
//! topics from the beginning on every start (a fresh consumer group each
//! time: their state lives in memory and is rebuilt from the events).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use saga::kafka::{KafkaConfig, KafkaRuntime, KafkaSagaHandle, TopicSpec};
use saga::{
    Clock, Envelope, InMemoryRuntime, MemoryBackend, ParticipantPolicy, SagaError, SagaHandle,
    SagaId, SagaInstance,
};

use crate::analytics::Analytics;
use crate::dlq::{DlqProcessor, FakeSms, Publish};
use crate::inventory::{Inventory, CATALOGUE};
use crate::messages::*;
use crate::notification::{self, FakeEmailProvider, NotificationPolicy, NotificationService};
use crate::order::{self, Invalid, Order, OrderPolicy, OrderRequest};

/// Which runtime the system runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Everything in this process, on saga-core's in-memory runtime.
    Memory,
    /// Apache Kafka at this bootstrap address (`host:port,...`); the rest of
    /// the Kafka settings come from the environment (`KafkaConfig::from_env`)
    /// and [`Config`].
    Kafka(String),
}

/// Which services a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Services {
    /// The order saga (orchestrator) and the orders API.
    pub order: bool,
    /// The inventory participant.
    pub inventory: bool,
    /// The notification participant.
    pub notification: bool,
    /// The analytics projection.
    pub analytics: bool,
    /// The DLQ processor.
    pub dlq: bool,
}

impl Services {
    /// Every service (the in-memory system, `serve`).
    pub const ALL: Services = Services {
        order: true,
        inventory: true,
        notification: true,
        analytics: true,
        dlq: true,
    };

    /// One service by name: `order`, `inventory`, `notification`,
    /// `analytics` or `dlq`.
    pub fn only(name: &str) -> Option<Services> {
        let mut s = Services {
            order: false,
            inventory: false,
            notification: false,
            analytics: false,
            dlq: false,
        };
        match name {
            "order" => s.order = true,
            "inventory" => s.inventory = true,
            "notification" => s.notification = true,
            "analytics" => s.analytics = true,
            "dlq" => s.dlq = true,
            _ => return None,
        }
        Some(s)
    }

    /// The names of the services run, for logs.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.order, "order"),
            (self.inventory, "inventory"),
            (self.notification, "notification"),
            (self.analytics, "analytics"),
            (self.dlq, "dlq"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect()
    }
}

/// How the system is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// The runtime.
    pub runtime: RuntimeKind,
    /// Which services this process runs (Kafka; in memory it runs all).
    pub services: Services,
    /// Notification timings (the seed's by default).
    pub notification: NotificationPolicy,
    /// Order saga timings.
    pub order: OrderPolicy,
    /// SKU and units on hand.
    pub catalogue: Vec<(String, u32)>,
    /// Partitions per channel (Kafka: of the topics it creates, and the
    /// number of inventory stock shards).
    pub partitions: usize,
    /// The topic namespace (empty: the design's names).
    pub topics: Topics,
    /// Kafka: the application name (`SAGA_APP`), prefix of transactional ids.
    pub app: Option<String>,
    /// Kafka: this process's instance id (`SAGA_INSTANCE_ID`), unique per
    /// live process of one service, stable across its restarts.
    pub instance_id: Option<String>,
    /// Kafka: create the topics on start (default). Off where they are
    /// provisioned beforehand, and on librdkafka's mock cluster, which does
    /// not serve CreateTopics.
    pub create_topics: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::Memory,
            services: Services::ALL,
            notification: NotificationPolicy::default(),
            order: OrderPolicy::default(),
            catalogue: CATALOGUE.iter().map(|(s, n)| ((*s).into(), *n)).collect(),
            partitions: 3,
            topics: Topics::default(),
            app: None,
            instance_id: None,
            create_topics: true,
        }
    }
}

/// Why a saga could not be started.
#[derive(Debug)]
pub enum StartError {
    /// The id is taken: draw another.
    AlreadyExists,
    /// The runtime could not take the write; nothing was written.
    Unavailable(String),
}

/// What the services need from a runtime.
#[async_trait]
pub trait Platform: Send + Sync + 'static {
    /// "memory" or "kafka".
    fn name(&self) -> &'static str;
    /// Starts the order saga for `order`: stores it and sends its first
    /// messages atomically. An error means nothing was written.
    async fn start_order(&self, order: Order) -> Result<(), StartError>;
    /// The order saga `id`.
    async fn order(&self, id: &str) -> Result<Option<SagaInstance<Order>>, String>;
    /// Every order saga this process knows (on Kafka: of the partitions
    /// its orchestrator owns).
    async fn orders(&self) -> Result<Vec<SagaInstance<Order>>, String>;
    /// Appends a message to its channel (atomically, on Kafka).
    async fn publish(&self, env: Envelope) -> Result<(), String>;
    /// Every message on `channel` this process has seen (for timelines
    /// and inspection).
    fn read(&self, channel: &str) -> Vec<Envelope>;
    /// Unconsumed messages per (consumer group, channel), where known.
    fn lag(&self) -> Vec<(String, String, u64)>;
    /// Whether nothing is in flight: no lag, no pending participant retry,
    /// every saga settled (on Kafka: every saga this process owns).
    fn idle(&self) -> bool;
    /// Takes writes or refuses them (HTTP 503): off while shutting down,
    /// and in tests of that path.
    fn set_accepting(&self, on: bool);
    /// Stops every worker and waits for them.
    async fn shutdown(&self);
}

/// The consumer groups and the channels they read (design names).
pub const GROUPS: &[(&str, &str)] = &[
    (order::SAGA, INVENTORY_RESPONSES),
    (order::SAGA, NOTIFICATIONS_RESPONSES),
    ("inventory", INVENTORY_REQUESTS),
    ("notification", NOTIFICATIONS_REQUESTS),
    ("analytics", ORDERS_EVENTS),
    ("analytics", INVENTORY_EVENTS),
    ("analytics", NOTIFICATIONS_EVENTS),
    ("dlq-processor", NOTIFICATIONS_DLQ),
    ("dlq-processor", ORDERS_DLQ),
];

/// [`Platform`] on saga-core's in-memory runtime.
pub struct MemoryPlatform {
    runtime: Mutex<Option<InMemoryRuntime>>,
    backend: MemoryBackend,
    orders: SagaHandle<Order>,
    accepting: AtomicBool,
}

impl MemoryPlatform {
    fn check_accepting(&self) -> Result<(), String> {
        if self.accepting.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(SagaError::Shutdown.to_string())
        }
    }
}

#[async_trait]
impl Platform for MemoryPlatform {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn start_order(&self, order: Order) -> Result<(), StartError> {
        self.check_accepting().map_err(StartError::Unavailable)?;
        match self.orders.start(order.order_id.clone(), order) {
            Ok(_) => Ok(()),
            Err(SagaError::AlreadyExists { .. }) => Err(StartError::AlreadyExists),
            Err(e) => Err(StartError::Unavailable(e.to_string())),
        }
    }

    async fn order(&self, id: &str) -> Result<Option<SagaInstance<Order>>, String> {
        self.orders.get(&SagaId::new(id)).map_err(|e| e.to_string())
    }

    async fn orders(&self) -> Result<Vec<SagaInstance<Order>>, String> {
        self.orders.list().map_err(|e| e.to_string())
    }

    async fn publish(&self, env: Envelope) -> Result<(), String> {
        self.check_accepting()?;
        self.backend.publish(env);
        Ok(())
    }

    fn read(&self, channel: &str) -> Vec<Envelope> {
        self.backend.messages(channel)
    }

    fn lag(&self) -> Vec<(String, String, u64)> {
        GROUPS
            .iter()
            .map(|(g, c)| ((*g).into(), (*c).into(), self.backend.lag(g, c)))
            .collect()
    }

    fn idle(&self) -> bool {
        self.lag().iter().all(|(_, _, n)| *n == 0)
            && ["inventory", "notification"]
                .iter()
                .all(|p| self.backend.ledger(p).retries.is_empty())
            && self
                .orders
                .list()
                .map(|all| all.iter().all(|o| o.status.is_settled()))
                .unwrap_or(false)
    }

    fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::SeqCst);
    }

    async fn shutdown(&self) {
        self.set_accepting(false);
        let rt = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rt) = rt {
            rt.shutdown().await;
        }
    }
}

/// Every message of some topics, as a projection saw them (the order
/// process's source for timelines). Grows with the traffic: an example's
/// convenience, not a production read model.
#[derive(Clone, Default)]
pub struct ChannelLog {
    messages: Arc<Mutex<HashMap<String, Vec<Envelope>>>>,
}

impl ChannelLog {
    fn push(&self, env: &Envelope) {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(env.channel.clone())
            .or_default()
            .push(env.clone());
    }

    fn read(&self, channel: &str) -> Vec<Envelope> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }
}

/// [`Platform`] on saga-kafka's `KafkaRuntime`, exactly-once by default
/// (`SAGA_DELIVERY`).
pub struct KafkaPlatform {
    runtime: tokio::sync::RwLock<Option<KafkaRuntime>>,
    orders: Option<KafkaSagaHandle<Order>>,
    log: ChannelLog,
    accepting: AtomicBool,
}

impl KafkaPlatform {
    fn check_accepting(&self) -> Result<(), String> {
        if self.accepting.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the service is shutting down".into())
        }
    }

    fn orders(&self) -> Result<&KafkaSagaHandle<Order>, String> {
        self.orders
            .as_ref()
            .ok_or_else(|| "this process does not run the order service".to_owned())
    }
}

#[async_trait]
impl Platform for KafkaPlatform {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn start_order(&self, order: Order) -> Result<(), StartError> {
        self.check_accepting().map_err(StartError::Unavailable)?;
        let handle = self.orders().map_err(StartError::Unavailable)?;
        match handle.start(order.order_id.clone(), order).await {
            Ok(_) => Ok(()),
            Err(saga::kafka::Error::Saga(e)) if matches!(*e, SagaError::AlreadyExists { .. }) => {
                Err(StartError::AlreadyExists)
            }
            Err(e) => {
                tracing::warn!(error = %e, "order not started: the broker did not take it");
                Err(StartError::Unavailable(e.to_string()))
            }
        }
    }

    async fn order(&self, id: &str) -> Result<Option<SagaInstance<Order>>, String> {
        self.orders()?
            .get(&SagaId::new(id))
            .await
            .map_err(|e| e.to_string())
    }

    async fn orders(&self) -> Result<Vec<SagaInstance<Order>>, String> {
        Ok(self.orders()?.owned())
    }

    async fn publish(&self, env: Envelope) -> Result<(), String> {
        self.check_accepting()?;
        let rt = self.runtime.read().await;
        let rt = rt.as_ref().ok_or("the Kafka runtime is shut down")?;
        rt.publish(vec![env]).await.map_err(|e| e.to_string())
    }

    fn read(&self, channel: &str) -> Vec<Envelope> {
        self.log.read(channel)
    }

    fn lag(&self) -> Vec<(String, String, u64)> {
        // Consumer lag on Kafka is the broker's to tell (kafka-consumer-groups,
        // or an exporter); this process does not compute it.
        Vec::new()
    }

    fn idle(&self) -> bool {
        self.orders
            .as_ref()
            .is_none_or(|h| h.owned().iter().all(|o| o.status.is_settled()))
    }

    fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::SeqCst);
    }

    async fn shutdown(&self) {
        self.set_accepting(false);
        if let Some(rt) = self.runtime.write().await.take() {
            rt.shutdown().await;
        }
    }
}

/// Why an order was not accepted.
#[derive(Debug)]
pub enum PlaceError {
    /// The request is wrong (HTTP 4xx).
    Invalid(Invalid),
    /// The runtime could not take the write; nothing was written, the
    /// client may retry (HTTP 503).
    Unavailable(String),
}

/// The system, or the part of it this process runs: the services it runs
/// are `Some`.
pub struct System {
    /// The runtime seam.
    pub platform: Arc<dyn Platform>,
    /// The topic names.
    pub topics: Topics,
    /// Which services this process runs.
    pub services: Services,
    /// The inventory service.
    pub inventory: Option<Inventory>,
    /// The notification service.
    pub notifications: Option<NotificationService>,
    /// The fake email API behind it.
    pub email: FakeEmailProvider,
    /// The analytics projection.
    pub analytics: Option<Analytics>,
    /// The DLQ processor.
    pub dlq: Option<DlqProcessor>,
    catalogue: BTreeSet<String>,
}

fn dlq_processor(platform: &Arc<dyn Platform>, clock: Clock, topics: &Topics) -> DlqProcessor {
    let publisher = platform.clone();
    let publish: Publish = Arc::new(move |env| {
        let p = publisher.clone();
        Box::pin(async move { p.publish(env).await })
    });
    DlqProcessor::new(publish, clock, FakeSms::default())
        .events_on(topics.name(NOTIFICATIONS_EVENTS))
}

/// Every topic the system uses on Kafka, with its kind: the design's
/// channels, and the runtime's own for the order saga (its state, replies
/// and dead letters) and the participants (ledgers, dead letters). What to
/// provision beforehand when [`Config::create_topics`] is off.
pub fn kafka_topics(config: &Config) -> Result<Vec<TopicSpec>, SagaError> {
    let topics = &config.topics;
    let saga = order::saga(&config.order, topics)?;
    let participants = [
        ParticipantPolicy::new(topics.name("inventory")),
        notification::policy(&config.notification, topics),
    ];
    let dead_letters: Vec<String> = participants
        .iter()
        .map(|p| p.dead_letter_channel.clone())
        .chain([saga.dead_letter_channel().to_owned()])
        .collect();
    let mut specs: Vec<TopicSpec> = Vec::new();
    let mut add = |spec: TopicSpec| {
        if !specs.iter().any(|s| s.name == spec.name) {
            specs.push(spec);
        }
    };
    for name in topics
        .names(ALL_CHANNELS)
        .into_iter()
        .chain(saga.reply_channels())
        .chain(saga.command_channels())
        .chain(dead_letters.iter().cloned())
    {
        add(if dead_letters.contains(&name) {
            TopicSpec::dead_letters(name)
        } else {
            TopicSpec::messages(name)
        });
    }
    add(TopicSpec::compacted(saga::kafka::state_topic(saga.name())));
    for p in &participants {
        add(TopicSpec::compacted(saga::kafka::ledger_topic(&p.name)));
    }
    Ok(specs)
}

/// A consumer group name no earlier process used: a projection that keeps
/// its state in memory re-reads its topics from the beginning on start.
fn fresh_group(topics: &Topics, what: &str) -> String {
    topics.name(&format!(
        "{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))
}

impl System {
    /// Starts `config.services` on `config`'s runtime (every service in
    /// memory). Must run inside tokio.
    pub async fn start(config: Config) -> Result<Self, String> {
        match config.runtime.clone() {
            RuntimeKind::Memory => Self::in_memory(config).map_err(|e| e.to_string()),
            RuntimeKind::Kafka(bootstrap) => Self::on_kafka(config, &bootstrap).await,
        }
    }

    fn catalogue(config: &Config) -> Vec<(&str, u32)> {
        config
            .catalogue
            .iter()
            .map(|(s, n)| (s.as_str(), *n))
            .collect()
    }

    /// Starts every service on the in-memory runtime. The inventory keeps
    /// one stock shard (see `inventory.rs`).
    pub fn in_memory(config: Config) -> Result<Self, SagaError> {
        let backend = MemoryBackend::with_partitions(config.partitions);
        let clock = Clock::system();
        let runtime = InMemoryRuntime::with_clock(backend.clone(), clock);
        let topics = config.topics.clone();

        let inventory =
            Inventory::new(&Self::catalogue(&config)).events_on(topics.name(INVENTORY_EVENTS));
        runtime.participant(
            &topics.name(INVENTORY_REQUESTS),
            ParticipantPolicy::new(topics.name("inventory")),
            inventory.clone(),
        );

        let email = FakeEmailProvider::new();
        let notifications = NotificationService::new(Arc::new(email.clone()), clock)
            .events_on(topics.name(NOTIFICATIONS_EVENTS));
        runtime.participant(
            &topics.name(NOTIFICATIONS_REQUESTS),
            notification::policy(&config.notification, &topics),
            notifications.clone(),
        );

        let analytics = Analytics::new();
        let a = analytics.clone();
        let channels = topics.names(crate::analytics::CHANNELS);
        let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
        runtime.projection(&topics.name("analytics"), &refs, move |env| a.apply(env));

        let orders = runtime.saga(order::saga(&config.order, &topics)?);
        let memory = Arc::new(MemoryPlatform {
            runtime: Mutex::new(None),
            backend: backend.clone(),
            orders,
            accepting: AtomicBool::new(true),
        });
        let platform: Arc<dyn Platform> = memory.clone();

        let dlq = dlq_processor(&platform, clock, &topics);
        let d = dlq.clone();
        let channels = topics.names(crate::dlq::CHANNELS);
        let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
        runtime.projection(&topics.name("dlq-processor"), &refs, move |env| {
            d.ingest(env)
        });
        *memory.runtime.lock().unwrap_or_else(|e| e.into_inner()) = Some(runtime);

        Ok(Self {
            platform,
            topics,
            services: Services::ALL,
            inventory: Some(inventory),
            notifications: Some(notifications),
            email,
            analytics: Some(analytics),
            dlq: Some(dlq),
            catalogue: config.catalogue.into_iter().map(|(s, _)| s).collect(),
        })
    }

    /// The Kafka configuration: the environment (`KafkaConfig::from_env`:
    /// security, delivery mode …) with `bootstrap`, and the app name,
    /// instance id and partitions of `config` when set.
    pub fn kafka_config(config: &Config, bootstrap: &str) -> Result<KafkaConfig, String> {
        let mut cfg = KafkaConfig::from_lookup(|key| match key {
            "KAFKA_BOOTSTRAP_SERVERS" => Some(bootstrap.to_owned()),
            _ => std::env::var(key).ok().filter(|v| !v.is_empty()),
        })
        .map_err(|e| e.to_string())?;
        if let Some(app) = &config.app {
            cfg = cfg.app(app.clone());
        }
        if let Some(id) = &config.instance_id {
            cfg = cfg.instance_id(id.clone());
        }
        let partitions = i32::try_from(config.partitions)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("invalid partition count {}", config.partitions))?;
        Ok(cfg.partitions(partitions))
    }

    /// Starts `config.services` on Kafka at `bootstrap`.
    pub async fn on_kafka(config: Config, bootstrap: &str) -> Result<Self, String> {
        let kcfg = Self::kafka_config(&config, bootstrap)?;
        Self::on_kafka_with(config, kcfg).await
    }

    /// Starts `config.services` on Kafka with a ready runtime configuration
    /// (tests tune its timeouts and retries); `config.create_topics` decides
    /// whether topics are created.
    pub async fn on_kafka_with(config: Config, kcfg: KafkaConfig) -> Result<Self, String> {
        let kcfg = kcfg.create_topics(config.create_topics);
        let runtime = KafkaRuntime::new(kcfg.clone()).map_err(|e| e.to_string())?;
        let clock = Clock::system();
        let topics = config.topics.clone();
        let services = config.services;
        let err = |what: &str| {
            let what = what.to_owned();
            move |e: saga::kafka::Error| format!("cannot start the {what}: {e}")
        };

        // Every topic of the system, made up front with its kind: the
        // dead-letter topics keep their messages 30 days (K4), created as
        // such before any projection could create them as plain topics.
        if config.create_topics {
            let specs = kafka_topics(&config).map_err(|e| e.to_string())?;
            saga::kafka::ensure_topics(&kcfg, &specs)
                .await
                .map_err(err("topics"))?;
        }

        let inventory = if services.inventory {
            let inv = Inventory::sharded(&Self::catalogue(&config), config.partitions as u32)
                .events_on(topics.name(INVENTORY_EVENTS));
            runtime
                .participant(
                    &topics.name(INVENTORY_REQUESTS),
                    ParticipantPolicy::new(topics.name("inventory")),
                    inv.clone(),
                )
                .await
                .map_err(err("inventory"))?;
            Some(inv)
        } else {
            None
        };

        let email = FakeEmailProvider::new();
        let notifications = if services.notification {
            let n = NotificationService::new(Arc::new(email.clone()), clock)
                .events_on(topics.name(NOTIFICATIONS_EVENTS));
            runtime
                .participant(
                    &topics.name(NOTIFICATIONS_REQUESTS),
                    notification::policy(&config.notification, &topics),
                    n.clone(),
                )
                .await
                .map_err(err("notification service"))?;
            Some(n)
        } else {
            None
        };

        let analytics = if services.analytics {
            let a = Analytics::new();
            let handler = a.clone();
            let channels = topics.names(crate::analytics::CHANNELS);
            let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
            runtime
                .projection(&fresh_group(&topics, "analytics"), &refs, move |env| {
                    handler.apply(env)
                })
                .await
                .map_err(err("analytics projection"))?;
            Some(a)
        } else {
            None
        };

        let log = ChannelLog::default();
        let orders = if services.order {
            let handle = runtime
                .saga(order::saga(&config.order, &topics).map_err(|e| e.to_string())?)
                .await
                .map_err(err("order saga"))?;
            let channels = topics.names(ALL_CHANNELS);
            let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
            let l = log.clone();
            runtime
                .projection(&fresh_group(&topics, "timeline"), &refs, move |env| {
                    l.push(env)
                })
                .await
                .map_err(err("timeline projection"))?;
            Some(handle)
        } else {
            None
        };

        let kafka = Arc::new(KafkaPlatform {
            runtime: tokio::sync::RwLock::new(None),
            orders,
            log,
            accepting: AtomicBool::new(true),
        });
        let platform: Arc<dyn Platform> = kafka.clone();

        let dlq = if services.dlq {
            let dlq = dlq_processor(&platform, clock, &topics);
            let d = dlq.clone();
            let channels = topics.names(crate::dlq::CHANNELS);
            let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
            runtime
                .projection(&fresh_group(&topics, "dlq"), &refs, move |env| {
                    d.ingest(env)
                })
                .await
                .map_err(err("DLQ processor"))?;
            Some(dlq)
        } else {
            None
        };
        *kafka.runtime.write().await = Some(runtime);
        tracing::info!(services = ?services.names(), prefix = topics.prefix(), "services on Kafka started");

        Ok(Self {
            platform,
            topics,
            services,
            inventory,
            notifications,
            email,
            analytics,
            dlq,
            catalogue: config.catalogue.into_iter().map(|(s, _)| s).collect(),
        })
    }

    /// The inventory (panics if this process does not run it).
    pub fn inventory(&self) -> &Inventory {
        self.inventory.as_ref().expect("the inventory runs here")
    }

    /// The analytics (panics if this process does not run them).
    pub fn analytics(&self) -> &Analytics {
        self.analytics.as_ref().expect("the analytics run here")
    }

    /// The DLQ processor (panics if this process does not run it).
    pub fn dlq(&self) -> &DlqProcessor {
        self.dlq.as_ref().expect("the DLQ processor runs here")
    }

    /// Whether the catalogue has `sku`.
    pub fn knows_sku(&self, sku: &str) -> bool {
        self.catalogue.contains(sku)
    }

    /// Validates `req` and starts its order saga. Returns the PENDING order.
    pub async fn place_order(&self, req: &OrderRequest) -> Result<Order, PlaceError> {
        let items = order::validate(req, |s| self.knows_sku(s)).map_err(PlaceError::Invalid)?;
        let mut last = String::new();
        for _ in 0..3 {
            let id = format!(
                "ORD-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8].to_uppercase()
            );
            let order = Order::new(id, req.customer_id.clone(), items.clone());
            match self.platform.start_order(order.clone()).await {
                Ok(()) => {
                    metrics::counter!("ecommerce_orders_placed_total").increment(1);
                    return Ok(order);
                }
                // An id collision: draw another.
                Err(StartError::AlreadyExists) => continue,
                Err(StartError::Unavailable(e)) => {
                    last = e;
                    break;
                }
            }
        }
        Err(PlaceError::Unavailable(format!(
            "the order could not be recorded ({last}); nothing was written, please retry"
        )))
    }

    /// Waits until `cond` holds, polling, for at most `timeout` of tokio
    /// time (virtual under a paused clock).
    pub async fn wait_until(&self, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until nothing is in flight (see [`Platform::idle`]).
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let platform = self.platform.clone();
        self.wait_until(timeout, move || platform.idle()).await
    }

    /// Stops every service.
    pub async fn shutdown(&self) {
        self.platform.shutdown().await;
    }
}
