//! The README's first command, run as a new user would (with the test build's binary).

use std::process::Command;

use serde_json::Value;

#[test]
fn demo_script_prints_the_published_events() {
    let output = Command::new("bash")
        .arg(crate::support::repo_root().join("scripts/demo.sh"))
        .env("WALCAST_BIN", crate::support::walcast_bin())
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "ACTION_CREATED",
            "ACTION_CREATED",
            "ACTION_ACQUIRED",
            "ACTION_COMPLETED",
            "ACTION_RELEASED",
            "ACTION_ARCHIVED"
        ]
    );
    let seqs: Vec<&str> = events.iter().map(|e| e["seq"].as_str().unwrap()).collect();
    assert_eq!(seqs, ["1", "2", "3", "4", "5", "6"]);
    assert_eq!(
        events[0]["actor"]["actorId"], "ann",
        "actor from the walcast.actor message"
    );
    assert!(stderr.contains("walcast stopped cleanly"), "{stderr}");
}
