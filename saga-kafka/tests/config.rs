//! The configuration's `Debug` output never shows a secret.

use saga_kafka::KafkaConfig;

#[test]
fn debug_output_redacts_passwords() {
    let env = [
        ("KAFKA_BOOTSTRAP_SERVERS", "broker:9093"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("KAFKA_SASL_USERNAME", "order-service"),
        ("KAFKA_SASL_PASSWORD", "pw-sasl-123"),
        ("KAFKA_SSL_KEY_PASSWORD", "pw-key-456"),
        ("KAFKA_SSL_CA_LOCATION", "/etc/kafka/ca.pem"),
    ];
    let config = KafkaConfig::from_lookup(|k| {
        env.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap()
    .set(
        "sasl.jaas.config",
        "org.apache.kafka... password=\"pw-jaas-789\";",
    )
    .set("ssl.keystore.password", "pw-store-000")
    .set("sasl.oauthbearer.client.secret", "pw-oauth-111");
    let shown = format!("{config:?}");
    for secret in [
        "pw-sasl-123",
        "pw-key-456",
        "pw-jaas-789",
        "pw-store-000",
        "pw-oauth-111",
    ] {
        assert!(!shown.contains(secret), "{secret} leaked in {shown}");
    }
    // What is not secret stays visible, for debugging.
    assert!(shown.contains("order-service"));
    assert!(shown.contains("SCRAM-SHA-512"));
    assert!(shown.contains("/etc/kafka/ca.pem"));
    assert!(shown.contains("[redacted]"));
    let pretty = format!("{config:#?}");
    assert!(!pretty.contains("pw-sasl-123"));
}
