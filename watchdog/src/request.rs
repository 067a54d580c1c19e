//! What was stopped: a request's first bytes (copied by the kernel at its start) turned into
//! words for records and status: `GET /reports/2024` or the start of a SQL statement, with the
//! query string dropped, control bytes escaped and the text truncated. Pure.

use watchdog_common::{
    conn_flag,
    h2::{self, Path, Unreadable},
    head::{ends_path, head_state, method, proto, HEAD_BYTES},
    ConnInfo,
};

use crate::routes::{first_match, Route};

/// Longest text shown for a request, in characters.
const MAX_TEXT: usize = 100;

/// An HTTP/1.x request line, as far as the head holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// Method code (`watchdog_common::head::METHODS`, 1-based).
    pub method: u8,
    pub path: &'a [u8],
    /// The query string (without `?`), if it started within the head.
    pub query: Option<&'a [u8]>,
    /// The path ended within the bytes read.
    pub complete: bool,
}

/// The request line of an HTTP/1.x head.
pub fn line(head: &[u8]) -> Option<Line<'_>> {
    let mut buf = [0u8; HEAD_BYTES];
    let n = head.len().min(HEAD_BYTES);
    buf[..n].copy_from_slice(&head[..n]);
    let (code, mlen) = method(&buf, n)?;
    let rest = &head[(mlen + 1).min(n)..n];
    let end = rest.iter().position(|b| ends_path(*b));
    let path = &rest[..end.unwrap_or(rest.len())];
    let query = match end {
        Some(i) if rest[i] == b'?' => {
            let q = &rest[i + 1..];
            Some(
                &q[..q
                    .iter()
                    .position(|b| ends_path(*b) && *b != b'?')
                    .unwrap_or(q.len())],
            )
        }
        _ => None,
    };
    Some(Line {
        method: code,
        path,
        query,
        complete: end.is_some(),
    })
}

/// The request line of an HTTP/2 stream, from the first bytes of its header block (HPACK:
/// `watchdog_common::h2::pseudo`).
pub fn stream_line(block: &[u8]) -> Result<Line<'_>, Unreadable> {
    let mut buf = [0u8; HEAD_BYTES];
    let n = block.len().min(HEAD_BYTES);
    buf[..n].copy_from_slice(&block[..n]);
    let ps = h2::pseudo(&buf, n)?;
    let (value, complete): (&[u8], bool) = match ps.path {
        Path::Static(s) => (s, true),
        Path::Literal { start, len } => {
            let end = (start + len).min(n);
            (&block[start.min(n)..end], start + len <= n)
        }
    };
    let stop = value.iter().position(|b| ends_path(*b));
    let path = &value[..stop.unwrap_or(value.len())];
    let query = match stop {
        Some(i) if value[i] == b'?' => Some(&value[i + 1..]),
        _ => None,
    };
    Ok(Line {
        method: ps.method,
        path,
        query,
        complete: complete || stop.is_some(),
    })
}

/// Is this the record of one HTTP/2 stream (rather than of a connection's request)?
fn is_stream(conn: &ConnInfo) -> bool {
    conn.proto == proto::HTTP2 && conn.flags & conn_flag::STREAM != 0
}

/// The route a request of `conn` takes among `routes`, as its label: the pattern, `default`
/// when none matches, `unknown` when its bytes could not be read or its path was cut short.
/// Also returns the route's index.
pub fn route_of(conn: &ConnInfo, head: &[u8], routes: &[Route]) -> (String, Option<usize>) {
    if routes.is_empty() {
        return ("default".into(), None);
    }
    if conn.head_state == head_state::UNREADABLE || conn.head_state == head_state::SPLIT {
        return ("unknown".into(), None);
    }
    let len = usize::from(conn.head_len).min(head.len());
    let l = if is_stream(conn) && conn.head_state == head_state::READ {
        match stream_line(&head[..len]) {
            Ok(l) => l,
            Err(_) => return ("unknown".into(), None),
        }
    } else if conn.proto != proto::HTTP1 || conn.head_state != head_state::READ {
        return ("default".into(), None);
    } else {
        let Some(l) = line(&head[..len]) else {
            return ("default".into(), None);
        };
        l
    };
    if !l.complete && len < HEAD_BYTES {
        return ("unknown".into(), None);
    }
    match first_match(routes, l.method, l.path, l.complete) {
        Some(i) => (routes[i].label(), Some(i)),
        None => ("default".into(), None),
    }
}

/// The request in words, if its bytes were read: method and path for HTTP/1.x (the query
/// string only when `keep_query`), the statement for PostgreSQL's simple and extended queries.
pub fn describe(conn: &ConnInfo, head: &[u8], keep_query: bool) -> Option<String> {
    if conn.head_state != head_state::READ && conn.head_state != head_state::SPLIT {
        return None;
    }
    let head = &head[..usize::from(conn.head_len).min(head.len())];
    let cut = head.len() >= HEAD_BYTES;
    match conn.proto {
        proto::HTTP2 if is_stream(conn) => match stream_line(head) {
            Ok(l) => Some(words(&l, keep_query)),
            Err(Unreadable::Indexed) => Some(format!(
                "HTTP/2 stream {} (its path is an HPACK index)",
                conn.gen
            )),
            Err(Unreadable::Huffman) => Some(format!(
                "HTTP/2 stream {} (its path is Huffman-coded)",
                conn.gen
            )),
            Err(Unreadable::Split) => Some(format!("HTTP/2 stream {}", conn.gen)),
        },
        proto::HTTP1 => Some(words(&line(head)?, keep_query)),
        proto::POSTGRES => statement(head).map(|s| {
            let mut t = escape(s);
            if cut {
                t.push('…');
            }
            truncate(t)
        }),
        proto::MYSQL => mysql_statement(head).map(|s| {
            let mut t = escape(s);
            if cut {
                t.push('…');
            }
            truncate(t)
        }),
        _ => None,
    }
}

/// A statement's text from elsewhere (the server's process list), as records show SQL.
pub fn sql_text(s: &str) -> String {
    truncate(escape(s.as_bytes()))
}

/// The SQL of a MySQL `COM_QUERY` (0x03) or `COM_STMT_PREPARE` (0x16) packet: 3-byte length,
/// sequence id 0, command, text. Only when the server's first read took more than the 4-byte
/// header (MariaDB's does not: its records take the statement from the process list instead).
fn mysql_statement(head: &[u8]) -> Option<&[u8]> {
    match head {
        [_, _, _, 0, 0x03 | 0x16, sql @ ..] if !sql.is_empty() => Some(sql),
        _ => None,
    }
}

/// `GET /path?…` (the query string itself only when `keep_query`).
fn words(l: &Line<'_>, keep_query: bool) -> String {
    let method = watchdog_common::head::METHODS
        .get(usize::from(l.method).wrapping_sub(1))
        .unwrap_or(&"?");
    let mut out = format!("{method} {}", escape(l.path));
    if let (true, Some(q)) = (keep_query, l.query) {
        out.push('?');
        out.push_str(&escape(q));
    } else if l.query.is_some() {
        out.push_str("?…");
    }
    if !l.complete {
        out.push('…');
    }
    truncate(out)
}

/// The SQL of a PostgreSQL `Q` (simple query) or `P` (parse: name, then SQL) message.
fn statement(head: &[u8]) -> Option<&[u8]> {
    let (&kind, rest) = head.split_first()?;
    let body = rest.get(4..)?;
    let sql = match kind {
        b'Q' => body,
        b'P' => &body[body.iter().position(|b| *b == 0)? + 1..],
        _ => return None,
    };
    Some(&sql[..sql.iter().position(|b| *b == 0).unwrap_or(sql.len())])
}

/// Printable ASCII as it is; everything else as `\xNN`.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn truncate(s: String) -> String {
    if s.chars().count() <= MAX_TEXT {
        return s;
    }
    let mut t: String = s.chars().take(MAX_TEXT - 1).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn conn(proto: u8, state: u8, len: usize) -> ConnInfo {
        ConnInfo {
            proto,
            head_state: state,
            head_len: len as u16,
            ..ConnInfo::default()
        }
    }

    fn http(bytes: &[u8], keep: bool) -> Option<String> {
        describe(
            &conn(proto::HTTP1, head_state::READ, bytes.len()),
            bytes,
            keep,
        )
    }

    #[test]
    fn http_requests_read_as_method_and_path_without_the_query() {
        let r = b"GET /reports/2024?token=s3cret HTTP/1.1\r\nHost: x\r\n";
        assert_eq!(http(r, false).unwrap(), "GET /reports/2024?…");
        assert_eq!(http(r, true).unwrap(), "GET /reports/2024?token=s3cret");
        assert_eq!(
            http(b"POST /a\x01b HTTP/1.1", false).unwrap(),
            "POST /a\\x01b"
        );
        assert_eq!(http(b"GET /slo", false).unwrap(), "GET /slo…");
        assert_eq!(http(b"\x00garbage", false), None);
    }

    #[test]
    fn postgres_statements_read_from_simple_and_extended_queries() {
        let q = b"Q\x00\x00\x00\x18SELECT pg_sleep(5)\x00";
        let c = conn(proto::POSTGRES, head_state::READ, q.len());
        assert_eq!(describe(&c, q, false).unwrap(), "SELECT pg_sleep(5)");
        let p = b"P\x00\x00\x00\x20s1\x00SELECT $1::int\x00\x00\x00";
        let c = conn(proto::POSTGRES, head_state::READ, p.len());
        assert_eq!(describe(&c, p, false).unwrap(), "SELECT $1::int");
    }

    #[test]
    fn mysql_statements_read_from_whole_packets_and_headers_show_nothing() {
        let q = b"\x12\x00\x00\x00\x03SELECT SLEEP(300)";
        let c = conn(proto::MYSQL, head_state::READ, q.len());
        assert_eq!(describe(&c, q, false).unwrap(), "SELECT SLEEP(300)");
        let header = b"\x12\x00\x00\x00";
        let c = conn(proto::MYSQL, head_state::READ, header.len());
        assert_eq!(describe(&c, header, false), None);
        assert_eq!(sql_text("SELECT\n1"), "SELECT\\x0a1");
    }

    #[test]
    fn unreadable_and_split_heads_take_route_unknown() {
        let routes = vec![crate::routes::Route {
            method: None,
            pattern: "/a/*".parse().unwrap(),
            budget: None,
            steps: vec![],
        }];
        let head = b"GET /a/b HTTP/1.1\r\n";
        let ok = conn(proto::HTTP1, head_state::READ, head.len());
        assert_eq!(route_of(&ok, head, &routes), ("/a/*".into(), Some(0)));
        let split = conn(proto::HTTP1, head_state::READ, 6);
        assert_eq!(route_of(&split, head, &routes).0, "unknown");
        let gone = conn(proto::HTTP1, head_state::UNREADABLE, 0);
        assert_eq!(route_of(&gone, head, &routes).0, "unknown");
        assert_eq!(route_of(&ok, b"GET /b HTTP/1.1", &routes).0, "default");
        assert_eq!(route_of(&ok, head, &[]).0, "default");
    }

    proptest! {
        /// Whatever the bytes, the text is bounded, printable and never holds the query string
        /// unless asked to.
        #[test]
        fn any_head_describes_safely(bytes in proptest::collection::vec(any::<u8>(), 0..HEAD_BYTES), keep in any::<bool>()) {
            for p in [proto::HTTP1, proto::POSTGRES, proto::MYSQL, proto::OTHER] {
                if let Some(t) = describe(&conn(p, head_state::READ, bytes.len()), &bytes, keep) {
                    prop_assert!(t.chars().count() <= MAX_TEXT);
                    prop_assert!(t.chars().all(|c| !c.is_control()));
                }
            }
            let mut line = b"GET /x?secret=".to_vec();
            line.extend_from_slice(&bytes);
            let t = http(&line[..line.len().min(HEAD_BYTES)], false).unwrap();
            prop_assert!(!t.contains("secret"));
        }
    }
}
