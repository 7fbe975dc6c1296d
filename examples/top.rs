//! A `top`-like view of a live deployment: `cargo run --example top -- <listening> [--once]`.
//!
//! Every second it calls [`worker_events::inspect`] on the control socket `<listening>` (the
//! path given to `Options::new`) and redraws one table: the broker, its pid and epoch, then
//! one line per worker id (pid, alive, parked, and on shared memory the events queued into
//! and out of it and those lost on the way to it), then the dedup table's fill. `--once`
//! prints one table without clearing the screen and exits (status 1 if the inspection
//! failed), for scripts.
//!
//! The inspector takes no worker slot, maps the region read-only and is authenticated like a
//! worker: run it as the deployment's user.

use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut path, mut once) = (None, false);
    for a in args.by_ref() {
        match a.as_str() {
            "--once" => once = true,
            "-h" | "--help" => usage(0),
            _ if path.is_none() && !a.starts_with('-') => path = Some(a),
            _ => usage(2),
        }
    }
    let Some(path) = path else { usage(2) };
    if once {
        match worker_events::inspect(&path) {
            Ok(s) => print!("{s}"),
            Err(e) => {
                eprintln!("top: {path}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    loop {
        // Clear the screen, cursor home.
        print!("\x1b[2J\x1b[H");
        match worker_events::inspect(&path) {
            Ok(s) => print!("{path}\n{s}"),
            Err(e) => println!("{path}: {e}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn usage(code: i32) -> ! {
    eprintln!("usage: top <listening socket path> [--once]");
    std::process::exit(code)
}
