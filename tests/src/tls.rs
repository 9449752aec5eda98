//! Test certificates and a TLS client for the HTTPS tests: a throwaway
//! certificate authority (rcgen), leaf certificates for `localhost` and
//! 127.0.0.1 written as PEM files the balancer reads, and rustls clients that
//! trust only that authority, speaking raw HTTP/1.1 or WebSockets over TLS.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A certificate authority that exists only for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "Switchboard test CA");
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA certificate");
        TestCa { issuer }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes a new leaf certificate (and a new key) for localhost and
    /// 127.0.0.1 to `cert` and `key`, each replaced atomically (the key
    /// first); returns the leaf's DER.
    pub fn write_leaf(&self, cert: &Path, key: &Path) -> CertificateDer<'static> {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let params = CertificateParams::new(names).expect("leaf parameters");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = params.signed_by(&leaf_key, &self.issuer).expect("leaf certificate");
        let replace = |path: &Path, text: &str| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write PEM");
            std::fs::rename(&tmp, path).expect("rename PEM");
        };
        replace(key, &leaf_key.serialize_pem());
        replace(cert, &format!("{}{}", leaf.pem(), self.issuer.pem()));
        leaf.der().clone()
    }

    /// A client that trusts this authority only, offering `versions`.
    pub fn client(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der()).expect("trust the test CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsClient { connector: tokio_rustls::TlsConnector::from(Arc::new(config)) }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

pub struct TlsClient {
    connector: tokio_rustls::TlsConnector,
}

impl TlsClient {
    /// Connects and completes the handshake with `port` on 127.0.0.1.
    pub async fn connect(&self, port: u16) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        tokio::time::timeout(Duration::from_secs(10), self.connector.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }

    /// One HTTP/1.1 request (`Connection: close`); returns the status and the
    /// whole response text.
    pub async fn request(&self, port: u16, method: &str, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut tls = self.connect(port).await.expect("TLS connect");
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(if method == "POST" { "Content-Length: 0\r\n\r\n" } else { "\r\n" });
        tls.write_all(head.as_bytes()).await.expect("send request");
        // tokio-rustls may keep written bytes in rustls until flushed.
        tls.flush().await.expect("flush request");
        let mut out = Vec::new();
        // A peer that closes without close_notify is fine here.
        let _ = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text)
    }
}

/// The certificate the server presented on `tls`.
pub fn peer_leaf(tls: &TlsStream<TcpStream>) -> Option<CertificateDer<'static>> {
    tls.get_ref().1.peer_certificates()?.first().map(|c| c.clone().into_owned())
}
