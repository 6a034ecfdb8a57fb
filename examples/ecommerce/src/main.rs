//! The example system's command line (see `ecommerce --help`).

fn main() -> std::process::ExitCode {
    ecommerce::cli::main()
}
