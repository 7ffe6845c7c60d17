//! What `sonde-agent` and `sonde-aggregator` share at their edges, so that neither
//! binary borrows its command line from the other:
//!
//! - [`logging`]: `--log.level` and `--log.format`, and the subscriber they set up;
//! - [`check_config`]: the `check-config FILE` subcommand and how it reports;
//! - [`errors`]: an error and its causes in one line, for logs and exit messages;
//! - [`signals`]: SIGTERM/SIGINT to stop, SIGHUP to reload;
//! - [`reload`]: how the last reload went, for `sonde_config_last_reload_*`;
//! - [`http_server`]: the HTTP server both put their endpoints behind, and its
//!   `--web.*` flags;
//! - [`storage_lock`]: one process per `--storage.path`.

pub mod check_config;
pub mod errors;
pub mod http_server;
pub mod logging;
pub mod reload;
pub mod signals;
pub mod storage_lock;
