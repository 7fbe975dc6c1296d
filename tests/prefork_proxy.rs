//! `examples/prefork_proxy.rs` as a real process tree (a master and N forked workers) driven
//! with real HTTP/1.1 over real TCP: cache updates reach every worker, a purge purges
//! everywhere, concurrent unique refreshes count once, a SIGKILLed worker is restarted and
//! catches up through the snapshot its peers send it, and SIGTERM stops everything with
//! exit code 0.
//!
//! The example binary is built by `cargo test --features "tokio metrics"` (cargo builds the examples
//! of a package for its tests); it is found next to this test's binary, in
//! `target/<profile>/examples/`. When missing or older than its source (`cargo test --test
//! prefork_proxy` builds no example), the test builds it with `cargo build --example`.

#![cfg(all(feature = "tokio", feature = "metrics"))]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn example_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(build_example).clone()
}

fn build_example() -> PathBuf {
    // target/<profile>/deps/prefork_proxy-<hash> -> target/<profile>/examples/prefork_proxy
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = profile_dir.join("examples").join("prefork_proxy");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/prefork_proxy.rs");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&bin).is_none() || modified(&bin) < modified(&src) {
        // `cargo test --test prefork_proxy` builds no example: build it, same profile.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", "prefork_proxy", "--features", "tokio metrics", "--target-dir"]);
        cmd.arg(profile_dir.parent().unwrap()).current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name() == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build --example prefork_proxy");
        assert!(st.success(), "cargo build --example prefork_proxy: {st}");
    }
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// One HTTP response.
#[derive(Debug)]
struct Resp {
    status: u16,
    worker: u32,
    body: String,
}

/// A keep-alive HTTP/1.1 connection.
struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Conn { r: BufReader::new(s) }
    }

    fn request(&mut self, method: &str, path: &str, body: &str, close: bool) -> Resp {
        let conn = if close { "close" } else { "keep-alive" };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: {conn}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.r.get_mut().write_all(req.as_bytes()).expect("send request");
        let mut line = String::new();
        self.r.read_line(&mut line).expect("status line");
        let status: u16 =
            line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
        let (mut len, mut worker) = (0usize, None);
        loop {
            line.clear();
            self.r.read_line(&mut line).expect("header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').unwrap_or_else(|| panic!("header {l:?}"));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => len = value.trim().parse().unwrap(),
                "x-worker" => worker = Some(value.trim().parse().unwrap()),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).expect("body");
        let worker = worker.unwrap_or_else(|| panic!("no x-worker header on {method} {path}"));
        Resp { status, worker, body: String::from_utf8(body).unwrap() }
    }
}

/// One request on a fresh connection.
fn fresh(addr: SocketAddr, method: &str, path: &str, body: &str) -> Resp {
    Conn::open(addr).request(method, path, body, true)
}

/// `GET path` answered by every one of the `n` workers, each through fresh connections
/// (new connections until all `n` have answered).
fn from_every_worker(addr: SocketAddr, n: u32, path: &str) -> BTreeMap<u32, Resp> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = BTreeMap::new();
    while seen.len() < n as usize {
        assert!(Instant::now() < deadline, "only workers {:?} of {n} answered {path} in 30 s", seen.keys());
        let r = fresh(addr, "GET", path, "");
        seen.entry(r.worker).or_insert(r);
    }
    seen
}

/// One keep-alive connection to each worker.
fn connection_per_worker(addr: SocketAddr, n: u32) -> BTreeMap<u32, Conn> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conns = BTreeMap::new();
    while conns.len() < n as usize {
        assert!(Instant::now() < deadline, "only workers {:?} of {n} reached in 30 s", conns.keys());
        let mut c = Conn::open(addr);
        let r = c.request("GET", "/stats", "", false);
        conns.entry(r.worker).or_insert(c);
    }
    conns
}

/// A number field of the flat JSON `/stats` answers.
fn json_u64(json: &str, field: &str) -> u64 {
    let pat = format!("\"{field}\":");
    let at = json.find(&pat).unwrap_or_else(|| panic!("no {field} in {json}")) + pat.len();
    json[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// The master and its workers; SIGKILLs everything left on drop.
struct Proxy {
    master: Child,
    addr: SocketAddr,
    n: u32,
    log: Arc<Mutex<String>>,
    pids: Vec<u32>,
}

impl Proxy {
    fn start(n: u32) -> Proxy {
        let mut master = Command::new(example_binary())
            .args(["--workers", &n.to_string(), "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the proxy");
        let log = Arc::new(Mutex::new(String::new()));
        let (l, err) = (log.clone(), master.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let out = master.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| {
            let _ = master.kill();
            panic!("no 'listening' line in 60 s ({e}); stderr:\n{}", log.lock().unwrap())
        });
        let want_tail = format!(" with {n} workers");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|l| l.strip_suffix(want_tail.as_str()))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let mut p = Proxy { master, addr, n, log, pids: Vec::new() };
        p.pids = p.worker_pids().into_values().collect();
        p
    }

    /// Worker index -> pid, from every worker's `/stats`.
    fn worker_pids(&self) -> BTreeMap<u32, u32> {
        from_every_worker(self.addr, self.n, "/stats")
            .into_iter()
            .map(|(w, r)| {
                assert_eq!(json_u64(&r.body, "worker"), u64::from(w), "{}", r.body);
                (w, json_u64(&r.body, "pid") as u32)
            })
            .collect()
    }

    /// SIGTERM the master: it exits 0 and no worker is left.
    fn stop(mut self) {
        kill(Pid::from_raw(self.master.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.master.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "master still running 30 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "master exit status {status:?}; stderr:\n{}", self.log.lock().unwrap());
        for &pid in &self.pids {
            // The master reaped them before exiting: not even a zombie is left.
            assert_eq!(
                kill(Pid::from_raw(pid as i32), None),
                Err(nix::errno::Errno::ESRCH),
                "worker pid {pid} still exists after the master exited"
            );
        }
        self.pids.clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("proxy stderr:\n{}", self.log.lock().unwrap());
        }
        if self.pids.is_empty() {
            return; // stopped
        }
        // A failed test: SIGTERM (the master stops the workers it has now, restarted ones
        // included), then SIGKILL whatever is left.
        let _ = kill(Pid::from_raw(self.master.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.master.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
        for &pid in &self.pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Until `f` holds (checked every 20 ms), at most `secs` seconds.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every worker, reached through fresh connections, answers `key` with `want` (None: 404).
fn assert_everywhere(p: &Proxy, key: &str, want: Option<&str>) {
    for (w, r) in from_every_worker(p.addr, p.n, &format!("/cache/{key}")) {
        match want {
            Some(v) => assert_eq!((r.status, r.body.as_str()), (200, v), "worker {w}, key {key}"),
            None => assert_eq!(r.status, 404, "worker {w}, key {key}: {r:?}"),
        }
    }
}

#[test]
fn put_reaches_every_worker_and_delete_purges_everywhere() {
    let p = Proxy::start(3);
    assert_everywhere(&p, "k", None);
    // One PUT, on whichever worker the connection lands; then every worker serves it. The
    // publisher answers 204 after applying it; the others within a few milliseconds.
    let put = fresh(p.addr, "PUT", "/cache/k", "v1");
    assert_eq!(put.status, 204);
    eventually(5, "every worker serves k=v1", || {
        from_every_worker(p.addr, p.n, "/cache/k").values().all(|r| r.status == 200 && r.body == "v1")
    });
    assert_everywhere(&p, "k", Some("v1"));
    // An overwrite on each worker in turn: each one's write reaches all.
    let mut conns = connection_per_worker(p.addr, p.n);
    for (w, c) in conns.iter_mut() {
        let v = format!("from-{w}");
        assert_eq!(c.request("PUT", "/cache/k", &v, false).status, 204);
        eventually(5, &format!("every worker serves k={v}"), || {
            from_every_worker(p.addr, p.n, "/cache/k").values().all(|r| r.status == 200 && r.body == v)
        });
    }
    drop(conns);
    let del = fresh(p.addr, "DELETE", "/cache/k", "");
    assert_eq!(del.status, 204);
    eventually(5, "k purged everywhere", || {
        from_every_worker(p.addr, p.n, "/cache/k").values().all(|r| r.status == 404)
    });
    assert_everywhere(&p, "k", None);
    // Every worker's /metrics is the Prometheus text of its counters, recorded through the
    // library's `metrics` feature: each published at least the PUT it served.
    for (w, r) in from_every_worker(p.addr, p.n, "/metrics") {
        assert_eq!(r.status, 200, "worker {w}");
        let line = r
            .body
            .lines()
            .find(|l| l.starts_with("worker_events_published_total") && l.contains(&format!("worker=\"{w}\"")))
            .unwrap_or_else(|| panic!("worker {w}: no published counter in /metrics:\n{}", r.body));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v >= 1.0, "worker {w}: {line}");
    }
    p.stop();
}

#[test]
fn concurrent_refreshes_on_every_worker_count_one() {
    let n = 3;
    let p = Proxy::start(n);
    let conns = connection_per_worker(p.addr, n);
    let barrier = Arc::new(Barrier::new(n as usize));
    let answers: Vec<(u32, u16)> = conns
        .into_iter()
        .map(|(w, mut c)| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                let r = c.request("POST", "/refresh/k", "", false);
                (w, r.status)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(answers, (0..n).map(|w| (w, 202)).collect::<Vec<_>>(), "each worker accepted its POST");
    let total =
        || -> u64 { from_every_worker(p.addr, n, "/stats").values().map(|r| json_u64(&r.body, "refreshes")).sum() };
    eventually(5, "one refresh counted", || total() >= 1);
    std::thread::sleep(Duration::from_millis(500)); // time for a wrong second delivery
    assert_eq!(total(), 1, "exactly one worker counts the refresh of k");
    // Another key is another unique event.
    assert_eq!(fresh(p.addr, "POST", "/refresh/other", "").status, 202);
    eventually(5, "the refresh of another key counted", || total() == 2);
    p.stop();
}

#[test]
fn killed_worker_is_restarted_with_its_id_and_catches_up() {
    let n = 3;
    let mut p = Proxy::start(n);
    assert_eq!(fresh(p.addr, "PUT", "/cache/a", "a1").status, 204);
    assert_eq!(fresh(p.addr, "PUT", "/cache/c", "c1").status, 204);
    eventually(5, "a and c everywhere", || {
        from_every_worker(p.addr, n, "/cache/c").values().all(|r| r.body == "c1")
            && from_every_worker(p.addr, n, "/cache/a").values().all(|r| r.body == "a1")
    });
    let before = p.worker_pids();
    let victim = 1;
    kill(Pid::from_raw(before[&victim] as i32), Signal::SIGKILL).unwrap();
    // While it is dead (its successor may already be up: either way), the cache changes.
    let live: Vec<u32> = (0..n).filter(|&w| w != victim).collect();
    let mut done = (false, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(done.0 && done.1) {
        assert!(Instant::now() < deadline, "could not update the cache through a surviving worker");
        let mut c = Conn::open(p.addr);
        let r = c.request("GET", "/stats", "", false);
        if !live.contains(&r.worker) {
            continue;
        }
        if !done.0 {
            assert_eq!(c.request("PUT", "/cache/b", "b1", false).status, 204);
            done.0 = true;
        } else {
            assert_eq!(c.request("DELETE", "/cache/c", "", false).status, 204);
            done.1 = true;
        }
    }
    // The master forks a new worker with the same id.
    let mut after = BTreeMap::new();
    eventually(30, "worker 1 restarted with a new pid", || {
        after = p.worker_pids();
        after[&victim] != before[&victim]
    });
    p.pids = after.values().copied().collect();
    for w in &live {
        assert_eq!(after[w], before[w], "worker {w} was not touched");
    }
    // It accepts connections only once caught up: its very first answers are current,
    // including `a`, published before it was killed and held now only by its peers.
    let first = from_every_worker(p.addr, n, "/cache/a");
    assert_eq!((first[&victim].status, first[&victim].body.as_str()), (200, "a1"));
    assert_everywhere(&p, "a", Some("a1"));
    assert_everywhere(&p, "b", Some("b1"));
    assert_everywhere(&p, "c", None);
    // And it takes part in updates again.
    assert_eq!(fresh(p.addr, "PUT", "/cache/a", "a2").status, 204);
    eventually(5, "a=a2 everywhere", || from_every_worker(p.addr, n, "/cache/a").values().all(|r| r.body == "a2"));
    let log = p.log.lock().unwrap().clone();
    assert!(log.contains("worker 1: restarted, caught up") && !log.contains("no snapshot"), "{log}");
    p.stop();
}
