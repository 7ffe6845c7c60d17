//! Logging set up the Prometheus exporters' way: `--log.level` and `--log.format`.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Logfmt,
    Json,
}

/// `--log.level` and `--log.format`, the same for both binaries.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct LogFlags {
    #[arg(long = "log.level", value_enum, default_value = "info")]
    pub level: LogLevel,
    #[arg(long = "log.format", value_enum, default_value = "logfmt")]
    pub format: LogFormat,
}

impl LogFlags {
    pub fn init(self) {
        init(self.level, self.format);
    }
}

/// Installs the global subscriber; logs go to stderr.
pub fn init(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    };
    // Our own crates at the chosen level; chatty dependencies (h2, hyper) one notch up.
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "warn,sonde_agent={level},sonde_aggregator={level},sonde_cli={level},sonde={level}"
    ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Logfmt => builder.with_ansi(false).try_init(),
    };
}
