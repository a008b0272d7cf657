//! Maps `(method, path, body)` to a typed [`ApiRequest`]. The table [`ROUTES`] is the single list
//! of endpoints; a test checks that `openapi/outboard-vmm.yaml` documents each of them.

use crate::ApiError;
use outboard_api_types::{
    ActionType, BootSource, DiskConfig, InstanceActionInfo, LiveUpdate, MachineConfig, NetConfig,
    RequestedVmState, SerialConfig, SnapshotCreate, VmStatePatch, VsockConfig,
};
use serde::de::DeserializeOwned;

/// A typed API request, as the VMM receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`
    GetInstanceInfo,
    /// `GET /version`
    GetVersion,
    /// `GET /vm/config`
    GetVmConfig,
    /// `GET /metrics`
    GetMetrics,
    /// `PUT /machine-config`
    PutMachineConfig(MachineConfig),
    /// `PUT /boot-source`
    PutBootSource(BootSource),
    /// `PUT /serial`
    PutSerial(SerialConfig),
    /// `PUT /disks`
    PutDisk(DiskConfig),
    /// `PUT /network-interfaces`
    PutNet(NetConfig),
    /// `PUT /vsock`
    PutVsock(VsockConfig),
    /// `PUT /actions`
    Action(ActionType),
    /// `PATCH /vm`
    PatchVm(RequestedVmState),
    /// `PUT /snapshot/create`
    CreateSnapshot(SnapshotCreate),
    /// `PUT /live-update`
    LiveUpdate(LiveUpdate),
    /// `GET /attestation?nonce=<hex>&user_data=<hex>&public_key=<hex>`: the raw query string
    /// (without `?`), parsed by the VMM's attestation code.
    GetAttestation {
        /// The query string, possibly empty.
        query: String,
    },
    /// `GET /attestation/event-log`
    GetAttestationEventLog,
}

/// Every endpoint as `(method, path)`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/vm/config"),
    ("GET", "/metrics"),
    ("PUT", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/serial"),
    ("PUT", "/disks"),
    ("PUT", "/network-interfaces"),
    ("PUT", "/vsock"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/live-update"),
    ("GET", "/attestation"),
    ("GET", "/attestation/event-log"),
];

/// Routes one request. `target` may carry a query string; only `GET /attestation` reads it,
/// other endpoints ignore it.
pub fn route(method: &str, target: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    Ok(match (method, path) {
        ("GET", "/") => ApiRequest::GetInstanceInfo,
        ("GET", "/version") => ApiRequest::GetVersion,
        ("GET", "/vm/config") => ApiRequest::GetVmConfig,
        ("GET", "/metrics") => ApiRequest::GetMetrics,
        ("PUT", "/machine-config") => ApiRequest::PutMachineConfig(json(body)?),
        ("PUT", "/boot-source") => ApiRequest::PutBootSource(json(body)?),
        ("PUT", "/serial") => ApiRequest::PutSerial(json(body)?),
        ("PUT", "/disks") => ApiRequest::PutDisk(json(body)?),
        ("PUT", "/network-interfaces") => ApiRequest::PutNet(json(body)?),
        ("PUT", "/vsock") => ApiRequest::PutVsock(json(body)?),
        ("PUT", "/actions") => ApiRequest::Action(json::<InstanceActionInfo>(body)?.action_type),
        ("PATCH", "/vm") => ApiRequest::PatchVm(json::<VmStatePatch>(body)?.state),
        ("PUT", "/snapshot/create") => ApiRequest::CreateSnapshot(json(body)?),
        ("PUT", "/live-update") => ApiRequest::LiveUpdate(json(body)?),
        ("GET", "/attestation") => ApiRequest::GetAttestation {
            query: query.to_owned(),
        },
        ("GET", "/attestation/event-log") => ApiRequest::GetAttestationEventLog,
        _ if ROUTES.iter().any(|(_, p)| *p == path) => {
            return Err(ApiError::method_not_allowed(format!(
                "Method {method} is not allowed on {path}"
            )))
        }
        _ => return Err(ApiError::not_found(format!("No such resource: {path}"))),
    })
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("Missing JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_requests_come_out_of_json() {
        assert_eq!(
            route(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count":2,"mem_size_mib":256}"#
            )
            .unwrap(),
            ApiRequest::PutMachineConfig(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256
            })
        );
        assert_eq!(
            route("PATCH", "/vm/", br#"{"state":"Resumed"}"#).unwrap(),
            ApiRequest::PatchVm(RequestedVmState::Resumed)
        );
        assert_eq!(
            route("GET", "/?x=1", b"").unwrap(),
            ApiRequest::GetInstanceInfo
        );
        assert_eq!(
            route("GET", "/attestation?nonce=0a0b&user_data=", b"").unwrap(),
            ApiRequest::GetAttestation {
                query: "nonce=0a0b&user_data=".into()
            }
        );
        assert_eq!(
            route("GET", "/attestation", b"").unwrap(),
            ApiRequest::GetAttestation {
                query: String::new()
            }
        );
        assert_eq!(
            route("GET", "/attestation/event-log/", b"").unwrap(),
            ApiRequest::GetAttestationEventLog
        );
        assert_eq!(
            route("PUT", "/actions", br#"{"action_type":"InstanceAbort"}"#).unwrap(),
            ApiRequest::Action(ActionType::InstanceAbort)
        );
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        let status = |m, p, b: &[u8]| route(m, p, b).unwrap_err().status;
        assert_eq!(status("PUT", "/actions", b""), 400);
        assert_eq!(status("PUT", "/actions", b"{not json"), 400);
        assert_eq!(
            status("PUT", "/actions", br#"{"action_type":"Explode"}"#),
            400
        );
        assert_eq!(
            status("PUT", "/machine-config", br#"{"vcpu_count":"two"}"#),
            400
        );
        assert_eq!(status("DELETE", "/vm", b""), 405);
        assert_eq!(status("POST", "/attestation", b""), 405);
        assert_eq!(status("GET", "/nope", b""), 404);
        assert_eq!(status("GET", "", b""), 404);
    }

    #[test]
    fn openapi_document_lists_every_route() {
        let doc = include_str!("../../../openapi/outboard-vmm.yaml");
        for (method, path) in ROUTES {
            let start = doc
                .find(&format!("\n  {path}:\n"))
                .unwrap_or_else(|| panic!("openapi/outboard-vmm.yaml lacks path {path}"));
            let section = &doc[start + 1..];
            let end = section[1..].find("\n  /").map_or(section.len(), |e| e + 1);
            let method = method.to_ascii_lowercase();
            assert!(
                section[..end].contains(&format!("\n    {method}:")),
                "openapi/outboard-vmm.yaml lacks {method} {path}"
            );
        }
    }
}
