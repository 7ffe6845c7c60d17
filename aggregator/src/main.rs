//! `sonde-aggregator`: merges the agents' results into `up`, flags missing jobs, and
//! writes everything to Prometheus remote-write receivers.
//!
//! With no flags at all it starts the all-in-one default: the aggregator plus an
//! embedded agent probing the aggregator's own endpoints.

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
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
    after_help = "Without --config.file, when sonde-aggregator.yml does not exist and no flags other than --web.listen-address, --grpc.listen-address, --storage.path and --log.* are given, starts an all-in-one default: the aggregator plus an embedded agent probing its own endpoints (status page at http://127.0.0.1:9450/)."
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
    command: Option<AggregatorCommand>,
}

#[derive(clap::Subcommand, Debug)]
enum AggregatorCommand {
    #[command(flatten)]
    Common(Command),
    /// Print, on stdout, a sonde aggregator config made of the scrape jobs of a
    /// Prometheus config that point at a blackbox exporter; on stderr, what could not be
    /// carried over.
    ImportPrometheus {
        /// The Prometheus config file (prometheus.yml).
        file: PathBuf,
        /// The blackbox exporter's config file (its --config.file): the output loads its
        /// modules unchanged, with `modules_file:`.
        #[arg(long = "blackbox.config")]
        blackbox_config: Option<PathBuf>,
    },
}

/// The flags the all-in-one default can be started with (clap's ids; `LogFlags` is the
/// group of `--log.*`): where it listens, where it stores, how it logs. Any other flag, or a subcommand, means a real setup.
const ALL_IN_ONE_FLAGS: &[&str] = &[
    "web_listen_address",
    "grpc_listen_address",
    "storage_path",
    "level",
    "format",
    "LogFlags",
];

/// True when the command line asks for the all-in-one default (provided that the
/// default config file does not exist): no `--config.file`, no subcommand, and no flag
/// outside [`ALL_IN_ONE_FLAGS`].
fn all_in_one_requested(matches: &ArgMatches) -> bool {
    matches.subcommand().is_none()
        && matches.ids().all(|id| {
            ALL_IN_ONE_FLAGS.contains(&id.as_str())
                || matches.value_source(id.as_str()) != Some(ValueSource::CommandLine)
        })
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let all_in_one = all_in_one_requested(&matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(AggregatorCommand::ImportPrometheus {
        file,
        blackbox_config,
    }) = &cli.command
    {
        return import_prometheus(file, blackbox_config.as_deref());
    }
    if let Some(AggregatorCommand::Common(Command::CheckConfig { file })) = &cli.command {
        return check_config::run(file, |file| {
            let (config, problems) = AggregatorConfig::check(file);
            check_config::Outcome {
                summary: config.map(|c| {
                    format!(
                        "{} modules, {} jobs, {} remote_write endpoints",
                        c.modules.len(),
                        c.jobs.len(),
                        c.remote_write.len()
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
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, all_in_one)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", sonde_cli::errors::describe(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `import-prometheus`: the config on stdout, the notes on stderr; failing when there is
/// nothing to convert.
fn import_prometheus(
    file: &std::path::Path,
    blackbox_config: Option<&std::path::Path>,
) -> ExitCode {
    let conversion = match sonde_aggregator::import_prometheus::import_file(file, blackbox_config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for note in &conversion.notes {
        eprintln!("{note}");
    }
    if conversion.converted == 0 {
        eprintln!(
            "{}: nothing to convert: none of its {} scrape jobs points at a blackbox exporter (metrics_path /probe, params.module, or a relabeling to __param_target)",
            file.display(),
            conversion.scrape_jobs
        );
        return ExitCode::FAILURE;
    }
    print!("{}", conversion.config);
    eprintln!(
        "{}: {} of {} scrape jobs converted; check the result with `sonde-aggregator check-config`",
        file.display(),
        conversion.converted,
        conversion.scrape_jobs
    );
    ExitCode::SUCCESS
}

async fn run(cli: Cli, all_in_one: bool) -> anyhow::Result<()> {
    let (config, config_file) = if all_in_one && !cli.config_file.exists() {
        tracing::info!(
            "no --config.file and no {}: starting the all-in-one default",
            cli.config_file.display()
        );
        let config = AggregatorConfig::all_in_one(cli.web_listen_address, cli.grpc_listen_address)
            .context("the built-in all-in-one config")?;
        (config, None)
    } else {
        // The config error already names the file, line and column.
        let config = AggregatorConfig::load(&cli.config_file)?;
        (config, Some(cli.config_file.clone()))
    };
    let app = App::start(config, config_file, Some(&cli.storage_path))
        .await
        .context("cannot start the aggregator")?;
    let web = sonde_aggregator::web::Options {
        listen_address: cli.web_listen_address,
        enable_lifecycle: cli.web_enable_lifecycle,
        limits: cli.web.limits(),
    };
    let running = sonde_aggregator::server::start_with(app.clone(), web, cli.grpc_listen_address)
        .await
        .context("cannot start the aggregator's listeners")?;

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
        )
        .context("cannot start the all-in-one's embedded agent")?;
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
                    tracing::error!(error = %sonde_cli::errors::describe(&e), "reload failed; keeping the running config");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn requested(args: &[&str]) -> bool {
        let argv = std::iter::once("sonde-aggregator").chain(args.iter().copied());
        all_in_one_requested(&Cli::command().try_get_matches_from(argv).unwrap())
    }

    #[test]
    fn all_in_one_starts_with_listen_storage_and_log_flags() {
        assert!(requested(&[]));
        assert!(requested(&["--web.listen-address=127.0.0.1:19450"]));
        assert!(requested(&[
            "--web.listen-address",
            "0.0.0.0:9450",
            "--grpc.listen-address=127.0.0.1:19451",
            "--storage.path=/tmp/x",
            "--log.level=debug",
            "--log.format=json",
        ]));
        assert!(!requested(&["--config.file=sonde-aggregator.yml"]));
        assert!(!requested(&["--web.enable-lifecycle"]));
        assert!(!requested(&["--web.max-connections=10"]));
        assert!(!requested(&["check-config", "x.yml"]));
    }
}
