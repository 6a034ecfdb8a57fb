//! Wires the services on a runtime.
//!
//! [`Platform`] is the seam between the services and the runtime: what the
//! HTTP API, the demo and the DLQ processor need from it (start an order
//! saga, read orders, publish and read channels, lag). [`MemoryPlatform`]
//! implements it on saga-core's `InMemoryRuntime`; a Kafka platform
//! (saga-kafka) will implement the same trait, and per-service processes
//! will each start only their part of [`System::in_memory`]'s wiring.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga::{
    Clock, Envelope, InMemoryRuntime, MemoryBackend, ParticipantPolicy, SagaError, SagaHandle,
    SagaId, SagaInstance,
};

use crate::analytics::Analytics;
use crate::dlq::{DlqProcessor, FakeSms};
use crate::inventory::{Inventory, CATALOGUE};
use crate::messages::*;
use crate::notification::{self, FakeEmailProvider, NotificationPolicy, NotificationService};
use crate::order::{self, Invalid, Order, OrderPolicy, OrderRequest};

/// Which runtime the system runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Everything in this process, on saga-core's in-memory runtime.
    Memory,
    /// Apache Kafka at this bootstrap address (not implemented yet: it
    /// waits for the saga-kafka runtime).
    Kafka(String),
}

/// How the system is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// The runtime.
    pub runtime: RuntimeKind,
    /// Notification timings (the seed's by default).
    pub notification: NotificationPolicy,
    /// Order saga timings.
    pub order: OrderPolicy,
    /// SKU and units on hand.
    pub catalogue: Vec<(String, u32)>,
    /// Partitions per channel.
    pub partitions: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::Memory,
            notification: NotificationPolicy::default(),
            order: OrderPolicy::default(),
            catalogue: CATALOGUE.iter().map(|(s, n)| ((*s).into(), *n)).collect(),
            partitions: 3,
        }
    }
}

/// What the services need from a runtime.
pub trait Platform: Send + Sync + 'static {
    /// "memory" or "kafka".
    fn name(&self) -> &'static str;
    /// Starts the order saga for `order`: stores it and sends its first
    /// messages atomically. An error means nothing was written.
    fn start_order(&self, order: Order) -> Result<(), SagaError>;
    /// The order saga `id`.
    fn order(&self, id: &str) -> Result<Option<SagaInstance<Order>>, SagaError>;
    /// Every order saga.
    fn orders(&self) -> Result<Vec<SagaInstance<Order>>, SagaError>;
    /// Appends a message to its channel.
    fn publish(&self, env: Envelope) -> Result<(), SagaError>;
    /// Every message on `channel` (for timelines and inspection).
    fn read(&self, channel: &str) -> Vec<Envelope>;
    /// Unconsumed messages per (consumer group, channel).
    fn lag(&self) -> Vec<(String, String, u64)>;
    /// Whether nothing is in flight: no lag, no pending participant retry,
    /// every saga settled.
    fn idle(&self) -> bool;
}

/// The consumer groups and the channels they read.
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
    /// Stops taking writes: `start_order` and `publish` fail (HTTP 503).
    /// Used while shutting down, and by tests of that path.
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::SeqCst);
    }

    fn check_accepting(&self) -> Result<(), SagaError> {
        if self.accepting.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(SagaError::Shutdown)
        }
    }

    /// Stops every worker and waits for them.
    pub async fn shutdown(&self) {
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

impl Platform for MemoryPlatform {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn start_order(&self, order: Order) -> Result<(), SagaError> {
        self.check_accepting()?;
        self.orders.start(order.order_id.clone(), order).map(|_| ())
    }

    fn order(&self, id: &str) -> Result<Option<SagaInstance<Order>>, SagaError> {
        self.orders.get(&SagaId::new(id))
    }

    fn orders(&self) -> Result<Vec<SagaInstance<Order>>, SagaError> {
        self.orders.list()
    }

    fn publish(&self, env: Envelope) -> Result<(), SagaError> {
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

/// The whole system: every service on one runtime.
pub struct System {
    /// The runtime seam.
    pub platform: Arc<dyn Platform>,
    /// The in-memory platform (the only one so far), for shutdown.
    memory: Arc<MemoryPlatform>,
    /// The inventory service.
    pub inventory: Inventory,
    /// The notification service.
    pub notifications: NotificationService,
    /// The fake email API behind it.
    pub email: FakeEmailProvider,
    /// The analytics projection.
    pub analytics: Analytics,
    /// The DLQ processor.
    pub dlq: DlqProcessor,
    catalogue: BTreeSet<String>,
}

impl System {
    /// Starts every service on `config`'s runtime. Must run inside tokio.
    pub fn start(config: Config) -> Result<Self, String> {
        match &config.runtime {
            RuntimeKind::Memory => Self::in_memory(config).map_err(|e| e.to_string()),
            RuntimeKind::Kafka(bootstrap) => Err(format!(
                "Kafka mode (--kafka {bootstrap}) is not implemented yet: it needs the saga-kafka \
                 runtime; run without --kafka for the in-memory system"
            )),
        }
    }

    /// Starts every service on the in-memory runtime.
    pub fn in_memory(config: Config) -> Result<Self, SagaError> {
        let backend = MemoryBackend::with_partitions(config.partitions);
        let clock = Clock::system();
        let runtime = InMemoryRuntime::with_clock(backend.clone(), clock);

        let catalogue: Vec<(&str, u32)> = config
            .catalogue
            .iter()
            .map(|(s, n)| (s.as_str(), *n))
            .collect();
        let inventory = Inventory::new(&catalogue);
        runtime.participant(
            INVENTORY_REQUESTS,
            ParticipantPolicy::new("inventory"),
            inventory.clone(),
        );

        let email = FakeEmailProvider::new();
        let notifications = NotificationService::new(Arc::new(email.clone()), clock);
        runtime.participant(
            NOTIFICATIONS_REQUESTS,
            notification::policy(&config.notification),
            notifications.clone(),
        );

        let analytics = Analytics::new();
        let a = analytics.clone();
        runtime.projection("analytics", crate::analytics::CHANNELS, move |env| {
            a.apply(env)
        });

        let orders = runtime.saga(order::saga(&config.order)?);
        let memory = Arc::new(MemoryPlatform {
            runtime: Mutex::new(None),
            backend: backend.clone(),
            orders,
            accepting: AtomicBool::new(true),
        });
        let platform: Arc<dyn Platform> = memory.clone();

        let publisher = platform.clone();
        let dlq = DlqProcessor::new(
            Arc::new(move |env| publisher.publish(env).map_err(|e| e.to_string())),
            clock,
            FakeSms::default(),
        );
        let d = dlq.clone();
        runtime.projection("dlq-processor", crate::dlq::CHANNELS, move |env| {
            d.ingest(env)
        });
        *memory.runtime.lock().unwrap_or_else(|e| e.into_inner()) = Some(runtime);

        Ok(Self {
            platform,
            memory,
            inventory,
            notifications,
            email,
            analytics,
            dlq,
            catalogue: config.catalogue.into_iter().map(|(s, _)| s).collect(),
        })
    }

    /// The in-memory platform.
    pub fn memory(&self) -> &MemoryPlatform {
        &self.memory
    }

    /// Whether the catalogue has `sku`.
    pub fn knows_sku(&self, sku: &str) -> bool {
        self.catalogue.contains(sku)
    }

    /// Validates `req` and starts its order saga. Returns the PENDING order.
    pub fn place_order(&self, req: &OrderRequest) -> Result<Order, PlaceError> {
        let items = order::validate(req, |s| self.knows_sku(s)).map_err(PlaceError::Invalid)?;
        let mut last = String::new();
        for _ in 0..3 {
            let id = format!(
                "ORD-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8].to_uppercase()
            );
            let order = Order::new(id, req.customer_id.clone(), items.clone());
            match self.platform.start_order(order.clone()) {
                Ok(()) => {
                    metrics::counter!("ecommerce_orders_placed_total").increment(1);
                    return Ok(order);
                }
                // An id collision: draw another.
                Err(SagaError::AlreadyExists { .. }) => continue,
                Err(e) => {
                    last = e.to_string();
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
        self.memory.shutdown().await;
    }
}
