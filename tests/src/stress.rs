//! Randomized transfer cases for the accelerator, each drawn from a seed that replays it.
//!
//! A case is a set of concurrent connections (1 to 64) over one path (paired sockets in one
//! pod, or the full sidecar path through HAProxy with Istio's rules), with one shape (one way
//! up, one way down, echo, request/response), a size (1 B to 64 MiB, log-uniform, so many
//! cross the queue bound), write sizes (1 B to 1 MiB), an ending (half-close by the client,
//! the server or both, an abortive close, or a reader that closes with bytes unread), a
//! reader pace (fast, slow, stalled) and an event during the transfer (acceleration switched
//! off and on, the accelerator started again as a restarted agent does, the agent's sweeper
//! stopped as by `kill -9`).
//!
//! Every case checks: every byte in order (the first bad offset otherwise); EOF only after
//! the last byte; only the errors plain TCP gives for the same ending; no socket left in the
//! sockhash once the connections are closed; no reader's queue above its bound (one message
//! may take it past: it goes into an empty queue or takes TCP).
//!
//! Sockets are non-blocking and polled, as event-driven proxies and runtimes use them. A
//! blocking `recv()` on a paired socket can fail with EAGAIN when a wakeup carries no data (a
//! 6.18 kernel defect, docs/accelerator.md); the harness does not count that as a failure of
//! the bytes, and the docs list it.
use crate::accel::{Accel, Pod, abort_on_close};
use crate::mesh::{Mesh, SidecarPolling};
use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

/// splitmix64: small, fast, and the same sequence for the same seed everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    /// Log-uniform in `1..=max`: as many 1–2 byte cases as 32–64 MiB ones.
    pub fn log_size(&mut self, max: u64) -> u64 {
        let bits = 64 - max.leading_zeros() as u64;
        let b = self.range(0, bits - 1);
        self.range(1 << b, ((1u64 << (b + 1)) - 1).min(max))
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64 - 1) as usize]
    }
}

/// The byte at `offset` of connection `conn`'s stream in direction `dir` of case `seed`:
/// computed, so a reader checks any length without keeping a copy.
pub fn stream_byte(seed: u64, conn: u32, dir: u8, offset: u64) -> u8 {
    let mut z = seed ^ ((conn as u64) << 40) ^ ((dir as u64) << 56) ^ (offset / 8);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z >> ((offset % 8) * 8)) as u8
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Client and server in one enrolled pod: one paired hop.
    Direct,
    /// Client pod -> HAProxy -> HAProxy -> server app, Istio's rules: three paired hops.
    Sidecar,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The client sends `size` bytes.
    Up,
    /// The server sends `size` bytes.
    Down,
    /// The client sends `size` bytes and reads them back while it sends.
    Echo,
    /// Requests of up to 4 KiB, each answered with `size / rounds` bytes.
    RequestResponse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The client half-closes after its last byte; the server after its own.
    ClientHalfClose,
    /// The server half-closes first (right away when it sends nothing).
    ServerHalfClose,
    /// Both half-close as soon as each has sent everything.
    BothHalfClose,
    /// The sender aborts (SO_LINGER 0) half-way: its reader must see a correct prefix, then
    /// ECONNRESET.
    Abort,
    /// The reader closes after half the bytes: its sender must finish or see EPIPE/ECONNRESET.
    CloseUnread,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    Fast,
    /// 200 µs between reads of at most 16 KiB.
    Slow,
    /// One stall of 300 ms half-way.
    Stall,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    None,
    /// Acceleration switched off and on again during the transfer.
    AccelOffOn,
    /// The accelerator started again (a restarted agent: reuse of the pins, self-test).
    Restart,
    /// The agent's sweeper stops (as when the agent is killed with SIGKILL).
    SweeperKilled,
    /// An upgrade to a build whose connection maps have another layout (simulated by a map
    /// ABI stamp of another version): the live connections' maps are retired, new ones made.
    LayoutUpgrade,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub seed: u64,
    pub path: PathKind,
    /// The reader queue bound for this case: low on the direct path, so that most large
    /// cases cross it; the product's default on the sidecar path.
    pub queue_limit: u64,
    pub shape: Shape,
    pub size: u64,
    pub max_write: u64,
    pub ending: Ending,
    pub pace: Pace,
    pub conns: u32,
    pub event: Event,
}

/// The most bytes one case moves in all (conns × size), so that a case takes seconds.
const CASE_BYTES: u64 = 96 << 20;
/// The queue bound of direct-path cases: most cases above 1 MiB cross it.
pub const DIRECT_QUEUE_LIMIT: u64 = 1 << 20;

impl Case {
    pub fn from_seed(seed: u64, paths: &[PathKind]) -> Self {
        let mut r = Rng::new(seed);
        let path = r.pick(paths);
        let max_conns = if path == PathKind::Direct { 64 } else { 16 };
        let conns = r.log_size(max_conns) as u32;
        let size = r.log_size(64 << 20).min(CASE_BYTES / conns as u64).max(1);
        let max_write = r.log_size(1 << 20);
        // At most about 50,000 writes per connection, so that a case takes seconds.
        let size = size.min(max_write * 50_000 / conns as u64).max(1);
        Self {
            seed,
            path,
            queue_limit: match path {
                PathKind::Direct => DIRECT_QUEUE_LIMIT,
                PathKind::Sidecar => fastpath_common::DEFAULT_QUEUE_LIMIT_BYTES,
            },
            shape: r.pick(&[Shape::Up, Shape::Down, Shape::Echo, Shape::RequestResponse]),
            size,
            max_write,
            ending: r.pick(&[
                Ending::ClientHalfClose,
                Ending::ClientHalfClose,
                Ending::ServerHalfClose,
                Ending::BothHalfClose,
                Ending::Abort,
                Ending::CloseUnread,
            ]),
            pace: r.pick(&[Pace::Fast, Pace::Fast, Pace::Slow, Pace::Stall]),
            conns,
            event: r.pick(&[
                Event::None,
                Event::None,
                Event::AccelOffOn,
                Event::Restart,
                Event::SweeperKilled,
                Event::LayoutUpgrade,
            ]),
        }
    }
}

/// What went wrong in a case, with what replays it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub what: String,
}

/// A stream's reader side: checks each byte as it comes.
struct Checker {
    seed: u64,
    conn: u32,
    dir: u8,
    got: u64,
    first_bad: Option<u64>,
}

impl Checker {
    fn new(seed: u64, conn: u32, dir: u8) -> Self {
        Self {
            seed,
            conn,
            dir,
            got: 0,
            first_bad: None,
        }
    }
    fn feed(&mut self, data: &[u8]) {
        if self.first_bad.is_none() {
            for (i, b) in data.iter().enumerate() {
                let off = self.got + i as u64;
                if *b != stream_byte(self.seed, self.conn, self.dir, off) {
                    self.first_bad = Some(off);
                    break;
                }
            }
        }
        self.got += data.len() as u64;
    }
}

fn poll_fd(s: &TcpStream, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "case deadline"));
    }
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    let rc = unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Writes `len` bytes of stream `dir` in writes of 1..=max_write bytes; `stop_at` aborts.
fn send_stream(
    s: &TcpStream,
    case: &Case,
    conn: u32,
    dir: u8,
    len: u64,
    stop_at: Option<u64>,
    deadline: Instant,
) -> io::Result<u64> {
    let end = stop_at.unwrap_or(len).min(len);
    let mut r = Rng::new(case.seed ^ ((conn as u64) << 20) ^ dir as u64);
    write_stream(s, case, conn, dir, 0..end, &mut r, deadline)?;
    Ok(end)
}

/// Writes bytes `range` of stream `dir`, each write 1..=`case.max_write` bytes long.
fn write_stream(
    s: &TcpStream,
    case: &Case,
    conn: u32,
    dir: u8,
    range: std::ops::Range<u64>,
    sizes: &mut Rng,
    deadline: Instant,
) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut off = range.start;
    while off < range.end {
        let n = sizes.range(1, case.max_write).min(range.end - off);
        buf.clear();
        buf.extend((0..n).map(|i| stream_byte(case.seed, conn, dir, off + i)));
        let mut done = 0usize;
        while done < buf.len() {
            match (&*s).write(&buf[done..]) {
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_fd(s, libc::POLLOUT, deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        off += n;
    }
    Ok(())
}

/// How a read side ended.
#[derive(Debug, PartialEq, Eq)]
enum ReadEnd {
    Eof,
    Error(io::ErrorKind),
    /// Stopped on purpose after this many bytes (CloseUnread).
    Stopped,
}

/// Reads stream `dir` until EOF, an error, or `stop_after` bytes.
fn recv_stream(
    s: &TcpStream,
    chk: &mut Checker,
    pace: Pace,
    stall_at: u64,
    stop_after: Option<u64>,
    deadline: Instant,
) -> ReadEnd {
    let mut buf = vec![
        0u8;
        if pace == Pace::Slow {
            16 << 10
        } else {
            256 << 10
        }
    ];
    let mut stalled = false;
    loop {
        if let Some(stop) = stop_after
            && chk.got >= stop
        {
            return ReadEnd::Stopped;
        }
        if pace == Pace::Stall && !stalled && chk.got >= stall_at {
            stalled = true;
            std::thread::sleep(Duration::from_millis(300));
        }
        match (&*s).read(&mut buf) {
            Ok(0) => return ReadEnd::Eof,
            Ok(n) => {
                chk.feed(&buf[..n]);
                if pace == Pace::Slow {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = poll_fd(s, libc::POLLIN, deadline) {
                    return ReadEnd::Error(e.kind());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return ReadEnd::Error(e.kind()),
        }
    }
}

/// One side's verdict on its read stream.
fn judge_read(
    what: &str,
    chk: &Checker,
    end: &ReadEnd,
    expected: u64,
    sender_aborts: bool,
    through_proxy: bool,
) -> Option<String> {
    if let Some(off) = chk.first_bad {
        return Some(format!("{what}: byte {off} differs (of {} read)", chk.got));
    }
    if chk.got > expected {
        return Some(format!("{what}: {} bytes read, {expected} sent", chk.got));
    }
    match end {
        ReadEnd::Stopped => None,
        ReadEnd::Eof if chk.got == expected => None,
        // Through the sidecars a proxy ends the other leg of an aborted stream: a FIN or a
        // RST, whichever it chooses (with or without acceleration).
        ReadEnd::Eof if sender_aborts && through_proxy => None,
        ReadEnd::Eof => Some(format!("{what}: EOF after {} of {expected} bytes", chk.got)),
        ReadEnd::Error(io::ErrorKind::ConnectionReset) if sender_aborts => None,
        ReadEnd::Error(k) => Some(format!(
            "{what}: {k:?} after {} of {expected} bytes",
            chk.got
        )),
    }
}

/// The errors a sender may see when its reader closes with bytes unread (or not at all, when
/// everything fit in the buffers before the close).
fn sender_ok(res: &io::Result<u64>, reader_closes: bool) -> bool {
    match res {
        Ok(_) => true,
        Err(e) => {
            reader_closes
                && matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                )
        }
    }
}

/// The client of one connection: sends its stream and reads the server's, on two threads.
fn client_side(case: &Case, conn: u32, s: TcpStream, deadline: Instant) -> Option<String> {
    s.set_nonblocking(true).ok()?;
    if case.shape == Shape::RequestResponse {
        return request_response_client(case, conn, &s, deadline);
    }
    let up = matches!(case.shape, Shape::Up | Shape::Echo);
    let down = matches!(case.shape, Shape::Down | Shape::Echo);
    let half = (case.size / 2).max(1);
    if up && case.ending == Ending::Abort {
        // Send half, then reset: the close below (SO_LINGER 0) sends the RST. An echo client
        // reads its echo meanwhile (one that did not would deadlock with its server, plain
        // TCP or not: neither side reads while both wait to write).
        return std::thread::scope(|t| {
            let echo = (case.shape == Shape::Echo).then(|| {
                t.spawn(|| {
                    let mut chk = Checker::new(case.seed, conn, 0);
                    let _ = recv_stream(&s, &mut chk, Pace::Fast, u64::MAX, None, deadline);
                    chk.first_bad
                        .map(|off| format!("client echo before the reset: byte {off} differs"))
                })
            });
            let _ = send_stream(&s, case, conn, 0, case.size, Some(half), deadline);
            abort_on_close(&s);
            // Wakes the echo reader (its next read returns 0); nothing goes on the wire.
            let _ = s.shutdown(Shutdown::Read);
            echo.and_then(|h| h.join().unwrap())
        });
    }
    std::thread::scope(|t| {
        let writer = t.spawn(|| {
            if up {
                let res = send_stream(&s, case, conn, 0, case.size, None, deadline);
                if !sender_ok(&res, case.ending == Ending::CloseUnread) {
                    return Some(format!("client send: {res:?}"));
                }
            }
            // Echo: the server half-closes only after the client's EOF, whatever the ending.
            let client_closes = case.shape == Shape::Echo
                || matches!(case.ending, Ending::ClientHalfClose | Ending::BothHalfClose);
            if client_closes || !down {
                let _ = s.shutdown(Shutdown::Write);
            }
            None
        });
        let reader = t.spawn(|| {
            // An echo brings back the client's own stream.
            let dir = if case.shape == Shape::Echo { 0 } else { 1 };
            let mut chk = Checker::new(case.seed, conn, dir);
            if !down {
                // Up only: the server's side ends with EOF (or a reset, when it closed with
                // bytes unread).
                let end = recv_stream(&s, &mut chk, Pace::Fast, u64::MAX, None, deadline);
                return match end {
                    ReadEnd::Eof if chk.got == 0 => None,
                    ReadEnd::Error(io::ErrorKind::ConnectionReset)
                        if case.ending == Ending::CloseUnread =>
                    {
                        None
                    }
                    other => Some(format!(
                        "client waiting for EOF: {other:?} after {} bytes",
                        chk.got
                    )),
                };
            }
            let stop =
                (case.ending == Ending::CloseUnread && case.shape == Shape::Down).then_some(half);
            let end = recv_stream(&s, &mut chk, case.pace, half, stop, deadline);
            if case.shape == Shape::Echo && case.ending == Ending::CloseUnread {
                // The server stopped echoing half-way and closed: a correct prefix, ended by
                // EOF or a reset.
                return chk
                    .first_bad
                    .map(|off| format!("client echo: byte {off} differs"));
            }
            let sender_aborts = case.shape == Shape::Down && case.ending == Ending::Abort;
            judge_read(
                "client read",
                &chk,
                &end,
                case.size,
                sender_aborts,
                case.path == PathKind::Sidecar,
            )
        });
        let w = writer.join().unwrap();
        let r = reader.join().unwrap();
        w.or(r)
    })
}

fn server_side(case: &Case, conn: u32, s: TcpStream, deadline: Instant) -> Option<String> {
    s.set_nonblocking(true).ok()?;
    let half = (case.size / 2).max(1);
    match case.shape {
        Shape::Up => {
            if matches!(case.ending, Ending::ServerHalfClose | Ending::BothHalfClose) {
                let _ = s.shutdown(Shutdown::Write);
            }
            let mut chk = Checker::new(case.seed, conn, 0);
            let stop = (case.ending == Ending::CloseUnread).then_some(half);
            let end = recv_stream(&s, &mut chk, case.pace, half, stop, deadline);
            if case.ending == Ending::Abort && chk.got > half {
                return Some(format!(
                    "server read {} bytes of an upload reset after {half}",
                    chk.got
                ));
            }
            let verdict = judge_read(
                "server read",
                &chk,
                &end,
                case.size,
                case.ending == Ending::Abort,
                case.path == PathKind::Sidecar,
            );
            let _ = s.shutdown(Shutdown::Write);
            verdict
        }
        Shape::Down => {
            let aborts = case.ending == Ending::Abort;
            let res = send_stream(
                &s,
                case,
                conn,
                1,
                case.size,
                aborts.then_some(half),
                deadline,
            );
            if aborts {
                abort_on_close(&s);
                return None;
            }
            if !sender_ok(&res, case.ending == Ending::CloseUnread) {
                return Some(format!("server send: {res:?}"));
            }
            let _ = s.shutdown(Shutdown::Write);
            // Wait for the client's side to end too.
            let mut chk = Checker::new(case.seed, conn, 0);
            let _ = recv_stream(&s, &mut chk, Pace::Fast, u64::MAX, None, deadline);
            None
        }
        Shape::Echo => echo_server(case, &s, half, deadline),
        Shape::RequestResponse => request_response_server(case, conn, &s, deadline),
    }
}

/// Echoes until EOF (or stops half-way for CloseUnread), then half-closes.
fn echo_server(case: &Case, s: &TcpStream, half: u64, deadline: Instant) -> Option<String> {
    let mut buf = vec![0u8; 128 << 10];
    let mut total = 0u64;
    loop {
        if case.ending == Ending::CloseUnread && total >= half {
            return None;
        }
        match (&*s).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                let mut done = 0;
                while done < n {
                    match (&*s).write(&buf[done..n]) {
                        Ok(k) => done += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if poll_fd(s, libc::POLLOUT, deadline).is_err() {
                                return Some("echo: deadline while writing".into());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if case.ending == Ending::Abort => {
                            let _ = e;
                            return None;
                        }
                        Err(e) => return Some(format!("echo write after {total}: {e}")),
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if poll_fd(s, libc::POLLIN, deadline).is_err() {
                    return Some(format!("echo: deadline after {total} bytes"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionReset && case.ending == Ending::Abort =>
            {
                return None;
            }
            Err(e) => return Some(format!("echo read after {total}: {e}")),
        }
    }
    if case.ending != Ending::Abort && total != case.size {
        return Some(format!(
            "echo server: EOF after {total} of {} bytes",
            case.size
        ));
    }
    let _ = s.shutdown(Shutdown::Write);
    None
}

/// Requests are 8-byte sizes; each response is that many bytes of stream 1, continuing.
fn request_response_client(
    case: &Case,
    conn: u32,
    s: &TcpStream,
    deadline: Instant,
) -> Option<String> {
    let rounds = 1 + (case.seed % 8);
    let per = (case.size / rounds).max(1);
    let mut chk = Checker::new(case.seed, conn, 1);
    let mut buf = vec![0u8; 256 << 10];
    for round in 0..rounds {
        let req = per.to_le_bytes();
        let mut done = 0;
        while done < req.len() {
            match (&*s).write(&req[done..]) {
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_fd(s, libc::POLLOUT, deadline).ok()?
                }
                Err(e) => return Some(format!("request {round}: {e}")),
            }
        }
        let want = (round + 1) * per;
        while chk.got < want {
            let cap = (want - chk.got).min(buf.len() as u64) as usize;
            match (&*s).read(&mut buf[..cap]) {
                Ok(0) => return Some(format!("response {round}: EOF after {} of {want}", chk.got)),
                Ok(n) => chk.feed(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if poll_fd(s, libc::POLLIN, deadline).is_err() {
                        return Some(format!("response {round}: deadline at {}", chk.got));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(format!("response {round}: {e} at {}", chk.got)),
            }
        }
        if let Some(off) = chk.first_bad {
            return Some(format!("response {round}: byte {off} differs"));
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let end = recv_stream(s, &mut chk, Pace::Fast, u64::MAX, None, deadline);
    judge_read(
        "client after last response",
        &chk,
        &end,
        rounds * per,
        false,
        false,
    )
}

fn request_response_server(
    case: &Case,
    conn: u32,
    s: &TcpStream,
    deadline: Instant,
) -> Option<String> {
    let mut sent = 0u64;
    loop {
        let mut req = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            match (&*s).read(&mut req[got..]) {
                Ok(0) if got == 0 => {
                    let _ = s.shutdown(Shutdown::Write);
                    return None;
                }
                Ok(0) => return Some("request cut short".into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if poll_fd(s, libc::POLLIN, deadline).is_err() {
                        return Some("server: deadline waiting for a request".into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(format!("server request: {e}")),
            }
        }
        let n = u64::from_le_bytes(req);
        // Continue stream 1 where the last response ended.
        let mut sizes = Rng::new(case.seed ^ sent);
        let res = write_stream(s, case, conn, 1, sent..sent + n, &mut sizes, deadline);
        if let Err(e) = res {
            return Some(format!("server response: {e}"));
        }
        sent += n;
    }
}

/// Where cases run: one accelerator, one pod for the direct path, a mesh for the sidecar
/// path, and a sweeper thread that does what the agent does every 100 ms.
pub struct Bench {
    pub accel: Accel,
    pub pod: Pod,
    pub mesh: Option<Mesh>,
    sweeper_stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sweeper: Option<std::thread::JoinHandle<()>>,
}

impl Bench {
    /// `accelerated: false` enrolls nothing: the same cases over plain TCP (with the programs
    /// attached), which tells a failure of the product from one of the case itself.
    pub fn new(tag: &str, with_mesh: bool, queue_limit: u64, accelerated: bool) -> Self {
        let accel = Accel::start_configured(tag, |s| s.max_queued_bytes = queue_limit);
        let pod = Pod::new(&format!("{tag}p"));
        if accelerated {
            accel.enroll(&pod, None);
        }
        let mesh = with_mesh.then(|| {
            Mesh::with_polling(
                &format!("{tag}m"),
                62,
                accelerated.then_some(&accel),
                // STRESS_SIDECAR_POLLING=default: HAProxy's own (level-triggered) polling.
                SidecarPolling::from_env("STRESS_SIDECAR_POLLING"),
            )
        });
        // STRESS_PCAP=<dir>: a capture of both mesh pods' handshakes, FINs, resets and small
        // segments (tcpdump), for a replayed failure.
        if let (Ok(dir), Some(m)) = (std::env::var("STRESS_PCAP"), &mesh) {
            for (pod, name) in [(&m.client, "client"), (&m.server, "server")] {
                let _ = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &pod.ns.name,
                        "tcpdump",
                        "-i",
                        "any",
                        "-s",
                        "128",
                        "-U",
                        "-w",
                    ])
                    .arg(format!("{dir}/{name}.pcap"))
                    .arg("tcp and (tcp[tcpflags] & (tcp-rst|tcp-fin|tcp-syn) != 0 or len < 120)")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn();
            }
            std::thread::sleep(Duration::from_millis(800));
        }
        let mut b = Self {
            accel,
            pod,
            mesh,
            sweeper_stop: Default::default(),
            sweeper: None,
        };
        b.start_sweeper();
        b
    }

    fn start_sweeper(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sweeper_stop.store(false, Relaxed);
        let stop = self.sweeper_stop.clone();
        let dir = self.accel.pin_dir().to_path_buf();
        self.sweeper = Some(std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let _ = fastpath_installer::accel::sweep_demoted(&dir);
                let _ = fastpath_installer::accel::retire::sweep(&dir);
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }

    /// The TCP sockets of the client and server pods (`ss -tanoie`), and the accelerator's
    /// queue entries (cookie, state, bytes queued), for a failure report.
    fn sockets_now(&self, client: &Pod, server: &Pod) -> String {
        let ss = |pod: &Pod| pod.sh("ss -tanoie 2>&1 | grep -v LISTEN");
        let queues: aya::maps::HashMap<_, u64, fastpath_common::RxQueue> =
            self.accel.map(fastpath_common::map_names::RXQ);
        let entries: Vec<String> = queues
            .iter()
            .filter_map(Result::ok)
            .map(|(cookie, q)| format!("{cookie}: state {} queued {}", q.state, q.queued as i64))
            .collect();
        format!(
            "\n  client pod sockets:\n{}\n  server pod sockets:\n{}\n  queue entries: {}\n  \
             client pod counters: {:?}\n  server pod counters: {:?}",
            ss(client),
            ss(server),
            entries.join(", "),
            crate::mesh::NetCounters::of(client),
            crate::mesh::NetCounters::of(server)
        )
    }

    fn stop_sweeper(&mut self) {
        self.sweeper_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.sweeper.take() {
            let _ = t.join();
        }
    }

    /// Runs one case; `Err` says what failed (the seed replays it).
    pub fn run(&mut self, case: &Case) -> Result<(), Failure> {
        let fail = |what: String| Failure {
            seed: case.seed,
            what,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        if case.event == Event::SweeperKilled {
            self.stop_sweeper();
        }
        let (listener_pod, dial): (&Pod, Box<dyn Fn(u16) -> SocketAddr>) = match case.path {
            PathKind::Direct => (
                &self.pod,
                Box::new(|p| SocketAddr::from(([127, 0, 0, 1], p))),
            ),
            PathKind::Sidecar => {
                let mesh = self.mesh.as_ref().ok_or_else(|| fail("no mesh".into()))?;
                let ip = mesh.server_ip();
                (&mesh.server, Box::new(move |p| SocketAddr::new(ip, p)))
            }
        };
        let client_pod = match case.path {
            PathKind::Direct => &self.pod,
            PathKind::Sidecar => &self.mesh.as_ref().unwrap().client,
        };
        // Through the sidecars a failed connection is shown with both sidecars' log of it,
        // which tells HAProxy's own early EOF (a normal close after fewer bytes than were
        // sent) from the product's.
        let trace = |app_port: u16| match (case.path, &self.mesh) {
            (PathKind::Sidecar, Some(mesh)) => format!(" [{}]", mesh.trace(app_port)),
            _ => String::new(),
        };
        let listener = listener_pod.run(|| TcpListener::bind("0.0.0.0:0"));
        let listener = listener.map_err(|e| fail(format!("listen: {e}")))?;
        let addr = dial(listener.local_addr().unwrap().port());
        let limit = case.queue_limit;
        set_config(
            &self.accel.settings,
            fastpath_common::config_index::QUEUE_LIMIT_KIB,
            (limit >> 10) as u32,
        )
        .map_err(|e| fail(format!("queue bound: {e:#}")))?;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let monitor = {
            let (peak, done, dir) = (
                peak.clone(),
                done.clone(),
                self.accel.pin_dir().to_path_buf(),
            );
            std::thread::spawn(move || {
                use std::sync::atomic::Ordering::Relaxed;
                let map: Option<
                    aya::maps::HashMap<aya::maps::MapData, u64, fastpath_common::RxQueue>,
                > = aya::maps::MapData::from_pin(dir.join(fastpath_common::map_names::RXQ))
                    .ok()
                    .and_then(|d| aya::maps::Map::from_map_data(d).ok())
                    .and_then(|m| m.try_into().ok());
                // Connections of earlier cases (a sidecar's, closing) were queued under their
                // own case's bound: only this case's count against this case's bound.
                let earlier: std::collections::HashSet<u64> = map
                    .as_ref()
                    .map(|m| m.keys().flatten().collect())
                    .unwrap_or_default();
                while !done.load(Relaxed) {
                    if let Some(m) = &map {
                        for (cookie, q) in m.iter().flatten() {
                            if earlier.contains(&cookie) {
                                continue;
                            }
                            let queued = q.queued as i64;
                            if queued > 0 {
                                peak.fetch_max(queued as u64, Relaxed);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let conns = case.conns;
        // A restarted agent applies its configured bound: this case's.
        let mut settings = self.accel.settings.clone();
        settings.max_queued_bytes = limit;
        let result: Vec<Option<String>> = std::thread::scope(|t| {
            let server = t.spawn(|| {
                let mut handles = Vec::new();
                for conn in 0..conns {
                    let s = match accept_until(&listener, deadline) {
                        Ok(s) => s,
                        Err(e) => return vec![Some(format!("accept {conn}: {e}"))],
                    };
                    let c = case.clone();
                    // Connections are accepted in any order; the client says which it is.
                    handles.push(std::thread::spawn(move || {
                        let id = match read_conn_id(&s, deadline) {
                            Ok(id) => id,
                            Err(e) => return Some(format!("connection id: {e}")),
                        };
                        server_side(&c, id, s, deadline).map(|w| format!("conn {id}: {w}"))
                    }));
                }
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let event = t.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                match case.event {
                    Event::AccelOffOn => {
                        let _ = set_switch(&settings, false);
                        std::thread::sleep(Duration::from_millis(50));
                        let _ = set_switch(&settings, true);
                    }
                    Event::Restart => {
                        let st = fastpath_installer::accel::start(&settings);
                        if st != fastpath_installer::accel::AccelState::Active {
                            return Some(format!("restart: {st:?}"));
                        }
                    }
                    Event::LayoutUpgrade => {
                        if let Err(e) = stamp_another_map_abi(&settings.pin_dir) {
                            return Some(format!("layout upgrade: {e:#}"));
                        }
                        let st = fastpath_installer::accel::start(&settings);
                        if st != fastpath_installer::accel::AccelState::Active {
                            return Some(format!("layout upgrade: {st:?}"));
                        }
                    }
                    _ => {}
                }
                None
            });
            let clients: Vec<Option<String>> = client_pod.run(|| {
                std::thread::scope(|t2| {
                    let hs: Vec<_> = (0..conns)
                        .map(|conn| {
                            t2.spawn(move || {
                                let s = match TcpStream::connect_timeout(
                                    &addr,
                                    Duration::from_secs(10),
                                ) {
                                    Ok(s) => s,
                                    Err(e) => return Some(format!("connect {conn}: {e}")),
                                };
                                if let Err(e) = (&s).write_all(&conn.to_le_bytes()) {
                                    return Some(format!("conn {conn}: id: {e}"));
                                }
                                let port = s.local_addr().map_or(0, |a| a.port());
                                client_side(case, conn, s, deadline)
                                    .map(|w| format!("conn {conn}: {w}{}", trace(port)))
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                })
            });
            let mut all = clients;
            all.extend(server.join().unwrap());
            all.push(event.join().unwrap());
            all
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = monitor.join();
        let errors: Vec<String> = result.into_iter().flatten().collect();
        let failed = (!errors.is_empty()).then(|| {
            let mut what = errors.join("; ");
            // A stream whose end did not arrive: what each pod's sockets hold tells which hop
            // kept it (Recv-Q, Send-Q, state), and which ones are still accelerated.
            if what.contains("TimedOut") {
                what.push_str(&self.sockets_now(client_pod, listener_pod));
            }
            what
        });
        if case.event == Event::SweeperKilled {
            self.start_sweeper();
        }
        if let Some(what) = failed {
            return Err(fail(what));
        }
        let p = peak.load(std::sync::atomic::Ordering::Relaxed);
        if p > limit + case.max_write.max(1 << 20) {
            return Err(fail(format!("a queue reached {p} bytes, bound {limit}")));
        }
        self.wait_sockhash_empty().map_err(fail)
    }

    /// Every connection of the case is closed: no socket may stay in the sockhash, nor in
    /// the sockhash of a set of connection maps that an upgrade retired.
    fn wait_sockhash_empty(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let n = self.accel.map_entries(fastpath_common::map_names::SOCKS);
            let retired = fastpath_installer::accel::retire::accelerated_sockets_in_sets(
                self.accel.pin_dir(),
            )
            .map_err(|e| format!("retired sockhashes: {e:#}"))?;
            if n + retired == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{n} sockets left in the sockhash after the case, {retired} in retired ones"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop_sweeper();
    }
}

/// Stamps the pinned set with a map ABI other than this build's, as a build with other
/// connection maps would have left it: the next start retires them.
pub fn stamp_another_map_abi(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    use fastpath_common::{MAP_ABI_VERSION, meta_index};
    let meta = fastpath_pins::Pins::new(pin_dir).meta()?;
    meta.set(&meta_index::ABI_VERSION, &(MAP_ABI_VERSION as u64 + 1))?;
    Ok(())
}

fn set_switch(settings: &fastpath_installer::accel::AccelSettings, on: bool) -> anyhow::Result<()> {
    set_config(
        settings,
        fastpath_common::config_index::ACCEL_ENABLED,
        u32::from(on),
    )
}

fn set_config(
    settings: &fastpath_installer::accel::AccelSettings,
    index: u32,
    value: u32,
) -> anyhow::Result<()> {
    // An error, not a panic: a case that broke the pins fails, and the run says which.
    let cfg = fastpath_pins::Pins::new(&settings.pin_dir).config()?;
    cfg.set(&index, &value)?;
    Ok(())
}

/// A seed base from the clock, for a run that was not asked to repeat one.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Runs `count` cases from seeds `base`, `base + 1`, ...; prints each failure with the seed
/// that replays it; returns the failures and how many cases ran before `time_limit`.
/// Failures in a row after which a run stops.
const MAX_FAILURES_IN_A_ROW: usize = 20;

pub fn run_cases(
    bench: &mut Bench,
    base: u64,
    count: u64,
    paths: &[PathKind],
    time_limit: Duration,
    progress: bool,
) -> (u64, Vec<Failure>) {
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut ran = 0;
    let mut in_a_row = 0;
    for i in 0..count {
        if start.elapsed() > time_limit {
            break;
        }
        let case = Case::from_seed(base.wrapping_add(i), paths);
        if let Err(f) = bench.run(&case) {
            eprintln!(
                "stress: FAILED seed {} ({case:?}): {}\n  replay: STRESS_REPLAY={} bash scripts/soak.sh",
                f.seed, f.what, f.seed
            );
            failures.push(f);
            in_a_row += 1;
        } else {
            in_a_row = 0;
        }
        ran += 1;
        // A case that broke the accelerator itself fails every case after it: the first
        // failures say what happened, thousands more say nothing.
        if in_a_row == MAX_FAILURES_IN_A_ROW {
            eprintln!(
                "stress: stopping after {in_a_row} failures in a row: the accelerator is broken \
                 (the first of them says how)"
            );
            break;
        }
        if progress && ran % 500 == 0 {
            eprintln!(
                "stress: {ran} cases, {} failed, {:.0} s",
                failures.len(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    (ran, failures)
}

fn accept_until(l: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn read_conn_id(s: &TcpStream, deadline: Instant) -> io::Result<u32> {
    s.set_nonblocking(true)?;
    let mut b = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match (&*s).read(&mut b[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF before the id",
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => poll_fd(s, libc::POLLIN, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(u32::from_le_bytes(b))
}
