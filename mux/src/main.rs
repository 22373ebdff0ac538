//! The `mux` binary: parse the command line, set up the process, serve.

use std::process::ExitCode;

use anyhow::Context;
use mux::Server;
use mux::cli::{self, Command};
use mux::connection::Shared;
use mux::datapath::DataPath;
use mux::privileges::{self, Pidfile};
use mux::server::Control;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let (cli, matches) = cli::parse();
    match cli.command {
        Some(Command::Check(args)) => {
            let sub = matches
                .subcommand_matches("check")
                .expect("clap gave us check");
            match args.config(sub) {
                Ok(config) => {
                    print!("configuration OK\n{}", config.describe());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mux check: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Takeover(args)) => {
            init_logging(cli.run.verbose);
            let result = if args.guard {
                mux::takeover::guard(&args.ports, args.to_v4, args.to_v6)
                    .map(|()| "takeover rules removed".to_string())
            } else {
                mux::takeover::cleanup().map(|n| format!("removed {n} takeover rule(s)"))
            };
            match result {
                Ok(done) => {
                    println!("{done}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mux takeover: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Connect(args)) => connect(&args),
        Some(Command::Status(args)) => admin(&args.admin, "GET", "/metrics", |body| {
            print!("{}", mux::status::summarize(&body))
        }),
        Some(Command::Reload(args)) => admin(&args.admin, "POST", "/reload", |body| {
            print!("reloaded: {body}")
        }),
        Some(Command::Agent(args)) => {
            init_logging(args.verbose);
            match agent(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            init_logging(cli.run.verbose);
            match serve(&cli.run, &matches) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
}

fn serve(args: &cli::RunArgs, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let config = args.config(matches)?;
    match privileges::raise_fd_limit() {
        Ok(n) => {
            log::debug!("open file limit: {n}");
            // Before any thread starts (see `presize_fd_table`).
            match privileges::presize_fd_table(n) {
                Ok(entries) => log::debug!("descriptor table sized for {entries}"),
                Err(e) => log::debug!("cannot size the descriptor table: {e}"),
            }
        }
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
    // The server adds a single-threaded runtime per further CPU itself.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // This thread becomes a worker, maybe kept to one CPU; the threads
        // it spawns later are not workers.
        .on_thread_start(mux::sched::unpin)
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        // Handlers first: a signal that arrives while mux sets up must not
        // find the default action (death) in place.
        let stop = stop_signal();
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let (datapath, why) = DataPath::select(config.datapath, config.max_kernel_bulk)?;
        log::info!("datapath {why}");
        log::info!("routes:\n{}", config.describe().trim_end());
        let transparent_ports = config.transparent_ports();
        let transparent = !transparent_ports.is_empty();
        if transparent {
            mux::transparent::probe().context("transparent routes")?;
            log::info!(
                "{}",
                mux::transparent::route_answers(&transparent_ports)
                    .context("transparent routes")?
            );
        }
        let admin_addr = config.admin.clone();
        let takeover = config.takeover.clone();
        let kernel = match &datapath {
            DataPath::Kernel(kernel) => Some(kernel.clone()),
            _ => None,
        };
        let mut server = Server::bind(Shared::new(config, datapath)).await?;
        // Loading the kernel programs parsed the kernel's BTF on this thread:
        // tens of MiB, freed since, that mimalloc would keep resident while
        // this thread idles (a fresh mux on the kernel path sat at 54 MiB of
        // RSS; 14 with this).
        // SAFETY: mi_collect has no preconditions; it only frees memory no
        // allocation uses.
        unsafe { libmimalloc_sys::mi_collect(true) };
        for addr in server.local_addrs() {
            log::info!("listening on {addr}");
        }
        if let (Some(t), Some(how)) = (&takeover, server.take_over()?) {
            let ports: Vec<String> = t.ports.iter().map(u16::to_string).collect();
            log::info!(
                "takeover: port {} from other hosts now reaches mux, via {how}",
                ports.join(", "),
            );
        }
        let (reload, reloads) = tokio::sync::mpsc::channel(4);
        if let Some(addr) = admin_addr {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot serve the admin endpoint on {addr}"))?;
            log::info!(
                "admin: metrics on http://{}/metrics",
                listener.local_addr().context("admin address")?
            );
            tokio::spawn(mux::admin::serve(listener, reload.clone()));
        }
        match hup {
            Ok(hup) => {
                tokio::spawn(reload_on_sighup(hup, reload));
            }
            Err(e) => log::warn!("cannot handle SIGHUP ({e}); reload through the admin endpoint"),
        }
        let _pidfile = args.pidfile.as_deref().map(Pidfile::create).transpose()?;
        if let Some(user) = &args.user {
            privileges::drop_to_user(user, transparent)?;
            log::info!(
                "running as user {user}{}",
                if transparent {
                    ", keeping CAP_NET_RAW for transparent routes"
                } else {
                    ""
                }
            );
            if transparent {
                mux::transparent::probe()
                    .context("transparent routes cannot go on after --user")?;
            }
            if let Some(kernel) = &kernel {
                kernel
                    .after_privileges_dropped()
                    .context("datapath = \"ebpf\" but the kernel path cannot go on after --user")?;
            }
        }
        let (args, matches) = (args.clone(), matches.clone());
        server
            .serve(Control {
                shutdown: Box::pin(stop),
                reloads,
                load: Box::new(move || Ok(args.config(&matches)?)),
            })
            .await;
        log::info!("stopped");
        Ok(())
    })
}

/// SIGHUP asks for a reload, as for sslh and most daemons; the server logs
/// the outcome.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    reload: tokio::sync::mpsc::Sender<mux::admin::ReloadRequest>,
) {
    while hup.recv().await.is_some() {
        log::info!("SIGHUP: reloading the configuration");
        let (tx, rx) = tokio::sync::oneshot::channel();
        if reload.send(tx).await.is_err() {
            return;
        }
        let _ = rx.await;
    }
}

/// `mux status` and `mux reload`: one request to the admin endpoint.
fn admin(addr: &str, method: &str, path: &str, show: impl FnOnce(String)) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mux: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limit = std::time::Duration::from_secs(30);
    match runtime.block_on(mux::status::request(addr, method, path, limit)) {
        Ok(body) => {
            show(body);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mux: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `mux connect`: its standard output is the tunnel, so only errors are
/// printed, on standard error.
fn connect(args: &cli::ConnectArgs) -> ExitCode {
    let run = || -> anyhow::Result<()> {
        let token = cli::client_token(args.token_file.as_deref()).map_err(anyhow::Error::msg)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let result = runtime.block_on(mux::tunnel::connect::run(
            &args.server,
            &args.target,
            token.as_deref(),
        ));
        // Standard input is read on a blocking thread that may still wait
        // for a line that never comes: do not wait for it.
        runtime.shutdown_background();
        Ok(result?)
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mux connect: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn agent(args: &cli::AgentArgs) -> anyhow::Result<()> {
    let token = cli::client_token(args.token_file.as_deref()).map_err(anyhow::Error::msg)?;
    let expose = args
        .expose
        .iter()
        .map(|e| mux::tunnel::agent::parse_expose(e))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--expose {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let settings = mux::tunnel::agent::Settings {
        server: args.server.clone(),
        token,
        expose,
    };
    runtime.block_on(async {
        tokio::select! {
            () = mux::tunnel::agent::run(settings) => {}
            () = stop_signal() => {}
        }
    });
    log::info!("agent: stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM. The handlers are in place once this
/// returns, before the future is first polled.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            log::error!("cannot install signal handlers; stop mux with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: stopping"),
            _ = int.recv() => log::info!("SIGINT: stopping"),
        }
    }
}
