//! `switchboard-bench store-cost`: what storing and publishing a chat message
//! costs Redis, the way the node did before message ids (one pipeline of
//! `PUBLISH` + `XADD` per message) against the atomic, idempotent
//! store-and-publish script it runs now (`node/src/store_and_publish.lua`),
//! in batches of 256 as the node's publisher sends them. Messages per second
//! from one connection, each variant run in turn on a fresh stream, same
//! payloads. Against a `redis-server` you name (start one on a free port).

use anyhow::Result;
use serde_json::{json, Value};
use std::time::Instant;

const SCRIPT: &str = include_str!("../../node/src/store_and_publish.lua");
const BATCH: usize = 256;

fn fields(i: usize) -> Vec<(&'static str, String)> {
    vec![
        ("uid", format!("{i:032x}")),
        ("user", "bench".into()),
        ("message", format!("message number {i} with some text in it")),
        ("connectionId", "bm9kZQ.abcdefghijklmnop".into()),
        ("nodeId", "node".into()),
        ("timestamp", "2026-11-22T12:00:00Z".into()),
    ]
}

async fn run_variant(conn: &mut redis::aio::MultiplexedConnection, atomic: bool, count: usize) -> Result<f64> {
    let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).query_async(conn).await?;
    let key = if atomic { "bench:store:atomic" } else { "bench:store:pipeline" };
    let _: () = redis::cmd("DEL").arg(key).query_async(conn).await?;
    let started = Instant::now();
    let mut i = 0;
    while i < count {
        let mut pipe = redis::pipe();
        for j in i..(i + BATCH).min(count) {
            let f = fields(j);
            let payload = json!({"uid": f[0].1, "user": f[1].1, "message": f[2].1}).to_string();
            if atomic {
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(&sha)
                    .arg(2)
                    .arg(key)
                    .arg(format!("bench:stored:{}", f[0].1))
                    .arg(1000)
                    .arg("bench:channel")
                    .arg(&payload);
                for (k, v) in &f {
                    cmd.arg(*k).arg(v);
                }
            } else {
                pipe.cmd("PUBLISH").arg("bench:channel").arg(&payload).ignore();
                let cmd = pipe.cmd("XADD").arg(key).arg("MAXLEN").arg("~").arg(1000).arg("*");
                for (k, v) in &f {
                    cmd.arg(*k).arg(v);
                }
                cmd.ignore();
            }
        }
        let _: redis::Value = pipe.query_async(conn).await?;
        i += BATCH;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(redis_url: &str, count: usize) -> Result<Value> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    // Warm up both paths (script cache, allocations).
    run_variant(&mut conn, false, BATCH * 4).await?;
    run_variant(&mut conn, true, BATCH * 4).await?;
    let pipeline = run_variant(&mut conn, false, count).await?;
    let atomic = run_variant(&mut conn, true, count).await?;
    eprintln!(
        "store-cost: PUBLISH+XADD pipeline {pipeline:.0} msg/s; atomic store-and-publish {atomic:.0} msg/s ({:.2}×)",
        atomic / pipeline
    );
    Ok(
        json!({"messages": count, "pipeline_msgs_per_sec": pipeline, "atomic_msgs_per_sec": atomic, "ratio": atomic / pipeline}),
    )
}
