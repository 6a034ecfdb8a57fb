//! `ecommerce dlq …`: the operators' client for the DLQ processor of a
//! running `ecommerce serve`, over its HTTP API.

use clap::Subcommand;
use serde_json::{json, Value};

/// What to do with the dead-letter queue.
#[derive(Clone, Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters and their status.
    List,
    /// Show one dead letter in full (metadata, original message, actions).
    Show {
        /// `dlq-1`, or the full dead-letter id.
        id: String,
    },
    /// Send the original request again, optionally corrected.
    Retry {
        /// `dlq-1`, or the full dead-letter id.
        id: String,
        /// A corrected payload (JSON) to send instead of the original one.
        #[arg(long)]
        payload: Option<String>,
        /// A note for the audit archive.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Drop it on purpose.
    Discard {
        /// `dlq-1`, or the full dead-letter id.
        id: String,
        /// Why (kept in the archive).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Alert the ops team (the dead letter stays open).
    Alert {
        /// `dlq-1`, or the full dead-letter id.
        id: String,
        /// What to tell them.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Tell the customer by SMS instead of email.
    Sms {
        /// `dlq-1`, or the full dead-letter id.
        id: String,
        /// A note for the audit archive.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Show every action taken, for audit.
    Archive,
}

fn encode(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

/// Runs `cmd` against the API at `api` with the operator's bearer `token`
/// (the archive records the operator it belongs to); prints the answer.
pub async fn run(api: &str, token: &str, cmd: DlqCommand) -> Result<(), String> {
    let api = api.trim_end_matches('/');
    let client = reqwest::Client::new();
    let action = |id: &str, what: &str, body: Value| {
        (
            reqwest::Method::POST,
            format!("{api}/dlq/{}/{what}", encode(id)),
            Some(body),
        )
    };
    let (method, url, body) = match &cmd {
        DlqCommand::List => (reqwest::Method::GET, format!("{api}/dlq"), None),
        DlqCommand::Archive => (reqwest::Method::GET, format!("{api}/dlq/archive"), None),
        DlqCommand::Show { id } => (
            reqwest::Method::GET,
            format!("{api}/dlq/{}", encode(id)),
            None,
        ),
        DlqCommand::Retry { id, payload, note } => {
            let mut body = json!({"note": note});
            if let Some(p) = payload {
                let p: Value = serde_json::from_str(p)
                    .map_err(|e| format!("--payload is not valid JSON: {e}"))?;
                body["payload"] = p;
            }
            action(id, "retry", body)
        }
        DlqCommand::Discard { id, note } => action(id, "discard", json!({"note": note})),
        DlqCommand::Alert { id, note } => action(id, "alert", json!({"note": note})),
        DlqCommand::Sms { id, note } => action(id, "sms", json!({"note": note})),
    };
    let value = request(&client, api, token, method, &url, body).await?;
    match cmd {
        DlqCommand::List => print_list(&value),
        _ => println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
        ),
    }
    Ok(())
}

/// Sends one request to the API at `api` with the bearer `token`; the
/// JSON answer, or the API's error as text.
pub(crate) async fn request(
    client: &reqwest::Client,
    api: &str,
    token: &str,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut req = client.request(method, url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req
        .send()
        .await
        .map_err(|e| format!("cannot reach {api} (is `ecommerce serve` running?): {e}"))?;
    let status = res.status();
    let value: Value = res
        .json()
        .await
        .map_err(|e| format!("{url} answered {status} with a body that is not JSON: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "{status}: {}",
            value["error"].as_str().unwrap_or(&value.to_string())
        ));
    }
    Ok(value)
}

/// Percent-encodes what would end a path segment.
pub(crate) fn encode_segment(id: &str) -> String {
    encode(id)
}

fn print_list(v: &Value) {
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    println!("{} dead letter(s), {} open", entries.len(), v["open"]);
    for e in entries {
        let d = &e["dead_letter"];
        println!(
            "{:<7} {:<9} order {:<13} {} attempts  {}  last error: {}",
            e["dlq_id"].as_str().unwrap_or("?"),
            e["status"].as_str().unwrap_or("?"),
            e["order_id"].as_str().unwrap_or("?"),
            d["retry_count"],
            d["reason"].as_str().unwrap_or("?"),
            d["last_error"].as_str().unwrap_or("?"),
        );
    }
}
