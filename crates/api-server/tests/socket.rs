//! The server over a real Unix socket: keep-alive, errors as JSON, stale sockets, busy paths.

use outboard_api_server::{ApiError, ApiHandler, ApiRequest, ApiResponse, ApiServer};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Recorder(Mutex<Vec<ApiRequest>>);

impl ApiHandler for Recorder {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.0.lock().unwrap().push(request.clone());
        match request {
            ApiRequest::GetVersion => Ok(ApiResponse::Json(serde_json::json!({"vmm_version":"t"}))),
            ApiRequest::PatchVm(_) => Err(ApiError::conflict("VM is not running")),
            _ => Ok(ApiResponse::NoContent),
        }
    }
}

fn read_response(stream: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).unwrap();
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if out.len() >= head_end + 4 + len {
                return text;
            }
        }
        assert!(n > 0, "connection closed early: {text}");
    }
}

#[test]
fn serves_typed_requests_over_keep_alive_and_replaces_stale_socket() {
    let dir = std::env::temp_dir().join(format!("outboard-api-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    // A stale socket file from a dead process must not stop the bind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let handler = Arc::new(Recorder::default());
    ApiServer::bind(&path)
        .unwrap()
        .spawn(handler.clone())
        .unwrap();

    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s);
    assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
    assert!(r.ends_with(r#"{"vmm_version":"t"}"#), "{r}");

    let body = r#"{"state":"Paused"}"#;
    write!(
        s,
        "PATCH /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let r = read_response(&mut s);
    assert!(r.starts_with("HTTP/1.1 409 Conflict"), "{r}");
    assert!(
        r.contains(r#"{"fault_message":"VM is not running"}"#),
        "{r}"
    );

    s.write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}")
        .unwrap();
    let r = read_response(&mut s);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(
        handler.0.lock().unwrap().len(),
        2,
        "malformed request reached the handler"
    );

    // A live socket is not stolen by a second server.
    assert!(ApiServer::bind(&path).is_err());
    // A regular file at the path is refused, not deleted.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    assert!(ApiServer::bind(&file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    let _ = std::fs::remove_dir_all(&dir);
}
