//! For unit tests that use real loopback sockets: a connected pair, and a test run on both
//! io drivers (epoll, and io_uring in each completion mode the kernel allows).

use std::future::Future;
use std::pin::Pin;

use monoio::net::{TcpListener, TcpStream};

use crate::shard::UringSetup;

/// Runs `test` on the epoll driver, then on io_uring in every completion mode a shard may
/// get (`UringSetup`) that the kernel allows. Each run is on a thread of its own, as a
/// shard's: a ring set up for a single issuer belongs to the thread that made it.
pub fn on_both_drivers(test: fn() -> Pin<Box<dyn Future<Output = ()>>>) {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(test());
    for setup in UringSetup::PREFERENCE {
        std::thread::spawn(move || {
            if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .uring_builder(setup.builder())
                .enable_timer()
                .build()
            {
                rt.block_on(test());
            }
        })
        .join()
        .unwrap_or_else(|_| panic!("on io_uring, {}", setup.name()));
    }
}

/// Two ends of a TCP connection on 127.0.0.1: (connecting, accepted).
pub async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = monoio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}
