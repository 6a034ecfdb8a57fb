//! The inventory service: a saga participant on `inventory.requests`.
//!
//! It reserves every item of an order or none (one lock over the whole
//! check-and-reserve), answers `RESERVED` or `INSUFFICIENT_STOCK` with the
//! numbers, and publishes `INVENTORY_RESERVED`. A redelivered request is
//! answered again by the runtime's ledger (same message id) without running
//! this code; a request for an order it already answered, under another
//! message id, gets the same answer from the per-order guard here, so stock
//! is never reserved twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use saga::{Participant, ParticipantContext, StepError};
use serde::Serialize;

use crate::messages::{
    InventoryCommand, InventoryEvent, InventoryReply, OrderItem, ReservedItem, INVENTORY_EVENTS,
};

/// The seed's catalogue: SKU and units on hand.
pub const CATALOGUE: &[(&str, u32)] = &[
    ("LAPTOP-001", 50),
    ("MOUSE-001", 200),
    ("KEYBOARD-001", 150),
    ("MONITOR-001", 30),
    ("HEADSET-001", 80),
];

/// Stock of one SKU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StockLevel {
    /// The product.
    pub sku: String,
    /// Units in the warehouse.
    pub on_hand: u32,
    /// Units promised to confirmed orders.
    pub reserved: u32,
    /// `on_hand - reserved`: what a new order can get.
    pub available: u32,
}

#[derive(Default)]
struct State {
    /// SKU → (on hand, reserved).
    stock: BTreeMap<String, (u32, u32)>,
    /// Order → the answer it got (the per-order idempotency guard).
    answered: HashMap<String, InventoryReply>,
}

/// The inventory: a participant, and a handle to query stock. Cheap to clone.
#[derive(Clone, Default)]
pub struct Inventory {
    state: Arc<Mutex<State>>,
}

impl Inventory {
    /// An inventory holding `catalogue` (SKU, units on hand), nothing reserved.
    pub fn new(catalogue: &[(&str, u32)]) -> Self {
        let stock = catalogue
            .iter()
            .map(|(sku, n)| ((*sku).to_owned(), (*n, 0)))
            .collect();
        Self {
            state: Arc::new(Mutex::new(State {
                stock,
                answered: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stock of `sku`, if the inventory carries it.
    pub fn level(&self, sku: &str) -> Option<StockLevel> {
        self.lock()
            .stock
            .get(sku)
            .map(|&(on_hand, reserved)| StockLevel {
                sku: sku.to_owned(),
                on_hand,
                reserved,
                available: on_hand - reserved,
            })
    }

    /// The stock of every SKU.
    pub fn levels(&self) -> Vec<StockLevel> {
        let skus: Vec<String> = self.lock().stock.keys().cloned().collect();
        skus.iter().filter_map(|s| self.level(s)).collect()
    }

    /// Reserves every item of `order_id` or none; answers a repeated order
    /// with its first answer. Returns the answer and whether stock changed.
    pub fn reserve(&self, order_id: &str, items: &[OrderItem]) -> (InventoryReply, bool) {
        let mut st = self.lock();
        if let Some(previous) = st.answered.get(order_id) {
            tracing::info!(order_id, "duplicate reservation request: answering again");
            return (previous.clone(), false);
        }
        // One order may list a SKU twice: check the sums.
        let mut wanted: BTreeMap<&str, u32> = BTreeMap::new();
        for item in items {
            *wanted.entry(item.sku.as_str()).or_default() += item.quantity;
        }
        let short = wanted.iter().find_map(|(&sku, &requested)| {
            let (reason, available) = match st.stock.get(sku) {
                None => ("Unknown SKU", 0),
                Some(&(on_hand, reserved)) => ("Not enough stock", on_hand - reserved),
            };
            (available < requested).then(|| InventoryReply::InsufficientStock {
                order_id: order_id.to_owned(),
                sku: sku.to_owned(),
                available,
                requested,
                reason: reason.to_owned(),
            })
        });
        let (reply, changed) = match short {
            Some(reply) => (reply, false),
            None => {
                for (sku, n) in &wanted {
                    if let Some((_, reserved)) = st.stock.get_mut(*sku) {
                        *reserved += n;
                    }
                }
                let reply = InventoryReply::Reserved {
                    order_id: order_id.to_owned(),
                };
                (reply, true)
            }
        };
        st.answered.insert(order_id.to_owned(), reply.clone());
        (reply, changed)
    }
}

#[async_trait]
impl Participant for Inventory {
    type Command = InventoryCommand;
    type Reply = InventoryReply;
    type Error = StepError;

    async fn handle(
        &self,
        command: InventoryCommand,
        ctx: &mut ParticipantContext,
    ) -> Result<InventoryReply, StepError> {
        match command {
            InventoryCommand::Reserve { order_id, items } => {
                let (reply, changed) = self.reserve(&order_id, &items);
                if changed {
                    let mut reserved: BTreeMap<&str, u32> = BTreeMap::new();
                    for item in &items {
                        *reserved.entry(item.sku.as_str()).or_default() += item.quantity;
                    }
                    let items = reserved
                        .into_iter()
                        .map(|(sku, quantity)| ReservedItem {
                            sku: sku.to_owned(),
                            quantity,
                        })
                        .collect();
                    ctx.emit(
                        INVENTORY_EVENTS,
                        &InventoryEvent::InventoryReserved { order_id, items },
                    );
                }
                Ok(reply)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn item(sku: &str, quantity: u32) -> OrderItem {
        OrderItem {
            sku: sku.into(),
            quantity,
            unit_price: Decimal::ONE,
        }
    }

    #[test]
    fn reserves_all_or_nothing_and_once_per_order() {
        let inv = Inventory::new(CATALOGUE);
        let (r, changed) = inv.reserve("o1", &[item("LAPTOP-001", 1), item("MOUSE-001", 2)]);
        assert!(matches!(r, InventoryReply::Reserved { .. }) && changed);
        let (again, changed) = inv.reserve("o1", &[item("LAPTOP-001", 1)]);
        assert_eq!(again, r);
        assert!(!changed);
        assert_eq!(inv.level("LAPTOP-001").unwrap().reserved, 1);
        let (short, _) = inv.reserve("o2", &[item("MOUSE-001", 1), item("LAPTOP-001", 100)]);
        assert_eq!(
            short,
            InventoryReply::InsufficientStock {
                order_id: "o2".into(),
                sku: "LAPTOP-001".into(),
                available: 49,
                requested: 100,
                reason: "Not enough stock".into(),
            }
        );
        assert_eq!(inv.level("MOUSE-001").unwrap().reserved, 2);
    }
}
