//! `worker-events-bridge`: one per host; see the library docs and the README section
//! "Across hosts: the NATS bridge". Flags: `--help`. Stops cleanly on SIGTERM or SIGINT.
//! Prints `worker-events-bridge ready host=<id>` on stdout once both directions are set up.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use worker_events_bridge::{Bridge, Config};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = match Config::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Two threads: the bus loop and the NATS tasks can run side by side.
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let host = cfg.host_id.clone();
        let interval = cfg.stats_interval;
        let bridge = Bridge::new(cfg);
        let stats = bridge.stats();
        tokio::spawn(async move {
            while !stats.snapshot().ready {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            println!("worker-events-bridge ready host={host}");
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                tracing::info!("stats {}", stats.snapshot());
            }
        });
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                eprintln!("cannot install signal handlers");
                return std::process::ExitCode::FAILURE;
            }
        };
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        match bridge.run(shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "bridge failed");
                std::process::ExitCode::FAILURE
            }
        }
    })
}
