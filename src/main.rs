//! The `walcast` binary: parse the command line, set up logging, run, and
//! print any error once, as one line, with a non-zero exit.

use std::process::ExitCode;

use walcast::cli::{Cli, Command};
use walcast::{allocator, app, check, migrate, secrets, tail, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    allocator::tune();
    // One thread: the pipeline is a chain of tasks handing batches to each
    // other, and on one thread those hand-offs are plain function calls
    // instead of cross-thread wakeups, and memory is freed by the thread that
    // allocated it. Measured: 20 % less CPU per event than the multi-thread
    // runtime, and the other core stays free for Postgres and nats-server
    // (docs/BENCHMARKS.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(common) => {
            let settings = common.settings()?;
            telemetry::init_logging(settings.log_json);
            allocator::spawn_trimmer();
            app::run(settings, shutdown_signal()).await?;
        }
        Command::Migrate(common) => {
            let settings = common.settings()?;
            telemetry::init_logging(settings.log_json);
            let report = migrate::run(&settings).await?;
            for version in &report.applied {
                say(format_args!("applied {version}"));
            }
            if report.applied.is_empty() {
                say("migrations: up to date");
            }
            if report.publication_created {
                say(format_args!("created publication {}", settings.publication));
            }
            if report.generated_columns_published {
                say(format_args!(
                    "publication {}: publish_generated_columns = stored",
                    settings.publication
                ));
            }
            say(format_args!(
                "replication slot {}: {}",
                settings.slot,
                if report.slot_created {
                    "created"
                } else {
                    "exists"
                }
            ));
        }
        Command::Check(common) => {
            let settings = common.settings()?;
            telemetry::init_logging(settings.log_json);
            let lines = check::run(&settings).await;
            for line in &lines {
                say(line);
            }
            let failed = lines
                .iter()
                .filter(|l| l.status == check::Status::Fail)
                .count();
            if failed > 0 {
                anyhow::bail!("{failed} check(s) failed");
            }
        }
        Command::Backfill(common) => {
            let settings = common.settings()?;
            telemetry::init_logging(settings.log_json);
            let marker = walcast::state::demand::run(settings, shutdown_signal()).await?;
            say(format_args!(
                "backfill complete: {} rows from the snapshot at {}",
                marker.rows.unwrap_or(0),
                marker.snapshot_lsn.as_deref().unwrap_or("?")
            ));
        }
        Command::Auth(common) => {
            let settings = common.nats_settings()?;
            telemetry::init_logging(settings.log_json);
            walcast::auth::run(settings, shutdown_signal()).await?;
        }
        Command::Tail { tail, common } => {
            let settings = common.nats_settings()?;
            telemetry::init_logging(settings.log_json);
            tail::run(&settings, &tail).await?;
        }
    }
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutdown requested: draining (send the signal again to exit at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("walcast: second signal, exiting without draining");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon still runs; it just cannot drain on a signal.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The one place an error is printed: one line, each cause once, secrets scrubbed.
fn fail(error: anyhow::Error) -> ExitCode {
    let error: &(dyn std::error::Error + 'static) = error.as_ref();
    eprintln!("walcast: error: {}", telemetry::error_chain(error));
    ExitCode::FAILURE
}

/// Prints a line of a command's report, secrets scrubbed.
fn say(line: impl std::fmt::Display) {
    println!("{}", secrets::scrub(&line.to_string()));
}
