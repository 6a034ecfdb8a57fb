//! The system, or the part of it one process runs, on a runtime.
//!
//! The services are wired once ([`wiring`]), against saga-core's
//! `Runtime` trait, so the same code runs them on the in-memory runtime
//! ([`memory`]: every service in this process) and on Kafka ([`kafka`]:
//! any subset of the services per process: all of them with `serve
//! --kafka`, or one each with `order`, `inventory`, `notification`,
//! `analytics`, `dlq`, several instances of one sharing the work through
//! its consumer group). What differs between the two is only how a
//! process observes the log: consumer lag (the in-memory backend knows it;
//! on Kafka ask the broker) and what counts as idle.
//!
//! On Kafka, reads that span services come from the log: `GET
//! /orders/{id}` reads the saga's state topic through the handle, the
//! timelines come from a projection over every topic kept by the order
//! process, analytics and the DLQ view are projections that re-read their
//! topics from the beginning on every start (a fresh consumer group each
//! time: their state lives in memory and is rebuilt from the events).

pub mod kafka;
pub mod memory;
pub mod wiring;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use saga_core::{
    Envelope, Operation, Page, Runtime, SagaError, SagaHandle, SagaId, SagaInstance, SagaQuery,
};

use crate::analytics::Analytics;
use crate::dlq::DlqProcessor;
use crate::inventory::{Inventory, CATALOGUE, PRICES};
use crate::messages::Topics;
use crate::notification::{FakeEmailProvider, NotificationPolicy, NotificationService};
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

/// One product of the catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogueItem {
    /// The product.
    pub sku: String,
    /// Units in the warehouse at start.
    pub on_hand: u32,
    /// The price of one unit: what an order line costs, whatever the
    /// client says (a different `unit_price` in a request is refused).
    pub unit_price: Decimal,
}

/// The seed's catalogue: [`CATALOGUE`]'s stock at [`PRICES`]' prices (a
/// SKU without a price is left out: nobody could order it).
pub fn seed_catalogue() -> Vec<CatalogueItem> {
    CATALOGUE
        .iter()
        .filter_map(|(sku, on_hand)| {
            let cents = PRICES.iter().find(|(s, _)| s == sku)?.1;
            Some(CatalogueItem {
                sku: (*sku).into(),
                on_hand: *on_hand,
                unit_price: Decimal::new(cents, 2),
            })
        })
        .collect()
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
    /// The products: SKU, units on hand and list price.
    pub catalogue: Vec<CatalogueItem>,
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
            catalogue: seed_catalogue(),
            partitions: 3,
            topics: Topics::default(),
            app: None,
            instance_id: None,
            create_topics: true,
        }
    }
}

impl Config {
    /// Short notification timings (0.5 s per attempt, 0.2 s then 0.4 s of
    /// backoff, the order waiting 10 s for the outcome): the DLQ flow
    /// without the seed's seconds (`--fast`).
    pub fn fast(mut self) -> Self {
        self.notification = NotificationPolicy {
            attempt_timeout: Duration::from_millis(500),
            first_backoff: Duration::from_millis(200),
            max_attempts: 3,
        };
        self.order.notify_timeout = Duration::from_secs(10);
        self
    }
}

/// Why an order was not accepted.
#[derive(Debug)]
pub enum PlaceError {
    /// The request is wrong (HTTP 4xx).
    Invalid(Invalid),
    /// The runtime could not take the write in time; the client may retry
    /// (HTTP 503), with the same `Idempotency-Key` to be safe.
    Unavailable(String),
    /// The `Idempotency-Key` was used before with a different request
    /// (HTTP 422).
    KeyReused(String),
    /// The runtime refused the write for a reason retrying does not fix
    /// (a missing ACL, its configuration): HTTP 500, not retryable; the
    /// details are in the service's log and `/health`, not the answer.
    Refused(String),
}

/// The longest `Idempotency-Key` taken.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// The order id of a request with `Idempotency-Key` `key` from
/// `customer_id`: `ORD-` and 16 hex digits of a name-based UUID of both,
/// so retries of one request name one order, and two customers' keys never
/// collide.
pub fn order_id_for_key(customer_id: &str, key: &str) -> String {
    let name = format!("{customer_id}\n{key}");
    let uuid = uuid::Uuid::new_v5(&ORDER_KEYS, name.as_bytes());
    format!("ORD-{}", &uuid.simple().to_string()[..16].to_uppercase())
}

/// The namespace of [`order_id_for_key`]'s name-based UUIDs.
const ORDER_KEYS: uuid::Uuid = uuid::Uuid::from_u128(0x5f1c_1c0e_8a3b_4d52_9e07_6b2f_0d4a_91c3);

fn check_key(key: &str) -> Result<(), order::Invalid> {
    let ok = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY
        && key.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(order::Invalid {
            field: "Idempotency-Key".into(),
            message: format!("must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        })
    }
}

/// How many recent items a process keeps of each history it serves for
/// looking at (messages per channel, notification attempts, fake emails):
/// history is not state, and must not grow with every order.
pub const KEEP_RECENT: usize = 10_000;

/// Appends `item`, dropping the oldest beyond [`KEEP_RECENT`] (in chunks,
/// so appending stays cheap).
pub(crate) fn keep_recent<T>(list: &mut Vec<T>, item: T) {
    list.push(item);
    if list.len() >= 2 * KEEP_RECENT {
        list.drain(..list.len() - KEEP_RECENT);
    }
}

/// The recent messages of some topics, as a projection saw them (the order
/// process's source for timelines): the last [`KEEP_RECENT`] to
/// `2 × KEEP_RECENT` of each channel, an example's convenience, not a
/// production read model.
#[derive(Clone, Default)]
pub struct ChannelLog {
    messages: Arc<Mutex<HashMap<String, Vec<Envelope>>>>,
}

impl ChannelLog {
    pub(crate) fn push(&self, env: &Envelope) {
        let mut messages = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        let list = messages.entry(env.channel.clone()).or_default();
        keep_recent(list, env.clone());
    }

    /// The recent messages of `channel`.
    pub fn read(&self, channel: &str) -> Vec<Envelope> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }
}

/// How a process observes its runtime beyond the common API.
pub(crate) enum Observer {
    /// The in-memory backend: consumer lag and pending retries are known.
    Memory(memory::MemoryObserver),
    /// Kafka: consumer lag is the broker's to tell.
    Kafka,
}

/// The system, or the part of it this process runs: the services it runs
/// are `Some`.
pub struct System {
    runtime: Arc<dyn Runtime>,
    observer: Observer,
    accepting: AtomicBool,
    /// The order sagas, where the order service runs.
    pub orders: Option<SagaHandle<Order>>,
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
    /// Every message of every channel, where the order service runs.
    log: ChannelLog,
    /// The list price of every SKU.
    prices: BTreeMap<String, Decimal>,
}

impl System {
    /// Starts `config.services` on `config`'s runtime (every service in
    /// memory). Must run inside tokio.
    ///
    /// # Errors
    /// Why the runtime or a service could not start (a broker out of reach,
    /// a topic it cannot create).
    pub async fn start(config: Config) -> Result<Self, String> {
        match config.runtime.clone() {
            RuntimeKind::Memory => memory::start(config).await,
            RuntimeKind::Kafka(bootstrap) => kafka::start(config, &bootstrap).await,
        }
    }

    /// Starts `config.services` on Kafka with a ready runtime configuration
    /// (tests tune its timeouts and retries); `config.create_topics` decides
    /// whether topics are created.
    ///
    /// # Errors
    /// As [`System::start`].
    pub async fn on_kafka_with(
        config: Config,
        kcfg: saga_kafka::KafkaConfig,
    ) -> Result<Self, String> {
        kafka::start_with(config, kcfg).await
    }

    /// The runtime's health: the partitions it cannot serve, and why.
    pub fn health(&self) -> saga_core::Health {
        self.runtime.health()
    }

    /// "memory" or "kafka".
    pub fn runtime_name(&self) -> &'static str {
        self.runtime.name()
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
        self.prices.contains_key(sku)
    }

    /// The list price of `sku`, if the catalogue has it.
    pub fn price_of(&self, sku: &str) -> Option<Decimal> {
        self.prices.get(sku).copied()
    }

    /// Every SKU and its list price, by SKU.
    pub fn prices(&self) -> &BTreeMap<String, Decimal> {
        &self.prices
    }

    fn orders_handle(&self) -> Result<&SagaHandle<Order>, String> {
        self.orders
            .as_ref()
            .ok_or_else(|| "this process does not run the order service".to_owned())
    }

    /// The order saga `id`.
    ///
    /// # Errors
    /// If this process does not run the order service or cannot read it.
    pub async fn order(&self, id: &str) -> Result<Option<SagaInstance<Order>>, String> {
        self.orders_handle()?
            .get(&SagaId::new(id))
            .await
            .map_err(|e| e.to_string())
    }

    /// A page of the order sagas `query` selects (on Kafka: of every
    /// partition; the page's `as_of` says how fresh the listing is).
    ///
    /// # Errors
    /// [`SagaError::Runtime`] if this process does not run the order
    /// service; the runtime's error if it cannot list.
    pub async fn sagas(&self, query: &SagaQuery) -> Result<Page<SagaInstance<Order>>, SagaError> {
        self.orders_handle()
            .map_err(|e| SagaError::Runtime {
                what: "listing sagas".into(),
                source: e.into(),
            })?
            .list(query)
            .await
    }

    /// Applies an operator's `operation` to order saga `id` (parked).
    ///
    /// # Errors
    /// [`SagaError::UnknownSaga`], [`SagaError::InvalidAction`] (not
    /// parked, or parked on another step than `operation` names), or the
    /// runtime's error.
    pub async fn operate(&self, id: &str, operation: Operation) -> Result<(), SagaError> {
        self.orders_handle()
            .map_err(|e| SagaError::Runtime {
                what: "operating a saga".into(),
                source: e.into(),
            })?
            .operate(&SagaId::new(id), operation)
            .await
    }

    /// Every order saga this process knows (on Kafka: of every partition,
    /// through the saga type's catalog).
    ///
    /// # Errors
    /// As [`System::order`].
    pub async fn orders(&self) -> Result<Vec<SagaInstance<Order>>, String> {
        let handle = self.orders_handle()?;
        let mut all = Vec::new();
        let mut query = SagaQuery::all().limit(1_000);
        loop {
            let page = handle.list(&query).await.map_err(|e| e.to_string())?;
            all.extend(page.items);
            match page.next {
                Some(next) => query = query.after(next),
                None => return Ok(all),
            }
        }
    }

    /// Appends a message to its channel (atomically, on Kafka).
    ///
    /// # Errors
    /// When the process is shutting down or the runtime refuses it.
    pub async fn publish(&self, env: Envelope) -> Result<(), String> {
        self.check_accepting()?;
        self.runtime
            .publish(vec![env])
            .await
            .map_err(|e| e.to_string())
    }

    /// Every message on `channel` this process has seen (for timelines
    /// and inspection; where the order service runs).
    pub fn read(&self, channel: &str) -> Vec<Envelope> {
        self.log.read(channel)
    }

    /// Unconsumed messages per (consumer group, channel), where known (in
    /// memory; on Kafka the broker knows).
    pub fn lag(&self) -> Vec<(String, String, u64)> {
        match &self.observer {
            Observer::Memory(m) => m.lag(),
            Observer::Kafka => Vec::new(),
        }
    }

    /// Whether nothing is in flight: every saga this process holds settled,
    /// and in memory no lag and no pending participant retry.
    pub async fn idle(&self) -> bool {
        if let Observer::Memory(m) = &self.observer {
            if !m.quiet() {
                return false;
            }
        }
        match &self.orders {
            Some(_) => self
                .orders()
                .await
                .map(|all| all.iter().all(|o| o.status.is_settled()))
                .unwrap_or(false),
            None => true,
        }
    }

    /// Takes writes or refuses them (HTTP 503): off while shutting down,
    /// and in tests of that path.
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::SeqCst);
    }

    fn check_accepting(&self) -> Result<(), String> {
        if self.accepting.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(SagaError::Shutdown.to_string())
        }
    }

    /// Validates `req` and starts its order saga. Returns the order.
    ///
    /// With an `idempotency_key`, the order id derives from it (see
    /// [`order_id_for_key`]): a retry of the same request (after a timeout,
    /// a 503, a lost answer) gets the same order back, as it is now,
    /// instead of a second order.
    ///
    /// # Errors
    /// [`PlaceError::Invalid`] for a wrong request or key,
    /// [`PlaceError::KeyReused`] for a key used before with another
    /// request, [`PlaceError::Unavailable`] when the runtime could not take
    /// it in time.
    pub async fn place_order(
        &self,
        req: &OrderRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Order, PlaceError> {
        self.place_order_traced(req, idempotency_key, None).await
    }

    /// Like [`System::place_order`], the saga continuing trace `trace`
    /// (the API request's span) instead of starting its own.
    ///
    /// # Errors
    /// As [`System::place_order`].
    pub async fn place_order_traced(
        &self,
        req: &OrderRequest,
        idempotency_key: Option<&str>,
        trace: Option<saga_core::TraceContext>,
    ) -> Result<Order, PlaceError> {
        let items = order::validate(req, |s| self.price_of(s)).map_err(PlaceError::Invalid)?;
        if let Some(key) = idempotency_key {
            check_key(key).map_err(PlaceError::Invalid)?;
        }
        let unavailable = |why: String| {
            PlaceError::Unavailable(format!(
                "the order could not be recorded in time ({why}); please retry{}",
                if idempotency_key.is_some() {
                    " with the same Idempotency-Key"
                } else {
                    ""
                }
            ))
        };
        self.check_accepting().map_err(unavailable)?;
        let handle = self.orders_handle().map_err(unavailable)?;
        let id = match idempotency_key {
            Some(key) => order_id_for_key(&req.customer_id, key),
            // 64 random bits: a collision would return another order.
            None => format!(
                "ORD-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..16].to_uppercase()
            ),
        };
        let order = Order::new(id, req.customer_id.clone(), items);
        let started = match trace {
            Some(parent) => {
                handle
                    .start_traced(order.order_id.clone(), order.clone(), parent)
                    .await
            }
            None => handle.start(order.order_id.clone(), order.clone()).await,
        };
        if let Err(e) = started {
            if !e.is_retryable() {
                tracing::error!(error = %e, "order refused by the runtime");
                return Err(PlaceError::Refused(
                    "the order service cannot record orders (see its log and /health); nothing was placed"
                        .into(),
                ));
            }
            tracing::warn!(error = %e, "order not started");
            return Err(unavailable(e.to_string()));
        }
        if idempotency_key.is_none() {
            metrics::counter!("ecommerce_orders_placed_total").increment(1);
            return Ok(order);
        }
        // The saga may be the one an earlier request with this key started.
        match handle.get(&SagaId::new(order.order_id.clone())).await {
            Ok(Some(saga)) => {
                let first = saga.data;
                if first.customer_id != order.customer_id || first.items != order.items {
                    return Err(PlaceError::KeyReused(format!(
                        "Idempotency-Key already used for order {} with other items",
                        first.order_id
                    )));
                }
                metrics::counter!("ecommerce_orders_placed_total").increment(1);
                Ok(first)
            }
            // Started by another instance's worker, not applied yet (or
            // unreadable now): the order is the one just asked for.
            Ok(None) | Err(_) => {
                metrics::counter!("ecommerce_orders_placed_total").increment(1);
                Ok(order)
            }
        }
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

    /// Waits until nothing is in flight (see [`System::idle`]), for at most
    /// `timeout` of tokio time.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.idle().await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every service.
    pub async fn shutdown(&self) {
        self.set_accepting(false);
        self.runtime.shutdown().await;
    }
}
