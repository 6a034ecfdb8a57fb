//! The contracts between the services: topic names and the payloads that
//! travel on them. Every service depends on this module and on nothing else
//! of the others, so each could run as its own process.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Order lifecycle events (`ORDER_CREATED`, `ORDER_CONFIRMED`, `ORDER_CANCELLED`).
pub const ORDERS_EVENTS: &str = "orders.events";
/// `RESERVE` commands from the order saga to the inventory.
pub const INVENTORY_REQUESTS: &str = "inventory.requests";
/// The inventory's answers: `RESERVED` or `INSUFFICIENT_STOCK`.
pub const INVENTORY_RESPONSES: &str = "inventory.responses";
/// `INVENTORY_RESERVED` events.
pub const INVENTORY_EVENTS: &str = "inventory.events";
/// Email requests for confirmed and cancelled orders.
pub const NOTIFICATIONS_REQUESTS: &str = "notifications.requests";
/// The notification service's answers to the order saga about the
/// confirmation email (see `order.rs`: the saga records its outcome).
pub const NOTIFICATIONS_RESPONSES: &str = "notifications.responses";
/// `NOTIFICATION_SENT` / `NOTIFICATION_FAILED` events.
pub const NOTIFICATIONS_EVENTS: &str = "notifications.events";
/// Email requests that failed every attempt, with the DLQ metadata.
pub const NOTIFICATIONS_DLQ: &str = "notifications.dlq";
/// Dead letters of the order saga itself (a step after the point of no
/// return that ran out of retries parks the saga and lands here).
pub const ORDERS_DLQ: &str = "orders.dlq";

/// Every channel, in the order a request flows through them (used for
/// timelines and lag metrics).
pub const ALL_CHANNELS: &[&str] = &[
    ORDERS_EVENTS,
    INVENTORY_REQUESTS,
    INVENTORY_RESPONSES,
    INVENTORY_EVENTS,
    NOTIFICATIONS_REQUESTS,
    NOTIFICATIONS_RESPONSES,
    NOTIFICATIONS_EVENTS,
    NOTIFICATIONS_DLQ,
    ORDERS_DLQ,
];

/// The topic names under an optional namespace: `prefix` + the names
/// above (`ECOMMERCE_TOPIC_PREFIX`, `--topic-prefix`). The default, empty,
/// gives the exact names of the design; a prefix lets several systems (e.g.
/// tests) share one broker. The prefix also names the consumer groups, the
/// saga (so its `<saga>.state` topic) and the participants' ledgers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Names under `prefix` (may be empty).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of `base` (a topic, group or service name).
    pub fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// The full names of `bases`.
    pub fn names(&self, bases: &[&str]) -> Vec<String> {
        bases.iter().map(|b| self.name(b)).collect()
    }
}

/// One line of an order: a SKU, how many, at which unit price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    /// The product.
    pub sku: String,
    /// How many (at least 1).
    pub quantity: u32,
    /// The price of one unit, exact (serialized as a string: "999.99").
    pub unit_price: Decimal,
}

impl OrderItem {
    /// `quantity × unit_price`.
    pub fn line_total(&self) -> Decimal {
        self.unit_price * Decimal::from(self.quantity)
    }
}

/// What the order service publishes on `orders.events`.
// The variant names are the wire names (ORDER_CREATED …).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderEvent {
    /// An order was accepted (status PENDING).
    OrderCreated {
        /// The order.
        order_id: String,
        /// Who ordered.
        customer_id: String,
        /// What.
        items: Vec<OrderItem>,
        /// The order's total.
        total: Decimal,
    },
    /// The stock was reserved: the order is CONFIRMED.
    OrderConfirmed {
        /// The order.
        order_id: String,
        /// The order's total (confirmed revenue).
        total: Decimal,
    },
    /// The order was CANCELLED.
    OrderCancelled {
        /// The order.
        order_id: String,
        /// The order's total (lost revenue).
        total: Decimal,
        /// Why, for humans ("Not enough stock: LAPTOP-001 available 50, requested 100").
        reason: String,
        /// Why, as a category for analytics ("stock").
        reason_code: String,
    },
}

/// The commands the inventory accepts on `inventory.requests`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InventoryCommand {
    /// Reserve every item of an order, or none.
    Reserve {
        /// The order.
        order_id: String,
        /// What to reserve.
        items: Vec<OrderItem>,
    },
}

/// The inventory's answer to `RESERVE`, on `inventory.responses`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InventoryReply {
    /// Every item is reserved.
    Reserved {
        /// The order.
        order_id: String,
    },
    /// Nothing was reserved: this SKU is short.
    InsufficientStock {
        /// The order.
        order_id: String,
        /// The first SKU that is short.
        sku: String,
        /// How many of it are available.
        available: u32,
        /// How many the order asked for.
        requested: u32,
        /// Why ("Not enough stock", "Unknown SKU").
        reason: String,
    },
}

/// What the inventory publishes on `inventory.events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InventoryEvent {
    /// Stock was reserved for an order.
    InventoryReserved {
        /// The order.
        order_id: String,
        /// What was reserved.
        items: Vec<ReservedItem>,
    },
}

/// One SKU of a reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedItem {
    /// The product.
    pub sku: String,
    /// How many were reserved.
    pub quantity: u32,
}

/// Which email a notification request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotificationKind {
    /// "Your order is confirmed".
    OrderConfirmed,
    /// "Your order was cancelled: \<reason\>".
    OrderCancelled,
}

impl NotificationKind {
    /// `ORDER_CONFIRMED` or `ORDER_CANCELLED`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::OrderConfirmed => "ORDER_CONFIRMED",
            NotificationKind::OrderCancelled => "ORDER_CANCELLED",
        }
    }
}

/// A request to notify a customer, on `notifications.requests`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NotificationRequest {
    /// Which email.
    #[serde(rename = "type")]
    pub kind: NotificationKind,
    /// The order.
    pub order_id: String,
    /// The customer.
    pub customer_id: String,
    /// Where to send it.
    pub email: String,
    /// The order's total.
    pub total: Decimal,
    /// Why the order was cancelled, for cancellations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The notification service's answer to the order saga.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotificationReply {
    /// The email went out.
    Sent {
        /// On which attempt.
        attempts: u32,
    },
}

/// What the notification service publishes on `notifications.events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotificationEvent {
    /// A notification was delivered.
    NotificationSent {
        /// The order.
        order_id: String,
        /// Which notification.
        notification: NotificationKind,
        /// "email", or "sms" for the DLQ processor's fallback.
        channel: String,
        /// Attempts it took.
        attempts: u32,
    },
    /// A notification failed every attempt and was dead-lettered.
    NotificationFailed {
        /// The order.
        order_id: String,
        /// Which notification.
        notification: NotificationKind,
        /// Attempts made.
        retry_count: u32,
        /// Why it was given up.
        reason: String,
        /// The last attempt's error.
        last_error: String,
    },
}

/// Serializes a [`saga_core::Timestamp`] as RFC 3339 text
/// (`2026-11-27T18:38:01.200Z`) in API answers; use with
/// `#[serde(serialize_with = "crate::messages::rfc3339")]`.
pub fn rfc3339<S: serde::Serializer>(t: &saga_core::Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(t)
}

/// The `"type"` (events), `"action"` (commands) or `"status"` (replies)
/// field of a payload: what a message is, for humans.
pub fn message_type(payload: &serde_json::Value) -> String {
    ["type", "action", "status"]
        .iter()
        .find_map(|k| payload.get(k).and_then(|v| v.as_str()))
        .unwrap_or("?")
        .to_owned()
}
