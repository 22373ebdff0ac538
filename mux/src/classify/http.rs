//! http.
use super::Probe;
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpInfo { pub method: String, pub path: String, pub version: u8, pub host: Option<String> }
pub fn probe(_buf: &[u8], _last: bool) -> Probe<HttpInfo> { Probe::NoMatch }
