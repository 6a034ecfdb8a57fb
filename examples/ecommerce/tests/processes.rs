//! The e-commerce example as one OS process per service on a real Kafka
//! broker: an order process (orchestrator + API), **two inventory
//! instances** sharing `inventory.requests` through their consumer group, a
//! notification process and an analytics process. 200 orders go through
//! the HTTP API with bounded concurrency, asking for more laptops and
//! monitors than there are; every order must settle, and the stock the
//! inventory instances reserved (summed over the shards, one per
//! partition) must equal what the confirmed orders bought: nothing
//! oversold, nothing reserved twice.
//!
//! The processes are the example's `ecommerce` binary (cargo builds it for
//! this test); a guard kills them all at the end, also when the test
//! fails. Needs KAFKA_BOOTSTRAP_SERVERS.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{get_json, order_body, Processes};
use futures::stream::{self, StreamExt};
use serde_json::Value;

const ORDERS: usize = 200;
const CONCURRENCY: usize = 16;
const DEADLINE: Duration = Duration::from_secs(170);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Kafka: scripts/test.sh"]
async fn services_as_processes_settle_200_orders_without_overselling() {
    let t0 = Instant::now();
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS (scripts/test.sh starts a broker and sets it)");
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let prefix = format!("ecom-procs-{tag}.");
    let dir = std::env::temp_dir().join(format!("ecom-procs-{tag}"));
    let common: Vec<String> = [
        "--kafka",
        &bootstrap,
        "--topic-prefix",
        &prefix,
        "--app",
        &format!("ecom-procs-{tag}"),
        "--partitions",
        "3",
        "--fast",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();

    let mut procs = Processes::new(dir.clone(), common);
    for (name, service) in [
        ("inventory-1", "inventory"),
        ("inventory-2", "inventory"),
        ("notification-1", "notification"),
        ("analytics-1", "analytics"),
        ("order-1", "order"),
    ] {
        procs.spawn(name, service, "127.0.0.1:0");
    }
    let started = Instant::now() + Duration::from_secs(60);
    let order_api = procs.url("order-1", started);
    let inventories = [
        procs.url("inventory-1", started),
        procs.url("inventory-2", started),
    ];
    let analytics_api = procs.url("analytics-1", started);
    procs.url("notification-1", started);
    eprintln!("services up in {:.1} s", t0.elapsed().as_secs_f64());

    // The processes get the tests' token configuration; the client sends
    // the operator's token.
    let client = common::client(Duration::from_secs(20));

    // 200 orders, at most CONCURRENCY in flight; a 503 or a lost answer is
    // retried with the same Idempotency-Key (never a second order).
    let ids: Vec<(usize, String)> = stream::iter(0..ORDERS)
        .map(|i| {
            let client = client.clone();
            let url = format!("{order_api}/orders");
            async move {
                for _ in 0..20 {
                    let post = client
                        .post(&url)
                        .header("idempotency-key", format!("order-{i}"))
                        .json(&order_body(i));
                    match post.send().await {
                        Ok(res) if res.status().as_u16() == 202 => {
                            let body: Value = res.json().await.unwrap();
                            return (i, body["order_id"].as_str().unwrap().to_owned());
                        }
                        Ok(res) if res.status().is_server_error() => {}
                        Ok(res) => panic!("order {i}: {} {:?}", res.status(), res.text().await),
                        Err(e) => eprintln!("order {i}: {e}; retrying"),
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                panic!("order {i} was never accepted");
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    assert_eq!(ids.len(), ORDERS);
    eprintln!(
        "{ORDERS} orders accepted in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // Every order reaches a final state.
    let deadline = t0 + DEADLINE;
    let mut pending: Vec<(usize, String)> = ids;
    let mut settled: Vec<(usize, Value)> = Vec::new();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} orders not settled in time, e.g. {:?}",
            pending.len(),
            pending.first()
        );
        let checked: Vec<((usize, String), Option<Value>)> = stream::iter(pending)
            .map(|(i, id)| {
                let client = client.clone();
                let url = format!("{order_api}/orders/{id}");
                async move {
                    let order = get_json(&client, &url).await.filter(|o| {
                        matches!(o["saga_status"].as_str(), Some("completed" | "compensated"))
                    });
                    ((i, id), order)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        pending = Vec::new();
        for (key, order) in checked {
            match order {
                Some(o) => settled.push((key.0, o)),
                None => pending.push(key),
            }
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    eprintln!("all settled in {:.1} s", t0.elapsed().as_secs_f64());

    // What the confirmed orders bought, per SKU.
    let mut bought: BTreeMap<String, u64> = BTreeMap::new();
    let mut confirmed = 0;
    for (i, o) in &settled {
        match o["status"].as_str() {
            Some("CONFIRMED") => {
                confirmed += 1;
                for item in o["items"].as_array().unwrap() {
                    *bought
                        .entry(item["sku"].as_str().unwrap().to_owned())
                        .or_default() += item["quantity"].as_u64().unwrap();
                }
            }
            Some("CANCELLED") => {
                let reason = o["reason"].as_str().unwrap_or_default();
                assert!(reason.starts_with("Not enough stock"), "order {i}: {o}");
            }
            _ => panic!("order {i} settled as {o}"),
        }
    }
    assert!(confirmed > 0 && confirmed < ORDERS, "{confirmed} confirmed");

    // The stock shards the two instances serve: each partition's shard is
    // served by exactly one of them (once a rebalance in progress, say for
    // an instance that joined late, has settled).
    let deadline = Instant::now() + Duration::from_secs(60);
    let newest = loop {
        let mut newest: BTreeMap<u64, Value> = BTreeMap::new();
        let mut held_by: Vec<usize> = Vec::new();
        for url in &inventories {
            let inv = get_json(&client, &format!("{url}/inventory"))
                .await
                .expect("GET /inventory");
            let shards = inv["shards"].as_array().unwrap().clone();
            held_by.push(shards.len());
            for shard in shards {
                let p = shard["partition"].as_u64().unwrap();
                assert!(
                    newest.insert(p, shard).is_none(),
                    "partition {p} shown twice"
                );
            }
        }
        if newest.len() == 3 && held_by.iter().all(|n| *n >= 1) {
            break newest;
        }
        assert!(
            Instant::now() < deadline,
            "shards served: {held_by:?} of partitions {:?}",
            newest.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut reserved: BTreeMap<String, u64> = BTreeMap::new();
    for (p, shard) in &newest {
        for l in shard["stock"].as_array().unwrap() {
            let (on_hand, r) = (
                l["on_hand"].as_u64().unwrap(),
                l["reserved"].as_u64().unwrap(),
            );
            assert!(r <= on_hand, "partition {p} oversold: {l}");
            if r > 0 {
                *reserved
                    .entry(l["sku"].as_str().unwrap().to_owned())
                    .or_default() += r;
            }
        }
    }
    assert_eq!(
        reserved, bought,
        "reserved stock = what the confirmed orders bought"
    );
    assert!(bought["LAPTOP-001"] <= 50 && bought["MONITOR-001"] <= 30);

    // The analytics process saw every order.
    let a = loop {
        let a = get_json(&client, &format!("{analytics_api}/analytics")).await;
        if let Some(a) = a.clone().filter(|a| {
            a["orders.created"] == ORDERS
                && a["orders.confirmed"].as_u64().unwrap_or(0)
                    + a["orders.cancelled"].as_u64().unwrap_or(0)
                    == ORDERS as u64
        }) {
            break a;
        }
        assert!(Instant::now() < deadline, "analytics incomplete: {a:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(a["orders.confirmed"], confirmed);

    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{ORDERS} orders over 5 processes: {confirmed} confirmed, bought {bought:?}, in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
