//! TLS for the benchmark's clients: `https://` and `wss://` to a balancer on
//! loopback. The certificate is not verified (the benchmark only talks to
//! processes it started on this machine, usually with a throwaway
//! self-signed certificate); session resumption is off, so every connection
//! pays a full handshake, as a crowd of new visitors would.

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client settings every benchmark TLS connection uses.
pub fn config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|e| panic!("ring offers TLS 1.2 and 1.3: {e}"))
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
                .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            c.resumption = rustls::client::Resumption::disabled();
            Arc::new(c)
        })
        .clone()
}

/// `host:port` of an `https://` or `wss://` URL.
pub fn authority(url: &str) -> Result<&str> {
    let rest = url.split_once("://").map(|(_, r)| r).ok_or_else(|| anyhow!("{url}: not a URL"))?;
    Ok(rest.split('/').next().unwrap_or(rest))
}

/// TCP connect and a full TLS handshake.
pub async fn connect(host_port: &str) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(host_port).await.with_context(|| format!("connect {host_port}"))?;
    let _ = tcp.set_nodelay(true);
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h).trim_matches(['[', ']']);
    let name = ServerName::try_from(host.to_string()).map_err(|e| anyhow!("{host}: {e}"))?;
    Ok(tokio_rustls::TlsConnector::from(config()).connect(name, tcp).await?)
}

/// One request on a new TLS connection (`Connection: close`): status, the
/// `Set-Cookie` values and the body.
pub async fn request(url: &str, method: &str) -> Result<(u16, Vec<String>, String)> {
    let host_port = authority(url)?;
    let path = url.split_once(host_port).map_or("/", |(_, p)| p);
    let path = if path.is_empty() { "/" } else { path };
    let mut tls = connect(host_port).await?;
    let length = if method == "POST" { "Content-Length: 0\r\n" } else { "" };
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n{length}\r\n");
    tls.write_all(head.as_bytes()).await?;
    // tokio-rustls may keep written bytes in rustls until flushed.
    tls.flush().await?;
    let mut raw = Vec::new();
    // A server that closes without close_notify still delivered everything.
    if let Err(e) = tls.read_to_end(&mut raw).await {
        if raw.is_empty() {
            return Err(e.into());
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("{url}: no complete response") };
    let status =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("{url}: bad status line"))?;
    let cookies = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.trim().to_string())
        .collect();
    Ok((status, cookies, body.to_string()))
}
