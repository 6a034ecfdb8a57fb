//! The system on the in-memory runtime: every service in this process.

use std::sync::Arc;

use saga_core::{Clock, InMemoryRuntime, MemoryBackend};

use crate::messages::*;
use crate::order;
use crate::system::wiring::{wire, Options};
use crate::system::{Config, Observer, Services, System};

/// The consumer groups and the channels they read (design names), whose
/// lag the in-memory backend reports.
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

/// What the in-memory backend tells beyond the common API.
pub(crate) struct MemoryObserver {
    backend: MemoryBackend,
    topics: Topics,
}

impl MemoryObserver {
    /// Unconsumed messages per (consumer group, channel).
    pub(crate) fn lag(&self) -> Vec<(String, String, u64)> {
        // The timeline projection reads every channel.
        let timeline = ALL_CHANNELS.iter().map(|c| ("timeline", *c));
        GROUPS
            .iter()
            .copied()
            .chain(timeline)
            .map(|(g, c)| {
                let (g, c) = (self.topics.name(g), self.topics.name(c));
                let lag = self.backend.lag(&g, &c);
                (g, c, lag)
            })
            .collect()
    }

    /// No lag and no participant retry pending.
    pub(crate) fn quiet(&self) -> bool {
        self.lag().iter().all(|(_, _, n)| *n == 0)
            && ["inventory", "notification"]
                .iter()
                .all(|p| self.backend.pending_retries(&self.topics.name(p)) == 0)
    }
}

/// Starts every service on the in-memory runtime. The inventory keeps one
/// stock shard (see `inventory.rs`).
pub(crate) async fn start(config: Config) -> Result<System, String> {
    let backend = MemoryBackend::with_partitions(config.partitions as u32);
    let clock = Clock::system();
    let runtime = Arc::new(InMemoryRuntime::with_clock(backend.clone(), clock));
    let observer = Observer::Memory(MemoryObserver {
        backend,
        topics: config.topics.clone(),
    });
    let opts = Options {
        services: Services::ALL,
        sharded_inventory: false,
        fresh_groups: false,
        clock,
    };
    wire(runtime, &config, opts, observer).await
}
