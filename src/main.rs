//! The `pullcache` binary: parse, init tracing, start, wait for a signal, drain.

use std::process::ExitCode;

use clap::Parser;
use pullcache::config::{CaCommand, Cli, Command, LogFormat, Settings};

/// Exit status for bad configuration (EX_USAGE), before anything is bound.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Ca {
            command: CaCommand::Print { ca_dir },
        } => match pullcache::ca::CertificateAuthority::load_or_create(&ca_dir) {
            Ok(ca) => {
                print!("{}", ca.cert_pem());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pullcache: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Stats(args) => pullcache::cli::stats(args),
        Command::Entries(args) => pullcache::cli::entries(args),
        Command::Purge(args) => pullcache::cli::purge(args),
        Command::Setup(args) => pullcache::setup::run(args),
        Command::Serve(args) => {
            let settings = match Settings::try_from(args) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("pullcache: invalid configuration: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            init_tracing(settings.log_format);
            match serve(settings) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("pullcache: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn serve(settings: Settings) -> anyhow::Result<()> {
    let running = pullcache::server::start(settings).await?;
    shutdown_signal().await?;
    tracing::info!("shutting down: draining connections");
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
