//! Command line: `walcast run | migrate | check | backfill | auth | tail`, `--version`.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{ConfigError, Options, Settings};

/// PostgreSQL row changes → a gap-free, per-tenant stream of protobuf events on NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "walcast", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments (exits with clap's message on bad
    /// usage). The database URL and its file are one setting: when one comes
    /// from a flag and the other from the environment, the flag wins.
    pub fn parse_args() -> Cli {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        if let Some((_, sub)) = matches.subcommand() {
            cli.command.common_mut().prefer_flag_for_database(sub);
        }
        cli
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: tail the slot and publish events
    Run(Common),
    /// Apply migrations/ and create the publication and slot if missing
    Migrate(Common),
    /// Verify every precondition (Postgres, slot, publication, NATS, stream) and print fixes
    Check(Common),
    /// Copy the tables' current rows into the state bucket now (SPEC §8): a
    /// running `walcast run` does it, else this process runs the pipeline
    /// until the backfill is complete
    Backfill(Common),
    /// Answer the NATS auth callout only (SPEC §9): verify the application's
    /// token and issue a user confined to its tenant (`walcast run` does it
    /// too when the --auth-* settings are given)
    Auth(Common),
    /// Print a tenant's events from the stream as JSON, one per line
    Tail {
        #[command(flatten)]
        tail: crate::tail::TailArgs,
        #[command(flatten)]
        common: Common,
    },
}

/// Settings shared by every command.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// TOML config file (flags > WALCAST_* env > this file > defaults)
    #[arg(long, env = "WALCAST_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: Options,
}

impl Command {
    fn common_mut(&mut self) -> &mut Common {
        match self {
            Command::Run(common)
            | Command::Migrate(common)
            | Command::Check(common)
            | Command::Backfill(common)
            | Command::Auth(common) => common,
            Command::Tail { common, .. } => common,
        }
    }
}

impl Common {
    /// Drops the one of `database_url` / `database_url_file` that came from
    /// the environment when the other came from a flag.
    fn prefer_flag_for_database(&mut self, matches: &ArgMatches) {
        let from_env = |id| matches.value_source(id) == Some(ValueSource::EnvVariable);
        let from_flag = |id| matches.value_source(id) == Some(ValueSource::CommandLine);
        let options = &mut self.options;
        if from_flag("database_url_file") && from_env("database_url") {
            options.database_url = None;
        }
        if from_flag("database_url") && from_env("database_url_file") {
            options.database_url_file = None;
        }
    }

    /// Resolves settings with the documented precedence.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        self.merged()?.resolve()
    }

    /// Settings for commands that need only NATS.
    pub fn nats_settings(&self) -> Result<Settings, ConfigError> {
        self.merged()?.resolve_nats_only()
    }

    fn merged(&self) -> Result<Options, ConfigError> {
        let file = match &self.config {
            Some(path) => Options::from_file(path)?,
            None => Options::default(),
        };
        Ok(self.options.clone().merge(file))
    }
}
