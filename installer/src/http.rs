//! HTTP/1.1 for the probes (`:8000`), the Prometheus scrape (`MONITORING_PORT`) and the
//! plugin's log POSTs (a unix socket), on hyper with a current-thread tokio runtime: one
//! thread per listener, so the agent stays small.
//!
//! The TCP ports are bound on every address of a host-network pod, so any pod on the node can
//! reach them. Every connection therefore has a deadline for its whole exchange, the request
//! head and body have size limits, and a listener serves a bounded number of connections at
//! once: a slow or hostile client holds one slot for at most the deadline, never the agent.
//! One request per connection (`Connection: close`). Handlers are plain functions: they run
//! to completion on the listener's thread, so two log batches never interleave.
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use std::{convert::Infallible, sync::Arc, time::Duration};
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest request body accepted on the log socket (the plugin's log batch).
pub const MAX_BODY: usize = 4 << 20;

/// What one listener allows a client.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The whole exchange of one connection: request head, body and response.
    pub deadline: Duration,
    /// Request line and headers (hyper's read buffer; 8 KiB at least).
    pub head_bytes: usize,
    pub body_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Limits {
    /// The probe and metrics ports: kubelet and Prometheus send small GETs.
    pub const PORTS: Limits = Limits {
        deadline: Duration::from_secs(5),
        head_bytes: 16 << 10,
        body_bytes: 64 << 10,
        max_connections: 32,
    };
    /// The plugin's log socket: one batch per request.
    pub const LOG_SOCKET: Limits = Limits {
        deadline: Duration::from_secs(5),
        head_bytes: 16 << 10,
        body_bytes: MAX_BODY,
        max_connections: 32,
    };
}

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

/// A listener to serve.
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Serves `listener` on a thread of its own named `name`, within `limits`.
pub fn serve(
    name: &str,
    listener: Listener,
    limits: Limits,
    handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let handler: Handler = Arc::new(handler);
    let name = name.to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .stack_size(256 << 10)
        .spawn(move || runtime.block_on(accept_loop(&name, listener, limits, handler)))?;
    Ok(())
}

async fn accept_loop(name: &str, listener: Listener, limits: Limits, handler: Handler) {
    let served = match listener {
        Listener::Tcp(l) => accept_each(name, into_tokio_tcp(l), limits, handler).await,
        Listener::Unix(l) => accept_each(name, into_tokio_unix(l), limits, handler).await,
    };
    if let Err(e) = served {
        log::error!("{name}: cannot serve: {e}");
    }
}

fn into_tokio_tcp(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

fn into_tokio_unix(
    l: std::os::unix::net::UnixListener,
) -> std::io::Result<tokio::net::UnixListener> {
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// tokio's TCP and unix listeners, as one.
trait AcceptStream {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream>;
}

impl AcceptStream for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl AcceptStream for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

async fn accept_each(
    name: &str,
    listener: std::io::Result<impl AcceptStream>,
    limits: Limits,
    handler: Handler,
) -> std::io::Result<()> {
    let listener = listener?;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let stream = match listener.accept_stream().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                log::warn!("{name}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            serve_connection(stream, limits, handler).await;
            drop(slot);
        });
    }
}

async fn serve_connection<S>(stream: S, limits: Limits, handler: Handler)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(respond(req, limits, &handler).await) }
    });
    let connection = http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(limits.head_bytes.max(8192))
        .serve_connection(TokioIo::new(stream), service);
    // Past the deadline the connection is dropped, whatever it was doing.
    let _ = tokio::time::timeout(limits.deadline, connection).await;
}

async fn respond(
    req: hyper::Request<Incoming>,
    limits: Limits,
    handler: &Handler,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), limits.body_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return reply(Response::text(413, "request body too large\n"));
        }
        Err(_) => return reply(Response::text(400, "bad request body\n")),
    };
    reply(handler(&Request { method, path, body }))
}

fn reply(r: Response) -> hyper::Response<Full<Bytes>> {
    let status =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = hyper::Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(r.content_type),
    );
    resp
}

/// Binds `:port` on all addresses, dual-stack when the host has IPv6 (like Go's `:port`).
pub fn bind_all(port: u16) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(("::", port))
        .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        time::Instant,
    };

    const QUICK: Limits = Limits {
        deadline: Duration::from_millis(500),
        head_bytes: 8192,
        body_bytes: 1024,
        max_connections: 4,
    };

    /// A server on 127.0.0.1 that echoes the request's method, path and body length.
    fn server(limits: Limits) -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve("test", Listener::Tcp(l), limits, |req| {
            Response::text(
                200,
                format!("{} {} {}", req.method, req.path, req.body.len()),
            )
        })
        .unwrap();
        addr
    }

    /// Sends `raw`, returns what came back before the server closed (or 2 s passed).
    fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(raw);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status(reply: &str) -> Option<u16> {
        reply.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn answers_content_length_and_chunked_requests() {
        let addr = server(QUICK);
        let r = exchange(
            addr,
            b"POST /log?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n[\"\"]",
        );
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("POST /log 4"),
            "{r}"
        );
        let r = exchange(
            addr,
            b"POST /log HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        assert!(r.ends_with("POST /log 5"), "{r}");
        assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    }

    /// The request that crashed the hand-written server (a chunk size that overflowed its
    /// length check, then a slice panic that aborted install-cni): refused, and the server
    /// goes on answering.
    #[test]
    fn a_chunk_size_that_overflows_is_refused_and_the_server_keeps_serving() {
        let addr = server(QUICK);
        for _ in 0..3 {
            let r = exchange(
                addr,
                b"POST /log HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\nb\r\n",
            );
            assert!(matches!(status(&r), Some(400 | 413) | None), "{r}");
        }
        let r = exchange(addr, b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(r.ends_with("GET /readyz 0"), "{r}");
    }

    #[test]
    fn bodies_and_heads_above_their_limits_are_refused() {
        let addr = server(QUICK);
        let big = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{}",
            QUICK.body_bytes + 1,
            "x".repeat(QUICK.body_bytes + 1)
        );
        assert_eq!(status(&exchange(addr, big.as_bytes())), Some(413));
        let chunked = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            QUICK.body_bytes + 1,
            "x".repeat(QUICK.body_bytes + 1)
        );
        assert_eq!(status(&exchange(addr, chunked.as_bytes())), Some(413));
        let head = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "y".repeat(64 << 10)
        );
        assert_eq!(status(&exchange(addr, head.as_bytes())), Some(431));
        assert!(exchange(addr, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n").ends_with("GET /ok 0"));
    }

    /// Clients that send half a request and stop hold their slots only until the deadline;
    /// meanwhile other connections are answered.
    #[test]
    fn slow_clients_neither_block_others_nor_keep_their_slots() {
        let addr = server(QUICK);
        let started = Instant::now();
        let stalled: Vec<TcpStream> = (0..QUICK.max_connections - 1)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /slow HTTP/1.1\r\nHost:").unwrap();
                s
            })
            .collect();
        let r = exchange(addr, b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(r.ends_with("GET /readyz 0"), "{r}");
        assert!(
            started.elapsed() < QUICK.deadline,
            "answered only after the deadline"
        );
        // Every slot taken: the next connection waits until the stalled ones are cut.
        let mut last = TcpStream::connect(addr).unwrap();
        last.write_all(b"GET /slow HTTP/1.1\r\nHost:").unwrap();
        let r = exchange(addr, b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(r.ends_with("GET /after 0"), "{r}");
        assert!(started.elapsed() >= QUICK.deadline, "the cap did not hold");
        for mut s in stalled {
            let mut buf = [0u8; 1];
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            // Cut at the deadline: EOF (or a reset), not a hang.
            assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
        }
        let _ = last.write_all(b"\r\n");
    }
}
