//! Listening sockets: one per worker and listener, with `SO_REUSEPORT`.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Binds `count` sockets to `addr` with `SO_REUSEPORT`, one per worker, so the kernel spreads
/// connections across workers. A first probe bind without `SO_REUSEPORT` makes a port held by
/// any other socket a clear error, and resolves port 0 to one free port for all workers.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())?;
    let local = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))?;
    drop(probe);
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let s = Socket::new(
            Domain::for_address(local),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&local.into())?;
        s.listen(1024)?;
        sockets.push(s.into());
    }
    Ok((local, sockets))
}
