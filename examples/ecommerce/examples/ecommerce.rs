//! `cargo run --example ecommerce [-- ARGS]` from the workspace root: the
//! example system's command line (the same as its `ecommerce` binary).
//! Without arguments, the in-memory demo of the seed's three flows.

fn main() -> std::process::ExitCode {
    ecommerce::cli::main()
}
