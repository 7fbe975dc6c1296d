//! The running bridge: the bus loop (the privileged agent, driven by
//! `worker_events::tokio::AsyncWorker` on the bridge's runtime), the export task, the import
//! task, the acknowledger and the cluster-unique claims.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use worker_events::tokio::AsyncWorker;
use worker_events::{Events, PublishError, SYSTEM_SOURCE, Target, Wid, Worker};

use crate::config::{Config, kv_key};
use crate::local;
use crate::outbox::{Item, Outbox};
use crate::pattern::any_match;
use crate::seq::{Tracker, Verdict};
use crate::stats::{Counters, StatsHandle, add};
use crate::wire;

/// Publishes the export side keeps in flight (sent, acknowledgement not yet awaited).
const EXPORT_WINDOW: usize = 256;
/// Reconnect / retry backoff: from 10 ms, doubling, to 2 s.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long shutdown waits for the outbound buffer to drain into the stream.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The local bus (attach, dispatch, divert).
    #[error("local bus: {0}")]
    Bus(#[from] worker_events::Error),
    /// The configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The NATS client could not be built (bad URL, unreadable creds file).
    #[error("nats: {0}")]
    Nats(String),
    /// The import state file.
    #[error("state file {path}: {err}")]
    State {
        /// The file.
        path: String,
        /// What failed.
        err: std::io::Error,
    },
}

/// A bridge between this host's bus and NATS JetStream. [`Bridge::run`] does the work.
///
/// ```no_run
/// use worker_events_bridge::{Bridge, Config};
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg = Config::from_toml(r#"
///     export = ["cache:*"]
///     [nats]
///     urls = ["nats://127.0.0.1:4222"]
///     [bus]
///     listening = "/run/proxy/events.sock"
///     workers = 4
/// "#)?;
/// let bridge = Bridge::new(cfg);
/// let stats = bridge.stats();
/// tokio::spawn(async move {
///     loop {
///         tokio::time::sleep(std::time::Duration::from_secs(60)).await;
///         println!("{}", stats.snapshot());
///     }
/// });
/// bridge.run(async { tokio::signal::ctrl_c().await.unwrap() }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Bridge {
    cfg: Arc<Config>,
    stats: StatsHandle,
}

/// An imported message on its way to the bus loop.
struct Incoming {
    meta: wire::Meta,
    data: Bytes,
    msg: jetstream::Message,
}

/// A diverted unique event waiting for (or back from) its claim.
#[derive(Debug)]
struct Claim {
    hash: String,
    source: String,
    event: String,
    data: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimOutcome {
    Won,
    Lost,
    Unclaimed,
}

impl Bridge {
    /// A bridge for `cfg` (nothing is opened before [`Bridge::run`]).
    pub fn new(cfg: Config) -> Bridge {
        Bridge { cfg: Arc::new(cfg), stats: StatsHandle::default() }
    }

    /// The counters, live ([`StatsHandle::snapshot`]).
    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Attach to the bus as the privileged agent, connect to NATS (in the background, with
    /// backoff: the local bus works meanwhile), and relay until `shutdown` completes; then
    /// drain the outbound buffer into the stream for up to 3 s and detach.
    ///
    /// Must run inside a tokio runtime with I/O and time enabled.
    ///
    /// # Errors
    /// Attaching to the bus or a fatal bus error; a bad NATS option or state file. NATS
    /// being unreachable is not an error.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BridgeError> {
        let cfg = self.cfg.clone();
        let c = self.stats.0.clone();
        let opts = cfg.bus.options()?;
        let mut tracker = Tracker::open(&cfg.state_file)
            .map_err(|err| BridgeError::State { path: cfg.state_file.display().to_string(), err })?;
        let client = connect(&cfg, c.clone()).await?;

        // The agent and its one subscription.
        let events = Events::new(opts)?;
        let mut worker = events.init_worker(Wid::PrivilegedAgent)?;
        let outbox = Arc::new(Mutex::new(Outbox::new(cfg.outbound_buffer)));
        let wake_export = Arc::new(Notify::new());
        let (claim_tx, claim_rx) = mpsc::unbounded_channel::<Claim>();
        subscribe_all(&mut worker, &cfg, &c, &outbox, &wake_export, claim_tx);
        let sides: Vec<(String, String)> = cfg.cluster_unique.iter().map(|p| p.sides()).collect();
        if !sides.is_empty() {
            let pats: Vec<(&str, &str)> = sides.iter().map(|(s, e)| (s.as_str(), e.as_str())).collect();
            local::divert_unique(&mut worker, &pats)?;
        }
        let mut aw = AsyncWorker::new(worker)?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let (in_tx, mut in_rx) = mpsc::channel::<Incoming>(1024);
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<jetstream::Message>();
        let (won_tx, mut won_rx) = mpsc::unbounded_channel::<(Claim, ClaimOutcome)>();
        let export = tokio::spawn(export_task(
            client.clone(),
            cfg.clone(),
            c.clone(),
            outbox.clone(),
            wake_export.clone(),
            stop_rx.clone(),
        ));
        let import = tokio::spawn(import_task(client.clone(), cfg.clone(), c.clone(), in_tx, stop_rx.clone()));
        let acker = tokio::spawn(ack_task(ack_rx));
        let claims = tokio::spawn(claim_task(client.clone(), cfg.clone(), claim_rx, won_tx));

        let mut shutdown = std::pin::pin!(shutdown);
        let mut attach_tick = tokio::time::interval(Duration::from_millis(10));
        let result = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                r = aw.dispatch() => if let Err(e) = r { break Err(BridgeError::Bus(e)) },
                _ = attach_tick.tick(), if c.agent_ready.load(Ordering::Relaxed) == 0 => {
                    if aw.worker().is_ready() {
                        add(&c.agent_ready, 1);
                        tracing::info!("attached to the local bus as the privileged agent");
                    }
                }
                Some(inc) = in_rx.recv() => {
                    if let Err(e) = import_one(&mut aw, &c, &mut tracker, inc, &ack_tx).await {
                        break Err(e);
                    }
                }
                Some((claim, outcome)) = won_rx.recv() => deliver_claimed(aw.worker_mut(), &c, claim, outcome),
            }
        };

        // Shutdown: stop importing, let the export drain, detach.
        tracing::info!("bridge stopping");
        let _ = stop_tx.send(true);
        import.abort();
        claims.abort();
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH + Duration::from_millis(500), export).await;
        drop(ack_tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), acker).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
        let w = aw.into_inner();
        if let Err(e) = w.close(Duration::from_millis(200)) {
            tracing::warn!(error = %e, "closing the agent");
        }
        result
    }
}

/// The agent's one subscription, `("*", "*")`: exports, local losses, diverted uniques.
fn subscribe_all(
    w: &mut Worker,
    cfg: &Arc<Config>,
    c: &Arc<Counters>,
    outbox: &Arc<Mutex<Outbox>>,
    wake: &Arc<Notify>,
    claims: mpsc::UnboundedSender<Claim>,
) {
    let cfg = cfg.clone();
    let c = c.clone();
    let outbox = outbox.clone();
    let wake = wake.clone();
    w.subscribe("*", "*", move |ev| {
        let relayed = local::origin_host(ev).is_some() || local::from_agent(ev);
        if ev.source() == SYSTEM_SOURCE {
            // Events this agent missed locally: receivers must see the gap.
            if !relayed && let Some(l) = ev.lost() {
                add(&c.missed_locally, l.count);
                outbox.lock().unwrap().push_gap(l.count);
                wake.notify_one();
            }
            return;
        }
        if let Some(hash) = local::unique_hash(ev) {
            if any_match(&cfg.cluster_unique, ev.source(), ev.event()) {
                let _ = claims.send(Claim {
                    hash: hash.to_string(),
                    source: ev.source().to_string(),
                    event: ev.event().to_string(),
                    data: Bytes::copy_from_slice(ev.data_bytes()),
                });
            }
            return;
        }
        if relayed || !cfg.exported(ev.source(), ev.event()) {
            return;
        }
        let mut o = outbox.lock().unwrap();
        if o.push_event(ev.source(), ev.event(), ev.data_bytes()) {
            c.outbound_queued.store(o.len() as u64, Ordering::Relaxed);
        } else {
            let n = c.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "outbound buffer full (NATS unreachable?): event dropped; receivers get a lost notice"
                );
            }
        }
        drop(o);
        wake.notify_one();
    });
}

/// Connect (in the background: `retry_on_initial_connect`), reconnecting forever with
/// backoff; the connection state goes to the counters and the log.
async fn connect(cfg: &Config, c: Arc<Counters>) -> Result<async_nats::Client, BridgeError> {
    let mut o = async_nats::ConnectOptions::new()
        .name(format!("worker-events-bridge {}", cfg.host_id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| backoff(attempts as u32))
        .event_callback(move |ev| {
            let c = c.clone();
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        c.connected.store(1, Ordering::Relaxed);
                        add(&c.connects, 1);
                        tracing::info!("nats connected");
                    }
                    async_nats::Event::Disconnected => {
                        c.connected.store(0, Ordering::Relaxed);
                        tracing::warn!("nats disconnected; reconnecting with backoff");
                    }
                    other => tracing::info!(event = %other, "nats"),
                }
            }
        });
    if let (Some(u), Some(p)) = (&cfg.nats.user, &cfg.nats.password) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.nats.token {
        o = o.token(t.clone());
    }
    if let Some(f) = &cfg.nats.creds_file {
        o = o.credentials_file(f).await.map_err(|e| BridgeError::Nats(format!("{}: {e}", f.display())))?;
    }
    let urls: Vec<async_nats::ServerAddr> = cfg
        .nats
        .urls
        .iter()
        .map(|u| u.parse().map_err(|e| BridgeError::Nats(format!("{u}: {e}"))))
        .collect::<Result<_, _>>()?;
    o.connect(urls).await.map_err(|e| BridgeError::Nats(e.to_string()))
}

/// Backoff for attempt `n` (0-based): 10 ms doubling to 2 s.
fn backoff(n: u32) -> Duration {
    BACKOFF_MIN.saturating_mul(1u32 << n.min(16)).min(BACKOFF_MAX)
}

fn stream_config(cfg: &Config) -> stream::Config {
    let storage = if cfg.nats.memory_storage { stream::StorageType::Memory } else { stream::StorageType::File };
    let max_age = Duration::from_secs_f64(cfg.nats.stream_max_age_secs.max(0.0));
    // The duplicate window (Nats-Msg-Id) may not exceed max_age.
    let dup = if max_age.is_zero() { Duration::from_secs(120) } else { max_age.min(Duration::from_secs(120)) };
    stream::Config {
        name: cfg.stream_name(),
        subjects: vec![cfg.stream_subjects()],
        max_age,
        max_bytes: cfg.nats.stream_max_bytes,
        max_messages: cfg.nats.stream_max_messages,
        storage,
        num_replicas: cfg.nats.replicas.max(1),
        duplicate_window: dup,
        ..Default::default()
    }
}

/// `get_or_create_stream` that survives another bridge creating the same stream at the
/// same time: its "get" can miss a stream that its "create" then finds already there (the
/// server answers "stream name already in use" or "subjects overlap with an existing
/// stream"). Then the stream exists, so one more "get" returns it.
async fn get_or_create(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream, String> {
    let name = config.name.clone();
    match js.get_or_create_stream(config).await {
        Ok(s) => Ok(s),
        Err(e) => js.get_stream(&name).await.map_err(|_| e.to_string()),
    }
}

/// Get or create the stream, retrying with backoff until it works or `stop`.
async fn ensure_stream(js: &jetstream::Context, cfg: &Config, stop: &watch::Receiver<bool>) -> Option<stream::Stream> {
    let mut n: u32 = 0;
    loop {
        match get_or_create(js, stream_config(cfg)).await {
            Ok(s) => return Some(s),
            Err(e) => {
                if n.is_multiple_of(20) {
                    tracing::warn!(error = %e, "stream {} not available yet", cfg.stream_name());
                }
            }
        }
        if *stop.borrow() {
            return None;
        }
        tokio::time::sleep(backoff(n)).await;
        n += 1;
    }
}

/// The stream behind the cluster-unique KV bucket.
fn kv_stream_config(cfg: &Config) -> stream::Config {
    let storage = if cfg.nats.memory_storage { stream::StorageType::Memory } else { stream::StorageType::File };
    let bucket = cfg.bucket_name();
    stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: cfg.unique_timeout(),
        duplicate_window: cfg.unique_timeout().min(Duration::from_secs(120)),
        storage,
        num_replicas: cfg.nats.replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// The last sequence number this host put into the stream (0: none).
async fn last_exported(stream: &stream::Stream, subject: &str) -> Result<u64, String> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(wire::parse(Some(&m.headers)).map_or(0, |meta| meta.seq)),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

/// One message on its way into the stream.
struct Pending {
    seq: u64,
    item: Item,
    ack: Option<jetstream::context::PublishAckFuture>,
}

/// The export side: outbox -> JetStream, in order, `EXPORT_WINDOW` publishes in flight.
/// A failed acknowledgement resends the whole window from the failed message with the same
/// sequence numbers (JetStream drops the copies it already has by `Nats-Msg-Id`; a
/// receiver skips any that slip through by sequence number), so nothing is reordered.
async fn export_task(
    client: async_nats::Client,
    cfg: Arc<Config>,
    c: Arc<Counters>,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let subject = cfg.subject();
    // Where to continue: after the last number in the stream.
    let mut next = {
        let mut n = 0;
        loop {
            if let Some(s) = ensure_stream(&js, &cfg, &stop).await {
                match last_exported(&s, &subject).await {
                    Ok(last) => break last + 1,
                    Err(e) => tracing::warn!(error = %e, "reading the last exported sequence"),
                }
            }
            if *stop.borrow() {
                return;
            }
            tokio::time::sleep(backoff(n)).await;
            n += 1;
        }
    };
    add(&c.export_ready, 1);
    tracing::info!(next_seq = next, subject = %subject, "export ready");
    let mut inflight: VecDeque<Pending> = VecDeque::new();
    let mut failures = 0u32;
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        if stop_at.is_none() && *stop.borrow() {
            stop_at = Some(tokio::time::Instant::now() + SHUTDOWN_FLUSH);
        }
        if stop_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
            let left = outbox.lock().unwrap().len() + inflight.len();
            if left > 0 {
                tracing::warn!(left, "shutdown: events not exported");
            }
            return;
        }
        {
            let mut o = outbox.lock().unwrap();
            while inflight.len() < EXPORT_WINDOW {
                let Some(item) = o.pop() else { break };
                let seq = next + item.width() - 1;
                next += item.width();
                inflight.push_back(Pending { seq, item, ack: None });
            }
            c.outbound_queued.store(o.len() as u64, Ordering::Relaxed);
        }
        if inflight.is_empty() {
            if stop_at.is_some() {
                return;
            }
            tokio::select! {
                () = wake.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        // Send what is not sent yet, in order.
        let mut send_failed = false;
        for p in inflight.iter_mut().filter(|p| p.ack.is_none()) {
            let (gap, source, event, data) = match &p.item {
                Item::Event { source, event, data } => (None, source.as_str(), event.as_str(), data.clone()),
                Item::Gap(n) => (Some(*n), "", "", Bytes::new()),
            };
            let h = wire::headers(&cfg.host_id, p.seq, gap, source, event);
            match js.publish_with_headers(subject.clone(), h, data).await {
                Ok(f) => p.ack = Some(f),
                Err(e) => {
                    tracing::debug!(error = %e, "publish");
                    send_failed = true;
                    break;
                }
            }
        }
        let front = inflight.front_mut().expect("not empty");
        let ok = match front.ack.take() {
            Some(f) => match f.await {
                Ok(_) => true,
                Err(e) => {
                    tracing::debug!(error = %e, seq = front.seq, "publish not acknowledged");
                    false
                }
            },
            None => false,
        };
        if ok {
            let p = inflight.pop_front().expect("not empty");
            match p.item {
                Item::Event { .. } => add(&c.exported, 1),
                Item::Gap(n) => {
                    tracing::warn!(count = n, seq = p.seq, "exported a gap marker (events dropped or missed)")
                }
            }
            failures = 0;
            if !send_failed {
                continue;
            }
        }
        // Resend the whole window from the front (same numbers, same order).
        for p in inflight.iter_mut() {
            p.ack = None;
        }
        if failures.is_multiple_of(20) {
            tracing::warn!(in_flight = inflight.len(), "exporting stalled (NATS unreachable?); retrying");
        }
        tokio::time::sleep(backoff(failures)).await;
        failures += 1;
    }
}

/// The import side: this host's durable pull consumer -> the bus loop. Messages this host
/// exported itself are acknowledged and skipped here.
async fn import_task(
    client: async_nats::Client,
    cfg: Arc<Config>,
    c: Arc<Counters>,
    tx: mpsc::Sender<Incoming>,
    stop: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let mut n = 0;
    loop {
        let Some(stream) = ensure_stream(&js, &cfg, &stop).await else { return };
        let durable = cfg.durable_name();
        let config = consumer::pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            // A host that joins does not replay the past; a restarted one resumes.
            deliver_policy: consumer::DeliverPolicy::New,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            ..Default::default()
        };
        let consumer = match stream.get_or_create_consumer(&durable, config).await {
            Ok(cons) => cons,
            Err(e) => {
                tracing::warn!(error = %e, "consumer {durable}");
                tokio::time::sleep(backoff(n)).await;
                n += 1;
                continue;
            }
        };
        let mut msgs = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "consumer {durable}: messages");
                tokio::time::sleep(backoff(n)).await;
                n += 1;
                continue;
            }
        };
        if c.import_ready.load(Ordering::Relaxed) == 0 {
            add(&c.import_ready, 1);
            tracing::info!(consumer = %durable, "import ready");
        }
        n = 0;
        while let Some(m) = msgs.next().await {
            let msg = match m {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::warn!(error = %e, "consumer {durable}: re-subscribing");
                    break;
                }
            };
            let Some(meta) = wire::parse(msg.headers.as_ref()) else {
                tracing::warn!(subject = %msg.subject, "message without bridge headers: skipped");
                let _ = msg.ack().await;
                continue;
            };
            if meta.origin == cfg.host_id {
                let _ = msg.ack().await;
                continue;
            }
            let data = msg.payload.clone();
            if tx.send(Incoming { meta, data, msg }).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(backoff(n)).await;
        n += 1;
    }
}

/// Acknowledge in order, off the bus loop.
async fn ack_task(mut rx: mpsc::UnboundedReceiver<jetstream::Message>) {
    while let Some(m) = rx.recv().await {
        if let Err(e) = m.ack().await {
            tracing::debug!(error = %e, "ack");
        }
    }
}

/// Publish one imported message on the bus (after a lost notice for a gap), record its
/// number, then acknowledge it. A full local queue is waited out (dispatching meanwhile):
/// the stream holds the rest, nothing is reordered.
async fn import_one(
    aw: &mut AsyncWorker,
    c: &Counters,
    tracker: &mut Tracker,
    inc: Incoming,
    ack: &mpsc::UnboundedSender<jetstream::Message>,
) -> Result<(), BridgeError> {
    let m = &inc.meta;
    match tracker.check(&m.origin, m.seq, m.gap) {
        Verdict::Duplicate => add(&c.duplicates, 1),
        Verdict::Accept { lost } => {
            if lost > 0 {
                add(&c.lost, lost);
                tracing::warn!(origin = %m.origin, count = lost, seq = m.seq, "events from another host lost: lost notice");
                if let Err(e) = retry_full(aw, |w| local::report_relayed_lost(w, &m.origin, lost)).await? {
                    tracing::error!(error = %e, "lost notice refused by the local bus");
                }
            }
            if m.gap.is_none() {
                let r =
                    retry_full(aw, |w| local::publish_relayed(w, &m.origin, &m.source, &m.event, &inc.data)).await?;
                match r {
                    Ok(()) => add(&c.imported, 1),
                    Err(e) => {
                        // Undeliverable here (larger than this bus's max_payload_len, ...):
                        // the workers learn of it as a loss.
                        tracing::warn!(error = %e, origin = %m.origin, source = %m.source, event = %m.event, "imported event refused by the local bus");
                        add(&c.lost, 1);
                        let _ = retry_full(aw, |w| local::report_relayed_lost(w, &m.origin, 1)).await?;
                    }
                }
            }
            if let Err(e) = tracker.commit(&m.origin, m.seq) {
                tracing::error!(error = %e, "writing the state file");
            }
        }
    }
    let _ = ack.send(inc.msg);
    Ok(())
}

/// Run `f` until it does not fail with a full queue, dispatching (and pausing 1 ms) in
/// between. Returns the last result (an error other than a full queue).
async fn retry_full(
    aw: &mut AsyncWorker,
    mut f: impl FnMut(&mut Worker) -> Result<(), PublishError>,
) -> Result<Result<(), PublishError>, BridgeError> {
    loop {
        match f(aw.worker_mut()) {
            Err(PublishError::QueueOverflow) => {
                aw.worker_mut().dispatch()?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            r => return Ok(r),
        }
    }
}

/// Claim diverted unique events in the KV bucket, concurrently; outcomes go back to the bus
/// loop.
async fn claim_task(
    client: async_nats::Client,
    cfg: Arc<Config>,
    mut rx: mpsc::UnboundedReceiver<Claim>,
    tx: mpsc::UnboundedSender<(Claim, ClaimOutcome)>,
) {
    let js = jetstream::new(client.clone());
    let store: Arc<tokio::sync::Mutex<Option<kv::Store>>> = Arc::new(tokio::sync::Mutex::new(None));
    while let Some(claim) = rx.recv().await {
        let (js, cfg, tx, store, client) = (js.clone(), cfg.clone(), tx.clone(), store.clone(), client.clone());
        tokio::spawn(async move {
            let outcome = claim_one(&client, &js, &cfg, &store, &claim.hash).await;
            let _ = tx.send((claim, outcome));
        });
    }
}

async fn claim_one(
    client: &async_nats::Client,
    js: &jetstream::Context,
    cfg: &Config,
    store: &tokio::sync::Mutex<Option<kv::Store>>,
    hash: &str,
) -> ClaimOutcome {
    if client.connection_state() != async_nats::connection::State::Connected {
        return ClaimOutcome::Unclaimed;
    }
    // Bounded: the event must not wait longer than its own dedup window.
    let limit = (cfg.unique_timeout() / 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let work = async {
        let kv = {
            let mut g = store.lock().await;
            if g.is_none() {
                // The bucket's stream is created here rather than with
                // `create_key_value`, whose account-info request does not parse the answer
                // of a 2.9 server; the settings are those of a KV bucket (one value per key,
                // rollups, no deletes, direct gets) with entries expiring after
                // `unique_timeout`.
                // A few quick retries (within `limit`): the other host's bridge may be
                // creating the same stream right now.
                let mut n = 0;
                while let Err(e) = get_or_create(js, kv_stream_config(cfg)).await {
                    if n == 3 {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff(n)).await;
                    n += 1;
                }
                *g = Some(js.get_key_value(cfg.bucket_name()).await.map_err(|e| e.to_string())?);
            }
            g.clone().expect("set")
        };
        match kv.create(kv_key(hash), Bytes::from(cfg.host_id.clone())).await {
            Ok(_) => Ok(ClaimOutcome::Won),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(ClaimOutcome::Lost),
            Err(e) => Err(e.to_string()),
        }
    };
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, hash, "unique claim failed: delivering unclaimed");
            ClaimOutcome::Unclaimed
        }
        Err(_) => {
            tracing::warn!(hash, "unique claim timed out: delivering unclaimed");
            ClaimOutcome::Unclaimed
        }
    }
}

/// Deliver a claimed (or unclaimed) unique event locally: an ordinary unique publish from
/// the agent, never diverted again, deduplicated by the local table.
fn deliver_claimed(w: &mut Worker, c: &Counters, claim: Claim, outcome: ClaimOutcome) {
    match outcome {
        ClaimOutcome::Lost => {
            add(&c.unique_lost, 1);
            return;
        }
        ClaimOutcome::Won => add(&c.unique_won, 1),
        ClaimOutcome::Unclaimed => {
            let n = c.unique_unclaimed.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(unclaimed = n, "cluster-unique events delivered without a claim (NATS unreachable)");
            }
        }
    }
    if let Err(e) = w.publish_bytes(Target::Unique(&claim.hash), &claim.source, &claim.event, &claim.data) {
        tracing::warn!(error = %e, hash = %claim.hash, "publishing a claimed unique event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        assert_eq!(backoff(0), Duration::from_millis(10));
        assert_eq!(backoff(1), Duration::from_millis(20));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }
}
