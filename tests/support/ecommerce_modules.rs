// The e-commerce example's modules (all but the CLI client), compiled into
// the test crate that `include!`s this file at its root: the modules refer
// to each other as `crate::…`, so they must sit at the crate root.
#[path = "../../examples/ecommerce/analytics.rs"]
mod analytics;
#[path = "../../examples/ecommerce/demo.rs"]
mod demo;
#[path = "../../examples/ecommerce/dlq.rs"]
mod dlq;
#[path = "../../examples/ecommerce/http.rs"]
mod http;
#[path = "../../examples/ecommerce/inventory.rs"]
mod inventory;
#[path = "../../examples/ecommerce/messages.rs"]
mod messages;
#[path = "../../examples/ecommerce/notification.rs"]
mod notification;
#[path = "../../examples/ecommerce/order.rs"]
mod order;
#[path = "../../examples/ecommerce/system.rs"]
mod system;
#[path = "../../examples/ecommerce/timeline.rs"]
mod timeline;
