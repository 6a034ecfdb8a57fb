//! Benchmarks across the workspace (this package has no library code):
//! `benches/kafka_load.rs` measures the engine on Kafka against a bare
//! rdkafka transactional pipeline in the same run. The pure core and the
//! in-memory runtime are measured in `saga-core/benches/engine.rs`.
