//! The analytics service: a projection over `orders.events`,
//! `inventory.events` and `notifications.events`.
//!
//! Projections see a message again after a crash (offsets are committed after
//! the handler), so it counts each event id once.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use rust_decimal::Decimal;
use saga_core::{Envelope, MessageId};
use serde::Serialize;

use crate::messages::{InventoryEvent, NotificationEvent, OrderEvent};

/// The channels the projection reads.
pub const CHANNELS: &[&str] = &[
    crate::messages::ORDERS_EVENTS,
    crate::messages::INVENTORY_EVENTS,
    crate::messages::NOTIFICATIONS_EVENTS,
];

/// The numbers, as served by `GET /analytics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Orders created.
    #[serde(rename = "orders.created")]
    pub orders_created: u64,
    /// Orders confirmed.
    #[serde(rename = "orders.confirmed")]
    pub orders_confirmed: u64,
    /// Orders cancelled.
    #[serde(rename = "orders.cancelled")]
    pub orders_cancelled: u64,
    /// Sum of the totals of confirmed orders.
    #[serde(rename = "revenue.confirmed")]
    pub revenue_confirmed: Decimal,
    /// Sum of the totals of cancelled orders.
    #[serde(rename = "revenue.lost")]
    pub revenue_lost: Decimal,
    /// Notifications delivered (email, or SMS from the DLQ processor).
    #[serde(rename = "notifications.sent")]
    pub notifications_sent: u64,
    /// Notifications that failed every attempt.
    #[serde(rename = "notifications.failed")]
    pub notifications_failed: u64,
    /// Reservations made by the inventory.
    #[serde(rename = "inventory.reservations")]
    pub inventory_reservations: u64,
    /// Cancellations per reason code ("stock" …).
    pub cancellation_reasons: BTreeMap<String, u64>,
    /// Distinct events counted.
    pub events_processed: u64,
}

#[derive(Default)]
struct State {
    seen: HashSet<MessageId>,
    summary: Summary,
}

/// The projection's state and handler. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Analytics {
    state: Arc<Mutex<State>>,
}

impl Analytics {
    /// Empty analytics.
    pub fn new() -> Self {
        Self::default()
    }

    /// The numbers now.
    pub fn summary(&self) -> Summary {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .summary
            .clone()
    }

    /// Folds one event in (once per event id; unknown payloads are skipped).
    pub fn apply(&self, env: &Envelope) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.seen.insert(env.id.clone()) {
            tracing::debug!(event = %env.id, "analytics: duplicate event ignored");
            return;
        }
        let s = &mut st.summary;
        s.events_processed += 1;
        if let Ok(e) = serde_json::from_value::<OrderEvent>(env.payload.clone()) {
            match e {
                OrderEvent::OrderCreated { .. } => s.orders_created += 1,
                OrderEvent::OrderConfirmed { total, .. } => {
                    s.orders_confirmed += 1;
                    s.revenue_confirmed += total;
                }
                OrderEvent::OrderCancelled {
                    total, reason_code, ..
                } => {
                    s.orders_cancelled += 1;
                    s.revenue_lost += total;
                    *s.cancellation_reasons.entry(reason_code).or_default() += 1;
                }
            }
        } else if let Ok(e) = serde_json::from_value::<NotificationEvent>(env.payload.clone()) {
            match e {
                NotificationEvent::NotificationSent { .. } => s.notifications_sent += 1,
                NotificationEvent::NotificationFailed { .. } => s.notifications_failed += 1,
            }
        } else if let Ok(InventoryEvent::InventoryReserved { .. }) =
            serde_json::from_value::<InventoryEvent>(env.payload.clone())
        {
            s.inventory_reservations += 1;
        }
    }
}
