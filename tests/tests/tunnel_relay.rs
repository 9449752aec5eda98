//! The balancer's WebSocket tunnel moves every byte, in order, both ways at
//! once, when one side reads slowly. A stand-in node (registered in Redis
//! like a real one, answering `/health` and the upgrade) streams 8 MiB of a
//! known pattern to a client that reads in small, slow steps while it keeps
//! sending bytes of its own every 2 ms; both sides check every byte that
//! arrives. (The relay used to race two read-then-write futures in
//! `select!`, dropping whatever one had read when the other finished first.)

use std::time::Duration;
use switchboard_common::registry::{write_record, NodeRecord, NodeStatus};
use switchboard_common::token::ConnectionToken;
use switchboard_tests::{InProcessBalancer, RedisServer, TestBalancer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DOWN_BYTES: usize = 8 * 1024 * 1024;
const LIMIT: Duration = Duration::from_secs(60);

/// Byte `i` of the stream in direction `salt`: not periodic at any small
/// power of two, so a lost or repeated chunk shows.
fn pattern(i: usize, salt: u8) -> u8 {
    ((i % 251) as u8) ^ ((i / 251) as u8).wrapping_mul(31) ^ salt
}

async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    head
}

/// Checks bytes against the pattern from `offset`; returns the first bad index.
fn first_mismatch(data: &[u8], offset: usize, salt: u8) -> Option<usize> {
    data.iter().enumerate().find(|(i, &b)| b != pattern(offset + i, salt)).map(|(i, _)| offset + i)
}

/// Serves `/health` and one upgraded connection: sends `down_bytes` of the
/// pattern and reports how many client bytes arrived and whether they
/// matched, once the balancer has closed the connection.
async fn fake_node(
    listener: TcpListener,
    down_bytes: usize,
    report: tokio::sync::oneshot::Sender<(usize, Option<usize>)>,
) {
    let mut report = Some(report);
    loop {
        let Ok((mut s, _)) = listener.accept().await else { return };
        let head = read_head(&mut s).await;
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if !text.contains("upgrade: websocket") {
            let body = r#"{"status":"healthy"}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            continue;
        }
        let Some(report) = report.take() else { continue };
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        tokio::spawn(async move {
            let (mut rd, mut wr) = s.into_split();
            let writer = tokio::spawn(async move {
                let chunk: Vec<u8> = (0..64 * 1024).map(|i| pattern(i, 0)).collect();
                let data: Vec<u8> = (0..DOWN_BYTES.min(down_bytes)).map(|i| pattern(i, 0)).collect();
                for part in data.chunks(64 * 1024) {
                    if wr.write_all(part).await.is_err() {
                        return;
                    }
                }
                // Past the pattern, filler for as long as it is taken.
                let mut sent = data.len();
                while sent < down_bytes {
                    if wr.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
                // Keep the socket open until the client has read it all.
                tokio::time::sleep(LIMIT).await;
            });
            let mut got = 0usize;
            let mut bad = None;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if bad.is_none() {
                            bad = first_mismatch(&buf[..n], got, 0x5a);
                        }
                        got += n;
                    }
                }
            }
            writer.abort();
            let _ = report.send((got, bad));
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_loses_no_byte_with_both_directions_busy_and_a_slow_reader() {
    relay_byte_for_byte(&[]).await;
}

/// The same with one work-stealing runtime instead of per-core runtimes
/// (the default), whose tunnels are woken from any thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_loses_no_byte_on_a_work_stealing_runtime_too() {
    relay_byte_for_byte(&["--work-stealing", "true"]).await;
}

/// A client that keeps sending but never reads: the node → client direction
/// stops moving while the other stays busy. The balancer must end the tunnel
/// once that write has been stuck for the idle limit (the busy direction
/// alone must not keep it open), and so close the node's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_client_never_reads_ends_after_the_idle_limit_while_it_keeps_sending() {
    let (redis, report_rx) = stand_in(1 << 30).await;
    // A balancer process: after an in-process balancer has stopped, this
    // test binary could not start another one (Pingora's per-thread runtime
    // registry can hand out a runtime that has shut down, cloudflare/pingora#981).
    let lb = TestBalancer::start(&redis, &["--idle-timeout-secs", "1"]).await;
    lb.wait_accepting(&["relay"]).await;
    let (_rd, mut wr) = upgrade(&lb.base).await.into_split();
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        // Bounded: 100 bytes every 2 ms for at most a minute.
        for _ in 0..30_000 {
            let chunk: Vec<u8> = (sent..sent + 100).map(|i| pattern(i, 0x5a)).collect();
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        sent
    });
    let (arrived, bad) =
        tokio::time::timeout(LIMIT, report_rx).await.expect("the balancer closed the stuck tunnel").unwrap();
    assert_eq!(bad, None, "client → node bytes corrupted");
    assert!(arrived > 0, "the client's bytes reached the node while the tunnel lived");
    let sent = tokio::time::timeout(LIMIT, sender).await.expect("the client's writes failed once closed").unwrap();
    assert!(sent >= arrived);
}

/// Redis and the stand-in node (sending `down_bytes`) registered in it.
async fn stand_in(down_bytes: usize) -> (RedisServer, tokio::sync::oneshot::Receiver<(usize, Option<usize>)>) {
    let redis = RedisServer::start();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = listener.local_addr().unwrap();
    let (report_tx, report_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(fake_node(listener, down_bytes, report_tx));
    let now = chrono::Utc::now();
    let record = NodeRecord {
        node_id: "relay".into(),
        name: "Relay stand-in".into(),
        description: String::new(),
        url: format!("http://{node_addr}"),
        status: NodeStatus::Healthy,
        connections: 0,
        last_seen: now,
        started_at: now,
        version: "0".into(),
    };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    let mut pipe = redis::pipe();
    write_record(&mut pipe, "switchboard", &record, 120_000, chrono::Utc::now().timestamp_millis());
    let _: () = pipe.query_async(&mut r).await.unwrap();
    (redis, report_rx)
}

/// A WebSocket through the balancer at `base` to the stand-in node, past its 101.
async fn upgrade(base: &str) -> TcpStream {
    let token = ConnectionToken::issue("relay").token;
    let addr = base.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "GET /chathub?id={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

async fn relay_byte_for_byte(balancer_args: &[&str]) {
    let (redis, report_rx) = stand_in(DOWN_BYTES).await;
    let lb = InProcessBalancer::start(&redis, balancer_args).await;
    lb.wait_accepting(&["relay"]).await;
    let (mut rd, mut wr) = upgrade(&lb.base).await.into_split();

    // The client sends 100 bytes every 2 ms for as long as it reads…
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        loop {
            let chunk: Vec<u8> = (sent..sent + 100).map(|i| pattern(i, 0x5a)).collect();
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
            tokio::select! {
                _ = &mut done_rx => break,
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
        let _ = wr.shutdown().await;
        sent
    });
    // …and reads slowly: 4 KiB at a time, pausing every 256 KiB.
    let mut got = 0usize;
    let mut bad = None;
    let mut buf = vec![0u8; 4096];
    let read_all = async {
        while got < DOWN_BYTES {
            // Five seconds without a byte: whatever is missing is lost.
            let n = match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => 0,
            };
            if n == 0 {
                break;
            }
            if bad.is_none() {
                bad = first_mismatch(&buf[..n], got, 0);
            }
            got += n;
            if got % (256 * 1024) < n {
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }
    };
    tokio::time::timeout(LIMIT, read_all).await.expect("the download finished in time");
    assert_eq!(bad, None, "node → client bytes corrupted");
    assert_eq!(got, DOWN_BYTES, "node → client bytes lost");
    let _ = done_tx.send(());
    let sent = sender.await.unwrap();
    let (arrived, up_bad) = tokio::time::timeout(LIMIT, report_rx).await.expect("node report").unwrap();
    assert_eq!(up_bad, None, "client → node bytes corrupted");
    assert_eq!(arrived, sent, "client → node bytes lost");
    eprintln!("relayed {got} bytes down and {sent} up, byte for byte");
}
