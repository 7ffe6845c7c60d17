//! `sonde-aggregator`: merges the agents' results into `up`, flags missing jobs, and
//! writes everything to Prometheus remote-write receivers.
//!
//! With no flags at all it starts the all-in-one default: the aggregator plus an
//! embedded agent probing the aggregator's own endpoints.

use clap::Parser;
use sonde_agent::config::{AgentConfig, AggregatorEndpoint};
use sonde_aggregator::app::App;
use sonde_aggregator::config::AggregatorConfig;
use sonde_cli::check_config::{self, Command};
use sonde_cli::logging::LogFlags;
use sonde_cli::signals::{self, Hangups};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "sonde-aggregator",
    version,
    about = "Merges sonde agents' probe results into up, flags missing jobs, and remote-writes everything",
    after_help = "With no flags at all, starts an all-in-one default: the aggregator plus an embedded agent probing its own endpoints (status page at http://127.0.0.1:9450/)."
)]
struct Cli {
    #[arg(long = "config.file", default_value = "sonde-aggregator.yml")]
    config_file: PathBuf,
    #[arg(long = "web.listen-address", default_value = "127.0.0.1:9450")]
    web_listen_address: SocketAddr,
    /// Serve POST /-/reload (as Prometheus's flag of the same name). SIGHUP reloads
    /// regardless.
    #[arg(long = "web.enable-lifecycle")]
    web_enable_lifecycle: bool,
    #[command(flatten)]
    web: sonde_cli::http_server::WebFlags,
    #[arg(long = "grpc.listen-address", default_value = "127.0.0.1:9451")]
    grpc_listen_address: SocketAddr,
    #[arg(long = "storage.path", default_value = "data/aggregator")]
    storage_path: PathBuf,
    #[command(flatten)]
    log: LogFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

fn main() -> ExitCode {
    let all_in_one = std::env::args_os().len() == 1;
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return check_config::run(file, |file| {
            AggregatorConfig::load(file).map(|c| {
                format!(
                    "{} modules, {} jobs, {} remote_write endpoints",
                    c.modules.len(),
                    c.jobs.len(),
                    c.remote_write.len()
                )
            })
        });
    }
    cli.log.init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, all_in_one)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, all_in_one: bool) -> Result<(), String> {
    let (config, config_file) = if all_in_one && !cli.config_file.exists() {
        tracing::info!("no flags and no sonde-aggregator.yml: starting the all-in-one default");
        let config = AggregatorConfig::all_in_one(cli.web_listen_address, cli.grpc_listen_address)
            .map_err(|e| e.to_string())?;
        (config, None)
    } else {
        let config = AggregatorConfig::load(&cli.config_file).map_err(|e| e.to_string())?;
        (config, Some(cli.config_file.clone()))
    };
    let app = App::start(config, config_file, Some(&cli.storage_path)).await?;
    let web = sonde_aggregator::web::Options {
        listen_address: cli.web_listen_address,
        enable_lifecycle: cli.web_enable_lifecycle,
        limits: cli.web.limits(),
    };
    let running =
        sonde_aggregator::server::start_with(app.clone(), web, cli.grpc_listen_address).await?;

    let embedded = if all_in_one {
        let mut agent = AgentConfig::minimal("all-in-one".into());
        agent.labels.insert("mode".into(), "all-in-one".into());
        agent.aggregators.push(AggregatorEndpoint::new(format!(
            "http://{}",
            running.grpc_address
        )));
        let agent = sonde_agent::runtime::AgentRuntime::start(
            agent,
            Some(&cli.storage_path.join("embedded-agent")),
        )?;
        tracing::info!(url = %format!("http://{}/", running.web_address), "all-in-one: status page");
        Some(agent)
    } else {
        None
    };

    let mut hangups = Hangups::listen();
    let terminate = signals::terminate();
    tokio::pin!(terminate);
    loop {
        tokio::select! {
            _ = &mut terminate => break,
            () = hangups.recv() => {
                if let Err(e) = app.reload().await {
                    tracing::error!(error = %e, "reload failed; keeping the running config");
                }
            }
        }
    }
    if let Some(agent) = embedded {
        agent.shutdown(Duration::from_secs(2)).await;
    }
    running.shutdown(Duration::from_secs(10)).await;
    tracing::info!("stopped");
    Ok(())
}
