//! The e-commerce example's embedded demo (what `cargo run --example
//! ecommerce` prints), run in process under tokio's paused clock.

#[tokio::test(start_paused = true)]
async fn the_demo_plays_the_three_flows_of_the_seed() {
    let mut out = Vec::new();
    let outcome = ecommerce::demo::run(&mut out)
        .await
        .expect("the demo succeeds");
    let text = String::from_utf8(out).unwrap();
    assert_eq!(outcome.orders.len(), 3);

    // The "Orders" section: one line per order.
    let orders: Vec<&str> = text
        .split("=== Orders ===")
        .nth(1)
        .and_then(|s| s.split("===").next())
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("ORD-"))
        .collect();
    assert_eq!(orders.len(), 3, "{text}");
    assert!(orders[0].contains("CONFIRMED") && orders[0].contains("1059.97"));
    assert!(orders[0].contains("email: SENT"), "{}", orders[0]);
    assert!(orders[1].contains("CANCELLED"), "{}", orders[1]);
    assert!(
        orders[1].contains("Not enough stock: LAPTOP-001 available 49, requested 100"),
        "{}",
        orders[1]
    );
    assert!(orders[2].contains("CONFIRMED"), "{}", orders[2]);
    assert!(
        orders[2]
            .contains("email: FAILED (3 attempt(s)) -> notifications.dlq; order stays CONFIRMED"),
        "{}",
        orders[2]
    );

    // Flow 3's timeline shows the three attempts and the dead letter.
    for needle in [
        "email attempt 1: no answer (timed out)",
        "email attempt 2: 503 Service Unavailable",
        "email attempt 3: 500 Internal Server Error",
        "dead letter: max retries reached (3 attempts); retry_count 3",
        "NOTIFICATION_FAILED after 3 attempts",
        "INSUFFICIENT_STOCK: Not enough stock: LAPTOP-001 available 49, requested 100",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }

    // The analytics summary.
    for (key, value) in [
        ("orders.created", "3"),
        ("orders.confirmed", "2"),
        ("orders.cancelled", "1"),
        ("revenue.confirmed", "1169.95"),
        ("revenue.lost", "99999.00"),
        ("notifications.sent", "2"),
        ("notifications.failed", "1"),
        ("cancellation_reasons", "stock=1"),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no `{key}` line in:\n{text}"));
        assert_eq!(line.split_whitespace().nth(1), Some(value), "{line}");
    }

    // The DLQ entry and the operator's SMS fallback.
    assert!(text.contains("dlq-1 [open] order"), "{text}");
    assert!(text.contains("retry_count: 3  last_error: 500 Internal Server Error"));
    assert!(text.contains("SMS to phone-of-c-eva"), "{text}");
}
