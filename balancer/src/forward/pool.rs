//! Kept-alive connections to the nodes, for the plain requests the balancer
//! forwards itself. One pool per thread: each of the balancer's threads runs
//! a runtime of its own, and a socket is best used on the runtime whose
//! reactor it is registered with. A connection waits at most `POOLED_IDLE`
//! (less than a node's own idle limit, so a node never closes one as it is
//! reused) and at most `MAX_IDLE_PER_NODE` wait per node and thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub const POOLED_IDLE: Duration = Duration::from_secs(15);
const MAX_IDLE_PER_NODE: usize = 64;

struct Pool {
    idle: HashMap<SocketAddr, Vec<(TcpStream, Instant)>>,
    swept: Instant,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool { idle: HashMap::new(), swept: Instant::now() });
}

/// Whether an idle connection still looks usable: not closed by the node and
/// with nothing unasked-for to read.
fn usable(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

/// The most recently used idle connection to `addr` that is still usable.
pub fn take(addr: SocketAddr) -> Option<TcpStream> {
    POOL.with_borrow_mut(|pool| {
        let list = pool.idle.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            if since.elapsed() < POOLED_IDLE && usable(&stream) {
                return Some(stream);
            }
        }
        None
    })
}

/// Keeps `stream` for the next request to `addr`; now and then drops the
/// connections that waited too long (to nodes that may be gone).
pub fn put(addr: SocketAddr, stream: TcpStream) {
    POOL.with_borrow_mut(|pool| {
        let now = Instant::now();
        if now.duration_since(pool.swept) > POOLED_IDLE {
            pool.swept = now;
            for list in pool.idle.values_mut() {
                list.retain(|(_, since)| now.duration_since(*since) < POOLED_IDLE);
            }
            pool.idle.retain(|_, list| !list.is_empty());
        }
        let list = pool.idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_NODE {
            list.push((stream, now));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected pair: the node's address, the balancer's end, the node's end.
    async fn pair() -> (SocketAddr, TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (addr, client, server)
    }

    #[tokio::test]
    async fn a_connection_comes_back_until_its_node_closes_it() {
        let (addr, client, mut server) = pair().await;
        put(addr, client);
        let client = take(addr).expect("an idle connection comes back");
        assert!(take(addr).is_none(), "taken once");
        put(addr, client);
        server.shutdown().await.unwrap();
        drop(server);
        // The reactor learns of the close when the runtime next polls it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(take(addr).is_none(), "a closed connection is not reused");
    }

    #[tokio::test]
    async fn a_connection_with_unasked_for_bytes_is_not_reused() {
        let (addr, client, mut server) = pair().await;
        server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        client.readable().await.unwrap();
        put(addr, client);
        assert!(take(addr).is_none());
    }
}
