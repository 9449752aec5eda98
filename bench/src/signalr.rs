//! A lean SignalR JSON-protocol client over WebSocket for load generation:
//! negotiate (v1), connect, handshake, invoke and read, with nothing kept
//! per message beyond what a measurement needs.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const RS: char = '\u{1e}';

pub struct HubSocket {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

pub async fn connect(http: &reqwest::Client, base: &str) -> Result<HubSocket> {
    let resp = http.post(format!("{base}/chathub/negotiate?negotiateVersion=1")).send().await?;
    let status = resp.status();
    let body: Value = resp.json().await.with_context(|| format!("negotiate answered {status}"))?;
    let token = body["connectionToken"].as_str().ok_or_else(|| anyhow!("negotiate: {body}"))?;
    let url = format!("{}/chathub?id={token}", base.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::Text(format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").into())).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().starts_with("{}") => Ok(HubSocket { ws, next_id: 0 }),
        other => bail!("handshake answered {other:?}"),
    }
}

impl HubSocket {
    pub async fn send_record(&mut self, v: &Value) -> Result<()> {
        self.ws.send(Message::Text(format!("{v}{RS}").into())).await?;
        Ok(())
    }

    pub async fn ping(&mut self) -> Result<()> {
        self.send_record(&json!({"type": 6})).await
    }

    /// Invokes `target` and waits for its completion; other messages are skipped.
    pub async fn invoke(&mut self, target: &str, args: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id.to_string();
        self.send_record(&json!({"type": 1, "invocationId": id, "target": target, "arguments": args})).await?;
        loop {
            for msg in self.read_frame().await? {
                if msg["type"] == 3 && msg["invocationId"] == id.as_str() {
                    if let Some(e) = msg.get("error") {
                        bail!("{target} failed: {e}");
                    }
                    return Ok(msg["result"].clone());
                }
            }
        }
    }

    /// The hub messages of the next text frame.
    pub async fn read_frame(&mut self) -> Result<Vec<Value>> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return Ok(t
                        .as_str()
                        .split(RS)
                        .filter(|r| !r.is_empty())
                        .filter_map(|r| serde_json::from_str(r).ok())
                        .collect())
                }
                Some(Ok(Message::Close(_))) | None => bail!("connection closed"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
}
