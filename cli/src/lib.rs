//! What `sonde-agent` and `sonde-aggregator` share at their edges, so that neither
//! binary borrows its command line from the other:
//!
//! - [`logging`]: `--log.level` and `--log.format`, and the subscriber they set up;
//! - [`check_config`]: the `check-config FILE` subcommand and how it reports;
//! - [`signals`]: SIGTERM/SIGINT to stop, SIGHUP to reload;
//! - [`http_server`]: the HTTP server both put their endpoints behind, and its
//!   `--web.*` flags.

pub mod check_config;
pub mod http_server;
pub mod logging;
pub mod signals;
