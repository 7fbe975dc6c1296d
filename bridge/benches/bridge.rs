//! Cross-host latency and rate through the bridge, against a raw JetStream baseline on the
//! same `nats-server`, in the same run (only the ratios mean anything on a shared machine).
//!
//! `cargo bench -p worker-events-bridge --bench bridge` (needs `nats-server`). Two buses
//! (hosts A and B, one worker slot each, held by this process) and one bridge process per
//! host (the crate's binary). Each figure is printed with its baseline and the ratio.
//!
//! * latency: one event at a time, publish on A -> callback on B (p50/p99 of 2,000), vs a
//!   raw `async-nats` JetStream publish -> pull-consumer delivery round trip (stream in
//!   file storage, like the bridge's);
//! * rate: 20,000 events published on A, at most 2,000 of them not yet delivered on B at
//!   any time (a burst at bus speed outruns the agent: the bus drops what the agent cannot
//!   take, and B gets lost notices), until all are delivered on B (or reported lost), vs
//!   the same count published (acks awaited in windows of 256) and consumed raw.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use worker_events::{Events, Options, PublishError, Target, Wid, Worker};
use worker_events_dev_support::{Sample, TempDir, monotonic_ns};

const LAT_N: usize = 2000;
const RATE_N: usize = 20_000;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nats(dir: &Path) -> (Kill, u16) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("store"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server");
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    (Kill(child), port)
}

/// Start a bridge; the returned channel gets its "ready" line (the caller must keep its
/// bus's worker dispatching meanwhile: it serves the agent's attach).
fn bridge(sock: &Path, host: &str, port: u16, log: &Path) -> (Kill, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker-events-bridge"))
        .arg("--socket")
        .arg(sock)
        .args(["--workers", "1", "--host-id", host, "--export", "t:*"])
        .args(["--nats", &format!("nats://127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .args(["--stats-interval-secs", "5"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut out, &mut line);
        let _ = tx.send(line);
    });
    (Kill(child), rx)
}

fn worker(sock: &Path) -> Worker {
    let o = Options::new(sock).workers(1).enable_privileged_agent(true);
    let mut w = Events::new(o).unwrap().init_worker(Wid::Worker(0)).unwrap();
    assert!(w.wait_ready(Duration::from_secs(10)).unwrap());
    w
}

fn publish(w: &mut Worker, data: &[u8]) {
    loop {
        match w.publish_bytes(Target::All, "t", "x", data) {
            Ok(()) => return,
            Err(PublishError::QueueOverflow) => {
                let _ = w.wait(Some(Duration::from_millis(1)));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = TempDir::new("bridge-bench");
    let (_nats, port) = nats(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    // Baseline: raw JetStream on the same server.
    let (base_lat, base_rate) = rt.block_on(async {
        let client = async_nats::connect(format!("nats://127.0.0.1:{port}")).await.unwrap();
        let js = jetstream::new(client);
        let s = js
            .get_or_create_stream(stream::Config {
                name: "BASE".into(),
                subjects: vec!["base.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let cons = s
            .get_or_create_consumer(
                "base",
                consumer::pull::Config {
                    durable_name: Some("base".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut msgs = cons.messages().await.unwrap();
        let mut lat = Vec::with_capacity(LAT_N);
        for i in 0..LAT_N + 100 {
            let t0 = monotonic_ns();
            js.publish("base.x", vec![0u8; 16].into()).await.unwrap().await.unwrap();
            let m = msgs.next().await.unwrap().unwrap();
            let t1 = monotonic_ns();
            m.ack().await.unwrap();
            if i >= 100 {
                lat.push(t1 - t0);
            }
        }
        let t0 = Instant::now();
        let mut acks = std::collections::VecDeque::new();
        let consume = async {
            for _ in 0..RATE_N {
                let m = msgs.next().await.unwrap().unwrap();
                m.ack().await.unwrap();
            }
        };
        let produce = async {
            for _ in 0..RATE_N {
                acks.push_back(js.publish("base.x", vec![0u8; 16].into()).await.unwrap());
                if acks.len() >= 256 {
                    acks.pop_front().unwrap().await.unwrap();
                }
            }
            for a in acks {
                a.await.unwrap();
            }
        };
        tokio::join!(consume, produce);
        (Sample::new(lat), RATE_N as f64 / t0.elapsed().as_secs_f64())
    });

    eprintln!("baseline done");
    // Through the bridges: A's worker publishes, B's worker's callback receives.
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut wa = worker(&sa);
    let mut wb = worker(&sb);
    let (_ba, ra) = bridge(&sa, "A", port, &dir.join("a.log"));
    let (_bb, rb) = bridge(&sb, "B", port, &dir.join("b.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in [ra, rb] {
        loop {
            let _ = wa.wait(Some(Duration::from_millis(1)));
            let _ = wb.wait(Some(Duration::from_millis(1)));
            if let Ok(l) = r.try_recv() {
                assert!(l.contains("ready"), "bridge: {l:?}");
                break;
            }
            assert!(Instant::now() < deadline, "bridges not ready within 30 s");
        }
    }
    eprintln!("bridges ready");
    let g = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let g2 = g.clone();
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let l2 = lost.clone();
    wb.subscribe("worker-events", "lost", move |ev| {
        if let Some(l) = ev.lost() {
            l2.fetch_add(l.count, std::sync::atomic::Ordering::Relaxed);
        }
    });
    wb.subscribe("t", "x", move |ev| {
        if ev.origin_host().is_some() {
            let sent = u64::from_le_bytes(ev.data_bytes()[..8].try_into().unwrap());
            g2.lock().unwrap().push(monotonic_ns() - sent);
        }
    });
    let mut lat = Vec::with_capacity(LAT_N);
    for i in 0..LAT_N + 100 {
        publish(&mut wa, &monotonic_ns().to_le_bytes());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = wa.dispatch();
            let _ = wb.wait(Some(Duration::from_millis(1)));
            if let Some(l) = g.lock().unwrap().pop() {
                if i >= 100 {
                    lat.push(l);
                }
                break;
            }
            assert!(Instant::now() < deadline, "event {i} did not cross within 10 s");
        }
    }
    let lat = Sample::new(lat);
    // Sustained rate: at most WINDOW events between A's publish and B's callback (a burst
    // at bus speed would outrun the agent and be dropped by the bus, as lost notices).
    const WINDOW: usize = 2000;
    let lost_before = lost.load(std::sync::atomic::Ordering::Relaxed);
    let rate_lost = || (lost.load(std::sync::atomic::Ordering::Relaxed) - lost_before) as usize;
    let t0 = Instant::now();
    let (mut sent, mut received) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(120);
    while received + rate_lost() < RATE_N {
        while sent < RATE_N && sent - received - rate_lost().min(sent - received) < WINDOW {
            publish(&mut wa, &monotonic_ns().to_le_bytes());
            sent += 1;
        }
        let _ = wa.dispatch();
        let _ = wb.wait(Some(Duration::from_millis(1)));
        received += std::mem::take(&mut *g.lock().unwrap()).len();
        if Instant::now() > deadline {
            for h in ["a", "b"] {
                let log = std::fs::read_to_string(dir.join(format!("{h}.log"))).unwrap_or_default();
                eprintln!("--- bridge {h} log ---\n{}", log.lines().rev().take(5).collect::<Vec<_>>().join("\n"));
            }
            panic!("rate: {received} of {RATE_N} crossed, {} reported lost, within 120 s", rate_lost());
        }
    }
    let rate_lost = rate_lost();
    let rate = RATE_N as f64 / t0.elapsed().as_secs_f64();

    let (p50, p99) = (lat.percentile(0.5).unwrap(), lat.percentile(0.99).unwrap());
    let (b50, b99) = (base_lat.percentile(0.5).unwrap(), base_lat.percentile(0.99).unwrap());
    println!(
        "bridge bench ({LAT_N} latency samples, {RATE_N} events for the rate); ratios against the raw JetStream baseline of this run"
    );
    println!(
        "  latency p50: bridge {:>9.1} us  raw JetStream {:>9.1} us  ratio {:.2}x",
        us(p50),
        us(b50),
        p50 as f64 / b50 as f64
    );
    println!(
        "  latency p99: bridge {:>9.1} us  raw JetStream {:>9.1} us  ratio {:.2}x",
        us(p99),
        us(b99),
        p99 as f64 / b99 as f64
    );
    println!(
        "  rate:        bridge {rate:>9.0} ev/s raw JetStream {base_rate:>9.0} ev/s ratio {:.2}x",
        rate / base_rate
    );
    println!("  rate run:    {received} delivered on B, {rate_lost} reported lost (window {WINDOW})");
}
