//! The services, wired once on any runtime.

use std::sync::Arc;

use saga_core::{Clock, ParticipantPolicy, Runtime};

use crate::analytics::Analytics;
use crate::dlq::{DlqError, DlqProcessor, FakeSms, Publish};
use crate::inventory::Inventory;
use crate::messages::{
    Topics, ALL_CHANNELS, INVENTORY_EVENTS, INVENTORY_REQUESTS, NOTIFICATIONS_EVENTS,
    NOTIFICATIONS_REQUESTS,
};
use crate::notification::{self, FakeEmailProvider, NotificationService};
use crate::order;
use crate::system::{ChannelLog, Config, Observer, Services, System};

/// How the wiring differs between deployments.
pub(crate) struct Options {
    /// Which services to run.
    pub services: Services,
    /// One stock shard per partition (several inventory instances may
    /// run), or one shard (a single process serves every partition).
    pub sharded_inventory: bool,
    /// Projections that keep their state in memory re-read their topics
    /// from the beginning on start: a consumer group no earlier process used.
    pub fresh_groups: bool,
    /// The clock the services time attempts and actions with.
    pub clock: Clock,
}

/// The consumer group of projection `what`.
fn group(topics: &Topics, what: &str, fresh: bool) -> String {
    if fresh {
        topics.name(&format!(
            "{what}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))
    } else {
        topics.name(what)
    }
}

fn catalogue(config: &Config) -> Vec<(&str, u32)> {
    config
        .catalogue
        .iter()
        .map(|c| (c.sku.as_str(), c.on_hand))
        .collect()
}

/// Registers `opts.services` on `runtime` and returns the system around it.
pub(crate) async fn wire<R: Runtime>(
    runtime: Arc<R>,
    config: &Config,
    opts: Options,
    observer: Observer,
) -> Result<System, String> {
    let topics = config.topics.clone();
    let services = opts.services;
    let err =
        |what: &'static str| move |e: saga_core::SagaError| format!("cannot start the {what}: {e}");

    let inventory = if services.inventory {
        let cat = catalogue(config);
        let inv = if opts.sharded_inventory {
            Inventory::sharded(&cat, config.partitions as u32)
        } else {
            Inventory::new(&cat)
        }
        .events_on(topics.name(INVENTORY_EVENTS));
        runtime
            .participant(
                &topics.name(INVENTORY_REQUESTS),
                // A new attempt of an order's reservation gets its first
                // answer (the inventory keeps no per-order record).
                ParticipantPolicy::new(topics.name("inventory")).remember_steps(),
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
        let n = NotificationService::new(Arc::new(email.clone()), opts.clock)
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
        let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
        runtime
            .projection(
                &group(&topics, "analytics", opts.fresh_groups),
                &channels,
                move |env| handler.apply(env),
            )
            .await
            .map_err(err("analytics projection"))?;
        Some(a)
    } else {
        None
    };

    let log = ChannelLog::default();
    let orders = if services.order {
        let def = order::saga(&config.order, &topics).map_err(|e| e.to_string())?;
        let handle = runtime.saga(def).await.map_err(err("order saga"))?;
        let channels = topics.names(ALL_CHANNELS);
        let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
        let l = log.clone();
        runtime
            .projection(
                &group(&topics, "timeline", opts.fresh_groups),
                &channels,
                move |env| l.push(env),
            )
            .await
            .map_err(err("timeline projection"))?;
        Some(handle)
    } else {
        None
    };

    let dlq = if services.dlq {
        let publisher = runtime.clone();
        let publish: Publish = Arc::new(move |env| {
            let rt = publisher.clone();
            Box::pin(async move {
                rt.publish(vec![env]).await.map_err(|e| {
                    // An ACL refusal is not fixed by trying again.
                    if not_authorized(&e) {
                        DlqError::Refused(e.to_string())
                    } else {
                        DlqError::Unavailable(e.to_string())
                    }
                })
            })
        });
        let dlq = DlqProcessor::new(publish, opts.clock, FakeSms::default())
            .events_on(topics.name(NOTIFICATIONS_EVENTS));
        let d = dlq.clone();
        let channels = topics.names(crate::dlq::CHANNELS);
        let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
        runtime
            .projection(
                &group(&topics, "dlq-processor", opts.fresh_groups),
                &channels,
                move |env| d.ingest(env),
            )
            .await
            .map_err(err("DLQ processor"))?;
        Some(dlq)
    } else {
        None
    };
    Ok(System {
        runtime: runtime as Arc<dyn Runtime>,
        observer,
        accepting: std::sync::atomic::AtomicBool::new(true),
        orders,
        topics,
        services,
        inventory,
        notifications,
        email,
        analytics,
        dlq,
        log,
        prices: config
            .catalogue
            .iter()
            .map(|c| (c.sku.clone(), c.unit_price))
            .collect(),
    })
}

/// Whether the runtime refused for want of an authorization (on Kafka, a
/// missing ACL).
fn not_authorized(e: &saga_core::SagaError) -> bool {
    let saga_core::SagaError::Runtime { source, .. } = e else {
        return false;
    };
    matches!(
        source.downcast_ref::<saga_kafka::Error>(),
        Some(saga_kafka::Error::Authorization { .. })
    )
}
