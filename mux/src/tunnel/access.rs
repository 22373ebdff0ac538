//! Who may reach which target: the configured targets, their tokens, and the
//! decision for one CONNECT or agent hello. Pure, no I/O.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::route::Backend;

/// A shared secret. Only its SHA-256 is kept, and comparisons run in
/// constant time over digests of equal length, so neither the content nor
/// the length of the secret leaks through timing. Never printed.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl Token {
    pub fn new(secret: &str) -> Token {
        Token {
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digest.ct_eq(&digest).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How the box reaches a target.
#[derive(Debug, Clone)]
pub enum Reach {
    /// mux dials it, like a route's backend.
    Address(Backend),
    /// An agent that dialled in serves it.
    Agent,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub reach: Reach,
    /// The target's own token, else the global one; `None`: no token asked.
    pub token: Option<Token>,
}

impl Target {
    pub fn describe(&self) -> String {
        let reach = match &self.reach {
            Reach::Address(a) => a.to_string(),
            Reach::Agent => "an agent".to_string(),
        };
        let token = if self.token.is_some() {
            "token"
        } else {
            "no token"
        };
        format!("{} -> {reach} ({token})", self.name)
    }
}

/// Why a request is refused; each maps to its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a configured target: mux is never an open proxy (403).
    Unknown(String),
    /// A token is required and what came was missing or wrong (407 for
    /// CONNECT, 401 for agents).
    BadToken { target: String, missing: bool },
    /// An agent offered a target that mux dials itself (403).
    NotAgentTarget(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unknown(t) => write!(f, "`{t}` is not a configured target"),
            Refusal::BadToken {
                target,
                missing: true,
            } => write!(f, "target `{target}` needs a token and none was given"),
            Refusal::BadToken {
                target,
                missing: false,
            } => write!(f, "wrong token for target `{target}`"),
            Refusal::NotAgentTarget(t) => {
                write!(f, "target `{t}` has an address, so no agent may serve it")
            }
        }
    }
}

/// The configured targets, in file order.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    targets: Vec<Target>,
}

impl Targets {
    pub fn new(targets: Vec<Target>) -> Targets {
        Targets { targets }
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Target> {
        self.targets
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// The target a CONNECT authority names: `name`, `name:port` (the port
    /// is the target's own, whatever the client says: ssh passes `%h:%p`
    /// with its default 22), or exactly a target's configured address.
    pub fn find(&self, authority: &str) -> Option<&Target> {
        let authority = authority.trim();
        self.get(authority_host(authority)).or_else(|| {
            self.targets.iter().find(|t| match &t.reach {
                Reach::Address(a) => a.as_str().eq_ignore_ascii_case(authority),
                Reach::Agent => false,
            })
        })
    }

    /// Decides a CONNECT to `authority` with the token the client presented.
    pub fn authorize(&self, authority: &str, token: Option<&str>) -> Result<&Target, Refusal> {
        let target = self
            .find(authority)
            .ok_or_else(|| Refusal::Unknown(authority.to_string()))?;
        check_token(target, token)?;
        Ok(target)
    }

    /// Decides an agent's offer to serve `names`: each must be an agent
    /// target, and the token must open every one of them.
    pub fn authorize_agent(
        &self,
        names: &[String],
        token: Option<&str>,
    ) -> Result<Vec<&Target>, Refusal> {
        let mut granted = Vec::with_capacity(names.len());
        for name in names {
            let target = self
                .get(name)
                .ok_or_else(|| Refusal::Unknown(name.clone()))?;
            if !matches!(target.reach, Reach::Agent) {
                return Err(Refusal::NotAgentTarget(target.name.clone()));
            }
            check_token(target, token)?;
            granted.push(target);
        }
        Ok(granted)
    }
}

fn check_token(target: &Target, token: Option<&str>) -> Result<(), Refusal> {
    match (&target.token, token) {
        (None, _) => Ok(()),
        (Some(want), Some(got)) if want.matches(got) => Ok(()),
        (Some(_), got) => Err(Refusal::BadToken {
            target: target.name.clone(),
            missing: got.is_none(),
        }),
    }
}

/// The host of `host:port`, `[v6]:port`, or a bare host.
fn authority_host(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(authority, |(h, _)| h);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Targets {
        Targets::new(vec![
            Target {
                name: "node2".into(),
                reach: Reach::Address(Backend::parse("198.51.100.2:22").unwrap()),
                token: Some(Token::new("s2")),
            },
            Target {
                name: "open".into(),
                reach: Reach::Address(Backend::parse("[2001:db8::5]:22").unwrap()),
                token: None,
            },
            Target {
                name: "node3".into(),
                reach: Reach::Agent,
                token: Some(Token::new("s3")),
            },
        ])
    }

    #[test]
    fn tokens_match_only_the_same_secret() {
        let t = Token::new("secret");
        assert!(t.matches("secret"));
        assert!(!t.matches("secret "));
        assert!(!t.matches(""));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn targets_are_found_by_name_or_exact_address() {
        let t = targets();
        assert_eq!(t.find("node2:22").unwrap().name, "node2");
        assert_eq!(t.find("NODE2").unwrap().name, "node2");
        assert_eq!(t.find("node2:2200").unwrap().name, "node2");
        assert_eq!(t.find("198.51.100.2:22").unwrap().name, "node2");
        assert_eq!(t.find("[2001:db8::5]:22").unwrap().name, "open");
        assert!(t.find("198.51.100.2:23").is_none());
        assert!(t.find("198.51.100.2").is_none());
        assert!(t.find("node").is_none());
        assert!(t.find("").is_none());
    }

    #[test]
    fn connect_needs_the_right_token() {
        let t = targets();
        assert_eq!(t.authorize("node2:22", Some("s2")).unwrap().name, "node2");
        assert_eq!(
            t.authorize("node2:22", None).unwrap_err(),
            Refusal::BadToken {
                target: "node2".into(),
                missing: true
            }
        );
        assert!(matches!(
            t.authorize("node2:22", Some("s3")),
            Err(Refusal::BadToken { missing: false, .. })
        ));
        assert_eq!(t.authorize("open:22", None).unwrap().name, "open");
        assert_eq!(
            t.authorize("10.0.0.1:22", Some("s2")).unwrap_err(),
            Refusal::Unknown("10.0.0.1:22".into())
        );
    }

    #[test]
    fn agents_serve_only_agent_targets_they_hold_the_token_for() {
        let t = targets();
        assert_eq!(
            t.authorize_agent(&["node3".into()], Some("s3"))
                .unwrap()
                .len(),
            1
        );
        assert!(matches!(
            t.authorize_agent(&["node3".into()], Some("s2")),
            Err(Refusal::BadToken { .. })
        ));
        assert_eq!(
            t.authorize_agent(&["node2".into()], Some("s2"))
                .unwrap_err(),
            Refusal::NotAgentTarget("node2".into())
        );
        assert!(matches!(
            t.authorize_agent(&["nope".into()], Some("s3")),
            Err(Refusal::Unknown(_))
        ));
    }
}
