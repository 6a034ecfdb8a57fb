//! A readable timeline of one order: its status changes, every message of
//! it on every channel, and every email attempt, in time order.
//!
//! On Kafka the messages come from the process's channel log (a projection
//! over every topic, see `system.rs`), and email attempts are known only in
//! the process that runs the notification service.

use saga_core::{DeadLetter, Envelope, ReplyOutcome, Timestamp};
use serde::Serialize;

use crate::messages::*;
use crate::order::{Order, OrderStatus};
use crate::system::System;

/// One line of a timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Line {
    /// When.
    #[serde(serialize_with = "crate::messages::rfc3339")]
    pub at: Timestamp,
    /// Seconds since the order was created.
    pub offset_secs: f64,
    /// The channel, or "order" for status changes and "email" for attempts.
    pub source: String,
    /// What happened.
    pub text: String,
    #[serde(skip)]
    rank: u8,
}

fn items(items: &[OrderItem]) -> String {
    items
        .iter()
        .map(|i| format!("{} ×{}", i.sku, i.quantity))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a message says, in a few words, and its rank among messages
/// written in the same millisecond (causal order).
fn describe(env: &Envelope, channel: &str) -> (u8, String) {
    if let Some(ReplyOutcome::Failure {
        error, attempts, ..
    }) = &env.outcome
    {
        return (
            11,
            format!("answer to the saga: FAILED after {attempts} attempt(s) ({error})"),
        );
    }
    let p = &env.payload;
    let ty = message_type(p);
    let attempt = if env.attempt > 1 {
        format!(" (attempt {})", env.attempt)
    } else {
        String::new()
    };
    match channel {
        ORDERS_EVENTS => match serde_json::from_value::<OrderEvent>(p.clone()) {
            Ok(OrderEvent::OrderCreated { total, items: i, .. }) => {
                (1, format!("ORDER_CREATED: {}; total {total}", items(&i)))
            }
            Ok(OrderEvent::OrderConfirmed { total, .. }) => {
                (6, format!("ORDER_CONFIRMED: revenue {total}"))
            }
            Ok(OrderEvent::OrderCancelled { reason, total, .. }) => {
                (6, format!("ORDER_CANCELLED: {reason}; lost {total}"))
            }
            Err(_) => (6, ty),
        },
        INVENTORY_REQUESTS => match serde_json::from_value::<InventoryCommand>(p.clone()) {
            Ok(InventoryCommand::Reserve { items: i, .. }) => {
                (2, format!("RESERVE {}{attempt}", items(&i)))
            }
            Err(_) => (2, ty),
        },
        INVENTORY_RESPONSES => match serde_json::from_value::<InventoryReply>(p.clone()) {
            Ok(InventoryReply::Reserved { .. }) => (3, "RESERVED".into()),
            Ok(InventoryReply::InsufficientStock {
                sku,
                available,
                requested,
                reason,
                ..
            }) => (
                3,
                format!("INSUFFICIENT_STOCK: {reason}: {sku} available {available}, requested {requested}"),
            ),
            Err(_) => (3, ty),
        },
        INVENTORY_EVENTS => (4, ty),
        NOTIFICATIONS_REQUESTS => match serde_json::from_value::<NotificationRequest>(p.clone()) {
            Ok(r) => (
                7,
                format!("{} email request to {}{attempt}", r.kind.as_str(), r.email),
            ),
            Err(_) => (7, ty),
        },
        NOTIFICATIONS_RESPONSES => match serde_json::from_value::<NotificationReply>(p.clone()) {
            Ok(NotificationReply::Sent { attempts }) => {
                (11, format!("answer to the saga: SENT (attempts: {attempts})"))
            }
            Err(_) => (11, ty),
        },
        NOTIFICATIONS_EVENTS => match serde_json::from_value::<NotificationEvent>(p.clone()) {
            Ok(NotificationEvent::NotificationSent {
                channel, attempts, ..
            }) => (
                10,
                format!("NOTIFICATION_SENT by {channel} (attempts: {attempts})"),
            ),
            Ok(NotificationEvent::NotificationFailed {
                retry_count,
                last_error,
                ..
            }) => (
                10,
                format!("NOTIFICATION_FAILED after {retry_count} attempts ({last_error})"),
            ),
            Err(_) => (10, ty),
        },
        NOTIFICATIONS_DLQ | ORDERS_DLQ => match DeadLetter::from_envelope(env) {
            Ok(d) => (
                9,
                format!(
                    "dead letter: {}; retry_count {}; last_error \"{}\"",
                    d.reason, d.retry_count, d.last_error
                ),
            ),
            Err(_) => (9, ty),
        },
        _ => (12, ty),
    }
}

/// The timeline of `order_id`, oldest first (empty if unknown).
pub async fn of(system: &System, order_id: &str) -> Vec<Line> {
    let Ok(Some(inst)) = system.order(order_id).await else {
        return Vec::new();
    };
    let order: &Order = &inst.data;
    let mut lines = Vec::new();
    let mut push = |at: Timestamp, rank: u8, source: &str, text: String| {
        lines.push(Line {
            at,
            offset_secs: 0.0,
            source: source.into(),
            text,
            rank,
        })
    };
    for t in &order.transitions {
        let rank = if t.status == OrderStatus::Pending {
            0
        } else {
            5
        };
        push(
            t.at,
            rank,
            "order",
            format!("status {} ({})", t.status.as_str(), t.note),
        );
    }
    for channel in ALL_CHANNELS {
        for env in system.read(&system.topics.name(channel)) {
            if env.saga_id.as_str() == order_id {
                let (rank, text) = describe(&env, channel);
                push(env.timestamp, rank, channel, text);
            }
        }
    }
    let attempts = system
        .notifications
        .as_ref()
        .map(|n| n.attempts_for(order_id))
        .unwrap_or_default();
    for a in attempts {
        let took = a.ended_at.saturating_since(a.started_at).as_secs_f64();
        push(
            a.started_at,
            8,
            "email",
            format!(
                "{} email attempt {}: {} ({took:.1} s)",
                a.notification, a.attempt, a.outcome
            ),
        );
    }
    lines.sort_by_key(|l| (l.at, l.rank));
    let start = inst.created_at;
    for l in &mut lines {
        l.offset_secs = l.at.saturating_since(start).as_secs_f64();
    }
    lines
}

/// The timeline as text, one line each: `+  7.004s  notifications.requests  …`.
pub fn render(lines: &[Line]) -> String {
    let mut out = String::new();
    for l in lines {
        out.push_str(&format!(
            "  +{:>7.3}s  {:<24} {}\n",
            l.offset_secs, l.source, l.text
        ));
    }
    out
}
