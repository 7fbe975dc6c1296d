//! Transports behind the worker facade: shared-memory rings ([`shm`]) and the unix-socket
//! fallback through the broker.

pub(crate) mod shm;
