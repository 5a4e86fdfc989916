//! The downstream side: listening sockets ([`bind`]), worker threads and their runtimes
//! ([`workers`]), accepted connections and their serve loop ([`connection`]), the byte
//! stream a connection runs over ([`transport`]: where TLS and TCP plug in), and the HTTP/1
//! framing scanner ([`framing`]).

pub mod bind;
pub mod connection;
pub mod framing;
pub mod transport;
pub mod workers;

pub use bind::bind_reuseport;
pub use connection::{ConnShared, ListenerRuntime};
pub use workers::{WorkerSpec, spawn_worker};
