//! Everything that crosses the process boundary from a test to its children, as one key table:
//! each option is written once (field, type, environment variable and, for library options,
//! how it applies to [`Options`]) and the table generates the struct, the parent's
//! [`env`](Cfg::env) and the child's [`from_env`](Cfg::from_env).
//!
//! [`Cfg`] is the deployment every process of one test shares; [`Spawn`] is what differs from
//! one child to the next (its worker id, its recorder, what it publishes before attaching).

use std::path::PathBuf;
use std::time::Duration;

use worker_events::{Options, Transport, Wid};

/// How a value is written into an environment variable and read back. `encode` returns `None`
/// for "not set" (an absent variable); `decode(None)` is the value of an absent variable.
pub trait Value: Sized {
    /// The text of the variable, or `None` to leave it unset.
    fn encode(&self) -> Option<String>;
    /// The value of the variable's text (`None`: unset).
    fn decode(text: Option<&str>) -> Result<Self, String>;
}

fn required(text: Option<&str>) -> Result<&str, String> {
    text.ok_or_else(|| "not set".to_string())
}

macro_rules! value_by_parse {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn encode(&self) -> Option<String> {
                Some(self.to_string())
            }
            fn decode(text: Option<&str>) -> Result<Self, String> {
                let t = required(text)?;
                t.parse().map_err(|e| format!("{t:?}: {e}"))
            }
        }
    )*};
}
value_by_parse!(u32, u64, usize, String);

impl Value for PathBuf {
    fn encode(&self) -> Option<String> {
        Some(self.to_string_lossy().into_owned())
    }
    fn decode(text: Option<&str>) -> Result<Self, String> {
        required(text).map(PathBuf::from)
    }
}

/// `true` is `1`, `false` an unset variable (the library's own switches test presence).
impl Value for bool {
    fn encode(&self) -> Option<String> {
        self.then(|| "1".to_string())
    }
    fn decode(text: Option<&str>) -> Result<Self, String> {
        Ok(text.is_some())
    }
}

impl<T: Value> Value for Option<T> {
    fn encode(&self) -> Option<String> {
        self.as_ref().and_then(T::encode)
    }
    fn decode(text: Option<&str>) -> Result<Self, String> {
        text.map(|t| T::decode(Some(t))).transpose()
    }
}

impl Value for Transport {
    fn encode(&self) -> Option<String> {
        Some(format!("{self:?}"))
    }
    fn decode(text: Option<&str>) -> Result<Self, String> {
        match required(text)? {
            "SharedMemory" => Ok(Transport::SharedMemory),
            "Socket" => Ok(Transport::Socket),
            "Auto" => Ok(Transport::Auto),
            other => Err(format!("unknown transport {other:?}")),
        }
    }
}

/// `agent` or the worker number.
impl Value for Wid {
    fn encode(&self) -> Option<String> {
        Some(match self {
            Wid::Worker(n) => n.to_string(),
            Wid::PrivilegedAgent => "agent".to_string(),
        })
    }
    fn decode(text: Option<&str>) -> Result<Self, String> {
        match required(text)? {
            "agent" => Ok(Wid::PrivilegedAgent),
            n => n.parse().map(Wid::Worker).map_err(|e| format!("wid {n:?}: {e}")),
        }
    }
}

/// Apply one library option (the closure gets its expected type from here).
fn apply<T>(o: Options, v: T, f: impl FnOnce(Options, T) -> Options) -> Options {
    f(o, v)
}

/// The key table: `field: Type = "ENV_VAR"`, and `=> |options, value| ...` for a field that is
/// a library option (for an `Option<T>` field, applied only when set).
macro_rules! key_table {
    (
        $(#[$m:meta])* pub struct $name:ident {
            $( $(#[$fm:meta])* $field:ident : $ty:ty = $env:literal $(=> $apply:expr)? ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Clone, Debug)]
        pub struct $name {
            $( $(#[$fm])* pub $field: $ty, )*
        }

        impl $name {
            /// Every environment variable of the table.
            pub const KEYS: &'static [&'static str] = &[$($env),*];

            /// The environment variables that carry these values to a child (unset ones left out).
            pub fn env(&self) -> Vec<(&'static str, String)> {
                let mut v = Vec::new();
                $( if let Some(text) = Value::encode(&self.$field) { v.push(($env, text)); } )*
                v
            }

            /// In a child: the values its parent passed.
            pub fn from_env() -> Result<$name, String> {
                Ok($name {
                    $( $field: Value::decode(std::env::var($env).ok().as_deref())
                        .map_err(|e| format!("{}: {e}", $env))?, )*
                })
            }

            /// Apply the fields that are library options to `o`.
            #[allow(unused_mut, unused_variables)]
            fn apply_options(&self, mut o: Options) -> Options {
                $( $( if let Some(v) = OptionalValue::each(&self.$field) {
                o = apply(o, v.clone(), $apply);
            } )? )*
                o
            }
        }
    };
}

/// A field's value(s) to apply: one for a plain field, none or one for an `Option`.
trait OptionalValue {
    type Inner;
    fn each(&self) -> Option<&Self::Inner>;
}

macro_rules! plain_optional {
    ($($t:ty),*) => {$(
        impl OptionalValue for $t {
            type Inner = $t;
            fn each(&self) -> Option<&$t> {
                Some(self)
            }
        }
    )*};
}
plain_optional!(u32, bool, Transport);

impl<T> OptionalValue for Option<T> {
    type Inner = T;
    fn each(&self) -> Option<&T> {
        self.as_ref()
    }
}

key_table! {
    /// The options shared by every process of one test (the deployment).
    pub struct Cfg {
        /// The control socket (the first argument of [`Options::new`]).
        sock: PathBuf = "WE_SOCK",
        transport: Transport = "WE_TRANSPORT" => Options::transport,
        workers: u32 = "WE_WORKERS" => Options::workers,
        agent: bool = "WE_AGENT" => Options::enable_privileged_agent,
        max_queue_len: Option<usize> = "WE_MAX_QUEUE" => Options::max_queue_len,
        max_payload_len: Option<usize> = "WE_MAX_PAYLOAD" => Options::max_payload_len,
        ring_capacity: Option<usize> = "WE_RING" => Options::ring_capacity,
        unique_timeout_ms: Option<u64> = "WE_UNIQ_TIMEOUT_MS" => |o: Options, ms| o.unique_timeout(Duration::from_millis(ms)),
        unique_capacity: Option<usize> = "WE_UNIQ_CAP" => Options::unique_capacity,
        generation: Option<u64> = "WE_GENERATION" => Options::generation,
        broadcast_capacity: Option<usize> = "WE_BCAST" => Options::broadcast_capacity,
    }
}

impl Cfg {
    /// `workers` workers on the control socket `sock`, on the transport of the running test
    /// (see [`per_transport!`](crate::per_transport)), every other option at its default.
    pub fn new(sock: &std::path::Path, workers: u32) -> Cfg {
        Cfg {
            sock: sock.to_path_buf(),
            transport: super::transport(),
            workers,
            agent: false,
            max_queue_len: None,
            max_payload_len: None,
            ring_capacity: None,
            unique_timeout_ms: None,
            unique_capacity: None,
            generation: None,
            broadcast_capacity: None,
        }
    }

    /// The library's options for this deployment.
    pub fn options(&self) -> Options {
        self.apply_options(Options::new(&self.sock))
    }
}

key_table! {
    /// What one child is, beyond the deployment it joins.
    pub struct Spawn {
        /// Its worker id (the raw client: the slot its HELLO names is in the frame instead).
        wid: Wid = "WE_WID",
        /// A second `("boom", "*")` subscriber that panics, and a third that counts
        /// (`after_panic`): a panicking callback must not stop the others.
        panic: bool = "WE_PANIC",
        /// Events published before the worker is attached.
        early: Option<Early> = "WE_EARLY",
        /// The failover recorder instead of the list recorder (see `record.rs`).
        runs: Option<Runs> = "WE_RUNS",
        /// The raw-client role: this HELLO-or-anything frame (hex) instead of a worker.
        raw_frame: Option<String> = "WE_RAW_FRAME",
        /// (raw client) switch to this uid (and gid) first; needs root.
        raw_uid: Option<u32> = "WE_RAW_UID",
        /// The library's own switch: memfd creation fails, as in a sandbox without it.
        disable_shm: bool = "WORKER_EVENTS_DISABLE_SHM",
        /// A reactor (`callback.rs`): callbacks that publish in answer to `("trig", *)`.
        reactor: bool = "WE_REACTOR",
        /// The tokio role (`tokio_role.rs`) instead of the command loop.
        tokio: bool = "WE_TOKIO",
    }
}

impl Spawn {
    /// A plain worker `wid`.
    pub fn worker(wid: Wid) -> Spawn {
        Spawn {
            wid,
            panic: false,
            early: None,
            runs: None,
            raw_frame: None,
            raw_uid: None,
            disable_shm: false,
            reactor: false,
            tokio: false,
        }
    }
}

/// Events a child publishes before it is attached (it checks `!is_ready()` first), with no
/// dispatch in between: `n` events with payloads `0..n`, to `All`, or each to
/// `Unique("<prefix><seq>")` when `unique_prefix` is set.
#[derive(Clone, Debug)]
pub struct Early {
    pub src: String,
    pub ev: String,
    pub n: u64,
    pub unique_prefix: Option<String>,
}

impl Early {
    /// `n` `All` events.
    pub fn all(src: &str, ev: &str, n: u64) -> Early {
        Early { src: src.into(), ev: ev.into(), n, unique_prefix: None }
    }

    /// `n` `Unique("<prefix><seq>")` events.
    pub fn unique(src: &str, ev: &str, prefix: &str, n: u64) -> Early {
        Early { unique_prefix: Some(prefix.into()), ..Early::all(src, ev, n) }
    }
}

/// `<src> <ev> <n> [<prefix>]`.
impl Value for Early {
    fn encode(&self) -> Option<String> {
        let mut s = format!("{} {} {}", self.src, self.ev, self.n);
        if let Some(p) = &self.unique_prefix {
            s = format!("{s} {p}");
        }
        Some(s)
    }
    fn decode(text: Option<&str>) -> Result<Self, String> {
        let f: Vec<&str> = required(text)?.split_whitespace().collect();
        match f[..] {
            [src, ev, n] | [src, ev, n, _] => Ok(Early {
                src: src.into(),
                ev: ev.into(),
                n: n.parse().map_err(|e| format!("{n:?}: {e}"))?,
                unique_prefix: f.get(3).map(|p| p.to_string()),
            }),
            _ => Err(format!("{f:?}: want <src> <ev> <n> [<prefix>]")),
        }
    }
}

/// The failover recorder's setting: the child is incarnation `inc` of its slot, and keeps its
/// continuity table and unique-delivery log in `dir` (files there survive a SIGKILL).
#[derive(Clone, Debug)]
pub struct Runs {
    pub inc: u32,
    pub dir: PathBuf,
}

/// `<inc> <dir>`.
impl Value for Runs {
    fn encode(&self) -> Option<String> {
        Some(format!("{} {}", self.inc, self.dir.display()))
    }
    fn decode(text: Option<&str>) -> Result<Self, String> {
        let (inc, dir) = required(text)?.split_once(' ').ok_or("want <inc> <dir>")?;
        Ok(Runs { inc: inc.parse().map_err(|e| format!("{inc:?}: {e}"))?, dir: dir.into() })
    }
}
