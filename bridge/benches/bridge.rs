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
//! * rate: 20,000 events published back to back on A until all are delivered on B, vs the
//!   same count published (acks awaited in windows of 256) and consumed raw.

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
        .env("RUST_LOG", "warn")
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
    let t0 = Instant::now();
    let mut received = 0;
    for _ in 0..RATE_N {
        publish(&mut wa, &monotonic_ns().to_le_bytes());
        let _ = wb.dispatch();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while received < RATE_N {
        let _ = wa.dispatch();
        let _ = wb.wait(Some(Duration::from_millis(5)));
        received += std::mem::take(&mut *g.lock().unwrap()).len();
        assert!(Instant::now() < deadline, "rate: {received} of {RATE_N} crossed within 120 s");
    }
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
}
