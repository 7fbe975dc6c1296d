//! Transports behind the worker facade: shared-memory rings ([`shm`]) and the unix-socket
//! fallback through the broker ([`sock`]).

pub(crate) mod shm;
pub(crate) mod sock;
