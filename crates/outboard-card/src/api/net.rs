//! The card API's networking routes (under `/net`, see openapi/outboard-card.yaml): the
//! overlay mapping table (remote VM MAC/IP → host, per VNI), the overlay NICs (a TAP joined
//! to the Geneve multipath underlay by a dataplane worker thread) and their counters.
//!
//! ```text
//!  NIC: (none) ──PUT /net/interfaces/{id}──► running ──DELETE──► (none)
//!                                              │ GET …/counters
//! ```
//!
//! The mapping table is one per card, shared by every NIC; a worker picks up an edit within
//! a poll interval (1 ms) without locking its packet path.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::Context;
use outboard_card_net::counters::{NicCounters, NicSnapshot};
use outboard_card_net::dataplane::{Config, Dataplane, NicSpec, PathSpec};
use outboard_card_net::flow::{parse_mac, Mac};
use outboard_card_net::path::{Policy, Timing};
use outboard_card_net::reorder;
use outboard_card_net::table::{Port, SharedTable};
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{self, Request, Response};
use super::{body, chain};

/// Most NICs one card runs.
const MAX_NICS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingBody {
    vni: u32,
    mac: String,
    ip: Ipv4Addr,
    host: Ipv4Addr,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct NicBody {
    /// One of `tap` (a host or test) and `vhost_user` (a VM's NIC).
    #[serde(default)]
    tap: Option<String>,
    #[serde(default)]
    vhost_user: Option<std::path::PathBuf>,
    vni: u32,
    mac: String,
    ip: Ipv4Addr,
    host: Ipv4Addr,
    paths: Vec<SocketAddrV4>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    listen: Option<SocketAddrV4>,
    #[serde(default)]
    offload: Option<bool>,
    #[serde(default)]
    underlay_mtu: Option<usize>,
    #[serde(default)]
    train: Option<usize>,
    #[serde(default)]
    reorder_timeout_us: Option<u64>,
}

/// One running NIC.
struct Nic {
    summary: Value,
    counters: Arc<NicCounters>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl Drop for Nic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The card's networking state behind the API.
#[derive(Default)]
pub struct Net {
    table: SharedTable,
    nics: Mutex<HashMap<String, Nic>>,
}

fn mac_str(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Counters as JSON: the NIC's, then one object per path.
pub fn counters_json(s: &NicSnapshot) -> Value {
    let dropped: serde_json::Map<String, Value> = s
        .dropped
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let paths: Vec<Value> = s
        .paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "path": i, "tx_packets": p.tx_packets, "tx_bytes": p.tx_bytes,
                "rx_packets": p.rx_packets, "rx_bytes": p.rx_bytes, "probes": p.probes,
                "losses": p.losses, "rx_lost": p.rx_lost, "ecn_ce": p.ecn_ce,
                "ecn_ce_echoed": p.ecn_ce_echoed, "rtt_samples": p.rtt_samples,
                "rtt_p50_us": p.rtt_p50_us, "rtt_p99_us": p.rtt_p99_us, "weight": p.weight,
            })
        })
        .collect();
    json!({
        "tx_packets": s.tx_packets, "tx_bytes": s.tx_bytes,
        "rx_packets": s.rx_packets, "rx_bytes": s.rx_bytes,
        "dropped": dropped,
        "reorder_timeouts": s.reorder_timeouts, "reorder_overflows": s.reorder_overflows,
        "reorder_late": s.reorder_late, "reorder_max_depth": s.reorder_max_depth,
        "reorder_depth_p99": s.reorder_depth_p99,
        "frames_reassembled": s.frames_reassembled, "frames_incomplete": s.frames_incomplete,
        "frag_orphans": s.frag_orphans, "gso": s.gso,
        "paths": paths,
    })
}

impl Net {
    /// A card with `table` as its mapping table.
    pub fn with_table(table: SharedTable) -> Self {
        Self {
            table,
            nics: Mutex::default(),
        }
    }

    fn nics(&self) -> MutexGuard<'_, HashMap<String, Nic>> {
        self.nics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves counters of a NIC started outside the API (`outboard-card net --api`).
    pub fn adopt(&self, id: &str, summary: Value, counters: Arc<NicCounters>) {
        self.nics().insert(
            id.to_owned(),
            Nic {
                summary,
                counters,
                stop: Arc::new(AtomicBool::new(false)),
                worker: None,
            },
        );
    }

    /// Routes a request under `/net`; `parts` follow the `net` segment.
    pub fn handle(&self, method: &str, parts: &[&str], req: &Request) -> Response {
        let r = match (method, parts) {
            ("GET", ["mappings"]) => Ok(self.mappings()),
            ("PUT", ["mappings"]) => self.put_mapping(req),
            ("DELETE", ["mappings", vni, mac]) => self.delete_mapping(vni, mac),
            ("GET", ["interfaces"]) => Ok(self.list()),
            ("PUT", ["interfaces", id]) => self.create(id, req),
            ("DELETE", ["interfaces", id]) => self.delete(id),
            ("GET", ["interfaces", id, "counters"]) => self.counters(id),
            (
                _,
                ["mappings"]
                | ["mappings", _, _]
                | ["interfaces"]
                | ["interfaces", _]
                | ["interfaces", _, "counters"],
            ) => Err(Response::error(405, "Method not allowed")),
            _ => Err(Response::error(404, "No such /net route")),
        };
        r.unwrap_or_else(|e| e)
    }

    fn mappings(&self) -> Response {
        let list: Vec<Value> = self
            .table
            .snapshot()
            .list()
            .iter()
            .map(|(vni, mac, ip, host)| {
                json!({ "vni": vni, "mac": mac_str(mac), "ip": ip.to_string(), "host": host.to_string() })
            })
            .collect();
        Response::json(200, &json!({ "mappings": list }))
    }

    fn put_mapping(&self, req: &Request) -> Result<Response, Response> {
        let b: MappingBody = body(req)?;
        let mac = parse_mac(&b.mac)
            .ok_or_else(|| Response::error(400, format!("Bad MAC {:?}", b.mac)))?;
        self.table
            .edit(|t| t.add_remote(b.vni, mac, b.ip, b.host))
            .map_err(|e| Response::error(400, chain(&e)))?;
        Ok(Response::empty())
    }

    fn delete_mapping(&self, vni: &str, mac: &str) -> Result<Response, Response> {
        let vni: u32 = vni
            .parse()
            .map_err(|_| Response::error(400, format!("Bad VNI {vni:?}")))?;
        let mac = parse_mac(mac).ok_or_else(|| Response::error(400, format!("Bad MAC {mac:?}")))?;
        if self.table.edit(|t| t.remove_remote(vni, &mac)) {
            Ok(Response::empty())
        } else {
            Err(Response::error(404, "No such mapping"))
        }
    }

    fn list(&self) -> Response {
        let nics = self.nics();
        let mut ids: Vec<&String> = nics.keys().collect();
        ids.sort();
        let list: Vec<Value> = ids.iter().map(|id| nics[*id].summary.clone()).collect();
        Response::json(200, &json!({ "interfaces": list }))
    }

    fn create(&self, id: &str, req: &Request) -> Result<Response, Response> {
        if !valid_id(id) {
            return Err(Response::error(400, format!("Bad interface id {id:?}")));
        }
        let b: NicBody = body(req)?;
        let mut nics = self.nics();
        if nics.contains_key(id) {
            return Err(Response::error(409, format!("Interface {id} exists")));
        }
        if nics.len() >= MAX_NICS {
            return Err(Response::error(409, "Too many interfaces"));
        }
        let cfg = self.config(&b)?;
        let summary = json!({
            "id": id, "tap": b.tap, "vhost_user": b.vhost_user, "vni": b.vni, "mac": b.mac, "ip": b.ip.to_string(),
            "host": b.host.to_string(), "policy": format!("{:?}", cfg.policy).to_lowercase(),
            "paths": b.paths.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "offload": cfg.offload,
        });
        let mut dp = Dataplane::new(cfg).map_err(|e| Response::error(400, chain(&e)))?;
        let counters = dp.counters();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let worker = std::thread::Builder::new()
            .name(format!("net-{id}"))
            .spawn(move || {
                if let Err(e) = dp.run(&flag) {
                    log::error!("Overlay NIC stopped: {}", chain(&e));
                }
            })
            .map_err(|e| Response::error(500, format!("Cannot start a worker: {e}")))?;
        nics.insert(
            id.to_owned(),
            Nic {
                summary: summary.clone(),
                counters,
                stop,
                worker: Some(worker),
            },
        );
        Ok(Response::json(201, &summary))
    }

    fn config(&self, b: &NicBody) -> Result<Config, Response> {
        let bad = |m: String| Response::error(400, m);
        let mac = parse_mac(&b.mac).ok_or_else(|| bad(format!("Bad MAC {:?}", b.mac)))?;
        let policy = b
            .policy
            .as_deref()
            .unwrap_or("adaptive")
            .parse::<Policy>()
            .map_err(|e| bad(chain(&e)))?;
        Ok(Config {
            nic: match (&b.tap, &b.vhost_user) {
                (Some(tap), None) => NicSpec::Tap(tap.clone()),
                (None, Some(socket)) => NicSpec::VhostUser(socket.clone()),
                _ => return Err(bad("Give one of tap and vhost_user".into())),
            },
            port: Port {
                vni: b.vni,
                mac,
                ip: b.ip,
            },
            host: b.host,
            table: self.table.clone(),
            paths: b.paths.iter().map(|&local| PathSpec { local }).collect(),
            listen: b
                .listen
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 6081)),
            policy,
            timing: Timing::default(),
            reorder: reorder::Limits {
                timeout_us: b.reorder_timeout_us.unwrap_or(10_000),
                ..Default::default()
            },
            offload: b.offload.unwrap_or(true),
            underlay_mtu: b.underlay_mtu.unwrap_or(1500),
            train: b.train.unwrap_or(0),
        })
    }

    fn delete(&self, id: &str) -> Result<Response, Response> {
        // Dropping the NIC stops and joins its worker, outside the lock.
        let nic = self.nics().remove(id);
        match nic {
            Some(n) => {
                drop(n);
                Ok(Response::empty())
            }
            None => Err(Response::error(404, format!("No interface {id}"))),
        }
    }

    fn counters(&self, id: &str) -> Result<Response, Response> {
        let nics = self.nics();
        let n = nics
            .get(id)
            .ok_or_else(|| Response::error(404, format!("No interface {id}")))?;
        Ok(Response::json(200, &counters_json(&n.counters.snapshot())))
    }
}

/// Serves only the `/net` routes on `socket` (mode 0600) until the process ends: the API of
/// `outboard-card net`, which runs one NIC without a volume store.
pub fn serve(net: Arc<Net>, socket: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("Cannot bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let net = Arc::clone(&net);
                if let Err(e) = std::thread::Builder::new()
                    .name("api".into())
                    .spawn(move || connection(&net, s))
                {
                    log::warn!("Cannot start an API thread: {e}");
                }
            }
            Err(e) => log::warn!("API accept failed: {e}"),
        }
    }
    Ok(())
}

fn connection(net: &Net, mut stream: UnixStream) {
    let response = match http::read_request(&mut stream) {
        Ok(req) => {
            let path = req.path.split('?').next().unwrap_or_default();
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            match parts.split_first() {
                Some((&"net", rest)) => net.handle(&req.method, rest, &req),
                _ => Response::error(404, format!("No route {path}")),
            }
        }
        Err(r) => r,
    };
    http::write_response(&mut stream, &response);
}
