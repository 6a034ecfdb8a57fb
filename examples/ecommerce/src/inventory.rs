//! The inventory service: a saga participant on `inventory.requests`.
//!
//! It reserves every item of an order or none (one lock over the whole
//! check-and-reserve), answers `RESERVED` or `INSUFFICIENT_STOCK` with the
//! numbers, and publishes `INVENTORY_RESERVED`. A redelivered request is
//! answered again by the runtime's ledger (same message id) without running
//! this code; another attempt of the same step (the saga retried it, or an
//! operator did: a new message id, the same business key) gets the first
//! answer from the runtime too, as the service runs with
//! [`ParticipantPolicy::remember_steps`](saga_core::ParticipantPolicy::remember_steps):
//! stock is never reserved twice for one order within the policy's dedupe
//! horizon (an hour by default; keep it longer than any order can wait
//! for an operator). So the service keeps only stock, never a per-order
//! record: its state does not grow with the orders it served.
//!
//! ## Stock shards (on Kafka, and with several instances)
//!
//! Requests are keyed by order id, so two inventory instances see different
//! orders: if each kept the whole catalogue, each could sell the same last
//! laptop. So on Kafka the stock is **one shard per partition of
//! `inventory.requests`**: the catalogue's units are split across the
//! partitions (LAPTOP-001: 50 over 3 partitions is 17 / 17 / 16), and an
//! order is served from the shard of its partition only. A shard is the
//! participant's per-partition state ([`Participant::snapshot`] /
//! [`Participant::restore`], [`ParticipantContext::partition`]): the runtime
//! persists it in the same transaction as the replies and the consumed
//! offsets, and hands it to whichever instance owns the partition after a
//! crash or a rebalance. Only one instance owns a partition at a time, so
//! a unit is never sold twice, however many instances run. An instance
//! shows only the shards it serves now
//! ([`Participant::revoke`] drops a shard
//! that moved away).
//!
//! The price of this, a deliberate trade-off: an order is refused when
//! *its* shard is short even if another shard still has the units (flow 2
//! then reports its shard's `available`, e.g. 17, not 50), and a single
//! order can never take more than one shard holds. Rebalancing stock
//! between shards would need a saga of its own (move units from shard A to
//! shard B with compensation); the example does not do it.
//!
//! The embedded in-memory system (`cargo run --example ecommerce`, `serve`
//! without `--kafka`) keeps **one shard** for the whole catalogue: a single
//! process serves every partition there, so nothing can be oversold, and
//! the demo's numbers stay those of the design (50 laptops, "available 49").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use saga_core::{Participant, ParticipantContext, StepError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// The seed's list prices, in cents, of the SKUs of [`CATALOGUE`]: the
/// price of an order line is the server's, never the client's (see
/// `order::validate`).
pub const PRICES: &[(&str, i64)] = &[
    ("LAPTOP-001", 99_999),
    ("MOUSE-001", 2_999),
    ("KEYBOARD-001", 7_999),
    ("MONITOR-001", 24_950),
    ("HEADSET-001", 5_999),
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

/// One shard of stock: what one partition of `inventory.requests` sells
/// from (the whole catalogue when unsharded). Persisted as the
/// participant's per-partition state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Shard {
    /// SKU → (on hand, reserved).
    stock: BTreeMap<String, (u32, u32)>,
}

impl Shard {
    /// The shard as JSON, built by hand (so there is no encoding to fail):
    /// what `Shard`'s `Deserialize` reads back.
    fn to_json(&self) -> Value {
        let stock = self
            .stock
            .iter()
            .map(|(sku, (on_hand, reserved))| (sku.clone(), Value::from(vec![*on_hand, *reserved])))
            .collect::<serde_json::Map<_, _>>();
        let mut shard = serde_json::Map::new();
        shard.insert("stock".into(), Value::Object(stock));
        Value::Object(shard)
    }

    fn level(&self, sku: &str) -> Option<StockLevel> {
        self.stock.get(sku).map(|&(on_hand, reserved)| StockLevel {
            sku: sku.to_owned(),
            on_hand,
            reserved,
            available: on_hand - reserved,
        })
    }
}

/// One shard this process serves, as `GET /inventory` shows it (`shards`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShardView {
    /// The partition of `inventory.requests` it belongs to (0 when unsharded).
    pub partition: u32,
    /// Its stock.
    pub stock: Vec<StockLevel>,
}

struct State {
    /// The whole catalogue (SKU, units on hand).
    catalogue: Vec<(String, u32)>,
    /// `Some(n)`: one shard per partition of `n`; `None`: one shard.
    partitions: Option<u32>,
    /// The shards this process serves now.
    shards: BTreeMap<u32, Shard>,
}

impl State {
    fn fresh_shard(&self, index: u32) -> Shard {
        let n = self.partitions.unwrap_or(1).max(1);
        let stock = self
            .catalogue
            .iter()
            .map(|(sku, total)| {
                let extra = u32::from(index < total % n);
                (sku.clone(), (total / n + extra, 0))
            })
            .collect();
        Shard { stock }
    }

    fn shard_index(&self, partition: u32) -> u32 {
        if self.partitions.is_some() {
            partition
        } else {
            0
        }
    }

    fn shard_mut(&mut self, partition: u32) -> &mut Shard {
        let i = self.shard_index(partition);
        if !self.shards.contains_key(&i) {
            let fresh = self.fresh_shard(i);
            self.shards.insert(i, fresh);
        }
        self.shards.get_mut(&i).expect("just inserted")
    }
}

/// The inventory: a participant, and a handle to query stock. Cheap to clone.
#[derive(Clone)]
pub struct Inventory {
    state: Arc<Mutex<State>>,
    events: String,
    /// Set: the warehouse system is down and every command fails with
    /// this (retryable) error (fault injection, as the fake email API's).
    down: Arc<Mutex<Option<String>>>,
}

impl Inventory {
    fn with(catalogue: &[(&str, u32)], partitions: Option<u32>) -> Self {
        let mut st = State {
            catalogue: catalogue
                .iter()
                .map(|(sku, n)| ((*sku).to_owned(), *n))
                .collect(),
            partitions,
            shards: BTreeMap::new(),
        };
        if partitions.is_none() {
            // One shard, always served; sharded, a shard comes with its
            // partition (`restore`).
            let fresh = st.fresh_shard(0);
            st.shards.insert(0, fresh);
        }
        Self {
            state: Arc::new(Mutex::new(st)),
            events: INVENTORY_EVENTS.into(),
            down: Arc::default(),
        }
    }

    /// Makes every command fail with the retryable error `why` (the
    /// warehouse system down) until called with `None`: a reservation then
    /// retries, and its saga parks with the outcome unknown, for an
    /// operator to retry once the fault is fixed.
    pub fn set_down(&self, why: Option<&str>) {
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) = why.map(str::to_owned);
    }

    /// An inventory holding `catalogue` (SKU, units on hand) in one shard,
    /// nothing reserved (the embedded in-memory system).
    pub fn new(catalogue: &[(&str, u32)]) -> Self {
        Self::with(catalogue, None)
    }

    /// An inventory whose stock is split into one shard per partition of
    /// `inventory.requests` (see the module docs).
    pub fn sharded(catalogue: &[(&str, u32)], partitions: u32) -> Self {
        Self::with(catalogue, Some(partitions.max(1)))
    }

    /// Publishes its events on `channel` instead of `inventory.events`.
    pub fn events_on(mut self, channel: impl Into<String>) -> Self {
        self.events = channel.into();
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stock of `sku` summed over the shards this process has, if the
    /// inventory carries it. Exact when one process serves every
    /// partition; with several instances see [`Inventory::shards`].
    pub fn level(&self, sku: &str) -> Option<StockLevel> {
        let st = self.lock();
        let mut total: Option<StockLevel> = None;
        for shard in st.shards.values() {
            if let Some(l) = shard.level(sku) {
                let t = total.get_or_insert(StockLevel {
                    sku: sku.to_owned(),
                    on_hand: 0,
                    reserved: 0,
                    available: 0,
                });
                t.on_hand += l.on_hand;
                t.reserved += l.reserved;
                t.available += l.available;
            }
        }
        total
    }

    /// The stock of every SKU (see [`Inventory::level`]).
    pub fn levels(&self) -> Vec<StockLevel> {
        let skus: Vec<String> = self
            .lock()
            .catalogue
            .iter()
            .map(|(s, _)| s.clone())
            .collect();
        skus.iter().filter_map(|s| self.level(s)).collect()
    }

    /// Every shard this process serves now, with its stock.
    pub fn shards(&self) -> Vec<ShardView> {
        let st = self.lock();
        st.shards
            .iter()
            .map(|(&partition, shard)| ShardView {
                partition,
                stock: shard
                    .stock
                    .keys()
                    .filter_map(|sku| shard.level(sku))
                    .collect(),
            })
            .collect()
    }

    /// Whether the stock is split per partition.
    pub fn is_sharded(&self) -> bool {
        self.lock().partitions.is_some()
    }

    /// Reserves every item of `order_id` or none, from the shard of
    /// `partition`. Returns the answer and whether stock changed. (A
    /// repeated request never reaches it: the runtime answers it.)
    pub fn reserve(
        &self,
        partition: u32,
        order_id: &str,
        items: &[OrderItem],
    ) -> (InventoryReply, bool) {
        let mut st = self.lock();
        let shard = st.shard_mut(partition);
        // One order may list a SKU twice: check the sums.
        let mut wanted: BTreeMap<&str, u32> = BTreeMap::new();
        for item in items {
            *wanted.entry(item.sku.as_str()).or_default() += item.quantity;
        }
        let short = wanted.iter().find_map(|(&sku, &requested)| {
            let (reason, available) = match shard.stock.get(sku) {
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
                    if let Some((_, reserved)) = shard.stock.get_mut(*sku) {
                        *reserved += n;
                    }
                }
                let reply = InventoryReply::Reserved {
                    order_id: order_id.to_owned(),
                };
                (reply, true)
            }
        };
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
        if let Some(why) = self.down.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(StepError::retryable(why));
        }
        match command {
            InventoryCommand::Reserve { order_id, items } => {
                let (reply, changed) = self.reserve(ctx.partition(), &order_id, &items);
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
                        self.events.clone(),
                        &InventoryEvent::InventoryReserved { order_id, items },
                    );
                }
                Ok(reply)
            }
        }
    }

    /// The shard of `partition`, when sharded (persisted by the runtime with
    /// the replies). Unsharded, the in-memory process holds the only copy.
    fn snapshot(&self, partition: u32) -> Option<Value> {
        let st = self.lock();
        st.partitions?;
        st.shards.get(&partition).map(Shard::to_json)
    }

    /// Installs the shard of a partition this instance now serves: its last
    /// persisted state, or its fresh share of the catalogue. A shard that
    /// does not decode is refused (the partition is not served) rather than
    /// restarted from the catalogue, which would sell reserved units again.
    fn restore(
        &self,
        partition: u32,
        snapshot: Option<Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut st = self.lock();
        if st.partitions.is_none() {
            return Ok(());
        }
        let shard = match snapshot {
            Some(v) => serde_json::from_value::<Shard>(v)?,
            None => st.fresh_shard(partition),
        };
        tracing::info!(partition, "stock shard restored");
        st.shards.insert(partition, shard);
        Ok(())
    }

    /// The partition moved to another instance: its shard is no longer
    /// this one's to sell from or show.
    fn revoke(&self, partition: u32) {
        let mut st = self.lock();
        if st.partitions.is_some() {
            st.shards.remove(&partition);
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
    fn reserves_all_or_nothing() {
        let inv = Inventory::new(CATALOGUE);
        let (r, changed) = inv.reserve(0, "o1", &[item("LAPTOP-001", 1), item("MOUSE-001", 2)]);
        assert!(matches!(r, InventoryReply::Reserved { .. }) && changed);
        assert_eq!(inv.level("LAPTOP-001").unwrap().reserved, 1);
        let (short, changed) =
            inv.reserve(1, "o2", &[item("MOUSE-001", 1), item("LAPTOP-001", 100)]);
        assert!(!changed);
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

#[cfg(test)]
mod shard_tests {
    use super::*;
    use rust_decimal::Decimal;

    fn laptops(n: u32) -> Vec<OrderItem> {
        vec![OrderItem {
            sku: "LAPTOP-001".into(),
            quantity: n,
            unit_price: Decimal::ONE,
        }]
    }

    #[test]
    fn the_catalogue_is_split_across_partitions_and_each_shard_sells_its_own() {
        let inv = Inventory::sharded(CATALOGUE, 3);
        for p in 0..3 {
            inv.restore(p, None).unwrap();
        }
        let on_hand: Vec<u32> = inv
            .shards()
            .iter()
            .map(|s| {
                s.stock
                    .iter()
                    .find(|l| l.sku == "LAPTOP-001")
                    .unwrap()
                    .on_hand
            })
            .collect();
        assert_eq!(on_hand, [17, 17, 16]);
        assert_eq!(inv.level("LAPTOP-001").unwrap().on_hand, 50);
        let (r, _) = inv.reserve(2, "o1", &laptops(17));
        assert!(
            matches!(
                r,
                InventoryReply::InsufficientStock {
                    available: 16,
                    requested: 17,
                    ..
                }
            ),
            "{r:?}"
        );
        let (r, changed) = inv.reserve(0, "o2", &laptops(17));
        assert!(matches!(r, InventoryReply::Reserved { .. }) && changed);
        // The shard moves with its partition: a new owner restores it.
        let other = Inventory::sharded(CATALOGUE, 3);
        other.restore(0, inv.snapshot(0)).unwrap();
        let (r, changed) = other.reserve(0, "o3", &laptops(1));
        assert!(matches!(r, InventoryReply::InsufficientStock { available: 0, .. }) && !changed);
    }

    #[test]
    fn a_shard_holds_stock_only_however_many_orders_it_served() {
        let inv = Inventory::sharded(CATALOGUE, 1);
        inv.restore(0, None).unwrap();
        let before = inv.snapshot(0).unwrap().to_string().len();
        for i in 0..1000 {
            inv.reserve(0, &format!("o{i}"), &[]);
        }
        assert_eq!(inv.snapshot(0).unwrap().to_string().len(), before);
    }

    #[test]
    fn only_the_shards_served_now_are_shown() {
        let inv = Inventory::sharded(CATALOGUE, 3);
        assert!(
            inv.shards().is_empty(),
            "nothing before a partition is assigned"
        );
        inv.restore(1, None).unwrap();
        inv.restore(2, None).unwrap();
        inv.revoke(1);
        let shown: Vec<u32> = inv.shards().iter().map(|s| s.partition).collect();
        assert_eq!(shown, [2]);
    }

    #[test]
    fn a_shard_snapshot_reads_back_as_the_same_stock() {
        let inv = Inventory::sharded(CATALOGUE, 3);
        inv.restore(1, None).unwrap();
        inv.reserve(1, "o1", &laptops(3));
        let other = Inventory::sharded(CATALOGUE, 3);
        other.restore(1, inv.snapshot(1)).unwrap();
        assert_eq!(other.shards(), inv.shards());
    }

    #[test]
    fn a_shard_that_does_not_decode_is_refused() {
        let inv = Inventory::sharded(CATALOGUE, 3);
        assert!(inv.restore(0, Some(serde_json::json!("garbage"))).is_err());
        assert!(inv.shards().is_empty());
    }

    #[test]
    fn unsharded_keeps_one_shard_and_no_snapshot() {
        let inv = Inventory::new(CATALOGUE);
        assert_eq!(inv.shards().len(), 1);
        inv.reserve(2, "o1", &laptops(1));
        assert_eq!(inv.level("LAPTOP-001").unwrap().available, 49);
        assert!(inv.snapshot(0).is_none());
    }
}
