//! A card with several backing stores, as an API client sees it: placement by free space or by
//! name, volume names unique across stores, a volume on the second store served, a restart
//! keeping every volume on its store, bad store sets refused with a clear error; and a volume
//! grown while attached.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outboard_card_storage::loadgen::{Client, LoadSpec};
use serde_json::Value;

mod common;

use common::{call, format, fresh_dir, serve, serve_fails, Daemon, CARD};

const MIB: u64 = 1 << 20;

fn stores_of(d: &Daemon) -> Vec<Value> {
    let (st, v) = call(d, "GET", "/stores", "");
    assert_eq!(st, 200, "{v}");
    v["stores"].as_array().unwrap().clone()
}

fn volume(d: &Daemon, name: &str) -> Value {
    let (st, v) = call(d, "GET", &format!("/volumes/{name}"), "");
    assert_eq!(st, 200, "{v}");
    v
}

fn create(d: &Daemon, body: &str) -> (u16, Value) {
    call(d, "POST", "/volumes", body)
}

/// Bytes of `store` holding volume `v` (its extents in order).
fn on_store(store: &Path, v: &Value) -> Vec<u8> {
    let f = std::fs::File::open(store).unwrap();
    let mut out = Vec::new();
    for e in v["extents"].as_array().unwrap() {
        let mut buf = vec![0u8; e["length"].as_u64().unwrap() as usize];
        f.read_exact_at(&mut buf, e["physical"].as_u64().unwrap())
            .unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

fn verify_spec(read_pct: u8, ms: u64) -> LoadSpec {
    LoadSpec {
        depth: 8,
        read_pct,
        verify: true,
        duration: Duration::from_millis(ms),
        ..LoadSpec::default()
    }
}

/// Stops the daemon but keeps its directory (stores and all) for a restart.
fn stop_keeping_dir(mut d: Daemon) -> PathBuf {
    let _ = d.child.kill();
    let _ = d.child.wait();
    let dir = d.dir.clone();
    // Its Drop would remove the directory.
    std::mem::forget(d);
    dir
}

/// Attaches volume `name` (plain, one queue) on `<name>.sock` and connects the load generator
/// to it; returns the socket and the client.
fn attach_loadgen(d: &Daemon, name: &str) -> (PathBuf, Client) {
    let sock = d.dir.join(format!("{name}.sock"));
    let attach = format!(r#"{{"socket":"{}"}}"#, sock.display());
    let path = format!("/volumes/{name}/attachment");
    assert_eq!(call(d, "PUT", &path, &attach).0, 201);
    let client = Client::connect(&sock, 1, 8, 4096).unwrap();
    (sock, client)
}

/// A fresh directory with two formatted stores, s1 and s2, of the given sizes in MiB.
fn two_stores(tag: &str, mib1: u64, mib2: u64) -> (PathBuf, PathBuf, PathBuf) {
    let dir = fresh_dir(tag);
    let (s1, s2) = (dir.join("s1"), dir.join("s2"));
    format(&s1, mib1);
    format(&s2, mib2);
    (dir, s1, s2)
}

#[test]
fn two_stores_placement_uniqueness_service_and_restart() {
    let (dir, s1, s2) = two_stores("stores", 64, 96);
    let stores = [s1.clone(), s2.clone()];
    let d = serve(dir, &stores);
    let (p1, p2) = (s1.display().to_string(), s2.display().to_string());

    let list = stores_of(&d);
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["path"], p1.as_str());
    assert_eq!(list[1]["path"], p2.as_str());
    assert_eq!(list[0]["size"], 64 * MIB);
    assert_eq!(list[1]["size"], 96 * MIB);
    // The first MiB of each store holds its two volume table copies.
    assert_eq!(list[0]["free"], 63 * MIB);
    assert_eq!(list[1]["free"], 95 * MIB);

    // Placement: the store with the most free bytes, unless the request names one.
    let (st, a) = create(&d, &format!(r#"{{"name":"a","size":{}}}"#, 8 * MIB));
    assert_eq!(st, 201, "{a}");
    assert_eq!(a["store"], p2.as_str(), "95 MiB free beats 63");
    let (_, b) = create(&d, &format!(r#"{{"name":"b","size":{}}}"#, 40 * MIB));
    assert_eq!(b["store"], p2.as_str(), "87 MiB free beats 63");
    let (_, c) = create(&d, &format!(r#"{{"name":"c","size":{}}}"#, 4 * MIB));
    assert_eq!(c["store"], p1.as_str(), "63 MiB free beats 47");
    let (st, v) = create(
        &d,
        &format!(r#"{{"name":"d","size":{},"store":"{p2}"}}"#, 4 * MIB),
    );
    assert_eq!((st, &v["store"]), (201, &Value::from(p2.as_str())), "{v}");

    // Names are unique across the card, whichever store a request names.
    let (st, v) = create(&d, &format!(r#"{{"name":"a","size":4096,"store":"{p1}"}}"#));
    assert_eq!(st, 409, "{v}");
    assert!(v["fault_message"]
        .as_str()
        .unwrap()
        .contains("already exists"));
    let (st, v) = create(&d, r#"{"name":"e","size":4096,"store":"/no/such/store"}"#);
    assert_eq!(st, 400, "{v}");
    assert!(v["fault_message"]
        .as_str()
        .unwrap()
        .contains("No backing store /no/such/store"));
    // Too big for the named store though the card as a whole has room.
    let (st, _) = create(
        &d,
        &format!(r#"{{"name":"e","size":{},"store":"{p2}"}}"#, 60 * MIB),
    );
    assert_eq!(st, 409);

    let (st, all) = call(&d, "GET", "/volumes", "");
    assert_eq!(st, 200);
    let mut placed: Vec<(String, String)> = all["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["store"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    placed.sort();
    let want: Vec<(String, String)> = [("a", &p2), ("b", &p2), ("c", &p1), ("d", &p2)]
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    assert_eq!(placed, want);
    assert_eq!(all["free"], (63 - 4 + 95 - 8 - 40 - 4) * MIB);
    let list = stores_of(&d);
    assert_eq!(
        (list[0]["volumes"].as_u64(), list[1]["volumes"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(list[1]["free"], (95 - 52) * MIB);

    // A grow takes space from the volume's own store.
    let (st, g) = call(
        &d,
        "PATCH",
        "/volumes/c",
        &format!(r#"{{"size":{}}}"#, 10 * MIB),
    );
    assert_eq!((st, &g["store"]), (200, &Value::from(p1.as_str())), "{g}");
    assert_eq!(stores_of(&d)[0]["free"], 53 * MIB);

    // Volume d (second store, plain) is served: verified I/O, and its bytes land in s2.
    let (_, mut client) = attach_loadgen(&d, "d");
    assert_eq!(client.capacity(), 4 * MIB);
    let r = client.run(&verify_spec(0, 300)).unwrap();
    assert!(r.writes > 0);
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    let r = client.run(&verify_spec(50, 300)).unwrap();
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    let history = client.history().clone();
    drop(client);
    let dv = volume(&d, "d");
    assert!(
        on_store(&s2, &dv).iter().any(|&b| b != 0),
        "volume d's writes are not in store 2"
    );
    assert!(
        on_store(&s1, &dv).iter().all(|&b| b == 0),
        "volume d's writes reached store 1"
    );
    let before: Vec<Value> = ["a", "b", "c", "d"].iter().map(|n| volume(&d, n)).collect();

    // Restart: every volume is back on its store with the same extents, and d's data reads back.
    let dir = stop_keeping_dir(d);
    let d = serve(dir, &stores);
    for v in &before {
        let mut after = volume(&d, v["name"].as_str().unwrap());
        after["attached"] = Value::Null;
        let mut v = v.clone();
        v["attached"] = Value::Null;
        assert_eq!(after, v);
    }
    let (_, mut client) = attach_loadgen(&d, "d");
    client.set_history(history);
    let r = client.run(&verify_spec(100, 300)).unwrap();
    assert!(r.reads > 0);
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    drop(client);
    assert_eq!(call(&d, "DELETE", "/volumes/d/attachment", "").0, 204);
    assert_eq!(call(&d, "DELETE", "/volumes/d", "").0, 204);
    assert_eq!(stores_of(&d)[1]["volumes"], 2);
}

fn cli(store: &Path, args: &[&str]) {
    let out = Command::new(CARD)
        .arg("volume")
        .arg("--backing")
        .arg(store)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_store_sets_are_refused_clearly() {
    let (dir, s1, s2) = two_stores("stores-bad", 16, 16);

    let missing = dir.join("missing");
    let err = serve_fails(&dir, &[s1.clone(), missing.clone()]);
    assert!(
        err.contains(&format!("Cannot open backing store {}", missing.display())),
        "{err}"
    );

    let blank = dir.join("blank");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let err = serve_fails(&dir, &[s1.clone(), blank.clone()]);
    assert!(
        err.contains(&format!("Cannot open backing store {}", blank.display())),
        "{err}"
    );

    let err = serve_fails(&dir, &[s1.clone(), s1.clone()]);
    assert!(err.contains("have one device id"), "{err}");

    let err = serve_fails(&dir, &[]);
    assert!(err.contains("--backing"), "{err}");

    // One name on two stores (e.g. formatted and filled apart): refused, naming both.
    cli(&s1, &["create", "x", "1M"]);
    cli(&s2, &["create", "x", "2M"]);
    let err = serve_fails(&dir, &[s1.clone(), s2.clone()]);
    assert!(
        err.contains(&format!(
            "Volume x is on two backing stores, {} and {}",
            s1.display(),
            s2.display()
        )),
        "{err}"
    );
    // Either store alone is fine.
    cli(&s2, &["delete", "x"]);
    let d = serve(dir, &[s1, s2]);
    assert_eq!(stores_of(&d).len(), 2);
}

#[test]
fn attached_volume_grows_live() {
    let dir = fresh_dir("grow-live");
    let store = dir.join("store");
    format(&store, 64);
    let d = serve(dir, std::slice::from_ref(&store));
    assert_eq!(
        create(&d, &format!(r#"{{"name":"v","size":{}}}"#, 8 * MIB)).0,
        201
    );
    // A neighbour right behind v, so that v grows into a second extent.
    assert_eq!(
        create(&d, &format!(r#"{{"name":"n","size":{}}}"#, MIB)).0,
        201
    );
    let (sock, mut old) = attach_loadgen(&d, "v");
    assert_eq!(old.capacity(), 8 * MIB);
    let r = old.run(&verify_spec(30, 300)).unwrap();
    assert_eq!((r.errors, r.verify_failures), (0, 0));

    // Refused grows leave the device as it was.
    assert_eq!(call(&d, "PATCH", "/volumes/v", r#"{"size":4096}"#).0, 400);
    assert_eq!(
        call(
            &d,
            "PATCH",
            "/volumes/v",
            &format!(r#"{{"size":{}}}"#, 64 * MIB)
        )
        .0,
        409
    );

    // Grows in steps while the connected front end has verified I/O in flight.
    let load = std::thread::spawn(move || {
        let r = old.run(&verify_spec(50, 1500)).unwrap();
        (old, r)
    });
    let mut g = Value::Null;
    for mib in [12, 16, 20, 24] {
        std::thread::sleep(Duration::from_millis(250));
        let (st, v) = call(
            &d,
            "PATCH",
            "/volumes/v",
            &format!(r#"{{"size":{}}}"#, mib * MIB),
        );
        assert_eq!(st, 200, "{v}");
        g = v;
    }
    let (mut old, r) = load.join().unwrap();
    assert!(r.ops() > 0);
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    assert_eq!(g["size"], 24 * MIB);
    assert_eq!(g["extents"].as_array().unwrap().len(), 2, "{g}");
    // The load generator gives no backend request channel: nobody to tell.
    assert_eq!(g["front_end_notified"], false, "{g}");
    assert!(g["attached"].is_string());

    // The connected front end keeps working on what it knows.
    let r = old.run(&verify_spec(50, 200)).unwrap();
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    let history = old.history().clone();
    drop(old);
    // A front end connecting now reads the new capacity, and the new area (in the second
    // extent) takes writes and reads them back; the old area still verifies.
    let mut new = Client::connect(&sock, 1, 8, 4096).unwrap();
    assert_eq!(new.capacity(), 24 * MIB);
    new.set_history(history);
    let r = new.run(&verify_spec(50, 1000)).unwrap();
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    let old_blocks = 8 * MIB / 4096;
    assert!(
        new.history().keys().any(|&b| b >= old_blocks),
        "no write reached the grown area"
    );
    let r = new.run(&verify_spec(100, 500)).unwrap();
    assert_eq!((r.errors, r.verify_failures), (0, 0));
    let (_, stats) = call(&d, "GET", "/volumes/v/stats", "");
    assert_eq!(stats["errors"], 0, "{stats}");
}
