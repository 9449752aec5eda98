//! Several balancer replicas that share nothing but their settings (the
//! affinity cookie secret included), in front of the same nodes: a client
//! that negotiates through one balancer and opens its transport through
//! another reaches its node on every transport; an affinity cookie set by one
//! is honoured by the other; and when one balancer stops, clients whose
//! connections run through the other keep their node and their messages.

use serde_json::json;
use std::time::Duration;
use switchboard_common::token::owner_of;
use switchboard_tests::{HubClient, InProcessBalancer, InProcessNode, RedisServer, TransportKind, ALL_TRANSPORTS};

const SECRET: &str = "shared-by-every-replica-0123456789";

async fn hears(client: &mut HubClient, text: &str) -> bool {
    client
        .expect(Duration::from_secs(10), |v| v["target"] == "ReceiveMessage" && v["arguments"][1] == text)
        .await
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancers_share_every_client_and_one_can_go_away() {
    let redis = RedisServer::start();
    let _nodes = [
        InProcessNode::start(&redis, "multi-a", &[]).await,
        InProcessNode::start(&redis, "multi-b", &[]).await,
        InProcessNode::start(&redis, "multi-c", &[]).await,
    ];
    let one = InProcessBalancer::start(&redis, &["--cookie-secret", SECRET]).await;
    let two = InProcessBalancer::start(&redis, &["--cookie-secret", SECRET]).await;
    for b in [&one, &two] {
        b.wait_accepting(&["multi-a", "multi-b", "multi-c"]).await;
    }
    let http = reqwest::Client::new();

    // Negotiate through one, transport through the other, both ways, on every transport.
    let mut through_two = Vec::new();
    let mut through_one = Vec::new();
    for kind in ALL_TRANSPORTS {
        let mut c = HubClient::connect_split(&http, &one.base, &two.base, kind).await.expect("one → two");
        assert_eq!(c.invoke("Echo", vec![json!(format!("{kind:?}"))]).await, Ok(json!(format!("{kind:?}"))));
        through_two.push(c);
        let mut c = HubClient::connect_split(&http, &two.base, &one.base, kind).await.expect("two → one");
        assert_eq!(c.invoke("Echo", vec![json!("x")]).await, Ok(json!("x")));
        through_one.push(c);
    }

    // An affinity cookie from one replica places a browser on the same node at the other.
    let first =
        http.post(format!("{}/chathub/negotiate?negotiateVersion=1", one.base)).send().await.expect("negotiate");
    let cookie = first
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_string))
        .find(|c| c.starts_with("switchboard_affinity="))
        .expect("an affinity cookie");
    let body: serde_json::Value = first.json().await.expect("json");
    let home = owner_of(body["connectionToken"].as_str().expect("token")).expect("owner");
    for _ in 0..6 {
        let again = http
            .post(format!("{}/chathub/negotiate?negotiateVersion=1", two.base))
            .header("Cookie", &cookie)
            .send()
            .await
            .expect("negotiate");
        let body: serde_json::Value = again.json().await.expect("json");
        assert_eq!(owner_of(body["connectionToken"].as_str().expect("token")).as_deref(), Some(home.as_str()));
    }

    // A message from a client of one reaches a client of the other.
    through_one[0].send("SendMessage", vec![json!("a"), json!("across replicas")]).await;
    for c in through_two.iter_mut() {
        assert!(hears(c, "across replicas").await, "{:?} heard it", c.connection_id);
    }

    // The first balancer goes away: clients whose connections run through the
    // second keep their node, their connection and their messages.
    let gone = format!("{}/health", one.admin);
    drop(one);
    switchboard_tests::eventually(Duration::from_secs(15), "the first balancer to stop", || async {
        reqwest::get(&gone).await.is_err().then_some(())
    })
    .await;
    let sender = HubClient::connect(&http, &two.base, TransportKind::WebSockets).await.expect("new client");
    sender.send("SendMessage", vec![json!("s"), json!("after one left")]).await;
    for c in through_two.iter_mut() {
        assert!(hears(c, "after one left").await, "{:?} kept its connection", c.connection_id);
        assert_eq!(c.invoke("Echo", vec![json!("still")]).await, Ok(json!("still")));
    }
}
