//! A plain client connection moved to the thread that serves it. Pingora
//! accepts on one thread and, with per-core runtimes, hands each connection
//! to a random one of them; left where it was accepted, every readiness event
//! of the socket is delivered by the accepting thread's reactor and crosses
//! over (an eventfd write and a context switch per wake-up). `LocalConn`
//! registers a duplicate of the socket with the serving thread's reactor and
//! closes the original. Pingora's own streams carry a one-packet write buffer
//! so that a small answer's head and body leave in one segment; a stream made
//! from a bare socket has none, so `LocalConn` keeps one in front of it, and
//! Pingora's HTTP session flushes it at the end of each answer.

use crate::tunnel;
use async_trait::async_trait;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, UniqueID, UniqueIDType};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::net::TcpStream;

/// What one TCP segment carries on most paths: a small answer fits whole.
const WRITE_BUFFER: usize = 1460;

/// `l4`'s socket registered with this thread's reactor, unbuffered, with
/// `TCP_NODELAY` (for TLS, whose records rustls buffers itself); `l4`
/// itself when the socket could not be duplicated (out of descriptors),
/// which still works, from the accepting thread.
pub fn localized(l4: Box<L4Stream>) -> Box<L4Stream> {
    let Some(tcp) = tunnel::take_socket(&l4) else { return l4 };
    let mut local = L4Stream::from(tcp);
    let fd = local.as_raw_fd();
    local.set_socket_digest(SocketDigest::from_raw_fd(fd));
    let _ = local.set_nodelay();
    Box::new(local)
}

/// Puts `data` in front of the bytes already pushed back in `rewound`.
pub fn rewind_before(rewound: &mut Vec<u8>, data: &[u8]) {
    rewound.splice(0..0, data.iter().copied());
}

/// Serves a read from `rewound` (bytes pushed back in front of a stream) if
/// it holds any; false when the stream itself must be read.
pub fn read_rewound(rewound: &mut Vec<u8>, buf: &mut ReadBuf<'_>) -> bool {
    if rewound.is_empty() {
        return false;
    }
    let n = rewound.len().min(buf.remaining());
    buf.put_slice(&rewound[..n]);
    rewound.drain(..n);
    if rewound.is_empty() {
        *rewound = Vec::new();
    }
    true
}

#[derive(Debug)]
pub struct LocalConn {
    io: BufWriter<TcpStream>,
    rewound: Vec<u8>,
    digest: Arc<SocketDigest>,
    established: SystemTime,
}

impl LocalConn {
    /// `l4`'s socket moved to this thread, behind a one-packet write buffer;
    /// `None` when it could not be duplicated (out of descriptors). The
    /// caller drops `l4`.
    pub fn new(l4: &L4Stream) -> Option<Box<Self>> {
        let tcp = tunnel::take_socket(l4)?;
        let _ = tcp.set_nodelay(true);
        let digest = Arc::new(SocketDigest::from_raw_fd(tcp.as_raw_fd()));
        Some(Box::new(LocalConn {
            io: BufWriter::with_capacity(WRITE_BUFFER, tcp),
            rewound: Vec::new(),
            digest,
            established: SystemTime::now(),
        }))
    }

    /// Makes `data` the next bytes read, before anything still to come.
    pub fn rewind(&mut self, data: &[u8]) {
        rewind_before(&mut self.rewound, data);
    }

    /// The socket, for a tunnel, and any bytes still rewound (the write
    /// buffer is empty between requests: each answer ends with a flush).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.io.into_inner(), self.rewound)
    }
}

impl AsyncRead for LocalConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if read_rewound(&mut self.rewound, buf) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LocalConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for LocalConn {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(&mut self.io).await;
    }
}

impl UniqueID for LocalConn {
    fn id(&self) -> UniqueIDType {
        self.io.get_ref().as_raw_fd()
    }
}

impl Ssl for LocalConn {}

impl GetTimingDigest for LocalConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        vec![Some(TimingDigest {
            established_ts: self.established,
            establishment_duration: None,
            offload_wait_duration: None,
        })]
    }
}

impl GetProxyDigest for LocalConn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for LocalConn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(self.digest.clone())
    }
}

impl Peek for LocalConn {}
