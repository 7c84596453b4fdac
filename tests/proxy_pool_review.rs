//! A hostile review of the proxy's own HTTP/1.1 pool for a plain
//! `http://` upstream (src/server/h1pool.rs), black-box: real
//! `token-broker proxy` / `token-broker serve` processes, hand-written HTTP
//! on both sides. No assertion is about speed: each outcome is decided by
//! behaviour (the slow parties are slower by a wide margin).

mod common;
#[path = "common/raw_proxy.rs"]
mod raw_proxy;

use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raw_proxy::*;

/// A 200 with `body`, kept alive.
fn ok_kept(stream: &mut TcpStream, body: &str) -> Then {
    ok(stream, body);
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
    let upstream = RawUpstream::start_with(
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
        |r, s| ok_kept(s, &format!("at {}", r.target())),
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
    let upstream = RawUpstream::start_with(no_early, |r, s| match r.target() {
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
        other => ok_kept(s, &format!("at {other}")),
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
    let upstream = RawUpstream::start_with(no_early, |r, s| match r.target() {
        "/big" => {
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n");
            let _ = s.write_all(&[b'L'; 1000]);
            let _ = s.flush();
            std::thread::sleep(Duration::from_millis(500));
            let _ = s.write_all(&[b'L'; 199_000]);
            Then::KeepAlive
        }
        other => ok_kept(s, &format!("at {other}")),
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
