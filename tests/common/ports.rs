//! Free loopback ports.
//!
//! Mosquitto cannot listen on port 0 (in its config `listener 0` means a unix socket), so the
//! port is found by binding 127.0.0.1:0 and dropping the socket. Another process can take the
//! port before the broker binds it; [`super::broker::Broker::start`] retries with new ports
//! when that happens.

use std::net::{Ipv4Addr, TcpListener};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct TCP ports on 127.0.0.1 that were free a moment ago.
///
/// All sockets are held until every port is chosen, so the ports are distinct.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr of a bound socket").port())
        .collect()
}
