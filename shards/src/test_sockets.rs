//! For unit tests that use real loopback sockets: a connected pair, and a test run on both
//! io drivers (epoll, and io_uring where the kernel allows it).

use std::future::Future;
use std::pin::Pin;

use monoio::net::{TcpListener, TcpStream};

/// Runs `test` on the epoll driver, then on io_uring when it is available.
pub fn on_both_drivers(test: fn() -> Pin<Box<dyn Future<Output = ()>>>) {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(test());
    if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
    {
        rt.block_on(test());
    }
}

/// Two ends of a TCP connection on 127.0.0.1: (connecting, accepted).
pub async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = monoio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}
