//! Target discovery: each job's target groups, from its `static_configs` and its
//! `file_sd_configs` files, turned into the checks the hub places on agents.

mod build;
mod file_sd;
pub mod kubernetes;

pub use file_sd::{FileSd, FileSdError, parse_groups, read_groups};
pub use sonde_hub::targets::{Target, TargetSet};
