//! Optional diagnostics for child processes: with `WE_CHILD_TRACE=1` in the environment of a
//! test run, every child prints the library's `tracing` events of level INFO and above on
//! its stderr, each with its CLOCK_MONOTONIC time in milliseconds and its pid. The parent
//! keeps a child's stderr and shows it when the child fails (`Child::fail`), or on request
//! (`Child::stderr`): this is how a rare multi-process failure is read after the fact.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

struct Stderr;

impl<S: tracing::Subscriber> Layer<S> for Stderr {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() > tracing::Level::INFO {
            return;
        }
        let mut f = Fields(String::new());
        event.record(&mut f);
        let ms = super::monotonic_ns() / 1_000_000;
        eprintln!(
            "[{ms} ms pid {}] {} {}:{}",
            std::process::id(),
            event.metadata().level(),
            event.metadata().target(),
            f.0
        );
    }
}

/// Install the stderr layer for this process if `WE_CHILD_TRACE` is set.
pub fn install_from_env() {
    if std::env::var_os("WE_CHILD_TRACE").is_some() {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Stderr));
    }
}
