//! Configuration: a small TOML file ([`Config::from_toml`]) and/or command-line flags
//! ([`Config::from_args`]); flags override the file.
//!
//! ```toml
//! host_id = "edge-1"                 # default: the hostname (sanitized)
//! prefix = "worker-events"           # subjects <prefix>.ev.<host>, stream, bucket, durable
//! export = ["cache:purge*", "crud:*"]
//! cluster_unique = ["jobs:*"]
//! outbound_buffer = 100000           # events held while NATS is unreachable
//! state_file = "/run/proxy/bridge.state"
//!
//! [nats]
//! urls = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
//! user = "bridge"                    # or token = "...", or creds_file = "/etc/nats/bridge.creds"
//! password = "secret"
//! stream_max_age_secs = 3600
//! stream_max_bytes = 1073741824
//!
//! [bus]                              # must match the proxy's worker_events::Options
//! listening = "/run/proxy/events.sock"
//! workers = 8
//! transport = "auto"                 # auto | shm | socket
//! unique_timeout_ms = 5000
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use worker_events::{Options, Transport};

use crate::pattern::Pattern;

/// An error in the configuration (file, flags or values).
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn err(s: impl Into<String>) -> ConfigError {
    ConfigError(s.into())
}

/// NATS connection and stream settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs (the client picks one and fails over). Default `nats://127.0.0.1:4222`.
    pub urls: Vec<String>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// Stream limit: messages older than this are removed (receivers that had not read them
    /// get a `lost` notice). 0 = no limit. Default 1 hour.
    pub stream_max_age_secs: f64,
    /// Stream limit in bytes; -1 = none (default).
    pub stream_max_bytes: i64,
    /// Stream limit in messages; -1 = none (default).
    pub stream_max_messages: i64,
    /// Keep the stream in memory instead of files (tests, benchmarks). Default false.
    pub memory_storage: bool,
    /// Stream and bucket replicas (a NATS cluster). Default 1.
    pub replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            urls: vec!["nats://127.0.0.1:4222".to_string()],
            user: None,
            password: None,
            token: None,
            creds_file: None,
            stream_max_age_secs: 3600.0,
            stream_max_bytes: -1,
            stream_max_messages: -1,
            memory_storage: false,
            replicas: 1,
        }
    }
}

/// The local bus: must match the `worker_events::Options` of the proxy on this host (the bus
/// must have `enable_privileged_agent(true)`); the bridge attaches as the privileged agent.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// The control socket path (`Options::new`).
    pub listening: PathBuf,
    /// `Options::workers`.
    pub workers: u32,
    /// `Options::broker_id`.
    pub broker_id: u32,
    /// `auto`, `shm` or `socket` (`Options::transport`).
    pub transport: String,
    /// `Options::unique_timeout` in milliseconds; also the expiry of the cluster-unique
    /// claims. Default 5000.
    pub unique_timeout_ms: u64,
    /// `Options::max_queue_len`.
    pub max_queue_len: usize,
    /// `Options::max_payload_len`.
    pub max_payload_len: usize,
    /// `Options::ring_capacity` (0 = the core's default).
    pub ring_capacity: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        let o = Options::new("/run/worker-events.sock");
        BusConfig {
            listening: PathBuf::new(),
            workers: o.get_workers(),
            broker_id: 0,
            transport: "auto".to_string(),
            unique_timeout_ms: o.get_unique_timeout().as_millis() as u64,
            max_queue_len: o.get_max_queue_len(),
            max_payload_len: o.get_max_payload_len(),
            ring_capacity: 0,
        }
    }
}

impl BusConfig {
    /// The `worker_events::Options` these settings describe (privileged agent enabled).
    ///
    /// ```
    /// let c = worker_events_bridge::Config::from_toml("[bus]\nlistening = \"/run/p/ev.sock\"\nworkers = 3").unwrap();
    /// let o = c.bus.options().unwrap();
    /// assert_eq!(o.get_workers(), 3);
    /// assert!(o.get_enable_privileged_agent());
    /// ```
    ///
    /// # Errors
    /// No `listening` path, or an unknown transport.
    pub fn options(&self) -> Result<Options, ConfigError> {
        if self.listening.as_os_str().is_empty() {
            return Err(err("bus.listening (--socket) is required"));
        }
        let transport = match self.transport.as_str() {
            "auto" => Transport::Auto,
            "shm" | "shared-memory" => Transport::SharedMemory,
            "socket" => Transport::Socket,
            t => return Err(err(format!("bus.transport {t:?}: expected auto, shm or socket"))),
        };
        let mut o = Options::new(&self.listening)
            .workers(self.workers)
            .broker_id(self.broker_id)
            .transport(transport)
            .unique_timeout(Duration::from_millis(self.unique_timeout_ms))
            .max_queue_len(self.max_queue_len)
            .max_payload_len(self.max_payload_len)
            .enable_privileged_agent(true);
        if self.ring_capacity > 0 {
            o = o.ring_capacity(self.ring_capacity);
        }
        Ok(o)
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    host_id: Option<String>,
    prefix: Option<String>,
    export: Vec<String>,
    cluster_unique: Vec<String>,
    outbound_buffer: Option<usize>,
    state_file: Option<PathBuf>,
    stats_interval_secs: Option<u64>,
    nats: NatsConfig,
    bus: BusConfig,
}

/// The bridge's whole configuration.
///
/// ```
/// use worker_events_bridge::Config;
/// let c = Config::from_toml(r#"
///     host_id = "edge-1"
///     export = ["cache:*"]
///     cluster_unique = ["jobs:run*"]
///     [bus]
///     listening = "/run/p/events.sock"
///     workers = 4
/// "#).unwrap();
/// assert_eq!(c.host_id, "edge-1");
/// assert_eq!(c.subject(), "worker-events.ev.edge-1");
/// assert!(c.exported("cache", "purge") && !c.exported("crud", "x"));
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// This host's id: a NATS subject token (`[A-Za-z0-9_-]`). Default: the hostname with
    /// every other character replaced by `_`.
    pub host_id: String,
    /// Subject prefix (default `worker-events`): events go to `<prefix>.ev.<host_id>`; the
    /// stream is `<PREFIX>` (sanitized), the unique bucket `<prefix>-unique`, the durable
    /// consumer `<prefix>-<host_id>`.
    pub prefix: String,
    /// Exported `All` events.
    pub export: Vec<Pattern>,
    /// `Unique` events claimed cluster-wide (diverted to the bridge by the core).
    pub cluster_unique: Vec<Pattern>,
    /// Events held while NATS is unreachable; beyond it they are dropped, counted and
    /// logged, and receivers get a `lost` notice. Default 100,000.
    pub outbound_buffer: usize,
    /// Where the import side records the last sequence delivered per origin host (a small
    /// text file). Default: `<bus.listening>.bridge-state`.
    pub state_file: PathBuf,
    /// Period of the binary's stats log line. Default 60 s.
    pub stats_interval: Duration,
    /// NATS settings.
    pub nats: NatsConfig,
    /// Local bus settings.
    pub bus: BusConfig,
}

const USAGE: &str = "usage: worker-events-bridge [--config FILE] [--socket PATH] [--workers N] \
[--transport auto|shm|socket] [--unique-timeout-ms MS] [--max-queue-len N] [--max-payload-len N] \
[--nats URL]... [--user U --password P | --token T | --creds FILE] [--prefix P] [--host-id ID] \
[--export SRC:EV]... [--cluster-unique SRC:EV]... [--outbound-buffer N] [--state-file PATH] \
[--stream-max-age-secs S] [--stream-max-bytes B] [--memory-storage] [--stats-interval-secs S]";

impl Config {
    /// Parse a TOML document (see the module docs for the keys).
    ///
    /// # Errors
    /// Syntax, unknown keys, invalid values.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        Config::resolve(f)
    }

    /// Parse command-line flags (without the program name); `--config FILE` loads a TOML
    /// file first, the other flags override it. `--help` returns the usage as the error.
    ///
    /// # Errors
    /// Unknown flags, missing values, a bad file.
    ///
    /// ```
    /// # use worker_events_bridge::Config;
    /// let args = ["--socket", "/tmp/ev.sock", "--host-id", "a", "--export", "cache:*", "--nats", "nats://127.0.0.1:4333"];
    /// let c = Config::from_args(args.iter().map(|s| s.to_string())).unwrap();
    /// assert_eq!(c.nats.urls, ["nats://127.0.0.1:4333"]);
    /// assert_eq!(c.state_file, std::path::Path::new("/tmp/ev.sock.bridge-state"));
    /// ```
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Config, ConfigError> {
        let args: Vec<String> = args.into_iter().collect();
        let mut f = FileConfig::default();
        if let Some(i) = args.iter().position(|a| a == "--config") {
            let path = args.get(i + 1).ok_or_else(|| err("--config needs a value"))?;
            let text = std::fs::read_to_string(path).map_err(|e| err(format!("{path}: {e}")))?;
            f = toml::from_str(&text).map_err(|e| err(format!("{path}: {e}")))?;
        }
        let mut urls: Vec<String> = Vec::new();
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                return Err(err(USAGE));
            }
            if flag == "--memory-storage" {
                f.nats.memory_storage = true;
                continue;
            }
            let v = it.next().ok_or_else(|| err(format!("{flag} needs a value\n{USAGE}")))?;
            let num = |v: &str| v.parse::<u64>().map_err(|_| err(format!("{flag}: not a number: {v:?}")));
            match flag.as_str() {
                "--config" => {}
                "--socket" => f.bus.listening = PathBuf::from(v),
                "--workers" => f.bus.workers = num(&v)? as u32,
                "--broker-id" => f.bus.broker_id = num(&v)? as u32,
                "--transport" => f.bus.transport = v,
                "--unique-timeout-ms" => f.bus.unique_timeout_ms = num(&v)?,
                "--max-queue-len" => f.bus.max_queue_len = num(&v)? as usize,
                "--max-payload-len" => f.bus.max_payload_len = num(&v)? as usize,
                "--ring-capacity" => f.bus.ring_capacity = num(&v)? as usize,
                "--nats" => urls.push(v),
                "--user" => f.nats.user = Some(v),
                "--password" => f.nats.password = Some(v),
                "--token" => f.nats.token = Some(v),
                "--creds" => f.nats.creds_file = Some(PathBuf::from(v)),
                "--stream-max-age-secs" => {
                    f.nats.stream_max_age_secs = v.parse().map_err(|_| err(format!("{flag}: {v:?}")))?
                }
                "--stream-max-bytes" => {
                    f.nats.stream_max_bytes = v.parse().map_err(|_| err(format!("{flag}: {v:?}")))?
                }
                "--prefix" => f.prefix = Some(v),
                "--host-id" => f.host_id = Some(v),
                "--export" => f.export.push(v),
                "--cluster-unique" => f.cluster_unique.push(v),
                "--outbound-buffer" => f.outbound_buffer = Some(num(&v)? as usize),
                "--state-file" => f.state_file = Some(PathBuf::from(v)),
                "--stats-interval-secs" => f.stats_interval_secs = Some(num(&v)?),
                _ => return Err(err(format!("unknown flag {flag:?}\n{USAGE}"))),
            }
        }
        if !urls.is_empty() {
            f.nats.urls = urls;
        }
        Config::resolve(f)
    }

    fn resolve(f: FileConfig) -> Result<Config, ConfigError> {
        let host_id = match f.host_id {
            Some(h) => {
                if !is_token(&h) {
                    return Err(err(format!("host_id {h:?}: only A-Z a-z 0-9 _ - allowed")));
                }
                h
            }
            None => sanitize_token(&hostname()),
        };
        let prefix = f.prefix.unwrap_or_else(|| "worker-events".to_string());
        if prefix.is_empty() || prefix.split('.').any(|t| !is_token(t)) {
            return Err(err(format!("prefix {prefix:?}: dot-separated tokens of A-Z a-z 0-9 _ -")));
        }
        let parse = |v: &[String]| v.iter().map(|s| Pattern::parse(s).map_err(err)).collect::<Result<Vec<_>, _>>();
        let export = parse(&f.export)?;
        let cluster_unique = parse(&f.cluster_unique)?;
        if f.nats.urls.is_empty() {
            return Err(err("nats.urls is empty"));
        }
        if f.nats.user.is_some() != f.nats.password.is_some() {
            return Err(err("nats.user and nats.password go together"));
        }
        let state_file = match f.state_file {
            Some(p) => p,
            None => {
                let mut s = f.bus.listening.clone().into_os_string();
                s.push(".bridge-state");
                PathBuf::from(s)
            }
        };
        let c = Config {
            host_id,
            prefix,
            export,
            cluster_unique,
            outbound_buffer: f.outbound_buffer.unwrap_or(100_000).max(1),
            state_file,
            stats_interval: Duration::from_secs(f.stats_interval_secs.unwrap_or(60).max(1)),
            nats: f.nats,
            bus: f.bus,
        };
        c.bus.options()?;
        Ok(c)
    }

    /// The subject this host exports to: `<prefix>.ev.<host_id>`.
    pub fn subject(&self) -> String {
        format!("{}.ev.{}", self.prefix, self.host_id)
    }

    /// The stream's subjects: `<prefix>.ev.*`.
    pub fn stream_subjects(&self) -> String {
        format!("{}.ev.*", self.prefix)
    }

    /// The stream name: the prefix, upper-cased, `.` and `-` as `_`.
    pub fn stream_name(&self) -> String {
        self.prefix.to_ascii_uppercase().replace(['.', '-'], "_")
    }

    /// The cluster-unique KV bucket: `<prefix>-unique` (`.` as `_`).
    pub fn bucket_name(&self) -> String {
        format!("{}-unique", self.prefix.replace('.', "_"))
    }

    /// This host's durable consumer: `<prefix>-<host_id>` (`.` as `_`).
    pub fn durable_name(&self) -> String {
        format!("{}-{}", self.prefix.replace('.', "_"), self.host_id)
    }

    /// Is `(source, event)` exported?
    pub fn exported(&self, source: &str, event: &str) -> bool {
        crate::pattern::any_match(&self.export, source, event)
    }

    /// The unique timeout of the bus (and of the cluster-unique claims).
    pub fn unique_timeout(&self) -> Duration {
        Duration::from_millis(self.bus.unique_timeout_ms)
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn sanitize_token(s: &str) -> String {
    let t: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    if t.is_empty() { "host".to_string() } else { t.chars().take(255).collect() }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a valid writable buffer of the length given; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "host".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A KV key for a unique hash: `[A-Za-z0-9_-]` pass through, every other byte is `=XX`
/// (hex), so the mapping is one-to-one and the key is always valid.
pub(crate) fn kv_key(hash: &str) -> String {
    let mut k = String::with_capacity(hash.len() + 2);
    k.push_str("u_");
    for b in hash.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            k.push(b as char);
        } else {
            k.push_str(&format!("={b:02X}"));
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_flags() {
        let c = Config::from_toml("[bus]\nlistening = \"/x/e.sock\"\n").unwrap();
        assert_eq!(c.prefix, "worker-events");
        assert_eq!(c.stream_name(), "WORKER_EVENTS");
        assert_eq!(c.bucket_name(), "worker-events-unique");
        assert!(is_token(&c.host_id));
        assert!(Config::from_toml("bogus = 1\n[bus]\nlistening = \"/x\"\n").is_err());
        assert!(Config::from_toml("[bus]\nlistening = \"/x\"\ntransport = \"udp\"\n").is_err());
        assert!(Config::from_toml("host_id = \"a.b\"\n[bus]\nlistening = \"/x\"\n").is_err());
        let a = |v: &[&str]| Config::from_args(v.iter().map(|s| s.to_string()));
        assert!(a(&["--host-id", "h"]).is_err(), "no socket");
        let c = a(&["--socket", "/s", "--host-id", "h", "--user", "u", "--password", "p", "--memory-storage"]).unwrap();
        assert!(c.nats.memory_storage && c.nats.user.as_deref() == Some("u"));
        assert!(a(&["--socket", "/s", "--user", "u"]).is_err());
        assert!(a(&["--socket", "/s", "--nope", "1"]).is_err());
        assert!(c.bus.options().unwrap().get_enable_privileged_agent());
    }

    #[test]
    fn kv_keys_are_valid_and_distinct() {
        assert_eq!(kv_key("abc-1_2"), "u_abc-1_2");
        assert_eq!(kv_key("a.b"), "u_a=2Eb");
        assert_ne!(kv_key("a=2E"), kv_key("a."));
        assert_eq!(kv_key("é"), "u_=C3=A9");
    }
}
