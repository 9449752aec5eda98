//! The public listener's front door, a Pingora `ServerApp` in front of the
//! proxy. It reads the first request head of each connection itself: a
//! WebSocket upgrade is routed and tunnelled by `tunnel` (the balancer owns the
//! socket once the node answers 101); anything else is pushed back into the
//! stream (`rewind`) and handed to the Pingora HTTP proxy unchanged.
//!
//! Why: Pingora 0.9 pumps upgraded connections through its HTTP body path,
//! which keeps 64 KiB buffers per direction for the life of every WebSocket,
//! and has a race that drops a tunnel when the node's 101 is parsed before
//! the request's empty body is — seen here on pooled upstream connections.
//! Later requests on a kept-alive connection go straight to the proxy; browsers
//! and SignalR clients open a fresh connection for every WebSocket.

use crate::cluster::Cluster;
use crate::proxy::SwitchboardProxy;
use crate::tunnel;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Largest request head the front door reads; larger ones go to the proxy,
/// which answers them itself.
pub const MAX_HEAD: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct FrontApp {
    pub cluster: Arc<Cluster>,
    pub proxy: Arc<HttpProxy<SwitchboardProxy>>,
}

/// Reads until the end of the request head; returns everything read (the
/// head and whatever followed it), or `None` on EOF, error or timeout.
async fn read_head(stream: &mut L4Stream) -> Option<(Vec<u8>, bool)> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let read = async {
        loop {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(true);
            }
            if buf.len() >= MAX_HEAD {
                return Some(false);
            }
            // On the heap, not in the future: every connection's task is as
            // large as its largest await state for as long as it lives.
            let mut chunk = vec![0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let complete = tokio::time::timeout(HEAD_TIMEOUT, read).await.ok()??;
    Some((buf, complete))
}

#[async_trait]
impl ServerApp for FrontApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let any = stream.into_any();
        let mut l4: Box<L4Stream> = match any.downcast::<L4Stream>() {
            Ok(s) => s,
            Err(_) => {
                tracing::error!("unexpected stream type on the public listener");
                return None;
            }
        };
        let (head, complete) = read_head(&mut l4).await?;
        if complete {
            if let Some(request) = tunnel::UpgradeRequest::parse(&head) {
                tunnel::serve(self.cluster.clone(), l4, request, head).await;
                return None;
            }
        }
        l4.rewind(&head);
        let stream: Stream = l4;
        ServerApp::process_new(&self.proxy, stream, shutdown).await
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}
