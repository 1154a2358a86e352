//! A registration whose `registration_ack` could not fit in the frames the worker takes.

use futures_util::StreamExt;
use serde_json::{Value, json};
use tether_testkit::*;
use tokio_tungstenite::tungstenite::Message;

use crate::raw::Raw;
use crate::support::coordinator;

/// Over a real socket: a worker taking frames of 32 KiB registers with 400 running tasks, an
/// ack of a directive each that no such frame holds. Every frame the coordinator sends it fits
/// in 32 KiB, and the refusal says why (`bad_frame`, naming both sizes), then closes 4002.
/// Before, the ack went whole, the worker's socket refused it as oversize, and the worker
/// registered again into the same ack for ever.
#[tokio::test]
async fn a_registration_whose_ack_would_not_fit_its_frames_is_refused_in_frames_that_do() {
    const FRAME: usize = 32 * 1024;
    let (_dir, c) = coordinator().await;
    let mut r = Raw::connect(&c, "small-frames").await;
    let mut reg = r.registration(None, &["sleep"]);
    reg["max_frame"] = FRAME.into();
    let running: Vec<Value> = (0..400)
        .map(|i| json!({"task_id": format!("t-{i:034}"), "attempt": 1}))
        .collect();
    reg["inventory"] = json!({"running": running, "finished": [], "lost": []});
    r.send(&reg).await;
    let mut sent = Vec::new();
    let close = loop {
        let frame = tokio::time::timeout(DEADLINE, r.ws.next())
            .await
            .expect("a frame in time");
        match frame {
            Some(Ok(Message::Text(t))) => {
                assert!(t.len() <= FRAME, "a frame of {} bytes was sent", t.len());
                sent.push(serde_json::from_str::<Value>(t.as_str()).expect("json"));
            }
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("read: {e}"),
            None => break None,
        }
    };
    assert!(
        sent.iter().all(|m| m["type"] != "registration_ack"),
        "{sent:?}"
    );
    let error = sent
        .iter()
        .find(|m| m["type"] == "error")
        .expect("an error saying why");
    assert_eq!(error["code"], "bad_frame", "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("400 running tasks"), "{message}");
    assert!(message.contains("max_frame of 32768 bytes"), "{message}");
    assert_eq!(close, Some(4002));
    let overview = c.client().overview().await;
    assert_eq!(crate::raw::counter(&overview, "registrations"), 0);
}
