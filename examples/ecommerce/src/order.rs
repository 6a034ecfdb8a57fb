//! The order service: the saga orchestrator.
//!
//! The `order` saga, step by step:
//!
//! | step | kind | does | undone by |
//! |---|---|---|---|
//! | `create-order` | compensatable | PENDING, `ORDER_CREATED` | CANCELLED with the reason, `ORDER_CANCELLED` |
//! | `reserve-inventory` | **pivot** | `RESERVE` → `inventory.requests`, reply on `inventory.responses` | — |
//! | `confirm-order` | retryable | CONFIRMED, `ORDER_CONFIRMED` | never |
//! | `notify-confirmation` | retryable | asking `notifications.requests` for the ORDER_CONFIRMED email; if it fails for good, a dead letter on `notifications.dlq` and the saga goes on | never |
//!
//! `INSUFFICIENT_STOCK` fails the pivot with a permanent error whose message
//! carries the numbers, so `create-order`'s compensation cancels the order
//! with that reason, and the saga's `on_compensated` hook sends the
//! ORDER_CANCELLED email request (a fire-and-forget command: the
//! notification service retries it and dead-letters it on its own). Once the
//! stock is reserved the saga only goes forward: a failed email never
//! cancels a confirmed order.
//!
//! The confirmation email is a remote step rather than a fire-and-forget
//! command because the saga records its outcome in the order: `SENT`, or
//! `FAILED` when the notification service gave up (the step then writes the
//! dead letter, publishes `NOTIFICATION_FAILED` and the saga completes:
//! `on_exhausted(Exhausted::DeadLetterAndContinue)`).
//!
//! Every channel name goes through [`Topics`], so a system can run under a
//! topic namespace.

use std::time::Duration;

use rust_decimal::Decimal;
use saga_core::{
    Exhausted, RetryPolicy, SagaDefinition, SagaError, SagaInstance, SagaStatus, Step, StepContext,
    StepError, StepFailure, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::messages::{
    InventoryCommand, InventoryReply, NotificationEvent, NotificationKind, NotificationReply,
    NotificationRequest, OrderEvent, OrderItem, Topics, INVENTORY_REQUESTS, INVENTORY_RESPONSES,
    NOTIFICATIONS_DLQ, NOTIFICATIONS_EVENTS, NOTIFICATIONS_REQUESTS, NOTIFICATIONS_RESPONSES,
    ORDERS_DLQ, ORDERS_EVENTS,
};

/// The saga type's name.
pub const SAGA: &str = "order";

/// An order's business status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Accepted, stock not yet reserved.
    Pending,
    /// Stock reserved: the order will be fulfilled.
    Confirmed,
    /// Refused (not enough stock …): see the reason.
    Cancelled,
}

impl OrderStatus {
    /// `PENDING`, `CONFIRMED` or `CANCELLED`.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }
}

/// One change of an order's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// When.
    pub at: Timestamp,
    /// The new status.
    pub status: OrderStatus,
    /// Why.
    pub note: String,
}

/// What became of the customer's email, as the saga learnt it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationOutcome {
    /// `ORDER_CONFIRMED` or `ORDER_CANCELLED`.
    pub notification: String,
    /// `SENT` or `FAILED` (then the request is in `notifications.dlq`).
    pub status: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The saga data: the order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Its id (also the saga id and the message key).
    pub order_id: String,
    /// Who ordered.
    pub customer_id: String,
    /// What.
    pub items: Vec<OrderItem>,
    /// Sum of the lines, exact.
    pub total: Decimal,
    /// PENDING, CONFIRMED or CANCELLED.
    pub status: OrderStatus,
    /// Why it was cancelled.
    pub reason: Option<String>,
    /// Every status change.
    pub transitions: Vec<StatusChange>,
    /// The email's fate, once known.
    pub notification: Option<NotificationOutcome>,
}

impl Order {
    /// A new PENDING order; the total is the sum of the lines.
    pub fn new(order_id: String, customer_id: String, items: Vec<OrderItem>) -> Self {
        let total = items.iter().map(OrderItem::line_total).sum::<Decimal>();
        Self {
            order_id,
            customer_id,
            items,
            total: total.round_dp(2),
            status: OrderStatus::Pending,
            reason: None,
            transitions: Vec::new(),
            notification: None,
        }
    }

    fn set_status(&mut self, at: Timestamp, status: OrderStatus, note: impl Into<String>) {
        self.status = status;
        self.transitions.push(StatusChange {
            at,
            status,
            note: note.into(),
        });
    }

    fn notification(&self, kind: NotificationKind) -> NotificationRequest {
        NotificationRequest {
            kind,
            order_id: self.order_id.clone(),
            customer_id: self.customer_id.clone(),
            email: email_of(&self.customer_id),
            total: self.total,
            reason: self.reason.clone(),
        }
    }
}

/// The (fake) email address of a customer.
pub fn email_of(customer_id: &str) -> String {
    format!("{customer_id}@example.com")
}

/// A short category for a cancellation reason, for analytics.
pub fn reason_code(reason: &str) -> &'static str {
    if reason.contains("stock") {
        "stock"
    } else if reason.contains("Unknown SKU") {
        "unknown_sku"
    } else if reason.contains("timed out") {
        "timeout"
    } else {
        "other"
    }
}

/// Timings of the saga's remote steps.
#[derive(Clone, Debug)]
pub struct OrderPolicy {
    /// Deadline of one `RESERVE` attempt.
    pub reserve_timeout: Duration,
    /// Deadline of one notification request. It must cover the
    /// notification service's whole retry budget (3 × 5 s + 2 s + 4 s =
    /// 21 s); the runtime refuses to register the two otherwise.
    pub notify_timeout: Duration,
}

impl Default for OrderPolicy {
    fn default() -> Self {
        Self {
            reserve_timeout: Duration::from_secs(10),
            notify_timeout: Duration::from_secs(60),
        }
    }
}

fn on_notification_reply(
    ctx: &mut StepContext<'_, Order>,
    kind: NotificationKind,
    reply: NotificationReply,
) -> Result<(), StepError> {
    let NotificationReply::Sent { attempts } = reply;
    ctx.data_mut().notification = Some(NotificationOutcome {
        notification: kind.as_str().into(),
        status: "SENT".into(),
        attempts,
        last_error: None,
    });
    Ok(())
}

/// The confirmation email failed for good (the notification service gave
/// up after its attempts): the order records it and tells the world; the
/// order stays CONFIRMED.
fn on_notification_failed(
    ctx: &mut StepContext<'_, Order>,
    kind: NotificationKind,
    events: &str,
    failure: &StepFailure,
) {
    let order = ctx.data_mut();
    order.notification = Some(NotificationOutcome {
        notification: kind.as_str().into(),
        status: "FAILED".into(),
        attempts: failure.attempts,
        last_error: Some(failure.error.clone()),
    });
    let event = NotificationEvent::NotificationFailed {
        order_id: order.order_id.clone(),
        notification: kind,
        retry_count: failure.attempts,
        reason: failure.reason.clone(),
        last_error: failure.error.clone(),
    };
    ctx.emit(events, &event);
}

/// The `order` saga, on the channels of `topics` (its name is
/// `topics.name("order")`).
pub fn saga(policy: &OrderPolicy, topics: &Topics) -> Result<SagaDefinition<Order>, SagaError> {
    let notification_events = topics.name(NOTIFICATIONS_EVENTS);
    let events = topics.name(ORDERS_EVENTS);
    let (created_events, cancelled_events, confirmed_events) =
        (events.clone(), events.clone(), events);
    let notifications = topics.name(NOTIFICATIONS_REQUESTS);
    SagaDefinition::<Order>::builder(topics.name(SAGA))
        .dead_letter_channel(topics.name(ORDERS_DLQ))
        .step(
            Step::local("create-order", move |ctx: &mut StepContext<'_, Order>| {
                let now = ctx.now();
                let o = ctx.data_mut();
                o.set_status(now, OrderStatus::Pending, "order created");
                let event = OrderEvent::OrderCreated {
                    order_id: o.order_id.clone(),
                    customer_id: o.customer_id.clone(),
                    items: o.items.clone(),
                    total: o.total,
                };
                ctx.emit(created_events.clone(), &event);
                Ok(())
            })
            .compensate_local(move |ctx| {
                let now = ctx.now();
                let reason = ctx
                    .failure_reason()
                    .unwrap_or("cancelled by the system")
                    .to_owned();
                let o = ctx.data_mut();
                o.reason = Some(reason.clone());
                o.set_status(now, OrderStatus::Cancelled, reason.clone());
                let event = OrderEvent::OrderCancelled {
                    order_id: o.order_id.clone(),
                    total: o.total,
                    reason_code: reason_code(&reason).into(),
                    reason,
                };
                ctx.emit(cancelled_events.clone(), &event);
                Ok(())
            }),
        )
        .step(
            Step::remote("reserve-inventory", topics.name(INVENTORY_REQUESTS))
                .command(|o: &Order| InventoryCommand::Reserve {
                    order_id: o.order_id.clone(),
                    items: o.items.clone(),
                })
                .on_reply(|_ctx, reply: InventoryReply| match reply {
                    InventoryReply::Reserved { .. } => Ok(()),
                    InventoryReply::InsufficientStock {
                        sku,
                        available,
                        requested,
                        reason,
                        ..
                    } => Err(StepError::permanent(format!(
                        "{reason}: {sku} available {available}, requested {requested}"
                    ))),
                })
                .reply_to(topics.name(INVENTORY_RESPONSES))
                .retry(
                    RetryPolicy::exponential(Duration::from_millis(500), 2.0).with_max_attempts(3),
                )
                .timeout(policy.reserve_timeout)
                .pivot(),
        )
        .step(
            Step::local("confirm-order", move |ctx: &mut StepContext<'_, Order>| {
                let now = ctx.now();
                let o = ctx.data_mut();
                o.set_status(now, OrderStatus::Confirmed, "stock reserved");
                let event = OrderEvent::OrderConfirmed {
                    order_id: o.order_id.clone(),
                    total: o.total,
                };
                ctx.emit(confirmed_events.clone(), &event);
                Ok(())
            })
            .retryable(),
        )
        .step(
            // The notification service makes the attempts (the seed's 3,
            // 2 s then 4 s apart); the step waits for its answer and, if it
            // gave up, dead-letters the request and goes on.
            Step::remote("notify-confirmation", notifications.clone())
                .command(|o: &Order| o.notification(NotificationKind::OrderConfirmed))
                .on_reply(|ctx, reply: NotificationReply| {
                    on_notification_reply(ctx, NotificationKind::OrderConfirmed, reply)
                })
                .reply_to(topics.name(NOTIFICATIONS_RESPONSES))
                .retry(RetryPolicy::no_retry())
                .timeout(policy.notify_timeout)
                .retryable()
                .on_exhausted(Exhausted::DeadLetterAndContinue)
                .dead_letter_channel(topics.name(NOTIFICATIONS_DLQ))
                .on_give_up(move |ctx, failure| {
                    on_notification_failed(
                        ctx,
                        NotificationKind::OrderConfirmed,
                        &notification_events,
                        failure,
                    )
                }),
        )
        // The cancellation email: after `create-order`'s compensation has put
        // the reason in the order, in the same transition.
        .on_compensated(move |ctx| {
            let request = ctx.data().notification(NotificationKind::OrderCancelled);
            ctx.send(notifications.clone(), &request);
        })
        .build()
}

/// A client's order, as posted to `POST /orders` (validated by [`validate`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// Who orders.
    pub customer_id: String,
    /// What (at least one line).
    pub items: Vec<ItemRequest>,
}

/// One line of an [`OrderRequest`]. Quantity and price are checked by
/// [`validate`], so they are read loosely here to say exactly what is wrong.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    /// The product.
    pub sku: String,
    /// How many (must be ≥ 1).
    pub quantity: i64,
    /// Optional: the unit price the client expects, a decimal string like
    /// "999.99" (a JSON number is accepted too). The price is the
    /// catalogue's: absent, the line costs the catalogue's price; equal to
    /// it, accepted; different, the order is refused (422), so a client
    /// never pays a price it did not see, and never chooses one.
    #[serde(default)]
    pub unit_price: Option<Value>,
}

/// What is wrong with an order request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// Which field (`items[1].quantity`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Most lines per order, and most units per line.
pub const MAX_ITEMS: usize = 100;
/// Most units per line.
pub const MAX_QUANTITY: i64 = 10_000;

/// Parses a price: a positive decimal with at most 2 decimal places.
pub fn parse_price(v: &Value) -> Result<Decimal, String> {
    let text = match v {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(format!(
                "must be a decimal string like \"999.99\", got {other}"
            ))
        }
    };
    let price: Decimal = text
        .parse()
        .map_err(|_| format!("`{text}` is not a decimal number (use a string like \"999.99\")"))?;
    if price <= Decimal::ZERO {
        return Err(format!("must be greater than 0, got {text}"));
    }
    if price.scale() > 2 && price.normalize().scale() > 2 {
        return Err(format!("`{text}` has more than 2 decimal places"));
    }
    if price > Decimal::from(1_000_000) {
        return Err(format!("`{text}` is more than 1000000"));
    }
    let mut price = price.normalize();
    price.rescale(2);
    Ok(price)
}

/// Checks a request against the catalogue (`price_of`: the list price of
/// a SKU, `None` if unknown) and builds the lines, at the catalogue's
/// prices. A line's `unit_price`, when given, must be well-formed and
/// equal to the catalogue's.
pub fn validate(
    req: &OrderRequest,
    price_of: impl Fn(&str) -> Option<Decimal>,
) -> Result<Vec<OrderItem>, Invalid> {
    if req.customer_id.trim().is_empty() {
        return Err(invalid("customer_id", "must not be empty"));
    }
    if req.customer_id.len() > 64
        || !req
            .customer_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(invalid(
            "customer_id",
            "must be at most 64 letters, digits, '-', '_' or '.'",
        ));
    }
    if req.items.is_empty() {
        return Err(invalid("items", "an order needs at least one item"));
    }
    if req.items.len() > MAX_ITEMS {
        return Err(invalid(
            "items",
            format!(
                "at most {MAX_ITEMS} items per order, got {}",
                req.items.len()
            ),
        ));
    }
    let mut lines = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.iter().enumerate() {
        let at = |f: &str| format!("items[{i}].{f}");
        let Some(list_price) = price_of(&item.sku) else {
            return Err(invalid(at("sku"), format!("unknown SKU `{}`", item.sku)));
        };
        if item.quantity <= 0 {
            return Err(invalid(
                at("quantity"),
                format!("must be at least 1, got {}", item.quantity),
            ));
        }
        if item.quantity > MAX_QUANTITY {
            return Err(invalid(
                at("quantity"),
                format!("must be at most {MAX_QUANTITY}, got {}", item.quantity),
            ));
        }
        if let Some(asked) = &item.unit_price {
            let asked = parse_price(asked)
                .map_err(|m| invalid(at("unit_price"), format!("malformed price: {m}")))?;
            if asked != list_price {
                return Err(invalid(
                    at("unit_price"),
                    format!(
                        "{} costs {list_price}, not {asked} (leave unit_price out to pay the \
                         catalogue's price)",
                        item.sku
                    ),
                ));
            }
        }
        let mut unit_price = list_price;
        unit_price.rescale(2);
        lines.push(OrderItem {
            sku: item.sku.clone(),
            quantity: item.quantity as u32,
            unit_price,
        });
    }
    Ok(lines)
}

/// An order as served by `GET /orders/{id}`.
#[derive(Clone, Debug, Serialize)]
pub struct OrderView {
    /// The id.
    pub order_id: String,
    /// The customer.
    pub customer_id: String,
    /// PENDING, CONFIRMED or CANCELLED.
    pub status: OrderStatus,
    /// The total, exact.
    pub total: Decimal,
    /// The lines.
    pub items: Vec<OrderItem>,
    /// Why it was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The email's fate, once known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification: Option<NotificationOutcome>,
    /// Status changes, oldest first.
    pub history: Vec<HistoryLine>,
    /// The saga's own status: running, compensating, completed,
    /// compensated or parked.
    pub saga_status: String,
    /// The saga engine's log of this order.
    pub saga_history: Vec<HistoryLine>,
}

/// One line of an order's history in API answers.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryLine {
    /// When, as RFC 3339 text.
    pub at: String,
    /// The order's status (or the saga's, in `saga_history`) after it.
    pub status: String,
    /// What happened.
    pub note: String,
}

impl From<SagaInstance<Order>> for OrderView {
    fn from(inst: SagaInstance<Order>) -> Self {
        let saga_status = match &inst.status {
            SagaStatus::Parked { reason } => format!("parked: {reason}"),
            s => s.name().to_owned(),
        };
        let o = inst.data;
        Self {
            order_id: o.order_id,
            customer_id: o.customer_id,
            status: o.status,
            total: o.total,
            items: o.items,
            reason: o.reason,
            notification: o.notification,
            history: o
                .transitions
                .into_iter()
                .map(|t| HistoryLine {
                    at: t.at.to_string(),
                    status: t.status.as_str().into(),
                    note: t.note,
                })
                .collect(),
            saga_status,
            saga_history: inst
                .history
                .into_iter()
                .map(|h| HistoryLine {
                    at: h.at.to_string(),
                    status: h.status.into_owned(),
                    note: h.what.to_string(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prices_are_exact_and_checked() {
        assert_eq!(parse_price(&json!("999.99")).unwrap().to_string(), "999.99");
        assert_eq!(parse_price(&json!("1000")).unwrap().to_string(), "1000.00");
        assert_eq!(parse_price(&json!(29.99)).unwrap().to_string(), "29.99");
        assert!(parse_price(&json!("9.999")).is_err());
        assert!(parse_price(&json!("abc")).is_err());
        assert!(parse_price(&json!("-1")).is_err());
        assert!(parse_price(&json!(null)).is_err());
    }

    #[test]
    fn total_is_the_exact_sum() {
        let items = vec![
            OrderItem {
                sku: "LAPTOP-001".into(),
                quantity: 1,
                unit_price: parse_price(&json!("999.99")).unwrap(),
            },
            OrderItem {
                sku: "MOUSE-001".into(),
                quantity: 2,
                unit_price: parse_price(&json!("29.99")).unwrap(),
            },
        ];
        let o = Order::new("o".into(), "c".into(), items);
        assert_eq!(o.total.to_string(), "1059.97");
    }

    fn request(items: Value) -> OrderRequest {
        serde_json::from_value(json!({"customer_id": "c-1", "items": items})).unwrap()
    }

    fn list_price(sku: &str) -> Option<Decimal> {
        (sku == "MOUSE-001").then(|| Decimal::new(2_999, 2))
    }

    #[test]
    fn the_catalogue_sets_the_price_and_a_different_one_is_refused() {
        let absent = validate(
            &request(json!([{"sku": "MOUSE-001", "quantity": 2}])),
            list_price,
        )
        .unwrap();
        assert_eq!(absent[0].unit_price.to_string(), "29.99");
        let equal = validate(
            &request(json!([{"sku": "MOUSE-001", "quantity": 1, "unit_price": "29.990"}])),
            list_price,
        )
        .unwrap();
        assert_eq!(equal[0].unit_price.to_string(), "29.99");
        let cheaper = validate(
            &request(json!([{"sku": "MOUSE-001", "quantity": 1, "unit_price": "0.01"}])),
            list_price,
        )
        .unwrap_err();
        assert_eq!(cheaper.field, "items[0].unit_price");
        assert!(cheaper
            .message
            .starts_with("MOUSE-001 costs 29.99, not 0.01"));
    }

    #[test]
    fn the_saga_definition_is_valid() {
        let def = saga(&OrderPolicy::default(), &Topics::default()).unwrap();
        assert_eq!(def.steps().len(), 4);
        assert_eq!(def.name(), "order");
        let prefixed = saga(&OrderPolicy::default(), &Topics::new("t1.")).unwrap();
        assert_eq!(prefixed.name(), "t1.order");
    }
}
