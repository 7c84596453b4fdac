//! A hostile review of the proxy's own HTTP/1.1 pool for a plain
//! `http://` upstream (src/server/h1pool.rs), black-box: real
//! `token-broker proxy` / `token-broker serve` processes, hand-written HTTP
//! on both sides. No assertion is about speed: each outcome is decided by
//! behaviour (the slow parties are slower by a wide margin).

mod common;
#[path = "common/raw_proxy.rs"]
mod raw_proxy;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raw_proxy::*;

// ---------------------------------------------------------------------
// A raw upstream: one thread a connection, each request's head and body
// read, then the handler writes whatever it likes on the socket.

/// One request as the upstream read it (its request line; its body is
/// read and dropped).
#[derive(Clone, Debug)]
struct Seen {
    line: String,
}

impl Seen {
    fn target(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or("")
    }
}

/// What the handler says about the connection after an answer.
enum Then {
    KeepAlive,
    Close,
}

type Handler = dyn Fn(&Seen, &mut TcpStream) -> Then + Send + Sync;

struct RawUpstream {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicU64>,
}

impl RawUpstream {
    /// `early` answers a request from its head alone, before its body is
    /// read (the path and the socket are given): used when Some returns.
    fn start(
        early: impl Fn(&str, &mut TcpStream) -> bool + Send + Sync + 'static,
        handler: impl Fn(&Seen, &mut TcpStream) -> Then + Send + Sync + 'static,
    ) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        type Early = dyn Fn(&str, &mut TcpStream) -> bool + Send + Sync;
        let early: Arc<Early> = Arc::new(early);
        {
            let (seen, connections) = (seen.clone(), connections.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (seen, handler, early) = (seen.clone(), handler.clone(), early.clone());
                    std::thread::spawn(move || serve_raw(stream, &seen, &*early, &*handler));
                }
            });
        }
        RawUpstream {
            addr,
            seen,
            connections,
        }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn targets(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.target().to_owned())
            .collect()
    }
}

fn serve_raw(
    stream: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    early: &(dyn Fn(&str, &mut TcpStream) -> bool + Send + Sync),
    handler: &Handler,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            continue;
        }
        let mut length = 0;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                if n.trim().eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let target = line.split(' ').nth(1).unwrap_or("").to_owned();
        if early(&target, &mut writer) {
            return;
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request = Seen { line };
        seen.lock().unwrap().push(request.clone());
        let then = handler(&request, &mut writer);
        let _ = writer.flush();
        if let Then::Close = then {
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

fn no_early(_: &str, _: &mut TcpStream) -> bool {
    false
}

/// A 200 with `body`, kept alive.
fn ok(stream: &mut TcpStream, body: &str) -> Then {
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    Then::KeepAlive
}

// ---------------------------------------------------------------------
// The findings.

/// An upstream may answer before it has read a request's body (a 413, a
/// 400 from the head alone) and keep the connection: the proxy's request
/// is still being written when the answer ends. Such a connection is not
/// ready for another request until the upload is through, which may be
/// never. The next client must not be made to wait on it (hyper-util's
/// pool hands a connection out only once it is ready): here it got a 504
/// after response_timeout on an upstream that answers it at once.
#[test]
fn an_answer_that_ends_before_its_upload_is_written_does_not_hold_up_the_next_request() {
    let cred = Cred::new();
    let upstream = RawUpstream::start(
        |target, s| {
            if target != "/early" {
                return false;
            }
            // Answer from the head, keep the connection, read nothing more
            // for a long while.
            let _ = write!(s, "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\nno");
            let _ = s.flush();
            std::thread::sleep(Duration::from_secs(40));
            true
        },
        |r, s| ok(s, &format!("at {}", r.target())),
    );
    // A body kept whole (under retry_body_limit) and far larger than what
    // the sockets between the proxy and the upstream buffer.
    let daemon = cred.serve(
        &format!(
            "[proxies.t]\nprofile = \"codex\"\nlisten = \"127.0.0.1:0\"\nupstream = {:?}\n\
             retry_body_limit = 134217728\nresponse_timeout = \"3s\"\n",
            upstream.origin()
        ),
        1,
    );
    let size = 48 << 20;
    let (mut stream, mut reader) = connect(daemon.addr());
    let head = format!(
        "POST /early HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nContent-Length: {size}\r\n\r\n",
        daemon.key()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&vec![b'x'; size]).unwrap();
    let early = read_answer(&mut reader, false).expect("the early answer");
    assert_eq!(early.status, 413, "{early:?}");
    assert_eq!(early.text(), "no");
    let next = get(daemon.addr(), daemon.key(), "/next").expect("an answer");
    assert_eq!(
        (next.status, next.text().as_str()),
        (200, "at /next"),
        "the next request waited on a connection still busy with another's upload: {next:?}"
    );
}

/// Probes that held, kept as guards.
///
/// Bytes an upstream sends after a body of a known length (at once, or a
/// moment later while the connection is idle) must never be read as the
/// answer to the next request on that pooled connection; answers with
/// `Connection: close`, from HTTP/1.0, or followed by a close without a
/// word, must not cost the next request a 502.
#[test]
fn a_pooled_connection_never_carries_one_answer_into_the_next_request() {
    let cred = Cred::new();
    let upstream = RawUpstream::start(no_early, |r, s| match r.target() {
        "/extra-at-once" => {
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
            );
            Then::KeepAlive
        }
        "/extra-later" => {
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            let _ = s.flush();
            std::thread::sleep(Duration::from_millis(100));
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED");
            Then::KeepAlive
        }
        "/head-with-body" | "/204-with-body" | "/304-with-body" => {
            let status = match r.target() {
                "/204-with-body" => "204 No Content",
                "/304-with-body" => "304 Not Modified",
                _ => "200 OK",
            };
            let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: 8\r\n\r\nSMUGGLED");
            Then::KeepAlive
        }
        "/close" => {
            let _ = write!(s, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok");
            Then::Close
        }
        "/http10" => {
            let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
            Then::Close
        }
        "/http10-eof" => {
            let _ = write!(s, "HTTP/1.0 200 OK\r\n\r\nok-till-eof");
            Then::Close
        }
        "/silent-close" => {
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            Then::Close
        }
        other => ok(s, &format!("at {other}")),
    });
    let proxy = cred.proxy(&upstream.origin(), &[], &[]);
    let key = proxy.key().to_owned();
    let (mut stream, mut reader) = connect(proxy.addr());
    for first in [
        "/extra-at-once",
        "/extra-later",
        "/head-with-body",
        "/204-with-body",
        "/304-with-body",
        "/close",
        "/http10",
        "/http10-eof",
        "/silent-close",
    ] {
        let method = if first == "/head-with-body" { "HEAD" } else { "GET" };
        stream
            .write_all(
                format!("{method} {first} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n").as_bytes(),
            )
            .unwrap();
        let a = read_answer(&mut reader, method == "HEAD").unwrap_or_else(|| panic!("{first}: no answer"));
        assert!(!a.text().contains("SMUGGLED"), "{first}: {a:?}");
        // Whatever the upstream does after its answer is done by now.
        std::thread::sleep(Duration::from_millis(300));
        for n in 0..2 {
            let next = format!("/after{n}{first}");
            stream
                .write_all(format!("GET {next} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n").as_bytes())
                .unwrap();
            let a = read_answer(&mut reader, false).unwrap_or_else(|| panic!("{next}: no answer"));
            assert_eq!(
                (a.status, a.text()),
                (200, format!("at {next}")),
                "after {first}: {a:?}"
            );
        }
    }
}

/// A client that goes away in the middle of an answer: the connection
/// that answer came on is closed, never handed to the next request with
/// the rest of the body still in it. And the URI made once for the last
/// request target is not served for another target (another path, another
/// query), and dot segments are still refused after a plain path.
#[test]
fn an_abandoned_answer_never_reaches_the_next_client_and_targets_are_not_mixed() {
    let cred = Cred::new();
    let upstream = RawUpstream::start(no_early, |r, s| match r.target() {
        "/big" => {
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n");
            let _ = s.write_all(&[b'L'; 1000]);
            let _ = s.flush();
            std::thread::sleep(Duration::from_millis(500));
            let _ = s.write_all(&[b'L'; 199_000]);
            Then::KeepAlive
        }
        other => ok(s, &format!("at {other}")),
    });
    let proxy = cred.proxy(&upstream.origin(), &[], &[]);
    let key = proxy.key().to_owned();
    {
        let (mut stream, mut reader) = connect(proxy.addr());
        stream
            .write_all(format!("GET /big HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        // Gone after the head.
    }
    std::thread::sleep(Duration::from_millis(1000));
    for target in [
        "/next",
        "/v1/a?x=1",
        "/v1/b",
        "/v1/a?x=2",
        "/v1/a?x=1",
        "/v1/a",
        "/v1/a%2Fb",
    ] {
        let a = get(proxy.addr(), &key, target).unwrap_or_else(|| panic!("{target}: no answer"));
        assert_eq!((a.status, a.text()), (200, format!("at {target}")), "{target}: {a:?}");
    }
    for bad in ["/v1/./a", "/v1/../a", "/v1/%2e%2E/a", "/v1\\a"] {
        let a = get(proxy.addr(), &key, bad).unwrap_or_else(|| panic!("{bad}: no answer"));
        assert_eq!(a.status, 400, "{bad}: {a:?}");
    }
    let targets = upstream.targets();
    assert!(
        !targets.iter().any(|t| t.contains("..") || t.contains("/./")),
        "{targets:?}"
    );
    assert_eq!(targets.iter().filter(|t| *t == "/v1/a?x=1").count(), 2, "{targets:?}");
    // The abandoned answer's connection, and one for all the others.
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}
