//! Command line: `walcast run | migrate | check | tail`, `--version`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Options, Settings};

/// PostgreSQL row changes → a gap-free, per-tenant stream of protobuf events on NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "walcast", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: tail the slot and publish events
    Run(Common),
    /// Apply migrations/ and create the publication and slot if missing
    Migrate(Common),
    /// Verify every precondition (Postgres, slot, publication, NATS, stream) and print fixes
    Check(Common),
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

impl Common {
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
        Ok(self
            .options
            .clone()
            .merge(Options::database_from_env())
            .merge(file))
    }
}
