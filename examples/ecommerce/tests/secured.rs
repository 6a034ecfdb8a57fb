//! The example on a secured broker of its own: SASL_PLAINTEXT with
//! SCRAM-SHA-512, the StandardAuthorizer denying by default, one user per
//! service, and exactly the ACLs `ecommerce acls` prints (topics created
//! beforehand by the admin with `ecommerce topics create`).
//!
//! - the three seed flows go through, and a DLQ retry is published;
//! - a wrong password stops a service within 10 s, naming authentication;
//! - an ACL revoked while the inventory works (WRITE on its reply topic,
//!   then READ on its group) turns its `/health` to 503 within 10 s,
//!   naming the principal, operation and resource; once the ACL is back,
//!   the order settles and the stock reserved is exactly that of the
//!   confirmed orders.
//!
//! SASL_PLAINTEXT rather than SASL_SSL: a TLS listener adds a keystore to
//! generate, not another path through the authentication or authorization
//! code. Needs Java and Maven, like the test broker (scripts/kafka/broker.sh).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{example_binary, repo_root, token_lines};
use serde_json::{json, Value};

/// The secured broker, stopped when dropped.
struct Broker {
    state: PathBuf,
    address: String,
    admin_password: String,
}

impl Broker {
    fn script(state: &PathBuf, args: &[&str]) -> Command {
        let mut c = Command::new(repo_root().join("scripts/kafka/broker.sh"));
        c.args(args)
            .env("SAGA_KAFKA_STATE_DIR", state)
            .env("SAGA_KAFKA_SECURITY", "sasl");
        c
    }

    fn start(state: PathBuf) -> Self {
        let out = Self::script(&state, &["start"]).output().unwrap();
        assert!(
            out.status.success(),
            "the secured broker did not start:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let address =
            String::from_utf8(Self::script(&state, &["address"]).output().unwrap().stdout)
                .unwrap()
                .trim()
                .to_owned();
        let env = std::fs::read_to_string(state.join("broker.env")).unwrap();
        let admin_password = env
            .lines()
            .find_map(|l| l.strip_prefix("admin_password="))
            .expect("broker.env has the admin's password")
            .to_owned();
        Self {
            state,
            address,
            admin_password,
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) {
        let mut c = Self::script(&self.state, args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "broker.sh {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Self::script(&self.state, &["stop"]).output();
    }
}

/// The client settings of `user`.
fn sasl(user: &str, password: &str) -> Vec<(String, String)> {
    [
        ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("KAFKA_SASL_USERNAME", user),
        ("KAFKA_SASL_PASSWORD", password),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// The example's binary with the test's common arguments.
struct Example {
    common: Vec<String>,
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Drop for Example {
    fn drop(&mut self) {
        for (name, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                eprintln!("--- last lines of {name}:");
                for l in log.lines().rev().take(12).collect::<Vec<_>>().iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Example {
    fn command(&self, env: &[(String, String)]) -> Command {
        let mut c = Command::new(example_binary());
        c.args(&self.common)
            .env("RUST_LOG", "warn,librdkafka=error")
            .env("ECOMMERCE_API_TOKENS", token_lines())
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .envs(env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn output(&self, args: &[&str], env: &[(String, String)]) -> Output {
        let out = self.command(env).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ecommerce {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts `service` as process `name`; returns its log's path.
    fn spawn(
        &mut self,
        name: &str,
        service: &str,
        env: &[(String, String)],
        extra: &[&str],
    ) -> PathBuf {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = self
            .command(env)
            .arg(service)
            .args(["--instance-id", name, "--addr", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push((name.to_owned(), child));
        log_path
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self.children.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    /// Waits for `name` to listen; returns its URL.
    fn url(&mut self, name: &str, deadline: Instant) -> String {
        let path = self.dir.join(format!("{name}.log"));
        loop {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&path) {
                let _ = f.read_to_string(&mut text);
            }
            if let Some(rest) = text.split("listening on ").nth(1) {
                return rest.split(';').next().unwrap().trim().to_owned();
            }
            if let Ok(Some(status)) = self.child(name).try_wait() {
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

async fn poll(
    client: &reqwest::Client,
    url: &str,
    within: Duration,
    done: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = match client.get(url).send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.json::<Value>().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        };
        if done(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not as expected within {within:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn place(client: &reqwest::Client, api: &str, body: Value) -> String {
    let r = client
        .post(format!("{api}/orders"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{status} {v}");
    v["order_id"].as_str().unwrap().to_owned()
}

async fn settled(client: &reqwest::Client, api: &str, id: &str, within: Duration) -> Value {
    poll(client, &format!("{api}/orders/{id}"), within, |_, o| {
        matches!(o["status"].as_str(), Some("CONFIRMED" | "CANCELLED"))
            && o["saga_status"] != "running"
    })
    .await
}

fn reserved(inventory: &Value, sku: &str) -> u64 {
    inventory["stock"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["sku"] == sku)
        .unwrap()["reserved"]
        .as_u64()
        .unwrap()
}

/// Revokes the ACL binding `line` while the inventory works, places an
/// order of `units` keyboards for `customer`, checks the inventory's
/// `/health` turns 503 within 10 s with `problem`, grants the binding
/// again and returns the order once it settled and the inventory is
/// healthy again.
async fn ride_out_revocation(
    broker: &Broker,
    client: &reqwest::Client,
    (order_api, inventory_api): (&str, &str),
    line: &str,
    (customer, units): (&str, u64),
    problem: &str,
) -> Value {
    broker.run(&["acls", "remove", "-"], Some(line));
    let id = place(
        client,
        order_api,
        json!({"customer_id": customer, "items": [
            {"sku": "KEYBOARD-001", "quantity": units, "unit_price": "79.99"}
        ]}),
    )
    .await;
    let health = poll(
        client,
        &format!("{inventory_api}/health"),
        Duration::from_secs(10),
        |s, _| s == 503,
    )
    .await;
    let problems = health["problems"].to_string();
    assert!(problems.contains(problem), "{problems}");
    broker.run(&["acls", "add", "-"], Some(line));
    let order = settled(client, order_api, &id, Duration::from_secs(90)).await;
    poll(
        client,
        &format!("{inventory_api}/health"),
        Duration::from_secs(30),
        |s, _| s == 200,
    )
    .await;
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Java and Maven: scripts/test.sh (starts a secured broker of its own)"]
async fn on_a_secured_broker_the_services_run_with_exactly_the_generated_acls_and_fail_loudly() {
    let t0 = Instant::now();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let dir = std::env::temp_dir().join(format!("ecom-secured-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let broker = Broker::start(dir.join("broker"));
    eprintln!("secured broker up in {:.1} s", t0.elapsed().as_secs_f64());

    let services = ["order", "inventory", "notification", "analytics", "dlq"];
    let passwords: Vec<(String, String)> = services
        .iter()
        .map(|s| ((*s).to_owned(), uuid::Uuid::new_v4().simple().to_string()))
        .collect();
    let users: Vec<String> = passwords.iter().map(|(u, p)| format!("{u}={p}")).collect();
    let mut args = vec!["users"];
    args.extend(users.iter().map(String::as_str));
    broker.run(&args, None);
    let pw = |s: &str| passwords.iter().find(|(u, _)| u == s).unwrap().1.clone();

    let prefix = format!("sec-{tag}.");
    let mut example = Example {
        common: [
            "--kafka",
            &broker.address,
            "--topic-prefix",
            &prefix,
            "--app",
            &format!("sec-{tag}"),
            "--partitions",
            "3",
            "--fast",
            "--no-create-topics",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
        dir: dir.clone(),
        children: Vec::new(),
    };

    // The admin creates the topics; each service gets exactly its ACLs.
    example.output(
        &["topics", "create"],
        &sasl("admin", &broker.admin_password),
    );
    let mut acls = String::new();
    for s in services {
        let out = example.output(&["acls", "--service", s], &[]);
        acls.push_str(&String::from_utf8(out.stdout).unwrap());
    }
    assert!(acls.lines().all(|l| l.starts_with("User:")), "{acls}");
    broker.run(&["acls", "add", "-"], Some(&acls));

    // A wrong password: the service stops within 10 s, naming the cause.
    let started = Instant::now();
    let log = example.spawn(
        "inventory-bad",
        "inventory",
        &sasl("inventory", "wrong"),
        &[],
    );
    let status = loop {
        if let Some(status) = example.child("inventory-bad").try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a wrong password did not stop the service within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success());
    assert!(
        text.contains("cannot authenticate to Kafka as User:inventory"),
        "{text}"
    );
    assert!(
        !text.contains("wrong"),
        "the password is never printed: {text}"
    );

    // The services, each as its own user.
    for s in services {
        let extra: &[&str] = if s == "notification" {
            &["--email-script", "c-eva=timeout,503,500"]
        } else {
            &[]
        };
        example.spawn(&format!("{s}-1"), s, &sasl(s, &pw(s)), extra);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let urls: Vec<String> = services
        .iter()
        .map(|s| example.url(&format!("{s}-1"), deadline))
        .collect();
    let (order_api, inventory_api, dlq_api) = (&urls[0], &urls[1], &urls[4]);
    eprintln!("services up in {:.1} s", t0.elapsed().as_secs_f64());
    let client = common::client(Duration::from_secs(20));

    // Flow 1: confirmed, email sent.
    let id1 = place(
        &client,
        order_api,
        json!({"customer_id": "c-ana", "items": [
            {"sku": "LAPTOP-001", "quantity": 1, "unit_price": "999.99"},
            {"sku": "MOUSE-001", "quantity": 2, "unit_price": "29.99"}
        ]}),
    )
    .await;
    let o1 = settled(&client, order_api, &id1, Duration::from_secs(60)).await;
    assert_eq!(o1["status"], "CONFIRMED", "{o1}");
    // Flow 2: not enough stock, compensated.
    let id2 = place(
        &client,
        order_api,
        json!({"customer_id": "c-ben", "items": [
            {"sku": "LAPTOP-001", "quantity": 100, "unit_price": "999.99"}
        ]}),
    )
    .await;
    let o2 = settled(&client, order_api, &id2, Duration::from_secs(60)).await;
    assert_eq!(o2["status"], "CANCELLED", "{o2}");
    assert!(
        o2["reason"]
            .as_str()
            .unwrap()
            .starts_with("Not enough stock"),
        "{o2}"
    );
    // Flow 3: the email fails three times, the dead letter reaches the DLQ
    // service, and its retry is published as the dlq user.
    let id3 = place(
        &client,
        order_api,
        json!({"customer_id": "c-eva", "items": [
            {"sku": "KEYBOARD-001", "quantity": 1, "unit_price": "79.99"}
        ]}),
    )
    .await;
    let o3 = settled(&client, order_api, &id3, Duration::from_secs(60)).await;
    assert_eq!(o3["status"], "CONFIRMED", "{o3}");
    let dlq = poll(
        &client,
        &format!("{dlq_api}/dlq"),
        Duration::from_secs(60),
        |_, d| d["entries"].as_array().is_some_and(|e| !e.is_empty()),
    )
    .await;
    let entry = dlq["entries"][0]["dlq_id"].as_str().unwrap().to_owned();
    // Without WRITE on the command topic the redrive is refused for good:
    // 403 naming the authorization, not a retryable 503.
    let revoked = format!("User:dlq ALLOW WRITE TOPIC LITERAL {prefix}notifications.requests\n");
    assert!(acls.contains(&revoked), "{acls}");
    broker.run(&["acls", "remove", "-"], Some(&revoked));
    let r = client
        .post(format!("{dlq_api}/dlq/{entry}/retry"))
        .json(&json!({"note": "email is back"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body["retryable"].is_null(), "{body}");
    assert!(
        body.to_string()
            .contains("not authorized: User:dlq may not WRITE"),
        "{body}"
    );
    broker.run(&["acls", "add", "-"], Some(&revoked));
    let r = client
        .post(format!("{dlq_api}/dlq/{entry}/retry"))
        .json(&json!({"note": "email is back"}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert!(status.is_success(), "{status} {}", r.text().await.unwrap());
    let inv = poll(
        &client,
        &format!("{inventory_api}/inventory"),
        Duration::from_secs(5),
        |s, _| s == 200,
    )
    .await;
    assert_eq!(reserved(&inv, "LAPTOP-001"), 1);
    assert_eq!(reserved(&inv, "KEYBOARD-001"), 1);

    // The inventory loses WRITE on its reply topic while it works, then
    // READ on its consumer group.
    let revoked_at = Instant::now();
    let o4 = ride_out_revocation(
        &broker,
        &client,
        (order_api, inventory_api),
        &format!("User:inventory ALLOW WRITE TOPIC LITERAL {prefix}inventory.responses\n"),
        ("c-dan", 2),
        &format!(
            "not authorized: User:inventory may not WRITE topic `{prefix}inventory.responses`"
        ),
    )
    .await;
    eprintln!(
        "revoked ACL ridden out in {:.1} s",
        revoked_at.elapsed().as_secs_f64()
    );
    let o5 = ride_out_revocation(
        &broker,
        &client,
        (order_api, inventory_api),
        &format!("User:inventory ALLOW READ GROUP LITERAL {prefix}inventory\n"),
        ("c-fay", 3),
        &format!("not authorized: User:inventory may not READ group `{prefix}inventory`"),
    )
    .await;
    // Only confirmed orders hold stock.
    let inv = poll(
        &client,
        &format!("{inventory_api}/inventory"),
        Duration::from_secs(5),
        |s, _| s == 200,
    )
    .await;
    let confirmed = |o: &Value, n: u64| if o["status"] == "CONFIRMED" { n } else { 0 };
    let keyboards = 1 + confirmed(&o4, 2) + confirmed(&o5, 3);
    assert_eq!(reserved(&inv, "KEYBOARD-001"), keyboards, "{o4} {o5}");
    assert_eq!(reserved(&inv, "LAPTOP-001"), 1);
    eprintln!(
        "secured flows in {:.1} s (order 4: {})",
        t0.elapsed().as_secs_f64(),
        o4["status"]
    );
    drop(example);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
