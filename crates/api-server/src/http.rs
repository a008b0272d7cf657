//! Just enough HTTP/1.1 for a local control API: one request at a time per connection,
//! `Content-Length` bodies only (no chunked encoding), bounded header and body sizes.

use crate::{route, ApiError, ApiHandler, ApiResponse, IO_TIMEOUT};
use outboard_api_types::ErrorBody;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted; API bodies are small JSON documents.
pub const MAX_BODY: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;

/// A parsed request, borrowed from nothing: owned strings so the buffer can be reused.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

/// Why reading a request ended without one.
#[derive(Debug)]
enum ReadError {
    /// The peer closed the connection between requests: normal end.
    Closed,
    /// The request is malformed or too large: answer 4xx, then close.
    Bad(ApiError),
    /// A socket error or timeout: just close.
    Io,
}

pub fn serve_connection(mut stream: UnixStream, handler: &dyn ApiHandler) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = Vec::with_capacity(1024);
    loop {
        let request = match read_request(&mut stream, &mut buf) {
            Ok(r) => r,
            Err(ReadError::Bad(e)) => {
                let _ = write_response(&mut stream, Err(e), false);
                return;
            }
            Err(ReadError::Closed | ReadError::Io) => return,
        };
        let result = route(&request.method, &request.target, &request.body)
            .and_then(|req| handler.handle(req));
        if write_response(&mut stream, result, request.keep_alive).is_err() || !request.keep_alive {
            return;
        }
    }
}

/// Reads one request from `stream`. `buf` carries bytes already read past the previous request.
fn read_request(stream: &mut impl Read, buf: &mut Vec<u8>) -> Result<Request, ReadError> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(parsed) = parse_head(buf)? {
            let (method, target, keep_alive, content_length, head_len) = parsed;
            if content_length > MAX_BODY {
                return Err(ReadError::Bad(ApiError {
                    status: 413,
                    message: format!("Request body of {content_length} bytes exceeds {MAX_BODY}"),
                }));
            }
            while buf.len() < head_len + content_length {
                let n = stream.read(&mut chunk).map_err(|_| ReadError::Io)?;
                if n == 0 {
                    return Err(ReadError::Io);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head_len..head_len + content_length].to_vec();
            buf.drain(..head_len + content_length);
            return Ok(Request {
                method,
                target,
                body,
                keep_alive,
            });
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Bad(ApiError {
                status: 431,
                message: format!("Request head exceeds {MAX_HEAD} bytes"),
            }));
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(ReadError::Io),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                ReadError::Closed
            } else {
                ReadError::Io
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

type Head = (String, String, bool, usize, usize);

/// Parses the request head if it is complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(ReadError::Bad(ApiError::bad_request(format!(
                "Malformed HTTP request: {e}"
            ))))
        }
    };
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default().to_string();
    let http11 = req.version == Some(1);
    let mut keep_alive = http11;
    let mut content_length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| ReadError::Bad(ApiError::bad_request("Invalid Content-Length")))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::Bad(ApiError {
                status: 411,
                message: "Transfer-Encoding is not supported: send Content-Length".into(),
            }));
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    Ok(Some((method, target, keep_alive, content_length, head_len)))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

fn write_response(
    stream: &mut impl Write,
    result: Result<ApiResponse, ApiError>,
    keep_alive: bool,
) -> io::Result<()> {
    let (status, content_type, body) = match result {
        Ok(ApiResponse::NoContent) => (204, None, Vec::new()),
        Ok(ApiResponse::Json(v)) => (200, Some("application/json"), v.to_string().into_bytes()),
        Ok(ApiResponse::Bytes { content_type, body }) => (200, Some(content_type), body),
        Err(e) => {
            let body = serde_json::to_vec(&ErrorBody {
                fault_message: e.message,
            })
            .unwrap_or_default();
            (e.status, Some("application/json"), body)
        }
    };
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8]) -> Vec<Result<Request, String>> {
        let mut cursor = io::Cursor::new(input.to_vec());
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_request(&mut cursor, &mut buf) {
                Ok(r) => out.push(Ok(r)),
                Err(ReadError::Closed) => return out,
                Err(ReadError::Bad(e)) => {
                    out.push(Err(format!("{} {}", e.status, e.message)));
                    return out;
                }
                Err(ReadError::Io) => {
                    out.push(Err("io".into()));
                    return out;
                }
            }
        }
    }

    #[test]
    fn pipelined_requests_are_split_by_content_length() {
        let input =
            b"PUT /actions HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        let got = read_all(input);
        assert_eq!(got.len(), 2);
        let first = got[0].as_ref().unwrap();
        assert_eq!(first.method, "PUT");
        assert_eq!(first.body, b"hello");
        assert!(first.keep_alive);
        assert_eq!(got[1].as_ref().unwrap().target, "/");
    }

    #[test]
    fn oversized_body_is_refused_before_it_is_read() {
        let input = format!(
            "PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let got = read_all(input.as_bytes());
        assert!(got[0].as_ref().unwrap_err().starts_with("413"));
    }

    #[test]
    fn endless_headers_are_refused() {
        let mut input = b"GET / HTTP/1.1\r\n".to_vec();
        while input.len() < MAX_HEAD + 10 {
            input.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let got = read_all(&input);
        let err = got[0].as_ref().unwrap_err();
        assert!(err.starts_with("431") || err.starts_with("400"), "{err}");
    }

    #[test]
    fn garbage_and_bad_lengths_get_400() {
        for input in [
            &b"\x00\x01\x02 garbage\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            let got = read_all(input);
            assert!(got[0].as_ref().unwrap_err().starts_with("400"), "{got:?}");
        }
    }

    #[test]
    fn truncated_body_is_an_io_end_not_a_request() {
        let got = read_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 50\r\n\r\nshort");
        assert_eq!(got, vec![Err("io".to_string())]);
    }

    #[test]
    fn http10_and_connection_close_end_keep_alive() {
        let got = read_all(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!got[0].as_ref().unwrap().keep_alive);
        assert!(!got[1].as_ref().unwrap().keep_alive);
    }

    #[test]
    fn error_response_has_json_fault_message() {
        let mut out = Vec::new();
        write_response(&mut out, Err(ApiError::conflict("VM is not running")), true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"));
        assert!(
            text.ends_with(r#"{"fault_message":"VM is not running"}"#),
            "{text}"
        );
    }
}
