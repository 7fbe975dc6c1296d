//! The command grammar of the child role: [`Cmd`], parsed ([`FromStr`]) and written
//! ([`Display`](std::fmt::Display)) here and nowhere else, so the parent sends typed values, a
//! child refuses a malformed line with `@@ERR`, and no two commands share a name.
//! `role.rs` executes them.

use std::str::FromStr;

use worker_events::Target;

/// The target of a publish command: `all`, `current` or `u=<hash>`.
#[derive(Clone, Debug, PartialEq)]
pub enum Tgt {
    All,
    Current,
    Unique(String),
}

impl Tgt {
    /// `Unique(hash)`.
    pub fn unique(hash: &str) -> Tgt {
        Tgt::Unique(hash.to_string())
    }

    /// The library's target.
    pub fn target(&self) -> Target<'_> {
        match self {
            Tgt::All => Target::All,
            Tgt::Current => Target::Current,
            Tgt::Unique(h) => Target::Unique(h),
        }
    }
}

impl std::fmt::Display for Tgt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tgt::All => write!(f, "all"),
            Tgt::Current => write!(f, "current"),
            Tgt::Unique(h) => write!(f, "u={h}"),
        }
    }
}

impl FromStr for Tgt {
    type Err = String;
    fn from_str(s: &str) -> Result<Tgt, String> {
        match s {
            "all" => Ok(Tgt::All),
            "current" => Ok(Tgt::Current),
            _ => s.strip_prefix("u=").map(Tgt::unique).ok_or_else(|| format!("unknown target {s:?}")),
        }
    }
}

/// One event of a [`Cmd::Batch`]: `<target>:<src>:<ev>:<seq>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub target: Tgt,
    pub src: String,
    pub ev: String,
    pub seq: u64,
}

/// A command to a child, with its answer lines (before the final `@@OK`).
#[derive(Clone, Debug, PartialEq)]
pub enum Cmd {
    // Scenario commands -----------------------------------------------------------------
    /// `publish <target> <src> <ev> <start> <count>`: u64 payloads `start..start+count`, a
    /// dispatch after each (a worker's own queue is bounded by max_queue_len).
    /// Answers `@@PUBERR <e>` for the first 5 errors, then `@@PUB <ok> <errors>`.
    Publish { target: Tgt, src: String, ev: String, start: u64, count: u64 },
    /// `uniq <src> <ev> <prefix> <start> <count>`: `Unique("<prefix><seq>")` events with
    /// payload `seq`, a dispatch after each. Answers as `publish`.
    Uniq { src: String, ev: String, prefix: String, start: u64, count: u64 },
    /// `batch <item> ...`: publish all of them with no dispatch in between. Answers
    /// `@@PUBERR <e>` for each error, then `@@PUB <ok> <errors>`.
    Batch(Vec<Item>),
    /// `burst <target> <src> <ev> <start> <count> <hold_ms> <end|leak>`: u64 payloads
    /// `start..start+count` in one `Worker::batch`, no dispatch in between; answers
    /// `@@HELD <ok> <errors>`, keeps the batch open for <hold_ms>, then ends it (`end`) or
    /// leaks it with `mem::forget` (`leak`), and answers as `publish`.
    Burst { target: Tgt, src: String, ev: String, start: u64, count: u64, hold_ms: u64, leak: bool },
    /// `bytes <target> <src> <ev> <len>`: a raw payload `pattern(len)`. Answers as `publish`.
    Bytes { target: Tgt, src: String, ev: String, len: usize },
    /// `typed <target> <src> <ev> <0|1>`: through the typed `publish`, a `[u8; TYPED_LEN]`
    /// (0) or `[u8; TYPED_LEN + 1]` (1) holding `pattern(..)`: its rkyv bytes are the array
    /// itself. Answers as `publish`.
    Typed { target: Tgt, src: String, ev: String, one_more: bool },
    /// `pump <ms>`: dispatch for that long (inside bounded polling loops only).
    Pump { ms: u64 },
    /// `until <n> <ms>`: dispatch until events + lost counts >= n, at most <ms> (a bound for
    /// failure reporting, not a delay). Answers `@@UNTIL reached` or `@@UNTIL timeout`.
    Until { n: u64, ms: u64 },
    /// `park <n>`: `wait(None)` until events + lost counts >= n. Answers `@@PARKING` before
    /// the first wait, then `@@PARKED <events> <wait calls>`; a receiver nobody wakes never
    /// answers (the parent's liveness bound reports it).
    Park { n: u64 },
    /// `pollfd <ms>`: drain (`dispatch` until 0), answer `@@POLLING`, then poll(2) the
    /// worker's own fd for POLLIN, at most <ms> in all, dispatching each time it turns
    /// readable. Answers `@@POLLED <readable 0|1> <dispatched> <spurious>`.
    PollFd { ms: u64 },
    /// `pause`: stop dispatching until `resume`.
    Pause,
    /// `resume`.
    Resume,
    /// `report`: see `report.rs`.
    Report,
    /// `log`: `@@LOG <line>` per arrival (list recorder).
    Log,
    /// `exit`: drop the worker, answer, exit 0.
    Exit,

    // Paced runs (failover) ---------------------------------------------------------------
    /// `run <rate>`: publish the `All` run of this incarnation (source `seq`, event
    /// `i<inc>`, payloads 0, 1, ...) at <rate> events per ms, between commands.
    Run { rate: f64 },
    /// `run-stop`: stop it. Answers `@@STOPPED <sent> <errors>`.
    RunStop,
    /// `run-count`: `@@COUNT <sent>`.
    RunCount,
    /// `run-burst <n>`: n more events of the run right now (creating it at rate 0 if
    /// needed), a dispatch after each. Answers `@@COUNT <sent> <errors>`.
    RunBurst { n: u64 },
    /// `urun <rate> <end>`: `Unique("h<seq>")` events (source `uniq`) for seq 0..end at <rate>.
    URun { rate: f64, end: u64 },
    /// `urun-count`: `@@UCOUNT <sent> <end> <unique_pending> <publish errors>`.
    URunCount,
    /// `big-run <len>`: `All` events of <len> bytes (source `big`) as fast as the slowest
    /// receiver takes them (at most two waiting per peer).
    BigRun { len: usize },
    /// `big-run-stop`: answers `@@STOPPED <sent> <errors>`.
    BigRunStop,
    /// `slow <us>`: every run event's callback sleeps that long.
    Slow { us: u64 },
    /// `status`: `@@STATUS <is_broker 0|1> <is_ready 0|1>`.
    Status,
    /// `brokers`: `@@BROKER <epoch> <slot> <ns>` per broker notice received.
    Brokers,
    /// `drain <ms>`: dispatch until every inbound ring is empty. Answers `@@DRAINED reached`
    /// or `@@DRAINED timeout`.
    Drain { ms: u64 },
    /// `reach <ms> <p>:<inc>:<last> ...`: dispatch until each run (p, inc) got to `last` (here,
    /// or before this process started: the slot's continuity table says so).
    /// Answers `@@REACH reached` or `@@REACH timeout`.
    Reach { ms: u64, want: Vec<(u32, u32, u64)> },
    /// `close <ms>`: `Worker::close`; answers `@@CLOSED <ok|error> <ms taken>` and exits.
    Close { ms: u64 },

    // fork() without exec (issue 11, item 18) ------------------------------------------------
    /// `fork <secs>`: `fork()`. The child tries the inherited worker (publish, a batch's
    /// publish, dispatch, flush, then drops it), writes
    /// `@@FORKCHILD <pid>|<publish>|<batch>|<dispatch>|<flush>|<drop>`
    /// (each an outcome: `ok`, or the error text), sleeps <secs> and exits without touching
    /// anything else. The parent answers after that line, with `@@FORKED <pid>`.
    Fork { secs: u32 },

    // Relay support (issue 13) ----------------------------------------------------------------
    /// `relay <host> <target> <src> <ev> <start> <count>`: `publish_relayed` from <host> of
    /// u64 payloads `start..start+count` (8 LE bytes: the rkyv archive of a u64), a dispatch
    /// after each. Answers as `publish`.
    Relay { host: String, target: Tgt, src: String, ev: String, start: u64, count: u64 },
    /// `relay-lost <host> <count>`: `report_relayed_lost`. Answers `@@PUB 1 0` or
    /// `@@PUBERR <e>` and `@@PUB 0 1`.
    RelayLost { host: String, count: u64 },
    /// `divert <src>:<ev> ...`: `divert_unique` with these patterns (none: stop diverting).
    /// Answers `@@DIVERT ok` or `@@DIVERT <error>`.
    Divert(Vec<(String, String)>),
}

impl Cmd {
    /// [`Cmd::Publish`].
    pub fn publish(target: Tgt, src: &str, ev: &str, start: u64, count: u64) -> Cmd {
        Cmd::Publish { target, src: src.into(), ev: ev.into(), start, count }
    }

    /// [`Cmd::Uniq`].
    pub fn uniq(src: &str, ev: &str, prefix: &str, start: u64, count: u64) -> Cmd {
        Cmd::Uniq { src: src.into(), ev: ev.into(), prefix: prefix.into(), start, count }
    }

    /// [`Cmd::Bytes`].
    pub fn bytes(target: Tgt, src: &str, ev: &str, len: usize) -> Cmd {
        Cmd::Bytes { target, src: src.into(), ev: ev.into(), len }
    }

    /// [`Cmd::Typed`].
    pub fn typed(target: Tgt, src: &str, ev: &str, one_more: bool) -> Cmd {
        Cmd::Typed { target, src: src.into(), ev: ev.into(), one_more }
    }
}

impl std::fmt::Display for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Publish { target, src, ev, start, count } => write!(f, "publish {target} {src} {ev} {start} {count}"),
            Cmd::Uniq { src, ev, prefix, start, count } => write!(f, "uniq {src} {ev} {prefix} {start} {count}"),
            Cmd::Batch(items) => {
                write!(f, "batch")?;
                items.iter().try_for_each(|i| write!(f, " {}:{}:{}:{}", i.target, i.src, i.ev, i.seq))
            }
            Cmd::Burst { target, src, ev, start, count, hold_ms, leak } => {
                let how = if *leak { "leak" } else { "end" };
                write!(f, "burst {target} {src} {ev} {start} {count} {hold_ms} {how}")
            }
            Cmd::Bytes { target, src, ev, len } => write!(f, "bytes {target} {src} {ev} {len}"),
            Cmd::Typed { target, src, ev, one_more } => write!(f, "typed {target} {src} {ev} {}", u8::from(*one_more)),
            Cmd::Pump { ms } => write!(f, "pump {ms}"),
            Cmd::Until { n, ms } => write!(f, "until {n} {ms}"),
            Cmd::Park { n } => write!(f, "park {n}"),
            Cmd::PollFd { ms } => write!(f, "pollfd {ms}"),
            Cmd::Pause => write!(f, "pause"),
            Cmd::Resume => write!(f, "resume"),
            Cmd::Report => write!(f, "report"),
            Cmd::Log => write!(f, "log"),
            Cmd::Exit => write!(f, "exit"),
            Cmd::Run { rate } => write!(f, "run {rate}"),
            Cmd::RunStop => write!(f, "run-stop"),
            Cmd::RunCount => write!(f, "run-count"),
            Cmd::RunBurst { n } => write!(f, "run-burst {n}"),
            Cmd::URun { rate, end } => write!(f, "urun {rate} {end}"),
            Cmd::URunCount => write!(f, "urun-count"),
            Cmd::BigRun { len } => write!(f, "big-run {len}"),
            Cmd::BigRunStop => write!(f, "big-run-stop"),
            Cmd::Slow { us } => write!(f, "slow {us}"),
            Cmd::Status => write!(f, "status"),
            Cmd::Brokers => write!(f, "brokers"),
            Cmd::Drain { ms } => write!(f, "drain {ms}"),
            Cmd::Reach { ms, want } => {
                write!(f, "reach {ms}")?;
                want.iter().try_for_each(|(p, i, last)| write!(f, " {p}:{i}:{last}"))
            }
            Cmd::Close { ms } => write!(f, "close {ms}"),
            Cmd::Fork { secs } => write!(f, "fork {secs}"),
            Cmd::Relay { host, target, src, ev, start, count } => {
                write!(f, "relay {host} {target} {src} {ev} {start} {count}")
            }
            Cmd::RelayLost { host, count } => write!(f, "relay-lost {host} {count}"),
            Cmd::Divert(pats) => {
                write!(f, "divert")?;
                pats.iter().try_for_each(|(s, e)| write!(f, " {s}:{e}"))
            }
        }
    }
}

/// The words of one command line, parsed one by one.
struct Words<'a> {
    it: std::str::SplitWhitespace<'a>,
}

impl Words<'_> {
    fn next<T: FromStr>(&mut self, what: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        let w = self.it.next().ok_or_else(|| format!("missing {what}"))?;
        w.parse().map_err(|e| format!("{what} {w:?}: {e}"))
    }

    fn rest(&mut self) -> Vec<&str> {
        self.it.by_ref().collect()
    }
}

fn split_colons<const N: usize>(item: &str) -> Result<[&str; N], String> {
    let f: Vec<&str> = item.split(':').collect();
    f.try_into().map_err(|_| format!("{item:?}: want {N} fields separated by ':'"))
}

fn num<T: FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| format!("{s:?}: {e}"))
}

impl FromStr for Cmd {
    type Err = String;
    fn from_str(line: &str) -> Result<Cmd, String> {
        let mut w = Words { it: line.split_whitespace() };
        let name: String = w.next("command")?;
        let cmd = match name.as_str() {
            "publish" => Cmd::Publish {
                target: w.next("target")?,
                src: w.next("src")?,
                ev: w.next("ev")?,
                start: w.next("start")?,
                count: w.next("count")?,
            },
            "uniq" => Cmd::Uniq {
                src: w.next("src")?,
                ev: w.next("ev")?,
                prefix: w.next("prefix")?,
                start: w.next("start")?,
                count: w.next("count")?,
            },
            "batch" => Cmd::Batch(
                w.rest()
                    .into_iter()
                    .map(|item| {
                        let [t, src, ev, seq] = split_colons(item)?;
                        Ok(Item { target: t.parse()?, src: src.into(), ev: ev.into(), seq: num(seq)? })
                    })
                    .collect::<Result<_, String>>()?,
            ),
            "burst" => Cmd::Burst {
                target: w.next("target")?,
                src: w.next("src")?,
                ev: w.next("ev")?,
                start: w.next("start")?,
                count: w.next("count")?,
                hold_ms: w.next("hold_ms")?,
                leak: match w.next::<String>("end|leak")?.as_str() {
                    "end" => false,
                    "leak" => true,
                    other => return Err(format!("burst: {other:?} is neither end nor leak")),
                },
            },
            "bytes" => {
                Cmd::Bytes { target: w.next("target")?, src: w.next("src")?, ev: w.next("ev")?, len: w.next("len")? }
            }
            "typed" => Cmd::Typed {
                target: w.next("target")?,
                src: w.next("src")?,
                ev: w.next("ev")?,
                one_more: match w.next::<u8>("extra")? {
                    0 => false,
                    1 => true,
                    e => return Err(format!("typed: extra {e} is not 0 or 1")),
                },
            },
            "pump" => Cmd::Pump { ms: w.next("ms")? },
            "until" => Cmd::Until { n: w.next("n")?, ms: w.next("ms")? },
            "park" => Cmd::Park { n: w.next("n")? },
            "pollfd" => Cmd::PollFd { ms: w.next("ms")? },
            "pause" => Cmd::Pause,
            "resume" => Cmd::Resume,
            "report" => Cmd::Report,
            "log" => Cmd::Log,
            "exit" => Cmd::Exit,
            "run" => Cmd::Run { rate: w.next("rate")? },
            "run-stop" => Cmd::RunStop,
            "run-count" => Cmd::RunCount,
            "run-burst" => Cmd::RunBurst { n: w.next("n")? },
            "urun" => Cmd::URun { rate: w.next("rate")?, end: w.next("end")? },
            "urun-count" => Cmd::URunCount,
            "big-run" => Cmd::BigRun { len: w.next("len")? },
            "big-run-stop" => Cmd::BigRunStop,
            "slow" => Cmd::Slow { us: w.next("us")? },
            "status" => Cmd::Status,
            "brokers" => Cmd::Brokers,
            "drain" => Cmd::Drain { ms: w.next("ms")? },
            "reach" => Cmd::Reach {
                ms: w.next("ms")?,
                want: w
                    .rest()
                    .into_iter()
                    .map(|item| {
                        let [p, i, last] = split_colons(item)?;
                        Ok((num(p)?, num(i)?, num(last)?))
                    })
                    .collect::<Result<_, String>>()?,
            },
            "close" => Cmd::Close { ms: w.next("ms")? },
            "fork" => Cmd::Fork { secs: w.next("secs")? },
            "relay" => Cmd::Relay {
                host: w.next("host")?,
                target: w.next("target")?,
                src: w.next("src")?,
                ev: w.next("ev")?,
                start: w.next("start")?,
                count: w.next("count")?,
            },
            "relay-lost" => Cmd::RelayLost { host: w.next("host")?, count: w.next("count")? },
            "divert" => Cmd::Divert(
                w.rest()
                    .into_iter()
                    .map(|item| {
                        let [s, e] = split_colons(item)?;
                        Ok((s.to_string(), e.to_string()))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            other => return Err(format!("unknown command {other}")),
        };
        match w.rest()[..] {
            [] => Ok(cmd),
            ref extra => Err(format!("{name}: unexpected {extra:?}")),
        }
    }
}
