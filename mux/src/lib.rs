//! mux: many services through one TCP port. The library behind the `mux` binary.
//!
//! A connection enters at a listener ([`server`]), its first bytes are
//! classified ([`classify`]), a route picks a backend ([`route`]), and a data
//! path carries the rest ([`datapath`]); [`connection`] ties those together.

pub mod classify;
pub mod cli;
pub mod config;
pub mod connection;
pub mod datapath;
pub mod ebpf;
pub mod http;
pub mod privileges;
pub mod route;
pub mod server;
pub mod takeover;
pub mod tunnel;

use std::future::Future;

pub use config::Config;
pub use server::Server;

/// Binds and serves `config` until `shutdown` completes: mux without the
/// process set-up of the binary (privileges, pid file, signals).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (datapath, why) = datapath::DataPath::select(config.datapath)?;
    log::info!("datapath {why}");
    let server = Server::bind(connection::Shared::new(config, datapath)).await?;
    server.serve(shutdown).await;
    Ok(())
}
