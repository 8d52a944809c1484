//! A minimal HTTP/1.1 server on std (TCP or unix socket): one thread per listener, one request
//! per connection (`Connection: close`). Enough for probes, a Prometheus scrape and the
//! plugin's log POSTs, with no async runtime (the agent's idle memory stays small).
use std::io::{BufRead as _, BufReader, Read, Write};
use std::time::Duration;

/// Largest request body accepted (the plugin's log batch).
pub const MAX_BODY: usize = 4 << 20;

pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Reads one request; on a malformed or oversized one, the status to answer.
pub fn read_request(stream: &mut impl Read) -> Result<Request, u16> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|_| 400u16)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(400);
    };
    let path = target.split('?').next().unwrap_or(target).to_string();
    let method = method.to_string();
    let mut content_length = 0usize;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).map_err(|_| 400u16)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                content_length = v.parse().map_err(|_| 400u16)?;
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|_| 400u16)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| 400u16)?;
            if body.len() + size > MAX_BODY {
                return Err(413);
            }
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).map_err(|_| 400u16)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).map_err(|_| 400u16)?;
        }
    } else {
        if content_length > MAX_BODY {
            return Err(413);
        }
        body.resize(content_length, 0);
        r.read_exact(&mut body).map_err(|_| 400u16)?;
    }
    Ok(Request { method, path, body })
}

pub fn write_response(stream: &mut impl Write, resp: &Response) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&resp.body);
    let _ = stream.flush();
}

/// Handles one connection: read, answer, close.
fn handle<S: Read + Write>(mut s: S, handler: &dyn Fn(&Request) -> Response) {
    let resp = match read_request(&mut s) {
        Ok(req) => handler(&req),
        Err(status) => Response::text(status, reason(status)),
    };
    write_response(&mut s, &resp);
}

/// Serves a TCP listener on a background thread.
pub fn serve_tcp(
    name: &str,
    listener: std::net::TcpListener,
    handler: impl Fn(&Request) -> Response + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(128 << 10)
        .spawn(move || {
            for s in listener.incoming().flatten() {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                handle(s, &handler);
            }
        })?;
    Ok(())
}

/// Serves a unix-socket listener on a background thread. Connections are handled one at a
/// time (so the plugin's log batches never interleave) with a 1 s timeout, the plugin's own.
pub fn serve_unix(
    name: &str,
    listener: std::os::unix::net::UnixListener,
    handler: impl Fn(&Request) -> Response + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 << 10)
        .spawn(move || {
            for s in listener.incoming().flatten() {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                handle(s, &handler);
            }
        })?;
    Ok(())
}

/// Binds `:port` on all addresses, dual-stack when the host has IPv6 (like Go's `:port`).
pub fn bind_all(port: u16) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(("::", port))
        .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked() {
        let raw = b"POST /log HTTP/1.1\r\nHost: unix\r\nContent-Length: 4\r\n\r\n[\"\"]";
        let r = read_request(&mut &raw[..]).ok().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_slice()),
            ("POST", "/log", &b"[\"\"]"[..])
        );
        let raw = b"POST /log?x=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = read_request(&mut &raw[..]).ok().unwrap();
        assert_eq!(
            (r.path.as_str(), r.body.as_slice()),
            ("/log", &b"abcde"[..])
        );
        assert_eq!(read_request(&mut &b"\r\n"[..]).err(), Some(400));
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(read_request(&mut big.as_bytes()).err(), Some(413));
    }
}
