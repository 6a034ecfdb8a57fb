//! Who may call the HTTP API: bearer tokens by role, from configuration.
//!
//! Every route but `GET /health` and `GET /metrics` (open, for load
//! balancers and Prometheus scrapers; they show no customer data) needs an
//! `Authorization: Bearer <token>` header. A token belongs to one caller:
//!
//! - an **operator**, by name: the DLQ routes (`/dlq…`), `GET /analytics`,
//!   every order; the name is what the DLQ archive records as who acted;
//! - a **customer**, by customer id: places orders for that customer id
//!   only, and sees only that customer's orders.
//!
//! ## Configuration
//!
//! One token per line, `<role> <name> <token>`:
//!
//! ```text
//! # role     name     token
//! operator   alice    3b1f0c6e9a2d4d7c8e5f1a2b3c4d5e6f
//! customer   c-42     9f8e7d6c5b4a39281706f5e4d3c2b1a0
//! ```
//!
//! `role` is `operator` or `customer`; `name` is the operator's name or
//! the customer id (1 to 64 letters, digits, `-`, `_`, `.`, and `@` for
//! operators); `token` is 16 to 256 characters of `A-Z a-z 0-9 - . _ ~ + /`
//! and trailing `=` (RFC 6750's `b64token`; e.g. a UUID or
//! `openssl rand -hex 32`), each token used once. Blank lines and lines
//! starting with `#` are ignored.
//!
//! The lines come from [`TOKENS_ENV`] (`ECOMMERCE_API_TOKENS`, where `;`
//! also ends a line) and from the file named by `--api-tokens-file` or
//! [`TOKENS_FILE_ENV`] (`ECOMMERCE_API_TOKENS_FILE`); both together add
//! up. A process with none configured generates random tokens for an
//! operator and the walkthrough's customers and prints them at start (see
//! [`for_process`]), and warns if it listens beyond loopback.
//!
//! Tokens are kept as SHA-256 digests for checking: a presented token is
//! hashed and compared with every configured digest in constant time
//! (`subtle`), so neither its bytes nor its length show in the timing. No
//! token is ever logged, and [`ApiTokens`]' `Debug` shows roles and names
//! only.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The environment variable holding token lines (`;` or newline apart).
pub const TOKENS_ENV: &str = "ECOMMERCE_API_TOKENS";
/// The environment variable naming a token file (as `--api-tokens-file`).
pub const TOKENS_FILE_ENV: &str = "ECOMMERCE_API_TOKENS_FILE";
/// The environment variable the DLQ client reads its token from (as
/// `dlq --token`).
pub const CLIENT_TOKEN_ENV: &str = "ECOMMERCE_API_TOKEN";

/// The operator a process without configured tokens generates one for.
pub const GENERATED_OPERATOR: &str = "operator";
/// The customers a process without configured tokens generates tokens for:
/// those of the README's walkthrough and of the demo.
pub const GENERATED_CUSTOMERS: &[&str] = &["c-42", "c-ana", "c-ben", "c-eva"];

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 256;

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The DLQ, analytics and every order.
    Operator,
    /// Orders of one customer id.
    Customer,
}

impl Role {
    /// `operator` or `customer`, as in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Customer => "customer",
        }
    }
}

/// Who a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Its role.
    pub role: Role,
    /// The operator's name, or the customer id.
    pub name: String,
}

impl Caller {
    /// Whether the caller may see or act on `customer_id`'s orders: an
    /// operator always, a customer for their own id only.
    pub fn may_act_for(&self, customer_id: &str) -> bool {
        self.role == Role::Operator || self.name == customer_id
    }
}

struct Entry {
    caller: Caller,
    digest: [u8; 32],
    token: String,
}

/// The configured tokens. `Debug` never shows a token.
#[derive(Default)]
pub struct ApiTokens {
    entries: Vec<Entry>,
    generated: bool,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let callers: Vec<String> = self
            .entries
            .iter()
            .map(|e| format!("{} {} <redacted>", e.caller.role.as_str(), e.caller.name))
            .collect();
        f.debug_struct("ApiTokens")
            .field("tokens", &callers)
            .field("generated", &self.generated)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(Sha256::digest(token.as_bytes()).as_slice());
    out
}

fn check_token(token: &str) -> Result<(), String> {
    let body = token.trim_end_matches('=');
    let ok = (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len())
        && !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters of \
             A-Z a-z 0-9 - . _ ~ + / (and trailing =)"
        ))
    }
}

fn check_name(role: Role, name: &str) -> Result<(), String> {
    let extra: &[u8] = match role {
        Role::Operator => b"-_.@",
        Role::Customer => b"-_.",
    };
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a {} name must be 1 to 64 letters, digits or {}",
            role.as_str(),
            extra
                .iter()
                .map(|b| format!("'{}'", char::from(*b)))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

impl ApiTokens {
    /// No tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `token` for `role` `name`.
    ///
    /// # Errors
    /// A malformed name or token, or a token already given to a caller
    /// (the message never contains the token).
    pub fn add(&mut self, role: Role, name: &str, token: &str) -> Result<(), String> {
        check_name(role, name)?;
        check_token(token)?;
        if self.authenticate(token).is_some() {
            return Err(format!(
                "the token of {} `{name}` is already someone's",
                role.as_str()
            ));
        }
        self.entries.push(Entry {
            caller: Caller {
                role,
                name: name.to_owned(),
            },
            digest: digest(token),
            token: token.to_owned(),
        });
        Ok(())
    }

    /// Adds the token lines of `text` (see the module's documentation);
    /// `;` ends a line as a newline does. `source` names the text in
    /// errors.
    ///
    /// # Errors
    /// The first wrong line, by number (never its token).
    pub fn add_lines(&mut self, source: &str, text: &str) -> Result<(), String> {
        for (n, line) in text.split(['\n', ';']).enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |e: String| format!("{source}, entry {}: {e}", n + 1);
            let words: Vec<&str> = line.split_whitespace().collect();
            let [role, name, token] = words[..] else {
                return Err(at(format!(
                    "expected `<role> <name> <token>`, got {} word(s)",
                    words.len()
                )));
            };
            let role = match role {
                "operator" => Role::Operator,
                "customer" => Role::Customer,
                // Not echoed: a line in another order has its token here.
                _ => {
                    return Err(at(
                        "unknown role (expected `operator` or `customer` first)".into()
                    ))
                }
            };
            self.add(role, name, token).map_err(at)?;
        }
        Ok(())
    }

    /// The tokens of `text` (see [`ApiTokens::add_lines`]).
    ///
    /// # Errors
    /// As [`ApiTokens::add_lines`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Self::new();
        tokens.add_lines("tokens", text)?;
        Ok(tokens)
    }

    /// Random tokens (UUID v4, 122 random bits) for `operator` and each of
    /// `customers`; [`ApiTokens::was_generated`] says so.
    pub fn generate(operator: &str, customers: &[&str]) -> Self {
        let mut tokens = Self::new();
        let callers = std::iter::once((Role::Operator, operator))
            .chain(customers.iter().map(|c| (Role::Customer, *c)));
        for (role, name) in callers {
            let token = uuid::Uuid::new_v4().simple().to_string();
            if let Err(e) = tokens.add(role, name, &token) {
                // A name that cannot be a caller's: nobody gets a token.
                tracing::warn!(error = %e, "no token generated for {} `{name}`", role.as_str());
            }
        }
        tokens.generated = true;
        tokens
    }

    /// The tokens configured for this process: [`TOKENS_ENV`]'s lines, and
    /// the file `file` (else [`TOKENS_FILE_ENV`]'s). `None` when neither
    /// is set.
    ///
    /// # Errors
    /// An unreadable file or a wrong line.
    pub fn configured(file: Option<&Path>) -> Result<Option<Self>, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let inline = env(TOKENS_ENV);
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env(TOKENS_FILE_ENV).map(Into::into));
        if inline.is_none() && file.is_none() {
            return Ok(None);
        }
        let mut tokens = Self::new();
        if let Some(text) = inline {
            tokens.add_lines(TOKENS_ENV, &text)?;
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
            tokens.add_lines(&path.display().to_string(), &text)?;
        }
        if tokens.is_empty() {
            return Err("the API token configuration has no token".into());
        }
        Ok(Some(tokens))
    }

    /// Whether there is no token.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether these tokens were generated rather than configured.
    pub fn was_generated(&self) -> bool {
        self.generated
    }

    /// Every caller that has a token.
    pub fn callers(&self) -> impl Iterator<Item = &Caller> {
        self.entries.iter().map(|e| &e.caller)
    }

    /// Whose token `presented` is. Every configured token is compared (as
    /// SHA-256 digests, in constant time), whichever matches.
    pub fn authenticate(&self, presented: &str) -> Option<&Caller> {
        let wanted = digest(presented);
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&wanted)) {
                found = Some(&e.caller);
            }
        }
        found
    }

    /// The token of `role` `name` (for the demo and for printing
    /// generated tokens).
    pub fn token_of(&self, role: Role, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.caller.role == role && e.caller.name == name)
            .map(|e| e.token.as_str())
    }

    /// What a process prints about its generated tokens: each caller's
    /// token and ready-to-copy `curl` commands against `base` (e.g.
    /// `http://127.0.0.1:8080`).
    pub fn banner(&self, base: &str) -> String {
        let mut out = String::from(
            "No API tokens configured (ECOMMERCE_API_TOKENS, --api-tokens-file): \
             generated for this run:\n",
        );
        for e in &self.entries {
            out.push_str(&format!(
                "  {:<8} {:<10} {}\n",
                e.caller.role.as_str(),
                e.caller.name,
                e.token
            ));
        }
        if let Some(op) = self
            .entries
            .iter()
            .find(|e| e.caller.role == Role::Operator)
        {
            out.push_str(&format!(
                "  curl -s -H 'Authorization: Bearer {}' {base}/dlq\n",
                op.token
            ));
        }
        if let Some(c) = self
            .entries
            .iter()
            .find(|e| e.caller.role == Role::Customer)
        {
            out.push_str(&format!(
                "  curl -s -X POST {base}/orders -H 'Authorization: Bearer {}' \
                 -H 'content-type: application/json' \\\n    -d '{{\"customer_id\": \"{}\", \
                 \"items\": [{{\"sku\": \"MOUSE-001\", \"quantity\": 1}}]}}'\n",
                c.token, c.caller.name
            ));
        }
        out
    }
}

/// The tokens a process listening on `local` serves with: the
/// `configured` ones ([`ApiTokens::configured`], read before the process
/// starts its services, so a wrong line stops it early), else generated
/// ones ([`GENERATED_OPERATOR`], [`GENERATED_CUSTOMERS`]) printed on
/// stderr, with a WARN when `local` is not a loopback address: the
/// generated tokens are on the console, and anyone who reads it can act.
pub fn for_process(configured: Option<ApiTokens>, local: SocketAddr) -> ApiTokens {
    if let Some(tokens) = configured {
        tracing::info!(tokens = tokens.len(), "API tokens configured");
        return tokens;
    }
    let tokens = ApiTokens::generate(GENERATED_OPERATOR, GENERATED_CUSTOMERS);
    if !local.ip().is_loopback() {
        tracing::warn!(
            addr = %local,
            "listening beyond loopback without configured API tokens: the generated tokens \
             are printed on the console; configure {TOKENS_ENV} or --api-tokens-file"
        );
    }
    let host = if local.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local.port())
    } else {
        local
    };
    eprint!("{}", tokens.banner(&format!("http://{host}")));
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice-token-0123456789";
    const C42: &str = "c42-token-0123456789";

    fn sample() -> ApiTokens {
        ApiTokens::parse(&format!(
            "# who\noperator alice {ALICE}\n\ncustomer c-42 {C42}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_token_names_its_caller_and_an_unknown_one_nobody() {
        let t = sample();
        assert_eq!(
            t.authenticate(ALICE),
            Some(&Caller {
                role: Role::Operator,
                name: "alice".into()
            })
        );
        assert_eq!(t.authenticate(C42).map(|c| c.role), Some(Role::Customer));
        assert_eq!(t.authenticate("alice-token-012345678"), None);
        assert_eq!(t.authenticate(""), None);
    }

    #[test]
    fn semicolons_separate_entries_as_newlines_do() {
        let t = ApiTokens::parse(&format!("operator alice {ALICE}; customer c-42 {C42}")).unwrap();
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn debug_shows_names_but_never_tokens() {
        let text = format!("{:?}", sample());
        assert!(text.contains("operator alice <redacted>"), "{text}");
        assert!(!text.contains(ALICE) && !text.contains(C42), "{text}");
    }

    #[test]
    fn wrong_lines_are_refused_without_echoing_the_token() {
        for (line, says) in [
            ("admin bob bob-token-0123456789", "unknown role"),
            ("tok-0123456789abcdef operator bob", "unknown role"),
            ("operator bob", "expected `<role> <name> <token>`"),
            ("operator bob short", "a token must be 16 to 256"),
            ("customer c 42 x", "expected `<role> <name> <token>`"),
            ("customer c/42 c42-token-0123456789", "a customer name"),
            ("operator bob bad token!0123456789", "expected"),
        ] {
            let e = ApiTokens::parse(line).unwrap_err();
            assert!(e.contains(says), "{line}: {e}");
            assert!(!e.contains("0123456789"), "{line}: {e}");
        }
        let e = ApiTokens::parse(&format!("operator a {ALICE}\ncustomer c-1 {ALICE}")).unwrap_err();
        assert!(e.contains("entry 2") && e.contains("already"), "{e}");
    }

    #[test]
    fn generated_tokens_are_random_and_printed_with_a_curl_example() {
        let a = ApiTokens::generate("op", &["c-1", "c-2"]);
        let b = ApiTokens::generate("op", &["c-1", "c-2"]);
        assert!(a.was_generated() && a.len() == 3);
        let token = a.token_of(Role::Customer, "c-1").unwrap();
        assert_ne!(Some(token), b.token_of(Role::Customer, "c-1"));
        assert_eq!(a.authenticate(token).map(|c| c.name.as_str()), Some("c-1"));
        let banner = a.banner("http://127.0.0.1:8080");
        assert!(banner.contains(token), "{banner}");
        assert!(
            banner.contains("curl -s -H 'Authorization: Bearer "),
            "{banner}"
        );
    }

    #[test]
    fn a_customer_acts_for_itself_only_and_an_operator_for_anyone() {
        let c = Caller {
            role: Role::Customer,
            name: "c-1".into(),
        };
        assert!(c.may_act_for("c-1") && !c.may_act_for("c-2"));
        let o = Caller {
            role: Role::Operator,
            name: "alice".into(),
        };
        assert!(o.may_act_for("c-2"));
    }
}
