//! What the tests share: the API token they call with, the example's
//! services as OS processes (started, killed, restarted), and the orders
//! they post.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::Router;
use serde_json::{json, Value};

/// The operator the tests act as.
pub const OPERATOR: &str = "test-operator";
/// Its API token (operators may place orders for any customer).
pub const OPERATOR_TOKEN: &str = "test-operator-token-0001";

/// The token configuration of the tests (the processes get it through
/// `ECOMMERCE_API_TOKENS`).
pub fn token_lines() -> String {
    format!("operator {OPERATOR} {OPERATOR_TOKEN}")
}

/// [`token_lines`] for an in-process router.
pub fn api_tokens() -> ecommerce::auth::ApiTokens {
    ecommerce::auth::ApiTokens::parse(&token_lines()).expect("the test tokens parse")
}

/// Calls the in-process API as the operator.
pub async fn call(
    api: &Router,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    ecommerce::demo::call(api, Some(OPERATOR_TOKEN), method, path, body).await
}

/// An HTTP client that sends the operator's token with every request.
pub fn client(timeout: Duration) -> reqwest::Client {
    let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {OPERATOR_TOKEN}"))
        .expect("a header value");
    auth.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, auth)]);
    reqwest::Client::builder()
        .timeout(timeout)
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// A service process to run: its name (also its instance id), the
/// subcommand, and where it listens.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub service: String,
    pub addr: String,
}

/// The running services; killed (and reaped) when dropped, their logs'
/// last lines printed if the test is failing.
pub struct Processes {
    pub dir: PathBuf,
    exe: PathBuf,
    common: Vec<String>,
    children: Vec<(Service, Child)>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
        }
        let dir = self.dir.clone();
        for (s, child) in &mut self.children {
            let _ = child.wait();
            if std::thread::panicking() {
                let path = dir.join(format!("{}.log", s.name));
                let log = std::fs::read_to_string(path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- last lines of {}:", s.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Processes {
    /// Processes of the example's binary, logging into `dir`, each started
    /// with the arguments `common`.
    pub fn new(dir: PathBuf, common: Vec<String>) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            exe: example_binary(),
            common,
            children: Vec::new(),
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Starts `service` as process `name` (its instance id), listening on
    /// `addr` (`127.0.0.1:0` for any port). Its log is appended to.
    pub fn spawn(&mut self, name: &str, service: &str, addr: &str) {
        let s = Service {
            name: name.to_owned(),
            service: service.to_owned(),
            addr: addr.to_owned(),
        };
        let child = self.start(&s);
        self.children.push((s, child));
    }

    fn start(&self, s: &Service) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&s.name))
            .unwrap();
        Command::new(&self.exe)
            .arg(&s.service)
            .args(&self.common)
            .args(["--instance-id", &s.name, "--addr", &s.addr])
            .env("RUST_LOG", "warn,rdkafka=off,librdkafka=off")
            .env(ecommerce::auth::TOKENS_ENV, token_lines())
            .env_remove(ecommerce::auth::TOKENS_FILE_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.exe.display()))
    }

    /// Kills process `name` with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self, name: &str) {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(s, _)| s.name == name)
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts process `name` again, as it was started first.
    pub fn restart(&mut self, name: &str) {
        let i = self
            .children
            .iter()
            .position(|(s, _)| s.name == name)
            .unwrap();
        let child = self.start(&self.children[i].0.clone());
        self.children[i].1 = child;
    }

    /// Waits for `name` to print `listening on http://ADDR` (its first
    /// start); returns the URL.
    pub fn url(&mut self, name: &str, deadline: Instant) -> String {
        let path = self.log_path(name);
        loop {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&path) {
                let _ = f.read_to_string(&mut text);
            }
            if let Some(rest) = text.split("listening on ").nth(1) {
                let url = rest.split(';').next().unwrap().trim().to_owned();
                return url;
            }
            let (_, child) = self
                .children
                .iter_mut()
                .find(|(s, _)| s.name == name)
                .unwrap();
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited with {status} before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not start in time:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The example's binary, built by cargo for this test.
pub fn example_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ecommerce"))
}

/// A free port on 127.0.0.1 (free when asked).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Order `i`: laptops and monitors (scarce), and mice.
pub fn order_body(i: usize) -> Value {
    let mut items = vec![json!({"sku": "MOUSE-001", "quantity": 1 + i % 2, "unit_price": "29.99"})];
    if i % 2 == 0 {
        items.push(json!({"sku": "LAPTOP-001", "quantity": 1 + i % 3, "unit_price": "999.99"}));
    } else {
        items.push(json!({"sku": "MONITOR-001", "quantity": 1 + i % 4, "unit_price": "249.50"}));
    }
    json!({"customer_id": format!("c-{i}"), "items": items})
}

/// The units per SKU that order `i` asks for.
pub fn order_units(i: usize) -> Vec<(String, u64)> {
    order_body(i)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| {
            (
                it["sku"].as_str().unwrap().to_owned(),
                it["quantity"].as_u64().unwrap(),
            )
        })
        .collect()
}

pub async fn get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    let res = client.get(url).send().await.ok()?;
    if !res.status().is_success() {
        return None;
    }
    res.json().await.ok()
}

/// The temporary directory of test `tag`.
pub fn test_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(tag)
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}
