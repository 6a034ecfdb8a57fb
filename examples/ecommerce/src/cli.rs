//! The command line: the demo, `serve`, one command per service, and the
//! DLQ operators' client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::messages::Topics;
use crate::system::{kafka, Config, RuntimeKind, Services, System};
use crate::{auth, demo, dlq_client, http, notification, order, sagas_client};

#[derive(Debug, Parser)]
#[command(
    name = "ecommerce",
    about = "An e-commerce system on saga orchestration. Without a command: the in-memory demo."
)]
struct Args {
    /// Run on Apache Kafka at this bootstrap address (`host:port,...`),
    /// before or after the command. The per-service commands always run on
    /// Kafka: without --kafka at KAFKA_BOOTSTRAP_SERVERS. Security settings,
    /// delivery mode… come from the environment (see saga-kafka's README).
    // A value is required: an optional one would swallow the command's
    // name in `--kafka inventory`.
    #[arg(long, global = true, value_name = "BOOTSTRAP")]
    kafka: Option<String>,
    /// Namespace for topics, consumer groups and the saga's name (default
    /// $ECOMMERCE_TOPIC_PREFIX, else none: the design's exact topic names).
    #[arg(long, global = true, value_name = "PREFIX")]
    topic_prefix: Option<String>,
    /// This process's instance id (default $SAGA_INSTANCE_ID, else 0):
    /// unique per live process of a service, stable across its restarts
    /// (it names the transactional ids).
    #[arg(long, global = true, value_name = "ID")]
    instance_id: Option<String>,
    /// The application name, prefix of transactional ids (default $SAGA_APP).
    #[arg(long, global = true)]
    app: Option<String>,
    /// Partitions of the topics created, and inventory stock shards
    /// (default $KAFKA_PARTITIONS, else 3).
    #[arg(long, global = true)]
    partitions: Option<usize>,
    /// Shorter notification timings (0.5 s timeout, 0.2 s then 0.4 s
    /// backoff) for trying the DLQ flow without waiting; give it to every
    /// process of a deployment.
    #[arg(long, global = true)]
    fast: bool,
    /// On Kafka, do not create topics on start: check that they exist
    /// (co-partitioned, state topics and ledgers compacted) and stop with a
    /// clear message if not. Create them as an admin with `topics create`.
    /// Also $ECOMMERCE_CREATE_TOPICS=false.
    #[arg(long, global = true)]
    no_create_topics: bool,
    /// The API's bearer tokens, one `<role> <name> <token>` line each
    /// (default $ECOMMERCE_API_TOKENS_FILE; $ECOMMERCE_API_TOKENS adds
    /// lines). Without any, random tokens are generated and printed.
    #[arg(long, global = true, value_name = "FILE")]
    api_tokens_file: Option<PathBuf>,
    /// Export spans over OTLP/HTTP to this collector (a base URL such as
    /// `http://localhost:4318`; default $OTEL_EXPORTER_OTLP_ENDPOINT).
    /// Needs the `otel` feature.
    #[arg(long, global = true, value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How `acls` prints the bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AclFormat {
    /// `<principal> ALLOW <operation> <resource> <pattern> <name>`, one
    /// binding per line (Kafka's enum names, for an admin client).
    Lines,
    /// `kafka-acls.sh --add …` commands (set $BOOTSTRAP and $ADMIN_CONFIG).
    KafkaAcls,
}

/// What `topics` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Subcommand)]
enum TopicsAction {
    /// Create every topic of the system (run as a principal allowed to).
    Create,
    /// List every topic with its kind: what to provision.
    List,
}

/// The fake email API's behaviour (where the notification service runs).
#[derive(Debug, Clone, clap::Args)]
struct EmailArgs {
    /// Make the fake email API fail: "timeout,503,500" for the next
    /// sends, or "c-42=timeout,503,500" for one customer's. Repeatable.
    #[arg(long, value_name = "SCRIPT")]
    email_script: Vec<String>,
    /// Share (0.0–1.0) of other emails that fail with 503.
    #[arg(long, default_value_t = 0.0)]
    email_failure_rate: f64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service behind the HTTP API (in memory, or on Kafka with --kafka).
    Serve {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        #[command(flatten)]
        email: EmailArgs,
    },
    /// The order service on Kafka: the saga orchestrator and the orders API.
    Order {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
    },
    /// The inventory service on Kafka (GET /inventory shows its stock shards).
    Inventory {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8081")]
        addr: SocketAddr,
    },
    /// The notification service on Kafka, with the fake email API.
    Notification {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8082")]
        addr: SocketAddr,
        #[command(flatten)]
        email: EmailArgs,
    },
    /// The analytics projection on Kafka and GET /analytics.
    Analytics {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8083")]
        addr: SocketAddr,
    },
    /// Without an action: the DLQ processor service on Kafka (GET /dlq …).
    /// With one: operate the DLQ of a running `serve` or `dlq` process.
    Dlq {
        /// The API of the running `serve` or `dlq` process (actions).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// An operator's API token (default $ECOMMERCE_API_TOKEN, better:
        /// a flag shows in the process list); the archive records the
        /// operator it belongs to.
        #[arg(long)]
        token: Option<String>,
        /// Where the DLQ processor service listens (no action).
        #[arg(long, default_value = "127.0.0.1:8084")]
        addr: SocketAddr,
        #[command(subcommand)]
        action: Option<dlq_client::DlqCommand>,
    },
    /// Operate the order sagas of a running `serve` or `order` process:
    /// list (e.g. `--status parked --older-than 5m`, or `--status active`
    /// for stuck ones), show, retry, skip, abort.
    Sagas {
        /// The API of the running `serve` or `order` process.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// An operator's API token (default $ECOMMERCE_API_TOKEN, better:
        /// a flag shows in the process list); the saga's history records
        /// the operator it belongs to.
        #[arg(long)]
        token: Option<String>,
        #[command(subcommand)]
        action: sagas_client::SagasCommand,
    },
    /// Print the Kafka ACLs a service needs, derived from its wiring with
    /// this configuration (topic prefix, app, transactional-id prefix,
    /// topic creation).
    Acls {
        /// The service: order, inventory, notification, analytics or dlq.
        #[arg(long)]
        service: String,
        /// The service's principal (default `User:<service>`).
        #[arg(long)]
        principal: Option<String>,
        /// Output form.
        #[arg(long, value_enum, default_value_t = AclFormat::Lines)]
        format: AclFormat,
    },
    /// The system's topics on Kafka.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
}

/// The OTLP endpoint of this run (flag, else environment), for
/// [`init_tracing`].
static OTLP_ENDPOINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// What [`init_tracing`] installed, flushed at the end of the run.
static TELEMETRY: std::sync::Mutex<Option<crate::telemetry::Telemetry>> =
    std::sync::Mutex::new(None);

fn init_tracing(default: &str) {
    let endpoint = OTLP_ENDPOINT.get().cloned().flatten();
    match crate::telemetry::init(default, endpoint.as_deref()) {
        Ok(t) => {
            *TELEMETRY.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        }
        Err(e) => eprintln!("warning: {e}; spans are not exported"),
    }
}

/// Where Kafka is: `--kafka`'s value; else, for a per-service command
/// (`required`), `env` (KAFKA_BOOTSTRAP_SERVERS).
fn bootstrap(
    flag: Option<String>,
    required: bool,
    env: Option<String>,
) -> Result<Option<String>, String> {
    match flag {
        Some(v) if v.trim().is_empty() => Err("--kafka needs an address: HOST:PORT".to_owned()),
        Some(v) => Ok(Some(v)),
        None if required => env
            .filter(|v| !v.trim().is_empty())
            .map(Some)
            .ok_or_else(|| {
                "this service runs on Kafka: give --kafka HOST:PORT or set KAFKA_BOOTSTRAP_SERVERS"
                    .to_owned()
            }),
        None => Ok(None),
    }
}

fn env_bootstrap() -> Option<String> {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").ok()
}

fn config(args: &Args, kafka: Option<String>, services: Services) -> Result<Config, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let partitions = match args.partitions {
        Some(n) => n,
        None => env("KAFKA_PARTITIONS")
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| format!("KAFKA_PARTITIONS=`{v}` is not a number"))
            })
            .transpose()?
            .unwrap_or(3),
    };
    if partitions == 0 {
        return Err("--partitions must be at least 1".into());
    }
    let mut config = Config {
        runtime: kafka.map_or(RuntimeKind::Memory, RuntimeKind::Kafka),
        services,
        partitions,
        topics: Topics::new(
            args.topic_prefix
                .clone()
                .or_else(|| env("ECOMMERCE_TOPIC_PREFIX"))
                .unwrap_or_default(),
        ),
        app: args.app.clone(),
        instance_id: args.instance_id.clone(),
        create_topics: create_topics(args.no_create_topics, env("ECOMMERCE_CREATE_TOPICS"))?,
        ..Config::default()
    };
    if args.fast {
        config = config.fast();
    }
    Ok(config)
}

/// The operator's token of a client command: `--token`, else
/// $ECOMMERCE_API_TOKEN.
fn operator_token(flag: Option<String>, what: &str) -> Result<String, String> {
    flag.or_else(|| std::env::var(auth::CLIENT_TOKEN_ENV).ok())
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| {
            format!(
                "the {what} API needs an operator's token: --token or {}",
                auth::CLIENT_TOKEN_ENV
            )
        })
}

/// Whether processes create topics: not with `--no-create-topics`, else
/// as `ECOMMERCE_CREATE_TOPICS` says (default yes).
fn create_topics(flag_off: bool, env: Option<String>) -> Result<bool, String> {
    if flag_off {
        return Ok(false);
    }
    match env.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("true" | "1" | "yes" | "on") => Ok(true),
        Some("false" | "0" | "no" | "off") => Ok(false),
        Some(other) => Err(format!(
            "ECOMMERCE_CREATE_TOPICS=`{other}` is not `true` or `false`"
        )),
    }
}

/// `acls`: the service's bindings, printed.
async fn acls(
    args: &Args,
    service: &str,
    principal: Option<String>,
    format: AclFormat,
) -> Result<(), String> {
    let services = Services::only(service).ok_or_else(|| {
        format!("no service `{service}` (order, inventory, notification, analytics, dlq)")
    })?;
    // The address plays no part in the bindings.
    let kafka = args
        .kafka
        .clone()
        .or_else(env_bootstrap)
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    let config = config(args, Some(kafka.clone()), services)?;
    let kcfg = kafka::kafka_config(&config, &kafka)?;
    let plan = kafka::acl_plan(&config, &kcfg).await?;
    let principal = principal.unwrap_or_else(|| format!("User:{service}"));
    match format {
        AclFormat::Lines => print!("{}", plan.to_lines(&principal)),
        AclFormat::KafkaAcls => print!("{}", plan.to_kafka_acls(&principal)),
    }
    Ok(())
}

/// `topics create|list`.
async fn topics(args: &Args, action: TopicsAction) -> Result<(), String> {
    let kafka = bootstrap(
        args.kafka.clone(),
        action == TopicsAction::Create,
        env_bootstrap(),
    )?
    .unwrap_or_else(|| "127.0.0.1:9092".into());
    let config = config(args, Some(kafka.clone()), Services::ALL)?;
    let specs = match action {
        TopicsAction::List => kafka::kafka_topics(&config).map_err(|e| e.to_string())?,
        TopicsAction::Create => {
            let kcfg = kafka::kafka_config(&config, &kafka)?;
            kafka::create_topics(&config, &kcfg).await?
        }
    };
    for s in specs {
        let kind = match s.kind {
            saga_kafka::TopicKind::Compacted => "compacted",
            saga_kafka::TopicKind::DeadLetters => "dead-letters",
            _ => "messages",
        };
        println!(
            "{}\t{kind}\t{}",
            s.name,
            s.partitions.map_or(config.partitions, |n| n as usize)
        );
    }
    Ok(())
}

async fn serve(
    config: Config,
    addr: SocketAddr,
    email: EmailArgs,
    tokens_file: Option<&Path>,
) -> Result<(), String> {
    let tokens = auth::ApiTokens::configured(tokens_file)?;
    let system = Arc::new(System::start(config).await?);
    for s in &email.email_script {
        match s.split_once('=') {
            Some((customer, script)) => system.email.script_for(
                &order::email_of(customer.trim()),
                notification::parse_script(script)?,
            ),
            None => system.email.script(notification::parse_script(s)?),
        }
    }
    if email.email_failure_rate > 0.0 {
        system.email.fail_randomly(email.email_failure_rate, 42);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let tokens = auth::for_process(tokens, local);
    let services = system.services.names().join(", ");
    let runtime = system.runtime_name();
    tracing::info!(addr = %local, runtime, services, "e-commerce API listening");
    eprintln!("e-commerce [{services}] on {runtime}: listening on http://{local}; ctrl-c to stop");
    let app = http::router(system.clone(), tokens);
    let stopping = system.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: refusing new writes");
            stopping.set_accepting(false);
        })
        .await
        .map_err(|e| format!("server error: {e}"))?;
    system.shutdown().await;
    Ok(())
}

/// Ctrl-c, or SIGTERM on Unix.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn service(
    args: &Args,
    name: &str,
    addr: SocketAddr,
    email: EmailArgs,
) -> Result<(), String> {
    let services = Services::only(name).ok_or_else(|| format!("no service `{name}`"))?;
    let kafka = bootstrap(args.kafka.clone(), true, env_bootstrap())?;
    let tokens_file = args.api_tokens_file.as_deref();
    serve(config(args, kafka, services)?, addr, email, tokens_file).await
}

/// Runs the command line with the process's arguments; the exit code says
/// whether it succeeded (errors are printed on stderr).
pub fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(Args::parse()))
}

async fn run(args: Args) -> std::process::ExitCode {
    let _ = OTLP_ENDPOINT.set(
        args.otlp_endpoint
            .clone()
            .or_else(|| std::env::var(crate::telemetry::OTLP_ENDPOINT_ENV).ok()),
    );
    let no_email = || EmailArgs {
        email_script: Vec::new(),
        email_failure_rate: 0.0,
    };
    let result = match &args.command {
        None => {
            // The demo prints its own story; only errors from the services.
            init_tracing("error");
            if let Some(k) = &args.kafka {
                // `--kafka inventory`: the command's name taken for the address.
                let hint = if k == "serve" || Services::only(k).is_some() {
                    format!(" (`{k}` was read as --kafka's address: `--kafka HOST:PORT {k}`)")
                } else {
                    String::new()
                };
                Err(format!(
                    "the demo runs in memory; on Kafka use `serve --kafka HOST:PORT` \
                     (or one process per service) and the HTTP API{hint}"
                ))
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
        Some(Command::Serve { addr, email }) => {
            init_tracing("info");
            match bootstrap(args.kafka.clone(), false, None)
                .and_then(|k| config(&args, k, Services::ALL))
            {
                Ok(c) => serve(c, *addr, email.clone(), args.api_tokens_file.as_deref()).await,
                Err(e) => Err(e),
            }
        }
        Some(Command::Order { addr }) => {
            init_tracing("info");
            service(&args, "order", *addr, no_email()).await
        }
        Some(Command::Inventory { addr }) => {
            init_tracing("info");
            service(&args, "inventory", *addr, no_email()).await
        }
        Some(Command::Notification { addr, email }) => {
            init_tracing("info");
            service(&args, "notification", *addr, email.clone()).await
        }
        Some(Command::Analytics { addr }) => {
            init_tracing("info");
            service(&args, "analytics", *addr, no_email()).await
        }
        Some(Command::Dlq {
            addr, action: None, ..
        }) => {
            init_tracing("info");
            service(&args, "dlq", *addr, no_email()).await
        }
        Some(Command::Dlq {
            api,
            token,
            action: Some(action),
            ..
        }) => {
            init_tracing("warn");
            match operator_token(token.clone(), "DLQ") {
                Ok(token) => dlq_client::run(api, &token, action.clone()).await,
                Err(e) => Err(e),
            }
        }
        Some(Command::Sagas { api, token, action }) => {
            init_tracing("warn");
            match operator_token(token.clone(), "sagas") {
                Ok(token) => sagas_client::run(api, &token, action.clone()).await,
                Err(e) => Err(e),
            }
        }
        Some(Command::Acls {
            service,
            principal,
            format,
        }) => {
            init_tracing("error");
            acls(&args, service, principal.clone(), *format).await
        }
        Some(Command::Topics { action }) => {
            init_tracing("warn");
            topics(&args, *action).await
        }
    };
    let telemetry = TELEMETRY.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = telemetry {
        // Off the async runtime: the exporter's last flush blocks.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("ecommerce").chain(args.iter().copied()))
    }

    fn is_inventory(a: &Args) -> bool {
        matches!(a.command, Some(Command::Inventory { .. }))
    }

    #[test]
    fn kafka_goes_before_or_after_the_command() {
        for argv in [
            &["--kafka", "127.0.0.1:9092", "inventory"][..],
            &["inventory", "--kafka", "127.0.0.1:9092"],
            &["--kafka=127.0.0.1:9092", "inventory"],
            &["inventory", "--kafka=127.0.0.1:9092"],
        ] {
            let a = parse(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert!(is_inventory(&a), "{argv:?}: {a:?}");
            assert_eq!(a.kafka.as_deref(), Some("127.0.0.1:9092"), "{argv:?}");
        }
        let a = parse(&["--kafka", "b:9092", "serve", "--addr", "127.0.0.1:0"]).unwrap();
        assert!(matches!(a.command, Some(Command::Serve { .. })), "{a:?}");
        assert_eq!(a.kafka.as_deref(), Some("b:9092"));
        let a = parse(&["dlq", "--kafka", "b:9092", "--instance-id", "dlq-1"]).unwrap();
        assert!(matches!(a.command, Some(Command::Dlq { action: None, .. })));
        assert_eq!(a.kafka.as_deref(), Some("b:9092"));
        assert_eq!(a.instance_id.as_deref(), Some("dlq-1"));
    }

    #[test]
    fn topic_creation_is_on_unless_the_flag_or_the_environment_turns_it_off() {
        assert_eq!(create_topics(false, None), Ok(true));
        assert_eq!(create_topics(true, Some("true".into())), Ok(false));
        assert_eq!(create_topics(false, Some("False".into())), Ok(false));
        assert_eq!(create_topics(false, Some("1".into())), Ok(true));
        assert!(create_topics(false, Some("maybe".into())).is_err());
        let a = parse(&["--no-create-topics", "inventory"]).unwrap();
        assert!(a.no_create_topics && is_inventory(&a));
    }

    #[test]
    fn sagas_takes_the_filters_and_actions_of_the_admin_api() {
        let a = parse(&["sagas", "list", "--status", "parked", "--older-than", "5m"]).unwrap();
        let Some(Command::Sagas { action, .. }) = a.command else {
            panic!("{a:?}");
        };
        assert!(matches!(
            action,
            sagas_client::SagasCommand::List { status: Some(s), older_than: Some(o), .. }
                if s == "parked" && o == "5m"
        ));
        let a = parse(&["sagas", "abort", "ORD-1", "--note", "customer asked"]).unwrap();
        assert!(matches!(
            a.command,
            Some(Command::Sagas {
                action: sagas_client::SagasCommand::Abort(_),
                ..
            })
        ));
        assert!(parse(&["sagas", "retry"]).is_err(), "an id is needed");
    }

    #[test]
    fn kafka_needs_a_value() {
        // Without one, the command's name is not taken for it.
        assert!(parse(&["inventory", "--kafka"]).is_err());
        let a = parse(&["--kafka", "inventory"]).unwrap();
        assert_eq!(a.kafka.as_deref(), Some("inventory"));
        assert!(a.command.is_none(), "the demo, which refuses --kafka");
        let a = parse(&["inventory"]).unwrap();
        assert!(is_inventory(&a) && a.kafka.is_none());
    }

    #[test]
    fn the_environment_is_the_per_service_fallback() {
        let env = || Some("env:9092".to_owned());
        assert_eq!(
            bootstrap(Some("flag:9092".into()), true, env()),
            Ok(Some("flag:9092".into()))
        );
        assert_eq!(bootstrap(None, true, env()), Ok(Some("env:9092".into())));
        assert!(bootstrap(None, true, None).is_err());
        assert!(bootstrap(None, true, Some(String::new())).is_err());
        assert!(bootstrap(Some(String::new()), true, env()).is_err());
        // `serve` runs in memory unless --kafka says where Kafka is.
        assert_eq!(bootstrap(None, false, None), Ok(None));
        assert_eq!(
            bootstrap(Some("flag:9092".into()), false, None),
            Ok(Some("flag:9092".into()))
        );
    }
}
