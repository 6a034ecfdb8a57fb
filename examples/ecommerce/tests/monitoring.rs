//! The monitoring files say only what the code exports: every metric name
//! used by the alert rules (`deploy/prometheus/rules.yml`), their promtool
//! tests and the Grafana dashboard (`deploy/grafana/saga-dashboard.json`)
//! is in the table of `docs/METRICS.md`, and every alert has a unit test.
//! No Kafka needed.
//!
//! The rules are YAML, read without a YAML parser: the files are ours and
//! keep to a simple shape (checked here too), so a line scan finds every
//! `expr:` (inline, or a `|` block of the lines indented below it),
//! `alert:`, `alertname:` and `series:`. Metric names are then taken out
//! of each PromQL expression by a small tokenizer (no regular
//! expressions): every identifier outside quotes, label matchers (`{…}`),
//! ranges (`[…]`) and `by`/`without` lists that is not a PromQL function
//! or keyword is a metric name.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo_file(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The metric names of the table in `docs/METRICS.md`: the first cell of
/// each row that starts with a backquoted name.
fn documented() -> BTreeSet<String> {
    repo_file("docs/METRICS.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// PromQL's functions, aggregations and keywords used (or likely to be)
/// in rules and dashboards: not metric names.
const PROMQL: &[&str] = &[
    "abs",
    "absent",
    "and",
    "avg",
    "avg_over_time",
    "bool",
    "by",
    "ceil",
    "changes",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "delta",
    "deriv",
    "floor",
    "group_left",
    "group_right",
    "histogram_quantile",
    "idelta",
    "ignoring",
    "increase",
    "irate",
    "label_replace",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "offset",
    "on",
    "or",
    "quantile",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "sum",
    "sum_over_time",
    "time",
    "topk",
    "bottomk",
    "unless",
    "vector",
    "without",
];

/// The metric names `expr` uses (see the module's docs).
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    // After `by` or `without`: the next `( … )` lists labels.
    let mut labels_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if labels_next => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                labels_next = false;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if word == "by" || word == "without" || word == "on" || word == "ignoring" {
                    labels_next = true;
                } else if !PROMQL.contains(&word.as_str()) {
                    names.push(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number (1000, 0.5, 1e3): its letters are not a name.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The metric a series name belongs to: a histogram's `_bucket`, `_sum`
/// and `_count` series are the histogram's.
fn metric_of(series: &str, documented: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if documented.contains(base) {
                return base.to_owned();
            }
        }
    }
    series.to_owned()
}

/// Metrics that are Prometheus's own, not the project's (`up`: the scrape).
const PROMETHEUS_OWN: &[&str] = &["up"];

fn assert_documented(used: &[(String, String)], file: &str) {
    let documented = documented();
    assert!(
        documented.len() >= 20,
        "docs/METRICS.md's table looks unreadable: {documented:?}"
    );
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| {
            !PROMETHEUS_OWN.contains(&name.as_str())
                && !documented.contains(&metric_of(name, &documented))
        })
        .map(|(name, expr)| format!("`{name}` in `{expr}`"))
        .collect();
    assert!(
        missing.is_empty(),
        "{file} uses metrics docs/METRICS.md does not list:\n{}",
        missing.join("\n")
    );
}

/// The value of `key:` on a YAML line (`- ` and quotes around it taken off),
/// if the line is that key's.
fn yaml_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.trim_start().trim_start_matches("- ").trim_start();
    let value = rest.strip_prefix(key)?.strip_prefix(':')?.trim();
    Some(
        value
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
            .unwrap_or(value),
    )
}

/// Every `expr:` of a rules file: inline, or a `|` block (the lines
/// indented deeper than the key).
fn yaml_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(value) = yaml_value(line, "expr") else {
            continue;
        };
        if value == "|" || value == ">" {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" "));
        } else {
            assert!(!value.is_empty(), "an empty expr at line {}", n + 1);
            exprs.push(value.to_owned());
        }
    }
    exprs
}

fn used_in(exprs: &[String]) -> Vec<(String, String)> {
    exprs
        .iter()
        .flat_map(|e| metric_names(e).into_iter().map(move |n| (n, e.clone())))
        .collect()
}

#[test]
fn the_scan_finds_metric_names_and_skips_functions_labels_and_strings() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (component, le) (rate(saga_kafka_message_seconds_bucket{instance=~"a|b",x="sum"}[5m]))) > 0.5 and on (job) up == 1e3"#,
    );
    assert_eq!(names, ["saga_kafka_message_seconds_bucket", "up"]);
    let block = yaml_exprs("      - alert: X\n        expr: |\n          sum(a)\n            /\n          sum(b)\n        for: 5m\n");
    assert_eq!(block, ["sum(a) / sum(b)"]);
    assert_eq!(
        yaml_value("      - series: 'x{a=\"1\"}'", "series"),
        Some("x{a=\"1\"}")
    );
}

#[test]
fn every_metric_the_alert_rules_use_is_documented() {
    let rules = repo_file("deploy/prometheus/rules.yml");
    let exprs = yaml_exprs(&rules);
    let alerts = rules
        .lines()
        .filter(|l| yaml_value(l, "alert").is_some())
        .count();
    assert!(alerts >= 8, "expected the seed's alerts, found {alerts}");
    assert_eq!(exprs.len(), alerts, "one expr per alert");
    let used = used_in(&exprs);
    for name in [
        "saga_kafka_consumer_lag",
        "saga_kafka_message_seconds_bucket",
        "ecommerce_dlq_open",
        "up",
    ] {
        assert!(
            used.iter().any(|(n, _)| n == name),
            "the rules do not use {name}"
        );
    }
    assert_documented(&used, "deploy/prometheus/rules.yml");
}

#[test]
fn every_alert_has_a_unit_test_whose_series_are_documented_metrics() {
    let rules = repo_file("deploy/prometheus/rules.yml");
    let tests = repo_file("deploy/prometheus/rules_test.yml");
    let tested: BTreeSet<&str> = tests
        .lines()
        .filter_map(|l| yaml_value(l, "alertname"))
        .collect();
    let untested: Vec<&str> = rules
        .lines()
        .filter_map(|l| yaml_value(l, "alert"))
        .filter(|a| !tested.contains(a))
        .collect();
    assert!(untested.is_empty(), "alerts without a test: {untested:?}");
    let series: Vec<(String, String)> = tests
        .lines()
        .filter_map(|l| yaml_value(l, "series"))
        .map(|s| {
            let name = s.split('{').next().unwrap_or(s).trim();
            (name.to_owned(), s.to_owned())
        })
        .collect();
    assert!(!series.is_empty());
    assert_documented(&series, "deploy/prometheus/rules_test.yml");
}

#[test]
fn every_metric_the_dashboard_uses_is_documented() {
    let text = repo_file("deploy/grafana/saga-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= panels.len(), "every panel has a query");
    let used = used_in(&exprs);
    // What the dashboard is for: throughput, p99, lag per partition,
    // aborts by cause, DLQ size, problems.
    for name in [
        "saga_kafka_message_seconds_count",
        "saga_kafka_message_seconds_bucket",
        "saga_kafka_consumer_lag",
        "saga_kafka_aborts_total",
        "ecommerce_dlq_open",
        "saga_runtime_problems",
    ] {
        assert!(
            used.iter().any(|(n, _)| n == name),
            "the dashboard does not show {name}"
        );
    }
    assert_documented(&used, "deploy/grafana/saga-dashboard.json");
}
