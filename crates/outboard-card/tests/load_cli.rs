//! `outboard-card bench load` drives a volume served by `outboard-card attach` and verifies it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CARD: &str = env!("CARGO_BIN_EXE_outboard-card");

#[test]
fn load_generator_cli_verifies_an_attached_volume() {
    let dir = std::env::temp_dir().join(format!("outboard-card-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = dir.join("store");
    std::fs::File::create(&store)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let s = store.to_str().unwrap();
    for args in [vec!["format"], vec!["create", "v", "16M"]] {
        let out = Command::new(CARD)
            .args(["volume", "--backing", s])
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let sock = dir.join("v.sock");
    let mut card = Command::new(CARD)
        .args([
            "attach",
            "--backing",
            s,
            "--volume",
            "v",
            "--queues",
            "2",
            "--once",
            "--socket",
        ])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = Command::new(CARD)
        .args([
            "bench",
            "load",
            "--queues",
            "2",
            "--depth",
            "8",
            "--bs",
            "8K",
            "--read-pct",
            "50",
        ])
        .args(["--seconds", "0.5", "--verify", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = card.kill();
    let _ = card.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text.lines().find(|l| l.starts_with("RESULT load")).unwrap();
    assert!(
        line.contains(" errors=0 ") && line.contains(" verify_failures=0 "),
        "{line}"
    );
}
