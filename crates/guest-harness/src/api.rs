//! A blocking HTTP/1.1 client for REST APIs on Unix sockets (outboard-vmm's `--api-sock`, the
//! card's API): one request per connection (`Connection: close`), JSON bodies, a timeout on
//! every step. The server is treated as untrusted: an oversized or malformed response is an
//! error, never a panic or a hang.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Responses larger than this are refused.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot send the request to {path}")]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read the response from {path}")]
    Receive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Bad HTTP response from {path}: {reason}")]
    BadResponse { path: PathBuf, reason: &'static str },
    #[error("Socket {path} did not appear within {timeout:?}")]
    NoSocket { path: PathBuf, timeout: Duration },
}

/// A client for one Unix socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client with a 10 s timeout per connect, write and read.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until the server accepts connections (a freshly started VMM creates its socket
    /// a little after it starts).
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if UnixStream::connect(&self.path).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NoSocket {
                    path: self.path.clone(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `method path` with an optional JSON body; returns the status code and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        json: Option<&str>,
    ) -> Result<(u16, String), Error> {
        let connect = |source| Error::Connect {
            path: self.path.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.path).map_err(connect)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(connect)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(connect)?;
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n");
        if let Some(body) = json {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(json.unwrap_or(""));
        (&stream)
            .write_all(request.as_bytes())
            .map_err(|source| Error::Send {
                path: self.path.clone(),
                source,
            })?;
        self.read_response(stream)
    }

    fn read_response(&self, mut stream: UnixStream) -> Result<(u16, String), Error> {
        let bad = |reason| Error::BadResponse {
            path: self.path.clone(),
            reason,
        };
        let deadline = Instant::now() + self.timeout;
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        // (end of headers, end of body where Content-Length gives it), once the head is in.
        let mut head: Option<(usize, Option<usize>)> = None;
        loop {
            if Instant::now() >= deadline {
                return Err(Error::Receive {
                    path: self.path.clone(),
                    source: io::ErrorKind::TimedOut.into(),
                });
            }
            let n = match stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Receive {
                        path: self.path.clone(),
                        source,
                    })
                }
            };
            if n == 0 {
                break; // with no Content-Length, the body ends with the connection
            }
            data.extend_from_slice(&buf[..n]);
            if data.len() > MAX_RESPONSE {
                return Err(bad("response too large"));
            }
            if head.is_none() {
                if let Some(head_end) = find(&data, b"\r\n\r\n") {
                    let length = content_length(&data[..head_end]).map_err(bad)?;
                    head = Some((head_end, length.map(|l| head_end + 4 + l)));
                }
            }
            if let Some((_, Some(end))) = head {
                if data.len() >= end {
                    break;
                }
            }
        }
        let (head_end, expected_end) = head.ok_or_else(|| bad("no end of headers"))?;
        let head =
            std::str::from_utf8(&data[..head_end]).map_err(|_| bad("headers are not UTF-8"))?;
        let status_line = head.lines().next().unwrap_or_default();
        let mut parts = status_line.split(' ');
        if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
            return Err(bad("no HTTP/1.x status line"));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|s| (100..600).contains(s))
            .ok_or_else(|| bad("bad status code"))?;
        let body_end = match expected_end {
            Some(end) if data.len() >= end => end,
            Some(_) => return Err(bad("body shorter than Content-Length")),
            None => data.len(),
        };
        let body = String::from_utf8(data[head_end + 4..body_end].to_vec())
            .map_err(|_| bad("body is not UTF-8"))?;
        Ok((status, body))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> Result<Option<usize>, &'static str> {
    let head = std::str::from_utf8(head).map_err(|_| "headers are not UTF-8")?;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked bodies are not supported");
        }
        if name.trim().eq_ignore_ascii_case("content-length") {
            let length: usize = value.trim().parse().map_err(|_| "bad Content-Length")?;
            if length > MAX_RESPONSE {
                return Err("response too large");
            }
            return Ok(Some(length));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-shot server: reads the request head (and a body if announced), replies `reply`.
    fn serve(
        reply: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&request, b"\r\n\r\n").is_none() {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "the client closed before sending a request");
                request.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8(request).unwrap();
            let length = content_length(text.as_bytes()).unwrap().unwrap_or(0);
            let mut body = text
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .to_string();
            while body.len() < length {
                let n = stream.read(&mut buf).unwrap();
                body.push_str(std::str::from_utf8(&buf[..n]).unwrap());
            }
            stream.write_all(reply).unwrap();
            let head = text.split("\r\n\r\n").next().unwrap().to_string();
            format!("{head}\r\n\r\n{body}")
        });
        (dir, path, handle)
    }

    #[test]
    fn sends_json_and_reads_status_and_body() {
        let (_dir, path, server) =
            serve(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"error\":\"bad x\"}");
        let client = ApiClient::new(&path);
        let (status, body) = client
            .request("PUT", "/vm/config", Some("{\"cpus\":2}"))
            .unwrap();
        assert_eq!((status, body.as_str()), (400, "{\"error\":\"bad x\"}"));
        let request = server.join().unwrap();
        assert!(
            request.starts_with("PUT /vm/config HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Content-Length: 10\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\n{\"cpus\":2}"), "{request}");
    }

    #[test]
    fn reads_a_body_without_content_length_until_close() {
        let (_dir, path, server) = serve(b"HTTP/1.1 200 OK\r\n\r\n{\"state\":\"running\"}");
        let (status, body) = ApiClient::new(&path).request("GET", "/vm", None).unwrap();
        assert_eq!((status, body.as_str()), (200, "{\"state\":\"running\"}"));
        assert!(server.join().unwrap().starts_with("GET /vm HTTP/1.1\r\n"));
    }

    #[test]
    fn malformed_responses_are_errors() {
        for reply in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200",
        ] {
            let (_dir, path, server) = serve(reply);
            let result = ApiClient::new(&path).request("GET", "/", None);
            assert!(
                result.is_err(),
                "{:?} gave {result:?}",
                String::from_utf8_lossy(reply)
            );
            server.join().unwrap();
        }
    }

    #[test]
    fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let _listener = UnixListener::bind(&path).unwrap(); // accepts (backlog) but never answers
        let started = Instant::now();
        let result = ApiClient::new(&path)
            .with_timeout(Duration::from_millis(200))
            .request("GET", "/", None);
        assert!(matches!(result, Err(Error::Receive { .. })), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_missing_socket_is_a_connect_error_and_wait_ready_gives_up() {
        let client = ApiClient::new("/nonexistent/outboard.sock");
        assert!(matches!(
            client.request("GET", "/", None),
            Err(Error::Connect { .. })
        ));
        assert!(matches!(
            client.wait_ready(Duration::from_millis(50)),
            Err(Error::NoSocket { .. })
        ));
    }
}
