//! HTTPS on the public side: rustls (ring) terminates TLS 1.2 and 1.3 with
//! ALPN `http/1.1` on `tls_listen`, and the decrypted connection is served by
//! the same front as plain HTTP (WebSocket tunnels, SSE, long polling). The
//! certificate chain and key are read from PEM files; a `CertStore` answers
//! every handshake with the current pair and `watch` swaps in a new one when
//! the files change or on SIGHUP. A pair that does not load (missing, garbage,
//! a key that does not match the certificate) is fatal at start and ignored
//! with a warning at reload, so open connections and the old certificate stay.
//!
//! `TlsConn` is a decrypted client connection as Pingora's HTTP session sees
//! it: it carries bytes the front already read (`rewind`), reports TLS in its
//! digest (so the proxy sends `X-Forwarded-Proto: https`) and the TCP peer in
//! its socket digest.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, UniqueID, UniqueIDType};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::server::TlsStream;

/// How often the certificate files are checked for changes.
const POLL: Duration = Duration::from_secs(2);

/// Reads a certificate chain and its private key and checks they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("certificate {}: no PEM certificate in it", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key {}: {e}", key.display()))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| format!("key {}: {e}", key.display()))?;
    let pair = CertifiedKey::new(certs, signer);
    pair.keys_match().map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    Ok(pair)
}

/// When each file last changed, as far as the file system says.
type Stamp = (Option<SystemTime>, Option<u64>, Option<SystemTime>, Option<u64>);

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let meta = |p: &Path| std::fs::metadata(p).ok();
    let (c, k) = (meta(cert), meta(key));
    (
        c.as_ref().and_then(|m| m.modified().ok()),
        c.map(|m| m.len()),
        k.as_ref().and_then(|m| m.modified().ok()),
        k.map(|m| m.len()),
    )
}

/// The certificate every new handshake gets; swapped on reload.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    seen: Mutex<Stamp>,
}

impl CertStore {
    pub fn open(cert: &Path, key: &Path) -> Result<Arc<Self>, String> {
        let seen = stamp(cert, key);
        let pair = load_pair(cert, key)?;
        Ok(Arc::new(CertStore {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(pair),
            seen: Mutex::new(seen),
        }))
    }

    /// Loads the files again if they changed since the last attempt (or
    /// always, with `force`). True when a new pair is now served.
    pub fn reload(&self, force: bool) -> bool {
        let now = stamp(&self.cert, &self.key);
        {
            let Ok(mut seen) = self.seen.lock() else { return false };
            if !force && *seen == now {
                return false;
            }
            *seen = now;
        }
        match load_pair(&self.cert, &self.key) {
            Ok(pair) => {
                self.current.store(Arc::new(pair));
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(why) => {
                tracing::warn!("TLS certificate not reloaded, the previous one stays: {why}");
                false
            }
        }
    }

    /// The rustls settings of the HTTPS listener.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No TLS 1.3 session tickets: with them (stateful or stateless alike)
        // an idle wss:// connection whose client had negotiated over TLS
        // just before cost the balancer ~94 KB instead of ~18 KB (clients
        // arriving one at a time; docs/benchmarks.md). Returning clients pay
        // a full handshake instead, which this balancer does at ~2,900/s.
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reloads the certificate when its files change and on SIGHUP.
pub struct Reloader(pub Arc<CertStore>);

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = signal(SignalKind::hangup())
            .map_err(|e| tracing::warn!("no SIGHUP handler ({e}); the certificate files are still watched"))
            .ok();
        let sighup = async |h: &mut Option<tokio::signal::unix::Signal>| match h {
            Some(h) => h.recv().await,
            None => std::future::pending().await,
        };
        loop {
            let forced = tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(POLL) => false,
                Some(()) = sighup(&mut hangup) => true,
            };
            self.0.reload(forced);
        }
    }
}

/// A decrypted client connection, with bytes pushed back in front of it.
pub struct TlsConn {
    tls: TlsStream<Box<L4Stream>>,
    rewound: Vec<u8>,
    digest: Arc<SslDigest>,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("tcp", self.tls.get_ref().0).finish()
    }
}

impl TlsConn {
    pub fn new(tls: TlsStream<Box<L4Stream>>) -> Self {
        let session = tls.get_ref().1;
        let cipher = session.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        let version = session.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
        let digest = Arc::new(SslDigest::new(cipher, version, None, None, Vec::new()));
        TlsConn { tls, rewound: Vec::new(), digest }
    }

    /// Makes `data` the next bytes read, before anything still to come.
    pub fn rewind(&mut self, data: &[u8]) {
        self.rewound.splice(0..0, data.iter().copied());
    }

    pub fn into_parts(self) -> (TlsStream<Box<L4Stream>>, Vec<u8>) {
        (self.tls, self.rewound)
    }

    pub fn tcp(&self) -> &L4Stream {
        self.tls.get_ref().0
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.rewound.is_empty() {
            let n = self.rewound.len().min(buf.remaining());
            buf.put_slice(&self.rewound[..n]);
            self.rewound.drain(..n);
            if self.rewound.is_empty() {
                self.rewound = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for TlsConn {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(&mut self.tls).await;
    }
}

impl UniqueID for TlsConn {
    fn id(&self) -> UniqueIDType {
        self.tcp().id()
    }
}

impl Ssl for TlsConn {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(self.digest.clone())
    }
}

impl GetTimingDigest for TlsConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.tcp().get_timing_digest()
    }
}

impl GetProxyDigest for TlsConn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for TlsConn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.tcp().get_socket_digest()
    }
}

impl Peek for TlsConn {}
