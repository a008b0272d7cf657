//! The control API of `outboard-card serve`, as a client sees it: volumes, attach with a key
//! and QoS, I/O through the attached socket (load generator), live QoS change, stats, detach,
//! and hostile requests.

use std::time::Duration;

use outboard_card_storage::loadgen::{Client, LoadSpec};

mod common;

use common::{call, raw, start as start_card, Daemon};

fn start() -> Daemon {
    start_card("api", 64)
}

#[test]
fn volumes_attach_qos_stats_detach() {
    let d = start();
    let (st, v) = call(&d, "POST", "/volumes", r#"{"name":"vm1","size":8388608}"#);
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["extents"][0]["length"], 8 << 20);
    assert_eq!(
        call(&d, "POST", "/volumes", r#"{"name":"vm1","size":4096}"#).0,
        409
    );
    assert_eq!(
        call(&d, "POST", "/volumes", r#"{"name":"../x","size":4096}"#).0,
        400
    );
    assert_eq!(
        call(
            &d,
            "POST",
            "/volumes",
            r#"{"name":"big","size":1099511627776}"#
        )
        .0,
        409
    );
    assert_eq!(
        call(&d, "PATCH", "/volumes/vm1", r#"{"size":16777216}"#).0,
        200
    );
    let (st, list) = call(&d, "GET", "/volumes", "");
    assert_eq!(st, 200);
    assert_eq!(list["volumes"][0]["size"], 16 << 20);

    let sock = d.dir.join("vm1.sock");
    let key = "a1".repeat(32) + &"b2".repeat(32);
    let attach = format!(
        r#"{{"socket":"{}","key_hex":"{key}","queues":1,"qos":{{"iops":100000}}}}"#,
        sock.display()
    );
    assert_eq!(call(&d, "PUT", "/volumes/vm1/attachment", &attach).0, 201);
    assert_eq!(call(&d, "PUT", "/volumes/vm1/attachment", &attach).0, 409);
    assert_eq!(
        call(&d, "DELETE", "/volumes/vm1", "").0,
        409,
        "attached volumes cannot be deleted"
    );
    // Attached volumes grow live (tests/stores.rs covers the I/O side).
    let (st, v) = call(&d, "PATCH", "/volumes/vm1", r#"{"size":33554432}"#);
    assert_eq!((st, &v["size"]), (200, &serde_json::json!(32 << 20)), "{v}");

    let mut c = Client::connect(&sock, 1, 8, 4096).unwrap();
    let spec = LoadSpec {
        depth: 8,
        read_pct: 50,
        verify: true,
        duration: Duration::from_millis(300),
        ..LoadSpec::default()
    };
    let r = c.run(&spec).unwrap();
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    // Live QoS change: 200 IOPS now holds the next run well below the first one's rate.
    assert_eq!(
        call(
            &d,
            "PUT",
            "/volumes/vm1/qos",
            r#"{"iops":200,"iops_burst":1}"#
        )
        .0,
        204
    );
    let slow = c
        .run(&LoadSpec {
            duration: Duration::from_millis(500),
            ..spec.clone()
        })
        .unwrap();
    assert!(
        slow.ops() <= 100 + 8 + 1,
        "{} ops at 200 IOPS in 0.5 s",
        slow.ops()
    );
    let (st, stats) = call(&d, "GET", "/volumes/vm1/stats", "");
    assert_eq!(st, 200);
    assert_eq!(
        stats["read_ops"].as_u64().unwrap() + stats["write_ops"].as_u64().unwrap(),
        r.ops() + slow.ops()
    );
    assert!(stats["throttled_ns"].as_u64().unwrap() > 0);
    // Encrypted: nothing goes straight to guest memory. Throttle wake-ups are measured.
    assert_eq!(stats["zero_copy"].as_u64(), Some(0));
    assert!(stats["wake_late_max_ns"].as_u64().is_some());
    assert!(stats["queue_depth"].as_u64().is_some());
    // A write-only limit leaves reads alone.
    assert_eq!(
        call(
            &d,
            "PUT",
            "/volumes/vm1/qos",
            r#"{"iops_write":50,"iops_burst":1}"#
        )
        .0,
        204
    );
    let reads = c
        .run(&LoadSpec {
            read_pct: 100,
            duration: Duration::from_millis(300),
            ..spec.clone()
        })
        .unwrap();
    let writes = c
        .run(&LoadSpec {
            read_pct: 0,
            duration: Duration::from_millis(300),
            ..spec.clone()
        })
        .unwrap();
    assert!(
        writes.ops() <= 15 + 8 + 1,
        "{} writes at 50 IOPS in 0.3 s",
        writes.ops()
    );
    assert!(
        reads.ops() > 2 * writes.ops(),
        "reads {} writes {}",
        reads.ops(),
        writes.ops()
    );
    assert_eq!(call(&d, "PUT", "/volumes/vm1/qos", r#"{"iops":0}"#).0, 400);
    assert_eq!(
        call(&d, "PUT", "/volumes/vm1/qos", r#"{"op_size":0}"#).0,
        400
    );
    drop(c);

    assert_eq!(call(&d, "DELETE", "/volumes/vm1/attachment", "").0, 204);
    assert!(!sock.exists());
    assert_eq!(call(&d, "DELETE", "/volumes/vm1/attachment", "").0, 404);
    assert_eq!(call(&d, "GET", "/volumes/vm1/stats", "").0, 404);
    assert_eq!(call(&d, "DELETE", "/volumes/vm1", "").0, 204);
    assert_eq!(call(&d, "GET", "/volumes/vm1", "").0, 404);
}

#[test]
fn hostile_requests_get_clear_errors() {
    let d = start();
    let api = d.dir.join("api.sock");
    assert_eq!(call(&d, "GET", "/nope", "").0, 404);
    assert_eq!(call(&d, "PUT", "/volumes", "").0, 405);
    let (st, v) = call(&d, "POST", "/volumes", "{not json");
    assert_eq!(st, 400);
    assert!(v["fault_message"]
        .as_str()
        .unwrap()
        .starts_with("Bad request body"));
    assert_eq!(
        call(
            &d,
            "POST",
            "/volumes",
            r#"{"name":"a","size":1,"extra":true}"#
        )
        .0,
        400
    );
    assert_eq!(
        call(&d, "POST", "/volumes", r#"{"name":"a","size":-1}"#).0,
        400
    );
    assert_eq!(
        call(&d, "POST", "/volumes", r#"{"name":"a","size":4097}"#).0,
        400
    );
    call(&d, "POST", "/volumes", r#"{"name":"a","size":4096}"#);
    let bad_key = r#"{"socket":"/tmp/x.sock","key_hex":"zz"}"#;
    assert_eq!(call(&d, "PUT", "/volumes/a/attachment", bad_key).0, 400);
    let weak = format!(
        r#"{{"socket":"/tmp/x.sock","key_hex":"{}"}}"#,
        "00".repeat(64)
    );
    assert_eq!(call(&d, "PUT", "/volumes/a/attachment", &weak).0, 400);
    assert_eq!(
        call(
            &d,
            "PUT",
            "/volumes/a/attachment",
            r#"{"socket":"/tmp/x.sock","queues":0}"#
        )
        .0,
        400
    );
    assert_eq!(raw(&api, b"GARBAGE\r\n\r\n").0, 400);
    assert_eq!(
        raw(
            &api,
            b"POST /volumes HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
        )
        .0,
        413
    );
    assert_eq!(
        raw(&api, b"POST /volumes HTTP/1.1\r\nContent-Length: x\r\n\r\n").0,
        400
    );
    // The daemon is still serving.
    assert_eq!(call(&d, "GET", "/volumes", "").0, 200);
}
