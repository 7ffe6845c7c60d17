//! The dns prober (being written).

use super::{ProbeContext, Samples};
use sonde_proto::config::Module;

pub async fn probe(
    _ctx: &ProbeContext,
    _target: &str,
    _module: &Module,
    _out: &mut Samples,
) -> Result<(), String> {
    Err("the dns prober is not built yet".to_string())
}
