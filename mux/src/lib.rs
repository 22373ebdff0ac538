//! mux: many services through one TCP port. The library behind the `mux` binary.
//!
//! A connection enters at a listener ([`server`]), its first bytes are
//! classified ([`classify`]), a route picks a backend ([`route`]), and a data
//! path carries the rest ([`datapath`]); [`connection`] ties those together.

pub mod admin;
pub mod balance;
pub mod classify;
pub mod cli;
pub mod config;
pub mod connection;
pub mod datapath;
pub mod ebpf;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod privileges;
pub mod proxy_protocol;
pub mod route;
pub mod sched;
pub mod server;
pub mod status;
pub mod takeover;
pub mod transparent;
pub mod tunnel;

use std::future::Future;

pub use config::Config;
pub use server::Server;

/// Binds and serves `config` until `shutdown` completes: mux without the
/// process set-up of the binary (privileges, pid file, signals).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> anyhow::Result<()> {
    let (datapath, why) = datapath::DataPath::select(config.datapath, config.max_kernel_bulk)?;
    log::info!("datapath {why}");
    let mut server = Server::bind(connection::Shared::new(config, datapath)).await?;
    server.take_over()?;
    let (_reload, reloads) = tokio::sync::mpsc::channel(1);
    server
        .serve(server::Control {
            shutdown: Box::pin(shutdown),
            reloads,
            load: Box::new(|| anyhow::bail!("this server was started without a way to reload")),
        })
        .await;
    Ok(())
}
