//! What the control channel and the socket transport share, below both: the length-prefixed
//! frame codec ([`frame`]) and the bounded frame queues and inbox of a connection ([`queue`]).
//! Neither `control` nor `transport` imports the other; they meet here.

pub(crate) mod frame;
pub(crate) mod queue;
