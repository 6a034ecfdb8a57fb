//! The ACLs `ecommerce acls` prints: derived from each service's wiring,
//! and the README's list kept equal to them.

use ecommerce::system::kafka::{acl_plan, kafka_topics};
use ecommerce::system::{Config, Services};
use saga_kafka::KafkaConfig;

const SERVICES: [&str; 5] = ["order", "inventory", "notification", "analytics", "dlq"];

async fn lines(service: &str, create_topics: bool) -> String {
    let config = Config {
        services: Services::only(service).unwrap(),
        app: Some("ecommerce".into()),
        create_topics,
        ..Config::default()
    };
    // Built here, not from the environment: the list must not depend on it.
    let kcfg = KafkaConfig::new("127.0.0.1:9092").app("ecommerce");
    acl_plan(&config, &kcfg)
        .await
        .unwrap()
        .to_lines(&format!("User:{service}"))
}

#[tokio::test]
async fn the_readmes_acl_list_is_what_acls_prints() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let block = readme
        .split("<!-- acls:begin -->")
        .nth(1)
        .and_then(|s| s.split("<!-- acls:end -->").next())
        .expect("the README has the ACL block");
    let listed: String = block
        .lines()
        .filter(|l| l.starts_with("User:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut expected = String::new();
    for s in SERVICES {
        expected.push_str(&lines(s, false).await);
    }
    assert_eq!(
        listed, expected,
        "the README's ACL list is stale: replace it with the output of \
         `for s in order inventory notification analytics dlq; do \
         ecommerce --no-create-topics --app ecommerce acls --service $s; done`"
    );
}

#[tokio::test]
async fn services_that_create_topics_may_create_every_topic_and_others_none() {
    let all = kafka_topics(&Config::default()).unwrap();
    for s in SERVICES {
        let creating = lines(s, true).await;
        for t in &all {
            let line = format!("User:{s} ALLOW CREATE TOPIC LITERAL {}\n", t.name);
            assert!(creating.contains(&line), "{s} lacks {line}");
        }
        assert!(
            !lines(s, false).await.contains(" CREATE "),
            "{s} creates nothing with topic creation off"
        );
    }
}

#[tokio::test]
async fn a_topic_prefix_and_app_name_the_bindings() {
    let config = Config {
        services: Services::only("inventory").unwrap(),
        topics: ecommerce::messages::Topics::new("t1."),
        app: Some("shop".into()),
        create_topics: false,
        ..Config::default()
    };
    let kcfg = KafkaConfig::new("127.0.0.1:9092").app("shop");
    let text = acl_plan(&config, &kcfg).await.unwrap().to_lines("User:inv");
    assert!(
        text.contains("User:inv ALLOW READ TOPIC LITERAL t1.inventory.requests\n"),
        "{text}"
    );
    assert!(
        text.contains("ALLOW WRITE TRANSACTIONAL_ID PREFIXED shop-t1.inventory-\n"),
        "{text}"
    );
    assert!(
        text.contains("ALLOW READ GROUP LITERAL shop-reader\n"),
        "{text}"
    );
    assert!(!text.contains(" inventory.requests"), "{text}");
}
