//! Pictures in the README that come from the code stay equal to it.
//! `BLESS=1 cargo test -p ecommerce --test readme` rewrites them.

use ecommerce::messages::Topics;
use ecommerce::order::{saga, OrderPolicy};

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");

/// The text between `<!-- {name}:begin -->` and `<!-- {name}:end -->`.
fn block<'a>(readme: &'a str, name: &str) -> (usize, usize, &'a str) {
    let begin = format!("<!-- {name}:begin -->\n");
    let start = readme.find(&begin).expect("the README has the block") + begin.len();
    let end = start
        + readme[start..]
            .find(&format!("<!-- {name}:end -->"))
            .unwrap();
    (start, end, &readme[start..end])
}

#[test]
fn the_readmes_order_saga_diagram_is_what_to_mermaid_draws() {
    let readme = std::fs::read_to_string(README).unwrap();
    let def = saga(&OrderPolicy::default(), &Topics::default()).unwrap();
    let expected = format!("```mermaid\n{}\n```\n", def.to_mermaid().trim_end());
    let (start, end, shown) = block(&readme, "order-saga");
    if shown != expected && std::env::var_os("BLESS").is_some() {
        let updated = format!("{}{expected}{}", &readme[..start], &readme[end..]);
        std::fs::write(README, updated).unwrap();
        return;
    }
    assert_eq!(
        shown, expected,
        "the README's order saga diagram is stale: run with BLESS=1"
    );
}
