//! SSH: the client's identification line starts with `SSH-` (RFC 4253 4.2).
use super::Probe;
pub fn probe(_buf: &[u8]) -> Probe<()> { Probe::NoMatch }
