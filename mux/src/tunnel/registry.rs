//! The agents connected to this box, by the target names they serve, and
//! how a client's tunnel is opened through one of them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};

type Sender = SendRequest<Empty<Bytes>>;

/// One registration: the agent connection that serves a name now.
struct Entry {
    id: u64,
    sender: Sender,
}

#[derive(Default)]
pub struct Registry {
    agents: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
}

/// Why no tunnel opened through an agent; each ends in a 502.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no agent serves target `{0}` now")]
    NoAgent(String),
    #[error("the agent for `{0}` is gone")]
    Gone(String),
    #[error("the agent for `{0}` did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("the agent for `{name}` answered {status}: {reason}")]
    Refused {
        name: String,
        status: StatusCode,
        reason: String,
    },
    #[error("the agent for `{0}` answered but the stream did not open: {1}")]
    Upgrade(String, hyper::Error),
}

impl Registry {
    /// Records that `sender` serves `names` from now on, replacing an older
    /// agent for the same names (the newest connection is the live one
    /// after an agent restarts). Returns the id to deregister with.
    pub fn register(&self, names: &[String], sender: Sender) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        for name in names {
            agents.insert(
                name.to_ascii_lowercase(),
                Entry {
                    id,
                    sender: sender.clone(),
                },
            );
        }
        id
    }

    /// Forgets registration `id`, leaving names a newer agent took over.
    pub fn deregister(&self, names: &[String], id: u64) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        for name in names {
            let key = name.to_ascii_lowercase();
            if agents.get(&key).is_some_and(|e| e.id == id) {
                agents.remove(&key);
            }
        }
    }

    /// Asks the agent serving `name` for a stream to its local service.
    pub async fn open(&self, name: &str, limit: Duration) -> Result<Upgraded, AgentError> {
        let sender = {
            let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            agents
                .get(&name.to_ascii_lowercase())
                .map(|e| e.sender.clone())
        };
        let mut sender = sender.ok_or_else(|| AgentError::NoAgent(name.to_string()))?;
        let ask = async {
            sender
                .ready()
                .await
                .map_err(|_| AgentError::Gone(name.to_string()))?;
            // An authority-form target names the service; the port is not
            // the agent's business (its --expose decides), so 0 stands in.
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{name}:0"))
                .body(Empty::<Bytes>::new())
                .map_err(|_| AgentError::NoAgent(name.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|_| AgentError::Gone(name.to_string()))?;
            if response.status() != StatusCode::OK {
                let reason = response
                    .headers()
                    .get("mux-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                return Err(AgentError::Refused {
                    name: name.to_string(),
                    status: response.status(),
                    reason,
                });
            }
            hyper::upgrade::on(response)
                .await
                .map_err(|e| AgentError::Upgrade(name.to_string(), e))
        };
        match tokio::time::timeout(limit, ask).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout(name.to_string(), limit)),
        }
    }
}
