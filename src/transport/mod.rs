//! Transports behind the worker facade. Shared memory today; the socket fallback plugs in
//! beside it.

pub(crate) mod shm;
