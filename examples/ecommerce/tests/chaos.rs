//! Chaos: the example as OS processes (an order process with the API, two
//! inventory instances, a notification process) on a Kafka broker of this
//! test's own, orders posted over HTTP at a fixed rate, while a bounded
//! loop SIGKILLs and restarts random services and the broker is killed and
//! restarted once. Then an invariant checker reads the topics itself
//! (`read_committed`) and checks: every accepted order settled with one
//! `ORDER_CREATED` and one terminal event, none lost, none doubled for a
//! retried `Idempotency-Key`, the units the inventory reserved equal to
//! what the confirmed orders bought and never more than the stock, and no
//! dead letter but for notifications that failed. It prints
//!
//! `RESULT chaos orders=… kills=… broker_restarts=1 lost=0 stuck=0 duplicates=0 oversold=0 max_gap_s=…`
//!
//! The short run (300 orders, a kill every 4 s) is part of the test
//! command. A long run is the same test with more orders, e.g.
//!
//! ```text
//! CHAOS_ORDERS=10000 CHAOS_RATE=25 cargo test --release -p ecommerce --test chaos -- --include-ignored --nocapture
//! ```
//!
//! Settings (environment): `CHAOS_ORDERS` (300), `CHAOS_RATE` orders/s
//! (15), `CHAOS_KILL_EVERY_MS` (4000), `CHAOS_DOWN_MS` a killed service
//! stays down (1000), `CHAOS_BROKER_DOWN_MS` (3000), `CHAOS_BROKER_RESTARTS`
//! (1; 0 to measure service kills alone), `CHAOS_SEED` (1).
//! Needs Java and Maven, like the test broker (scripts/kafka/broker.sh).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_addr, order_body, order_units, repo_root, Processes};
use ecommerce::inventory::CATALOGUE;
use ecommerce::messages::{
    InventoryEvent, OrderEvent, Topics, INVENTORY_EVENTS, NOTIFICATIONS_DLQ, ORDERS_DLQ,
    ORDERS_EVENTS,
};
use saga_core::{DeadLetter, Timestamp};
use saga_kafka::testing::KafkaFixture;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A broker of this test's own (its state under `dir`), stopped on drop.
struct Broker {
    dir: std::path::PathBuf,
    address: String,
}

impl Broker {
    fn command(dir: &std::path::Path, what: &str) -> std::process::Output {
        Command::new(repo_root().join("scripts/kafka/broker.sh"))
            .arg(what)
            .env("SAGA_KAFKA_STATE_DIR", dir)
            .output()
            .expect("scripts/kafka/broker.sh runs")
    }

    fn start(dir: std::path::PathBuf) -> Self {
        let out = Self::command(&dir, "start");
        assert!(
            out.status.success(),
            "the chaos broker did not start:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Self::command(&dir, "address");
        let address = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Self { dir, address }
    }

    /// SIGKILL, `down`, then start again on the same data and address.
    fn crash_and_resume(dir: &std::path::Path, down: Duration) {
        let out = Self::command(dir, "crash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(down);
        let out = Self::command(dir, "resume");
        assert!(
            out.status.success(),
            "the chaos broker did not come back:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Self::command(&self.dir, "stop");
    }
}

/// splitmix64: the kill schedule's dice.
fn next(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What the client got for order `i`: the order id, on the first 202.
#[derive(Default)]
struct Posted {
    accepted: BTreeMap<usize, String>,
    /// A second 202 for a key named another order.
    other_ids: usize,
    given_up: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "starts and kills its own Kafka broker (Java, Maven): scripts/test.sh"]
async fn orders_survive_killed_services_and_a_broker_restart() {
    let orders = setting("CHAOS_ORDERS", 300) as usize;
    let rate = setting("CHAOS_RATE", 15).max(1);
    let kill_every = Duration::from_millis(setting("CHAOS_KILL_EVERY_MS", 4000));
    let down = Duration::from_millis(setting("CHAOS_DOWN_MS", 1000));
    let broker_down = Duration::from_millis(setting("CHAOS_BROKER_DOWN_MS", 3000));
    let mut seed = setting("CHAOS_SEED", 1);
    let restart_broker = setting("CHAOS_BROKER_RESTARTS", 1) > 0;
    let t0 = Instant::now();

    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let dir = common::test_dir(&format!("ecom-chaos-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let broker = Broker::start(dir.join("broker"));
    eprintln!(
        "chaos broker at {} in {:.1} s",
        broker.address,
        t0.elapsed().as_secs_f64()
    );
    let prefix = format!("chaos-{tag}.");
    let topics = Topics::new(prefix.clone());
    let common: Vec<String> = [
        "--kafka",
        &broker.address,
        "--topic-prefix",
        &prefix,
        "--app",
        &format!("chaos-{tag}"),
        "--partitions",
        "3",
        "--fast",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut procs = Processes::new(dir.clone(), common);
    let order_addr = free_addr();
    let victims = ["order-1", "inventory-1", "inventory-2", "notification-1"];
    procs.spawn("order-1", "order", &order_addr);
    procs.spawn("inventory-1", "inventory", "127.0.0.1:0");
    procs.spawn("inventory-2", "inventory", "127.0.0.1:0");
    procs.spawn("notification-1", "notification", "127.0.0.1:0");
    let up = Instant::now() + Duration::from_secs(90);
    let api = procs.url("order-1", up);
    for v in &victims[1..] {
        procs.url(v, up);
    }
    eprintln!("services up in {:.1} s", t0.elapsed().as_secs_f64());

    // The client: one order every 1/rate s, each retried with its key
    // until accepted (503s, refused connections and timeouts included).
    // The processes get the tests' token configuration; the client sends
    // the operator's token.
    let client = common::client(Duration::from_secs(10));
    let posted = Arc::new(Mutex::new(Posted::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..orders {
        let at = started + Duration::from_micros(i as u64 * 1_000_000 / rate);
        let (client, posted, url) = (client.clone(), posted.clone(), format!("{api}/orders"));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let deadline = Instant::now() + Duration::from_secs(240);
            loop {
                let res = client
                    .post(&url)
                    .header("idempotency-key", format!("chaos-{i}"))
                    .json(&order_body(i))
                    .send()
                    .await;
                if let Ok(res) = res {
                    let status = res.status().as_u16();
                    if status == 202 {
                        let body: serde_json::Value = res.json().await.unwrap_or_default();
                        let id = body["order_id"].as_str().unwrap_or_default().to_owned();
                        let mut p = posted.lock().unwrap();
                        match p.accepted.get(&i) {
                            Some(first) if *first != id => p.other_ids += 1,
                            _ => {
                                p.accepted.insert(i, id);
                            }
                        }
                        return;
                    }
                    assert!(status >= 500, "order {i}: HTTP {status}");
                }
                if Instant::now() > deadline {
                    posted.lock().unwrap().given_up += 1;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    let posting_ends = started + Duration::from_micros(orders as u64 * 1_000_000 / rate);

    // The chaos: a kill every `kill_every` while orders are posted (at
    // least three), the broker crashed once, after the second kill.
    let mut kills: Vec<(String, Timestamp)> = Vec::new();
    let mut broker_restarts = 0;
    while Instant::now() < posting_ends || kills.len() < 3 {
        tokio::time::sleep(kill_every).await;
        let victim = victims[(next(&mut seed) % victims.len() as u64) as usize];
        kills.push((victim.to_owned(), Timestamp::now()));
        eprintln!("{:>6.1} s: kill -9 {victim}", t0.elapsed().as_secs_f64());
        procs.kill(victim);
        tokio::time::sleep(down).await;
        procs.restart(victim);
        if restart_broker && kills.len() == 2 && broker_restarts == 0 {
            eprintln!("{:>6.1} s: kill -9 the broker", t0.elapsed().as_secs_f64());
            let dir = broker.dir.clone();
            tokio::task::spawn_blocking(move || Broker::crash_and_resume(&dir, broker_down))
                .await
                .unwrap();
            broker_restarts += 1;
            eprintln!("{:>6.1} s: the broker is back", t0.elapsed().as_secs_f64());
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("{:>6.1} s: all orders posted", t0.elapsed().as_secs_f64());

    // Every accepted order settles: one terminal event each.
    let fx = KafkaFixture::on(&broker.address);
    let accepted: BTreeMap<usize, String> = posted.lock().unwrap().accepted.clone();
    let by_id: HashMap<String, usize> = accepted.iter().map(|(i, id)| (id.clone(), *i)).collect();
    let settle_by = Instant::now() + Duration::from_secs(180);
    let events = loop {
        let events = fx.read_committed(&topics.name(ORDERS_EVENTS));
        let terminal = events
            .iter()
            .filter(|e| {
                matches!(
                    serde_json::from_value(e.payload.clone()),
                    Ok(OrderEvent::OrderConfirmed { .. } | OrderEvent::OrderCancelled { .. })
                )
            })
            .count();
        if terminal >= accepted.len() || Instant::now() > settle_by {
            break events;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };

    // The invariants, from the topics.
    let mut created: HashMap<String, usize> = HashMap::new();
    let mut terminal: HashMap<String, (usize, bool)> = HashMap::new();
    let mut completions: Vec<u64> = Vec::new();
    for e in &events {
        match serde_json::from_value(e.payload.clone()) {
            Ok(OrderEvent::OrderCreated { order_id, .. }) => {
                *created.entry(order_id).or_default() += 1;
            }
            Ok(OrderEvent::OrderConfirmed { order_id, .. }) => {
                terminal.entry(order_id).or_insert((0, true)).0 += 1;
                completions.push(e.timestamp.as_millis());
            }
            Ok(OrderEvent::OrderCancelled { order_id, .. }) => {
                terminal.entry(order_id).or_insert((0, false)).0 += 1;
                completions.push(e.timestamp.as_millis());
            }
            _ => {}
        }
    }
    let lost = accepted
        .values()
        .filter(|id| !created.contains_key(*id))
        .count();
    let stuck = accepted
        .values()
        .filter(|id| !terminal.contains_key(*id))
        .count();
    let duplicates = created.values().map(|n| n - 1).sum::<usize>()
        + terminal.values().map(|(n, _)| n - 1).sum::<usize>()
        + posted.lock().unwrap().other_ids
        + created.keys().filter(|id| !by_id.contains_key(*id)).count();

    // Stock: reserved units = what the confirmed orders bought ≤ on hand.
    let mut reserved: BTreeMap<String, u64> = BTreeMap::new();
    for e in fx.read_committed(&topics.name(INVENTORY_EVENTS)) {
        if let Ok(InventoryEvent::InventoryReserved { items, .. }) =
            serde_json::from_value(e.payload.clone())
        {
            for it in items {
                *reserved.entry(it.sku).or_default() += u64::from(it.quantity);
            }
        }
    }
    let mut bought: BTreeMap<String, u64> = BTreeMap::new();
    for (id, (_, confirmed)) in &terminal {
        if let (true, Some(i)) = (*confirmed, by_id.get(id)) {
            for (sku, n) in order_units(*i) {
                *bought.entry(sku).or_default() += n;
            }
        }
    }
    let oversold: u64 = CATALOGUE
        .iter()
        .map(|(sku, on_hand)| {
            reserved
                .get(*sku)
                .copied()
                .unwrap_or(0)
                .saturating_sub(u64::from(*on_hand))
        })
        .sum();

    // Dead letters: none for orders or stock; notifications only.
    let dead = |topic: &str| -> Vec<DeadLetter> {
        fx.read_committed(topic)
            .iter()
            .filter_map(|e| DeadLetter::from_envelope(e).ok())
            .collect()
    };
    let order_dead = dead(&topics.name(ORDERS_DLQ));
    let stock_dead = dead(&topics.name("inventory.dlq"));
    let notification_dead = dead(&topics.name(NOTIFICATIONS_DLQ));

    // Completion gaps: the longest stretch without an order settling, and
    // for each kill the stretch around it.
    completions.sort_unstable();
    let max_gap = completions
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0) as f64
        / 1e3;
    let mut kill_gaps: Vec<f64> = kills
        .iter()
        .filter_map(|(_, at)| {
            let at = at.as_millis();
            let after = completions.iter().find(|c| **c >= at)?;
            let before = completions.iter().rev().find(|c| **c < at)?;
            Some((after - before) as f64 / 1e3)
        })
        .collect();
    kill_gaps.sort_by(f64::total_cmp);
    let median_kill_gap = kill_gaps.get(kill_gaps.len() / 2).copied().unwrap_or(0.0);
    let given_up = posted.lock().unwrap().given_up;
    eprintln!(
        "kills: {:?}",
        kills.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>()
    );
    eprintln!("completion gap per kill (s): {kill_gaps:?}");
    eprintln!(
        "confirmed {} of {} accepted; reserved {reserved:?}; bought {bought:?}; notification dead letters {}",
        terminal.values().filter(|(_, c)| *c).count(),
        accepted.len(),
        notification_dead.len()
    );
    eprintln!(
        "RESULT chaos orders={} kills={} broker_restarts={broker_restarts} lost={lost} stuck={stuck} duplicates={duplicates} oversold={oversold} max_gap_s={max_gap:.1} median_kill_gap_s={median_kill_gap:.2} wall_s={:.0}",
        accepted.len(),
        kills.len(),
        t0.elapsed().as_secs_f64()
    );

    assert_eq!(given_up, 0, "orders never accepted");
    assert_eq!(accepted.len(), orders);
    assert!(kills.len() >= 3 && broker_restarts == usize::from(restart_broker));
    assert_eq!((lost, stuck, duplicates, oversold), (0, 0, 0, 0));
    assert_eq!(
        reserved, bought,
        "reserved units = what the confirmed orders bought"
    );
    assert!(order_dead.is_empty(), "order dead letters: {order_dead:#?}");
    assert!(
        stock_dead.is_empty(),
        "inventory dead letters: {stock_dead:#?}"
    );
    for d in &notification_dead {
        assert!(
            by_id.contains_key(d.original.saga_id.as_str()),
            "a notification dead letter for no accepted order: {d:?}"
        );
    }
    drop(procs);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
