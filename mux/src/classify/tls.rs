//! tls.
use super::Probe;
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsInfo { pub sni: Option<String>, pub alpn: Vec<String> }
pub fn probe(_buf: &[u8]) -> Probe<TlsInfo> { Probe::NoMatch }
