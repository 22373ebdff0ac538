//! socks5.
use super::Probe;
pub fn probe(_buf: &[u8]) -> Probe<()> { Probe::NoMatch }
