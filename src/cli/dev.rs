//! `behest-agent dev`: the embedded default (filled in once the embedded IdP lands).

use std::process::ExitCode;

use super::{CliResult, Global};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(_g: &Global, _args: Args) -> CliResult {
    Ok(ExitCode::SUCCESS)
}
