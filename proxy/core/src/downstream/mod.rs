//! The downstream side: listening sockets ([`bind`]), worker threads and their runtimes
//! ([`workers`]), accepted connections and their serve loop ([`connection`]), the inline
//! HTTP/1.1 server that serves their requests until one needs hyper's ([`h1`]), and the byte
//! stream a connection runs over ([`transport`]: where TLS and TCP plug in) with its
//! request-headers timeout ([`head_clock`]). Requests go on
//! to the request path ([`crate::http`]).

pub mod bind;
pub mod capture;
pub mod connection;
pub mod h1;
pub mod head_clock;
pub mod transport;
pub mod workers;

pub use bind::bind_reuseport;
pub use connection::{ListenerRuntime, ListenerSlot};
pub use workers::{WorkerCommand, WorkerSpec, spawn_worker};
