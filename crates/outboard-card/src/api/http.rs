//! Just enough HTTP/1.1 for the control API: one request per connection, bounded head and
//! body, timeouts, JSON responses. Clients are hostile: every limit answers 400/413, never a
//! panic or an unbounded allocation.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use zeroize::Zeroizing;

/// Largest request head.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send its request.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request. The body may hold key material: it is zeroized when dropped.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Zeroizing<Vec<u8>>,
}

/// A response: status and JSON body (empty for 204).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Self {
            status,
            body: value.to_string(),
        }
    }

    pub fn empty() -> Self {
        Self {
            status: 204,
            body: String::new(),
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(
            status,
            &serde_json::json!({ "fault_message": message.into() }),
        )
    }
}

/// Reads one request; `Err` is the response to send instead.
pub fn read_request(stream: &mut UnixStream) -> Result<Request, Response> {
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let mut buf = Zeroizing::new(Vec::with_capacity(1024));
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(Response::error(400, "Request head too large"));
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(Response::error(400, "Incomplete request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Response::error(400, "Malformed request")),
    }
    let method = req.method.unwrap_or_default().to_owned();
    let path = req.path.unwrap_or_default().to_owned();
    let mut length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Response::error(400, "Bad Content-Length"))?;
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(400, "Chunked bodies are not supported"));
        }
    }
    if length > MAX_BODY {
        return Err(Response::error(413, "Request body too large"));
    }
    let mut body = Zeroizing::new(buf[head_len..].to_vec());
    while body.len() < length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(Response::error(400, "Incomplete body")),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(length);
    chunk.fill(0);
    Ok(Request { method, path, body })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        _ => "Internal Server Error",
    }
}

/// Writes `r` and ends the exchange (the connection is closed after one request).
pub fn write_response(stream: &mut UnixStream, r: &Response) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(r.body.as_bytes());
}
