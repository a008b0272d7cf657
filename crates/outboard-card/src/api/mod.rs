//! The card's control API: REST with JSON bodies over a Unix socket (see
//! openapi/outboard-card.yaml).
//!
//! It owns the backing stores ([`stores`]: one or more, each with its volume table, names
//! unique across them) and the attachments (volume → vhost-user-blk server). Keys arrive in
//! attach requests, live only in the attached device, and are zeroized on detach.
//!
//! ```text
//!  volume: created ──attach──► attached ──detach──► created ──delete──► gone
//!             │ grow                   │ grow (live: device extended, front end told),
//!                                      │ qos (live), stats
//! ```
//!
//! Locks are taken stores first, then attachments, so a grow and an attach of the same volume
//! cannot interleave (the device always has the table's extents).

mod http;
pub mod net;
mod stores;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use outboard_card_storage::blk::device::VolumeDevice;
use outboard_card_storage::table::Volume;
use outboard_card_storage::throttle::{Limit, Limits};
use outboard_card_storage::vhost::Server;
use outboard_card_storage::xts::{XtsKey, KEY_LEN};
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::{Zeroize, Zeroizing};

use http::{Request, Response};
use stores::Stores;

struct Attachment {
    dev: Arc<VolumeDevice>,
    server: Server,
}

/// The card's state behind the API.
pub struct Card {
    stores: Mutex<Stores>,
    attached: Mutex<HashMap<String, Attachment>>,
    net: net::Net,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    size: u64,
    /// The backing store to put it on (its path); default: the one with the most free space.
    #[serde(default)]
    store: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrowBody {
    size: u64,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct QosBody {
    iops: Option<u64>,
    iops_burst: Option<u64>,
    iops_read: Option<u64>,
    iops_write: Option<u64>,
    bandwidth: Option<u64>,
    bandwidth_burst: Option<u64>,
    bandwidth_read: Option<u64>,
    bandwidth_write: Option<u64>,
    /// Bytes counted as one operation (default 256 KiB).
    op_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachBody {
    socket: PathBuf,
    #[serde(default)]
    key_hex: Option<String>,
    #[serde(default = "one")]
    queues: usize,
    #[serde(default)]
    qos: QosBody,
}

fn one() -> usize {
    1
}

fn limits(q: QosBody) -> Limits {
    let l = |rate: Option<u64>, burst: Option<u64>| {
        rate.map(|rate| match burst {
            Some(burst) => Limit { rate, burst },
            None => Limit::rate(rate),
        })
    };
    // Per-direction limits share the burst of their kind.
    Limits {
        iops_total: l(q.iops, q.iops_burst),
        iops_read: l(q.iops_read, q.iops_burst),
        iops_write: l(q.iops_write, q.iops_burst),
        bw_total: l(q.bandwidth, q.bandwidth_burst),
        bw_read: l(q.bandwidth_read, q.bandwidth_burst),
        bw_write: l(q.bandwidth_write, q.bandwidth_burst),
        op_size: q.op_size.unwrap_or(Limits::default().op_size),
    }
}

fn volume_json(v: &Volume, store: &str, attached: Option<&Attachment>) -> Value {
    let extents: Vec<Value> = v
        .extents
        .iter()
        .map(|e| json!({ "physical": e.physical, "length": e.length }))
        .collect();
    json!({
        "name": v.name,
        "size": v.size,
        "store": store,
        "extents": extents,
        "attached": attached.map(|a| a.server.socket().display().to_string()),
    })
}

/// Decodes 128 hex digits into a key; the digits are zeroized by the caller.
fn parse_key(hex: &str) -> Result<XtsKey, String> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 2 * KEY_LEN {
        return Err(format!("key_hex must be {} hex digits", 2 * KEY_LEN));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match (d(pair[0]), d(pair[1])) {
            (Some(h), Some(l)) => key[i] = h << 4 | l,
            _ => return Err("key_hex is not hex".into()),
        }
    }
    XtsKey::from_bytes(&key[..]).map_err(|e| e.to_string())
}

fn no_volume(name: &str) -> Response {
    Response::error(404, format!("No volume {name}"))
}

fn body<T: for<'a> Deserialize<'a>>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("Bad request body: {e}")))
}

/// Chain of an error's sources, for fault messages.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Card {
    /// Opens the volume tables of the backing stores (see [`Stores::open`]).
    pub fn open(backing: &[PathBuf]) -> Result<Self> {
        Ok(Self {
            stores: Mutex::new(Stores::open(backing)?),
            attached: Mutex::new(HashMap::new()),
            net: net::Net::default(),
        })
    }

    fn stores(&self) -> MutexGuard<'_, Stores> {
        self.stores.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attached(&self) -> MutexGuard<'_, HashMap<String, Attachment>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes one request.
    pub fn handle(&self, req: &Request) -> Response {
        let path = req.path.split('?').next().unwrap_or_default();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let r = match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["stores"]) => Ok(self.list_stores()),
            ("GET", ["volumes"]) => Ok(self.list()),
            ("POST", ["volumes"]) => self.create(req),
            ("GET", ["volumes", name]) => self.get(name),
            ("PATCH", ["volumes", name]) => self.grow(name, req),
            ("DELETE", ["volumes", name]) => self.delete(name),
            ("PUT", ["volumes", name, "attachment"]) => self.attach(name, req),
            ("DELETE", ["volumes", name, "attachment"]) => self.detach(name),
            ("PUT", ["volumes", name, "qos"]) => self.qos(name, req),
            ("GET", ["volumes", name, "stats"]) => self.stats(name),
            (
                _,
                ["stores"]
                | ["volumes"]
                | ["volumes", _]
                | ["volumes", _, "attachment" | "qos" | "stats"],
            ) => Err(Response::error(405, "Method not allowed")),
            (m, ["net", rest @ ..]) => Ok(self.net.handle(m, rest, req)),
            _ => Err(Response::error(404, format!("No route {path}"))),
        };
        r.unwrap_or_else(|e| e)
    }

    fn list_stores(&self) -> Response {
        let stores = self.stores();
        let list: Vec<Value> = stores
            .iter()
            .map(|s| {
                let t = s.table.table();
                json!({
                    "path": s.name(),
                    "size": t.device_size,
                    "free": t.free_bytes(),
                    "volumes": t.volumes.len(),
                })
            })
            .collect();
        Response::json(200, &json!({ "stores": list }))
    }

    fn list(&self) -> Response {
        let stores = self.stores();
        let attached = self.attached();
        let vols: Vec<Value> = stores
            .iter()
            .flat_map(|s| {
                let name = s.name();
                let attached = &attached;
                s.table
                    .list()
                    .iter()
                    .map(move |v| volume_json(v, &name, attached.get(&v.name)))
                    .collect::<Vec<_>>()
            })
            .collect();
        Response::json(
            200,
            &json!({ "volumes": vols, "free": stores.free_bytes() }),
        )
    }

    fn get(&self, name: &str) -> Result<Response, Response> {
        let stores = self.stores();
        let (i, v) = stores.find(name).ok_or_else(|| no_volume(name))?;
        Ok(Response::json(
            200,
            &volume_json(v, &stores.get(i).name(), self.attached().get(name)),
        ))
    }

    fn edit_error(e: outboard_card_storage::table::Error) -> Response {
        use outboard_card_storage::table::{EditError, Error};
        let status = match &e {
            Error::Edit(EditError::NotFound(_)) => 404,
            Error::Edit(EditError::Exists(_)) => 409,
            Error::Edit(EditError::NoSpace { .. } | EditError::Full(_)) => 409,
            Error::Edit(_) => 400,
            _ => 500,
        };
        Response::error(status, chain(&e))
    }

    fn create(&self, req: &Request) -> Result<Response, Response> {
        let b: CreateBody = body(req)?;
        let mut stores = self.stores();
        // Names are unique across the card, not only within a store.
        if stores.find(&b.name).is_some() {
            return Err(Response::error(
                409,
                format!("Volume {} already exists", b.name),
            ));
        }
        let i = match &b.store {
            Some(s) => stores
                .by_name(s)
                .ok_or_else(|| Response::error(400, format!("No backing store {s}")))?,
            None => stores.roomiest(),
        };
        let store = stores.get_mut(i);
        let v = store
            .table
            .create(&b.name, b.size)
            .map_err(Self::edit_error)?;
        Ok(Response::json(201, &volume_json(&v, &store.name(), None)))
    }

    /// Grows a volume; an attached one grows live: its device takes the new extents and the
    /// front end is told to read the capacity again.
    fn grow(&self, name: &str, req: &Request) -> Result<Response, Response> {
        let b: GrowBody = body(req)?;
        let mut stores = self.stores();
        let (i, _) = stores.find(name).ok_or_else(|| no_volume(name))?;
        let attached = self.attached();
        let store = stores.get_mut(i);
        let v = store.table.grow(name, b.size).map_err(Self::edit_error)?;
        let store_name = store.name();
        drop(stores);
        let Some(a) = attached.get(name) else {
            return Ok(Response::json(200, &volume_json(&v, &store_name, None)));
        };
        a.dev.grow(v.clone()).map_err(|e| {
            Response::error(
                500,
                format!("Grown on the store but not live: {}", chain(&e)),
            )
        })?;
        let mut out = volume_json(&v, &store_name, Some(a));
        match a.server.config_changed() {
            Ok(told) => out["front_end_notified"] = json!(told),
            Err(e) => {
                log::warn!("Cannot tell the front end of {name} its new size: {e}");
                out["front_end_notified"] = json!(false);
                out["notify_error"] = json!(e.to_string());
            }
        }
        Ok(Response::json(200, &out))
    }

    fn delete(&self, name: &str) -> Result<Response, Response> {
        let mut stores = self.stores();
        let (i, _) = stores.find(name).ok_or_else(|| no_volume(name))?;
        if self.attached().contains_key(name) {
            return Err(Response::error(409, format!("Volume {name} is attached")));
        }
        stores
            .get_mut(i)
            .table
            .delete(name)
            .map_err(Self::edit_error)?;
        Ok(Response::empty())
    }

    fn attach(&self, name: &str, req: &Request) -> Result<Response, Response> {
        let mut b: AttachBody = body(req)?;
        let key = b.key_hex.as_deref().map(parse_key).transpose();
        if let Some(k) = b.key_hex.as_mut() {
            k.zeroize();
        }
        let key = key.map_err(|e| Response::error(400, e))?;
        // Held until the device exists, so that no grow slips in between.
        let stores = self.stores();
        let (i, volume) = stores.find(name).ok_or_else(|| no_volume(name))?;
        let volume = volume.clone();
        let backing = stores.get(i).backing.clone();
        let mut attached = self.attached();
        if attached.contains_key(name) {
            return Err(Response::error(
                409,
                format!("Volume {name} is already attached"),
            ));
        }
        let dev = VolumeDevice::new(volume, backing, key, limits(b.qos))
            .map_err(|e| Response::error(400, chain(&e)))?;
        let dev = Arc::new(dev);
        let server = Server::start(dev.clone(), &b.socket, b.queues)
            .map_err(|e| Response::error(400, chain(&e)))?;
        let socket = server.socket().display().to_string();
        attached.insert(name.to_owned(), Attachment { dev, server });
        Ok(Response::json(201, &json!({ "socket": socket })))
    }

    fn detach(&self, name: &str) -> Result<Response, Response> {
        let a = self
            .attached()
            .remove(name)
            .ok_or_else(|| Response::error(404, format!("Volume {name} is not attached")))?;
        // Stopping joins the server, which drops the last handle on the device: the key is
        // zeroized here.
        let Attachment { dev, server } = a;
        let r = server.stop();
        drop(dev);
        r.map_err(|e| Response::error(500, chain(&e)))?;
        Ok(Response::empty())
    }

    fn qos(&self, name: &str, req: &Request) -> Result<Response, Response> {
        let b: QosBody = body(req)?;
        let attached = self.attached();
        let a = attached
            .get(name)
            .ok_or_else(|| Response::error(404, format!("Volume {name} is not attached")))?;
        a.dev
            .set_limits(limits(b))
            .map_err(|e| Response::error(400, chain(&e)))?;
        Ok(Response::empty())
    }

    fn stats(&self, name: &str) -> Result<Response, Response> {
        let attached = self.attached();
        let a = attached
            .get(name)
            .ok_or_else(|| Response::error(404, format!("Volume {name} is not attached")))?;
        let c = a.dev.counters.snapshot();
        Ok(Response::json(
            200,
            &json!({
                "read_ops": c.read_ops, "write_ops": c.write_ops,
                "read_bytes": c.read_bytes, "write_bytes": c.write_bytes,
                "flushes": c.flushes, "discards": c.discards, "write_zeroes": c.write_zeroes,
                "errors": c.errors, "throttled_ns": c.throttled_ns, "queue_depth": c.queue_depth,
                "zero_copy": c.zero_copy, "wake_late_max_ns": c.wake_late_max_ns,
            }),
        ))
    }
}

fn connection(card: &Card, mut stream: UnixStream) {
    let response = match http::read_request(&mut stream) {
        Ok(req) => card.handle(&req),
        Err(r) => r,
    };
    http::write_response(&mut stream, &response);
}

/// Serves the API on `socket` (mode 0600) until the process ends.
pub fn serve(card: Arc<Card>, socket: &Path) -> Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("Cannot bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    log::info!("Control API on {}", socket.display());
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let card = card.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name("api".into())
                    .spawn(move || connection(&card, s))
                {
                    log::warn!("Cannot start an API thread: {e}");
                }
            }
            Err(e) => log::warn!("API accept failed: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route the router knows is described in the OpenAPI document, and vice versa.
    #[test]
    fn openapi_document_matches_the_router() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../openapi/outboard-card.yaml"
        ))
        .unwrap();
        let documented: Vec<&str> = doc
            .lines()
            .filter(|l| l.starts_with("  /"))
            .map(|l| l.trim().trim_end_matches(':'))
            .collect();
        let routed = [
            "/stores",
            "/volumes",
            "/volumes/{name}",
            "/volumes/{name}/attachment",
            "/volumes/{name}/qos",
            "/volumes/{name}/stats",
            "/net/mappings",
            "/net/mappings/{vni}/{mac}",
            "/net/interfaces",
            "/net/interfaces/{id}",
            "/net/interfaces/{id}/counters",
        ];
        assert_eq!(documented, routed);
    }

    #[test]
    fn keys_parse_strictly() {
        let good = "0f".repeat(32) + &"f0".repeat(32);
        assert!(parse_key(&good).is_ok());
        assert!(parse_key(&good[2..]).is_err());
        assert!(parse_key(&("0g".repeat(32) + &"f0".repeat(32))).is_err());
        assert!(
            parse_key(&"ab".repeat(64)).is_err(),
            "equal halves are weak"
        );
    }
}
