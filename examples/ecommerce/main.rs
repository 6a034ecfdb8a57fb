//! The e-commerce example: an order saga over inventory, notification,
//! analytics and DLQ services (see README.md, "Walkthrough").
//!
//! ```text
//! cargo run --example ecommerce                      # the demo: the seed's three flows, in memory
//! cargo run --example ecommerce -- serve             # the HTTP API on 127.0.0.1:8080
//! cargo run --example ecommerce -- dlq list          # operate the DLQ of a running `serve`
//! ```

mod analytics;
mod cli;
mod demo;
mod dlq;
mod http;
mod inventory;
mod messages;
mod notification;
mod order;
mod system;
mod timeline;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::system::{Config, RuntimeKind, System};

#[derive(Debug, Parser)]
#[command(
    name = "ecommerce",
    about = "An e-commerce system on saga orchestration. Without a command: the in-memory demo."
)]
struct Args {
    /// Run on Apache Kafka at this bootstrap address instead of in memory
    /// (not implemented yet: it waits for the saga-kafka runtime).
    #[arg(long, global = true, value_name = "BOOTSTRAP")]
    kafka: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service behind the HTTP API.
    Serve {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Make the fake email API fail: "timeout,503,500" for the next
        /// sends, or "c-42=timeout,503,500" for one customer's. Repeatable.
        #[arg(long, value_name = "SCRIPT")]
        email_script: Vec<String>,
        /// Share (0.0–1.0) of other emails that fail with 503.
        #[arg(long, default_value_t = 0.0)]
        email_failure_rate: f64,
        /// Shorter notification timings (0.5 s timeout, 0.2 s then 0.4 s
        /// backoff) for trying the DLQ flow without waiting.
        #[arg(long)]
        fast: bool,
    },
    /// Operate the dead-letter queue of a running `serve`.
    Dlq {
        /// The API of the running `serve`.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// Who acts (recorded in the audit archive); default $USER.
        #[arg(long)]
        operator: Option<String>,
        #[command(subcommand)]
        action: cli::DlqCommand,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn config(kafka: Option<String>) -> Config {
    Config {
        runtime: kafka.map_or(RuntimeKind::Memory, RuntimeKind::Kafka),
        ..Config::default()
    }
}

async fn serve(
    mut config: Config,
    addr: SocketAddr,
    scripts: Vec<String>,
    failure_rate: f64,
    fast: bool,
) -> Result<(), String> {
    if fast {
        config.notification = notification::NotificationPolicy {
            attempt_timeout: Duration::from_millis(500),
            first_backoff: Duration::from_millis(200),
            max_attempts: 3,
        };
        config.order.notify_timeout = Duration::from_secs(10);
    }
    let system = Arc::new(System::start(config)?);
    for s in &scripts {
        match s.split_once('=') {
            Some((customer, script)) => system.email.script_for(
                &order::email_of(customer.trim()),
                notification::parse_script(script)?,
            ),
            None => system.email.script(notification::parse_script(s)?),
        }
    }
    if failure_rate > 0.0 {
        system.email.fail_randomly(failure_rate, 42);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, runtime = system.platform.name(), "e-commerce API listening");
    eprintln!("e-commerce API on http://{addr} (in memory); ctrl-c to stop");
    let app = http::router(system.clone());
    let stopping = system.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down: refusing new writes");
            stopping.memory().set_accepting(false);
        })
        .await
        .map_err(|e| format!("server error: {e}"))?;
    system.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.command {
        None => {
            // The demo prints its own story; only errors from the services.
            init_tracing("error");
            if let Some(k) = args.kafka {
                Err(System::start(config(Some(k))).err().unwrap_or_default())
            } else {
                let started = std::time::Instant::now();
                let mut stdout = std::io::stdout();
                demo::run(&mut stdout).await.map(|_| {
                    println!(
                        "\nDemo finished in {:.1} s.",
                        started.elapsed().as_secs_f64()
                    );
                })
            }
        }
        Some(Command::Serve {
            addr,
            email_script,
            email_failure_rate,
            fast,
        }) => {
            init_tracing("info");
            serve(
                config(args.kafka),
                addr,
                email_script,
                email_failure_rate,
                fast,
            )
            .await
        }
        Some(Command::Dlq {
            api,
            operator,
            action,
        }) => {
            init_tracing("warn");
            let operator = operator
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "operator".into());
            cli::run(&api, &operator, action).await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
