//! `sonde-agent`: probes targets and streams the results to sonde aggregators.

use anyhow::Context;
use clap::Parser;
use sonde_agent::config::AgentConfig;
use sonde_agent::runtime::AgentRuntime;
use sonde_cli::check_config::{self, Command};
use sonde_cli::logging::LogFlags;
use sonde_cli::reload::RELOAD;
use sonde_cli::signals::{self, Hangups};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "sonde-agent",
    version,
    about = "Probes targets over HTTP, DNS and TCP and streams the results to sonde aggregators"
)]
struct Cli {
    #[arg(long = "config.file", default_value = "sonde-agent.yml")]
    config_file: PathBuf,
    #[arg(long = "web.listen-address", default_value = "127.0.0.1:9452")]
    web_listen_address: SocketAddr,
    #[command(flatten)]
    web: sonde_cli::http_server::WebFlags,
    #[arg(long = "storage.path", default_value = "data/agent")]
    storage_path: PathBuf,
    #[command(flatten)]
    log: LogFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return check_config::run(file, |file| {
            let (config, problems) = AgentConfig::check(file);
            check_config::Outcome {
                summary: config.map(|c| {
                    format!(
                        "agent {}, {} aggregators, {} local jobs",
                        c.id,
                        c.aggregators.len(),
                        c.jobs.len()
                    )
                }),
                errors: problems.errors.iter().map(ToString::to_string).collect(),
                warnings: problems.warnings.iter().map(|w| w.as_warning()).collect(),
            }
        });
    }
    cli.log.init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", sonde_cli::errors::describe(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // The config error already names the file, line and column.
    let config = AgentConfig::load(&cli.config_file)?;
    std::fs::create_dir_all(&cli.storage_path).with_context(|| {
        format!(
            "cannot create --storage.path {}",
            cli.storage_path.display()
        )
    })?;
    let agent =
        AgentRuntime::start(config, Some(&cli.storage_path)).context("cannot start the agent")?;
    RELOAD.loaded();
    let listener = tokio::net::TcpListener::bind(cli.web_listen_address)
        .await
        .with_context(|| {
            format!(
                "cannot listen on --web.listen-address {}",
                cli.web_listen_address
            )
        })?;
    tracing::info!(address = %cli.web_listen_address, "serving /metrics and /probe");
    let (stop_web, web_stopped) = tokio::sync::oneshot::channel::<()>();
    let web = tokio::spawn(sonde_cli::http_server::serve(
        listener,
        sonde_agent::web::router(agent.clone()),
        cli.web.limits(),
        async {
            let _ = web_stopped.await;
        },
    ));
    let mut hangups = Hangups::listen();
    let terminate = signals::terminate();
    tokio::pin!(terminate);
    loop {
        tokio::select! {
            _ = &mut terminate => break,
            () = hangups.recv() => {
                let reloaded = AgentConfig::load(&cli.config_file)
                    .map_err(anyhow::Error::from)
                    .and_then(|c| Ok(agent.reload(c)?));
                match reloaded {
                    Ok(()) => {
                        RELOAD.loaded();
                        tracing::info!(file = %cli.config_file.display(), "config reloaded");
                    }
                    Err(e) => {
                        RELOAD.failed();
                        tracing::error!(error = %sonde_cli::errors::describe(e.as_ref()), "reload failed; keeping the running config");
                    }
                }
            }
        }
    }
    agent.shutdown(Duration::from_secs(5)).await;
    let _ = stop_web.send(());
    let _ = web.await;
    tracing::info!("stopped");
    Ok(())
}
