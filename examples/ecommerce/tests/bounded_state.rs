//! Bounded state: one partition driven through 100,000 orders of the
//! example (the order saga, the inventory and the notification service) at
//! the seed's 100 orders/s of virtual time. The runtime's drivers run as a
//! one-partition runtime would run them: each input handled and committed
//! in turn, the records they write applied to compacted tables (the saga's
//! state, the participants' ledgers and state) and message queues.
//!
//! What is kept must follow what is live, not history: with a settled
//! retention and a dedupe horizon of 5 minutes, the compacted tables stop
//! growing once 5 minutes of orders have passed, the largest record
//! written stays the same from the first orders to the last, and so does
//! what a new owner of the partition reads back (and the time it takes,
//! reported).
//!
//! Runs without a broker; its figures print as one `RESULT bounded …` line.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ecommerce::inventory::Inventory;
use ecommerce::messages::{OrderItem, Topics, INVENTORY_REQUESTS, NOTIFICATIONS_REQUESTS};
use ecommerce::notification::{self, FakeEmailProvider, NotificationPolicy, NotificationService};
use ecommerce::order::{self, Order, OrderPolicy};
use rust_decimal::Decimal;
use saga_core::driver::{Incoming, ParticipantDriver, Record, RecordKind, SagaDriver};
use saga_core::{Clock, ParticipantPolicy, SagaId, Timestamp};

const ORDERS: u64 = 100_000;
/// 100 orders per second.
const EVERY: Duration = Duration::from_millis(10);
const RETENTION: Duration = Duration::from_secs(300);
const CHECKPOINTS: [u64; 5] = [20_000, 40_000, 60_000, 80_000, 100_000];

/// What a partition's topics hold: the compacted ones as their latest
/// value per key, the message topics as queues of what is not consumed yet.
#[derive(Default)]
struct Log {
    tables: HashMap<String, BTreeMap<String, Vec<u8>>>,
    queue: VecDeque<(String, String, Option<Vec<u8>>, RecordKind)>,
    offset: u64,
    /// The largest record written since the last checkpoint.
    largest: usize,
    dead_letters: usize,
}

impl Log {
    fn write(&mut self, records: Vec<Record>) {
        for r in records {
            self.largest = self.largest.max(r.size());
            match r.kind {
                RecordKind::SagaState | RecordKind::Ledger | RecordKind::ParticipantState => {
                    let table = self.tables.entry(r.topic).or_default();
                    match r.value {
                        Some(v) => table.insert(r.key, v),
                        None => table.remove(&r.key),
                    };
                }
                _ => {
                    if r.topic.ends_with(".dlq") {
                        self.dead_letters += 1;
                    }
                    self.queue.push_back((r.topic, r.key, r.value, r.kind));
                }
            }
        }
    }

    fn table(&self, topic: &str) -> Vec<(String, Vec<u8>)> {
        self.tables
            .get(topic)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    fn keys(&self) -> usize {
        self.tables.values().map(BTreeMap::len).sum()
    }
}

/// The partition's owner: the saga driver and the two participants'.
struct Owner {
    saga: SagaDriver<Order>,
    inventory: ParticipantDriver,
    notification: ParticipantDriver,
}

fn owner(topics: &Topics, log: Option<&Log>) -> Owner {
    let def = order::saga(&OrderPolicy::default(), topics).unwrap();
    let mut saga = SagaDriver::new(def).with_settled_retention(RETENTION);
    let stock: Vec<(&str, u32)> = vec![("LAPTOP-001", u32::MAX / 2)];
    let inventory = ParticipantDriver::new(
        topics.name(INVENTORY_REQUESTS),
        ParticipantPolicy::new(topics.name("inventory"))
            .remember_steps()
            .dedupe_horizon(RETENTION),
        Arc::new(Inventory::sharded(&stock, 1)),
    );
    let mut inventory = inventory;
    let email = NotificationService::new(Arc::new(FakeEmailProvider::new()), Clock::system());
    let mut notification = ParticipantDriver::new(
        topics.name(NOTIFICATIONS_REQUESTS),
        notification::policy(&NotificationPolicy::default(), topics).dedupe_horizon(RETENTION),
        Arc::new(email),
    );
    let empty = Log::default();
    let log = log.unwrap_or(&empty);
    saga.restore(0, log.table(saga.state_topic()));
    let ledger = inventory.ledger_topic().to_owned();
    inventory.restore(0, log.table(&ledger)).unwrap();
    let ledger = notification.ledger_topic().to_owned();
    notification.restore(0, log.table(&ledger)).unwrap();
    Owner {
        saga,
        inventory,
        notification,
    }
}

impl Owner {
    /// Handles every queued message, each committed in turn.
    async fn drain(&mut self, log: &mut Log, now: Timestamp) {
        let inputs = self.saga.input_topics();
        while let Some((topic, key, value, kind)) = log.queue.pop_front() {
            log.offset += 1;
            let rec = Incoming {
                topic: &topic,
                partition: 0,
                offset: log.offset,
                key: Some(key.as_bytes()),
                value: value.as_deref(),
                kind: kind.header().map(str::as_bytes),
                traceparent: None,
            };
            let mut out = Vec::new();
            if inputs.contains(&topic) {
                self.saga.on_record(&rec, now, &mut out);
                self.saga.committed(|_| {});
            } else if let Some(p) = self.participant(&topic) {
                if let Some(attempt) = p.on_record(&rec, now, &mut out) {
                    let result = attempt.run(now).await;
                    p.finish(attempt, result, Duration::ZERO, now, &mut out);
                }
                p.before_commit(&mut out).unwrap();
                p.committed();
            }
            log.write(out);
        }
    }

    fn participant(&mut self, topic: &str) -> Option<&mut ParticipantDriver> {
        if topic == self.inventory.channel() {
            Some(&mut self.inventory)
        } else if topic == self.notification.channel() {
            Some(&mut self.notification)
        } else {
            None
        }
    }

    /// Fires what is due: timers, expiries, retries.
    async fn due(&mut self, log: &mut Log, now: Timestamp) {
        loop {
            let mut out = Vec::new();
            let fired = self.saga.on_due(now, &mut out);
            self.saga.committed(|_| {});
            log.write(out);
            if !fired {
                break;
            }
        }
        for p in [&mut self.inventory, &mut self.notification] {
            while p.next_due().is_some_and(|at| at <= now) {
                let mut out = Vec::new();
                if let Some(attempt) = p.take_due(now, &mut out) {
                    let result = attempt.run(now).await;
                    p.finish(attempt, result, Duration::ZERO, now, &mut out);
                }
                p.before_commit(&mut out).unwrap();
                p.committed();
                log.write(out);
            }
        }
    }
}

struct Checkpoint {
    orders: u64,
    keys: usize,
    largest: usize,
    restore: Duration,
}

#[tokio::test(flavor = "current_thread")]
async fn a_partition_keeps_what_is_live_not_history_over_100000_orders() {
    let topics = Topics::default();
    let mut log = Log::default();
    let mut partition = owner(&topics, None);
    let t0 = Timestamp::from_millis(1_800_000_000_000);
    let wall = Instant::now();
    let mut checkpoints = Vec::new();
    for i in 1..=ORDERS {
        let now = t0.saturating_add(EVERY * (i as u32));
        let id = format!("ORD-{i:08}");
        let item = OrderItem {
            sku: "LAPTOP-001".into(),
            quantity: 1,
            unit_price: Decimal::new(99_999, 2),
        };
        let o = Order::new(id.clone(), format!("c-{:04}", i % 1000), vec![item]);
        let mut out = Vec::new();
        assert!(partition
            .saga
            .start(0, SagaId::new(id), o, now, &mut out)
            .unwrap());
        partition.saga.committed(|_| {});
        log.write(out);
        partition.drain(&mut log, now).await;
        partition.due(&mut log, now).await;
        partition.drain(&mut log, now).await;
        if CHECKPOINTS.contains(&i) {
            // A new owner reads the partition back.
            let started = Instant::now();
            let _ = owner(&topics, Some(&log));
            let restore = started.elapsed();
            checkpoints.push(Checkpoint {
                orders: i,
                keys: log.keys(),
                largest: log.largest,
                restore,
            });
            log.largest = 0;
        }
    }
    let (in_progress, settled) = partition.saga.len();
    assert_eq!(log.dead_letters, 0, "every order went through");
    assert_eq!(in_progress, 0, "every order settled");
    for c in &checkpoints {
        eprintln!(
            "after {:>6} orders: {:>6} keys kept, largest record {:>5} B, restore {:>6.1} ms",
            c.orders,
            c.keys,
            c.largest,
            c.restore.as_secs_f64() * 1e3
        );
    }
    let first = &checkpoints[1];
    let last = checkpoints.last().unwrap();
    eprintln!(
        "RESULT bounded orders={ORDERS} keys_at_40k={} keys_at_100k={} largest_record_first={} largest_record_last={} restore_ms_40k={:.1} restore_ms_100k={:.1} settled_in_memory={settled} wall_s={:.1}",
        first.keys,
        last.keys,
        checkpoints[0].largest,
        last.largest,
        first.restore.as_secs_f64() * 1e3,
        last.restore.as_secs_f64() * 1e3,
        wall.elapsed().as_secs_f64()
    );
    // 5 minutes at 100 orders/s: 30,000 orders' worth of keys, from 40,000
    // orders on as many as at 100,000.
    for c in &checkpoints[1..] {
        let ratio = c.keys as f64 / first.keys as f64;
        assert!(
            (0.95..=1.05).contains(&ratio),
            "kept keys grow with history: {} at {} orders, {} at {}",
            first.keys,
            first.orders,
            c.keys,
            c.orders
        );
        assert!(
            c.largest <= checkpoints[0].largest,
            "the largest record grew: {} B after {} orders, {} B first",
            c.largest,
            c.orders,
            checkpoints[0].largest
        );
    }
    assert!(
        settled as u64 <= 31_000,
        "{settled} settled sagas remembered"
    );
}
