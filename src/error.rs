//! Error types. `Display` keeps the texts of lua-resty-events where users rely on them.

use std::io;

/// Everything that can go wrong in this crate.
///
/// The variants say what the caller should do next: fix an option, retry later, or report a
/// peer that sent something it should not have.
///
/// # Examples
///
/// ```
/// use worker_events::{Error, Options};
/// let err = worker_events::Events::new(Options::new("/tmp/x.sock").max_payload_len(0)).unwrap_err();
/// assert!(matches!(err, Error::InvalidOption(_)));
/// assert_eq!(err.to_string(), "\"max_payload_len\" option is invalid");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option failed validation; the text is the model library's.
    #[error("{0}")]
    InvalidOption(String),
    /// Publishing failed; see [`PublishError`].
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The worker id is outside `0..workers`, or names the privileged agent while it is
    /// disabled.
    #[error("invalid worker id {wid}: {reason}")]
    InvalidWid {
        /// The id that was refused.
        wid: crate::event::Wid,
        /// Why.
        reason: &'static str,
    },
    /// Another live process holds this worker id (its lock is held).
    #[error("worker id {0} is already held by another live process")]
    WidInUse(crate::event::Wid),
    /// The broker refused to attach this process.
    #[error("attach refused by the broker: {0}")]
    AttachRefused(String),
    /// The shared region handed over by the broker failed validation (wrong magic, wrong
    /// layout version, sizes that do not add up, missing seals).
    #[error("shared region rejected: {0}")]
    CorruptRegion(String),
    /// The received event could not be read as the requested type.
    #[error("event data is not a valid archived value: {0}")]
    Decode(String),
    /// [`crate::worker::Worker::close`] ran out of time: `events` outbound events (ring backlogs
    /// for live peers, unacknowledged unique events, events published before attaching)
    /// could not be handed over. Receivers of given-up ring backlogs get a `lost` notice.
    #[error("close timed out: {events} outbound events could not be flushed")]
    Unflushed {
        /// Events given up.
        events: u64,
    },
    /// This `Worker` was created in a process that has since called `fork()`, and this is
    /// the child. A worker belongs to the process that created it: its slot, its locks and
    /// its rings are the parent's, so the child's copy refuses to run (and its drop leaves
    /// the shared state alone). Create workers after forking (see `Events`).
    #[error("this worker was created before a fork(): it belongs to the parent process")]
    Forked,
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Io { context, source: source.into() }
    }
}

/// Why `publish` refused an event. Nothing was delivered anywhere when this is returned.
///
/// # Examples
///
/// ```
/// use worker_events::PublishError;
/// assert_eq!(PublishError::QueueOverflow.to_string(), "failed to publish event: queue overflow");
/// assert_eq!(
///     PublishError::PayloadTooLarge { limit: 65536 }.to_string(),
///     "failed to publish event: payload exceeds the limitation (65536)"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The publisher's own queue is full (`max_queue_len`): dispatch, then retry.
    #[error("failed to publish event: queue overflow")]
    QueueOverflow,
    /// The data is larger than `max_payload_len`.
    #[error("failed to publish event: payload exceeds the limitation ({limit})")]
    PayloadTooLarge {
        /// The configured `max_payload_len`.
        limit: usize,
    },
    /// The source or event name is longer than 65,535 bytes.
    #[error("failed to publish event: source or event name longer than 65535 bytes")]
    NameTooLong,
    /// The unique hash is empty or longer than [`MAX_UNIQUE_HASH_LEN`](crate::event::MAX_UNIQUE_HASH_LEN).
    #[error("failed to publish event: unique hash must be 1..={max} bytes, got {len}")]
    InvalidUniqueHash {
        /// Length of the hash given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The origin host given to
    /// [`Worker::publish_relayed`](crate::worker::Worker::publish_relayed) or
    /// [`Worker::report_relayed_lost`](crate::worker::Worker::report_relayed_lost) is empty or longer
    /// than 255 bytes.
    #[error("failed to publish event: origin host must be 1..={max} bytes, got {len}")]
    InvalidOriginHost {
        /// Length of the host name given.
        len: usize,
        /// The limit (255).
        max: usize,
    },
    /// The typed value could not be serialized.
    #[error("failed to publish event: serialization failed: {0}")]
    Serialize(String),
    /// This worker was created before a `fork()` and this is the child (see
    /// [`Error::Forked`]): nothing was published.
    #[error("failed to publish event: this worker belongs to the process that created it (fork without exec)")]
    Forked,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
