//! `ecommerce sagas …`: the operators' client for the order sagas of a
//! running order service (or `serve`), over its HTTP API: find the stuck
//! ones, read one with its history, and act on a parked one.

use clap::Subcommand;
use serde_json::{json, Value};

use crate::dlq_client::{encode_segment, request};

/// What to do with the order sagas.
#[derive(Clone, Debug, Subcommand)]
pub enum SagasCommand {
    /// List sagas, a page at a time, with where they stand and how long.
    List {
        /// running, compensating, completed, compensated, parked, active
        /// or final.
        #[arg(long)]
        status: Option<String>,
        /// Only those at this step.
        #[arg(long)]
        step: Option<String>,
        /// Only those unchanged for longer than this (`5m`, `2h`).
        #[arg(long)]
        older_than: Option<String>,
        /// The page after this saga id (the previous page's `next`).
        #[arg(long)]
        after: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one saga in full: data, steps, history.
    Show {
        /// The saga (order) id.
        id: String,
    },
    /// Run the parked step (or compensation) again, with a fresh budget;
    /// on a stuck saga (waiting on a backoff or an unanswered command),
    /// run it again now.
    Retry(ActionArgs),
    /// Count the parked step as done (or undone) and go on.
    Skip(ActionArgs),
    /// Compensate a saga parked before its point of no return, or a stuck
    /// one waiting on a compensatable step.
    Abort(ActionArgs),
}

/// The saga and why, for an action.
#[derive(Clone, Debug, clap::Args)]
pub struct ActionArgs {
    /// The saga (order) id.
    id: String,
    /// Why (recorded in the saga's history with the operator).
    #[arg(long, default_value = "")]
    note: String,
    /// The step it must still be parked on (refused otherwise).
    #[arg(long)]
    step: Option<String>,
    /// The saga's version it must still be at, as `sagas show` printed it
    /// (refused if it changed since).
    #[arg(long)]
    at_version: Option<u64>,
}

/// Runs `cmd` against the API at `api` with an operator's bearer `token`
/// (the history records the operator it belongs to); prints the answer.
///
/// # Errors
/// The API's error, or why it could not be reached.
pub async fn run(api: &str, token: &str, cmd: SagasCommand) -> Result<(), String> {
    let api = api.trim_end_matches('/');
    let client = reqwest::Client::new();
    let action = |what: &str, a: &ActionArgs| {
        let mut body = json!({"note": a.note});
        if let Some(step) = &a.step {
            body["step"] = json!(step);
        }
        if let Some(version) = a.at_version {
            body["version"] = json!(version);
        }
        (
            reqwest::Method::POST,
            format!("{api}/sagas/{}/{what}", encode_segment(&a.id)),
            Some(body),
        )
    };
    let (method, url, body) = match &cmd {
        SagasCommand::List {
            status,
            step,
            older_than,
            after,
            limit,
        } => {
            let mut url = reqwest::Url::parse(&format!("{api}/sagas"))
                .map_err(|e| format!("--api `{api}`: {e}"))?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("limit", &limit.to_string());
                for (k, v) in [
                    ("status", status),
                    ("step", step),
                    ("older_than", older_than),
                    ("after", after),
                ] {
                    if let Some(v) = v {
                        q.append_pair(k, v);
                    }
                }
            }
            (reqwest::Method::GET, url.to_string(), None)
        }
        SagasCommand::Show { id } => (
            reqwest::Method::GET,
            format!("{api}/sagas/{}", encode_segment(id)),
            None,
        ),
        SagasCommand::Retry(a) => action("retry", a),
        SagasCommand::Skip(a) => action("skip", a),
        SagasCommand::Abort(a) => action("abort", a),
    };
    let value = request(&client, api, token, method, &url, body).await?;
    match cmd {
        SagasCommand::List { .. } => print_list(&value),
        _ => println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
        ),
    }
    Ok(())
}

fn print_list(v: &Value) {
    let sagas = v["sagas"].as_array().cloned().unwrap_or_default();
    println!("{} saga(s)", sagas.len());
    for s in sagas {
        println!(
            "{:<22} {:<12} step {:<20} idle {:>6} s  {}",
            s["id"].as_str().unwrap_or("?"),
            s["status"].as_str().unwrap_or("?"),
            s["step"].as_str().unwrap_or("-"),
            s["idle_ms"].as_u64().unwrap_or(0) / 1000,
            s["reason"].as_str().unwrap_or(""),
        );
    }
    if let Some(next) = v["next"].as_str() {
        println!("more: --after {next}");
    }
}
