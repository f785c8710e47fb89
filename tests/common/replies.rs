//! Command replies as the test subscriber saw them on `ferry/test-gw/replies`.

use super::agent::Agent;
use super::subscriber::Subscriber;
use serde_json::Value;
use std::time::Duration;

/// The reply topic of the test device (`device_id: test-gw`).
pub const REPLIES: &str = "ferry/test-gw/replies";

/// Every reply to `id`, in arrival order.
pub fn replies(sub: &Subscriber, id: &str) -> Vec<Value> {
    sub.messages_on(REPLIES)
        .into_iter()
        .filter_map(|m| m.json)
        .filter(|j| j["id"] == id)
        .collect()
}

/// Waits for a final (ok or error) reply to `id`.
pub async fn final_reply(sub: &Subscriber, agent: &Agent, id: &str, timeout: Duration) -> Value {
    let done = |s: &Subscriber| {
        replies(s, id)
            .into_iter()
            .find(|r| r["status"] == "ok" || r["status"] == "error")
    };
    assert!(
        sub.wait_until(timeout, |s| done(s).is_some()).await,
        "no final reply to {id}; replies: {:?}\nlog:\n{}",
        sub.messages_on(REPLIES)
            .iter()
            .map(|m| m.text())
            .collect::<Vec<_>>(),
        agent.log()
    );
    done(sub).unwrap()
}
