//! A request's first bytes ("head"), as the kernel copies them from the receiving task's buffer,
//! and the byte-level rules both sides apply to them: which protocol a connection speaks, and the
//! route-table key of an HTTP/1.x request line.
//!
//! The functions here run in the kernel (inlined into the recv programs) and in the daemon's
//! tests, from the same source. They use fixed-size arrays and masked indexes only, so the
//! verifier can bound every access and every loop.

/// Bytes of a request's start copied from the receiving task's buffer (HTTP request line, the
/// start of a PostgreSQL statement). A power of two: indexes are masked with `HEAD_BYTES - 1`.
pub const HEAD_BYTES: usize = 128;
const HEAD_MASK: usize = HEAD_BYTES - 1;

/// Protocol of a tracked connection, decided once, from its first request's bytes.
pub mod proto {
    /// No request yet, or its bytes could not be read.
    pub const UNKNOWN: u8 = 0;
    /// An HTTP/1.x request line (one of `METHODS`, then a space).
    pub const HTTP1: u8 = 1;
    /// The HTTP/2 connection preface (`PRI * HTTP/2.0`): h2c and gRPC without TLS.
    pub const HTTP2: u8 = 2;
    /// A TLS handshake record: the bytes that follow are encrypted.
    pub const TLS: u8 = 3;
    /// A PostgreSQL startup, SSL or GSS request.
    pub const POSTGRES: u8 = 4;
    /// Anything else.
    pub const OTHER: u8 = 5;
    /// A MySQL or MariaDB client's handshake response (the server spoke first).
    pub const MYSQL: u8 = 6;
    /// Number of values (counter slots).
    pub const COUNT: u8 = 7;

    /// Label for metrics and status.
    pub fn label(p: u8) -> &'static str {
        match p {
            HTTP1 => "http1",
            HTTP2 => "http2",
            TLS => "tls",
            POSTGRES => "postgres",
            MYSQL => "mysql",
            OTHER => "other",
            _ => "unknown",
        }
    }
}

/// What the kernel could make of the current request's head (`ConnInfo::head_state`).
pub mod head_state {
    /// Not looked at (an encrypted connection, or not yet).
    pub const NONE: u8 = 0;
    /// Copied: `head_len` bytes of `head` are the request's first bytes.
    pub const READ: u8 = 1;
    /// Could not be copied: io_uring, splice or sendfile, a buffer layout the kernel programs do
    /// not follow, or a page fault.
    pub const UNREADABLE: u8 = 2;
    /// Copied, but the request line ends before the path does (split across reads): the
    /// request runs on the policy's budget.
    pub const SPLIT: u8 = 3;
}

/// HTTP methods a route may name; a method's code is its index + 1 (0 = any method).
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Route-table key data: local port (2 bytes, big-endian), method code (1), path bytes with a
/// 0 terminator when the path ended within them. A multiple of 8 (the value is a `u64` first).
pub const ROUTE_KEY_DATA: usize = 104;
/// Path bytes in a key.
pub const ROUTE_KEY_PATH: usize = ROUTE_KEY_DATA - 3;
/// Longest route pattern, in bytes (without the trailing `*`): an exact pattern and its
/// terminator fill the key.
pub const ROUTE_PATTERN_MAX: usize = ROUTE_KEY_PATH - 1;

/// The route table's value for one key (`ROUTES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteValue {
    /// When the kernel timer fires after a request on this route starts.
    pub deadline_ns: u64,
    /// Metrics slot the route's requests are counted in.
    pub slot: u32,
    /// `ROUTE_OFF`.
    pub flags: u32,
}

/// Every policy that may apply has `budget = "off"` for this route: no timer, no client-gone.
pub const ROUTE_OFF: u32 = 1;

const _: () = assert!(core::mem::size_of::<RouteValue>() == 16);

/// Byte `i` of a head (masked, so always in bounds).
#[inline(always)]
fn at(head: &[u8; HEAD_BYTES], i: usize) -> u8 {
    head[i & HEAD_MASK]
}

/// The method code (1-based index into `METHODS`) and the length of the method token, if the
/// head starts with one of `METHODS` followed by a space.
#[inline(always)]
pub fn method(head: &[u8; HEAD_BYTES], len: usize) -> Option<(u8, usize)> {
    let mut m = 0;
    while m < METHODS.len() {
        let name = METHODS[m].as_bytes();
        if len > name.len() && at(head, name.len()) == b' ' {
            let mut i = 0;
            let mut same = true;
            while i < name.len() {
                if at(head, i) != name[i] {
                    same = false;
                    break;
                }
                i += 1;
            }
            if same {
                return Some((m as u8 + 1, name.len()));
            }
        }
        m += 1;
    }
    None
}

/// The protocol a connection's first request shows.
#[inline(always)]
pub fn classify(head: &[u8; HEAD_BYTES], len: usize) -> u8 {
    if len == 0 {
        return proto::UNKNOWN;
    }
    if len >= 4
        && at(head, 0) == b'P'
        && at(head, 1) == b'R'
        && at(head, 2) == b'I'
        && at(head, 3) == b' '
    {
        return proto::HTTP2;
    }
    if method(head, len).is_some() {
        return proto::HTTP1;
    }
    if len >= 3 && at(head, 0) == 0x16 && at(head, 1) == 0x03 && at(head, 2) <= 0x04 {
        return proto::TLS;
    }
    // PostgreSQL: int32 length, then protocol 3.0 (0x00030000) or a request code 1234.56xx
    // (SSLRequest 5679, GSSENCRequest 5680, CancelRequest 5678).
    if len >= 8 && at(head, 0) == 0 && at(head, 1) == 0 {
        let (a, b, c, d) = (at(head, 4), at(head, 5), at(head, 6), at(head, 7));
        if (a, b, c, d) == (0, 3, 0, 0) || (a == 0x04 && b == 0xd2 && c == 0x16) {
            return proto::POSTGRES;
        }
    }
    if is_mysql_handshake(head, len) {
        return proto::MYSQL;
    }
    proto::OTHER
}

/// MySQL and MariaDB: the server speaks first (its greeting is a send on an idle connection,
/// which starts nothing), so a connection's first request is the client's handshake response or
/// SSL request: a packet with sequence id 1 and a body of at least 32 bytes (capability flags,
/// max packet size, charset, 23 bytes of filler). The servers read a packet's 4-byte header on
/// its own (MariaDB 10.11: `recvfrom(fd, buf, 4)`, then the body), so that header is all the
/// first read holds; a reader that takes more shows CLIENT_PROTOCOL_41 (0x200) in the flags and
/// the filler's first 19 bytes zero (MariaDB keeps extended capabilities in its last 4).
#[inline(always)]
fn is_mysql_handshake(head: &[u8; HEAD_BYTES], len: usize) -> bool {
    if len < 4 || at(head, 3) != 1 {
        return false;
    }
    if at(head, 0) < 32 && at(head, 1) == 0 && at(head, 2) == 0 {
        return false;
    }
    if len == 4 {
        return true;
    }
    if len < 32 || at(head, 5) & 0x02 == 0 {
        return false;
    }
    let mut i = 13;
    while i < 32 {
        if at(head, i) != 0 {
            return false;
        }
        i += 1;
    }
    true
}

/// Is `b` where an HTTP/1.x request target's path ends (query, fragment, the space before the
/// version, or a line end)?
#[inline(always)]
pub fn ends_path(b: u8) -> bool {
    matches!(b, b' ' | b'?' | b'#' | b'\r' | b'\n' | b'\t' | 0)
}

/// Outcome of building a route key from a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOutcome {
    /// The key is in `data`; its prefix length in bits.
    Key(u32),
    /// The head is not an HTTP/1.x request line: no route applies.
    NotHttp,
    /// The request line ends before the path does.
    Split,
}

/// Builds the route-table key of an HTTP/1.x request: `port`, method code, then the path up to
/// its end (followed by a 0 byte), or its first `ROUTE_KEY_PATH` bytes when longer (then only
/// prefix patterns can match it).
#[inline(always)]
pub fn route_key(
    port: u16,
    head: &[u8; HEAD_BYTES],
    len: usize,
    data: &mut [u8; ROUTE_KEY_DATA],
) -> KeyOutcome {
    let Some((code, mlen)) = method(head, len) else {
        return KeyOutcome::NotHttp;
    };
    let p = port.to_be_bytes();
    data[0] = p[0];
    data[1] = p[1];
    data[2] = code;
    let start = mlen + 1;
    let mut i = 0;
    while i < ROUTE_KEY_PATH {
        if start + i >= len {
            return KeyOutcome::Split;
        }
        let b = at(head, start + i);
        if ends_path(b) {
            data[3 + i] = 0;
            return KeyOutcome::Key(((3 + i + 1) * 8) as u32);
        }
        data[3 + i] = b;
        i += 1;
    }
    KeyOutcome::Key((ROUTE_KEY_DATA * 8) as u32)
}

/// The key data of a route pattern: exact patterns end with the 0 terminator, prefix patterns
/// (given without their `*`) do not. `None` if the pattern is too long for a key.
pub fn pattern_key(
    port: u16,
    method: u8,
    path: &[u8],
    prefix: bool,
) -> Option<(u32, [u8; ROUTE_KEY_DATA])> {
    if path.len() > ROUTE_PATTERN_MAX {
        return None;
    }
    let mut data = [0u8; ROUTE_KEY_DATA];
    let p = port.to_be_bytes();
    data[0] = p[0];
    data[1] = p[1];
    data[2] = method;
    data[3..3 + path.len()].copy_from_slice(path);
    let bytes = 3 + path.len() + usize::from(!prefix);
    Some(((bytes * 8) as u32, data))
}

/// Bytes of one read the kernel scans for the end of an HTTP/1.x head. A read longer than this
/// whose first `BLANK_SCAN` bytes hold no blank line counts as a whole head (as before heads
/// were looked at): the server's time.
pub const BLANK_SCAN: usize = 512;

/// Does an HTTP/1.x head end within the first `n` bytes of `buf`, given the last three bytes
/// received before them (`tail`, low byte last)? The end is an empty line: `\n\n` or
/// `\n\r\n` (`\r\n\r\n` included), as HTTP/1.x parsers accept it. Returns whether it was
/// found and, if not, the new tail.
#[inline(always)]
pub fn scan_blank(buf: &[u8; BLANK_SCAN], n: usize, tail: u32) -> (bool, u32) {
    let mut w = tail;
    let mut i = 0;
    while i < BLANK_SCAN {
        if i >= n {
            break;
        }
        w = (w << 8) | buf[i] as u32;
        if w & 0xffff == 0x0a0a || w & 0x00ff_ffff == 0x000a_0d0a {
            return (true, 0);
        }
        i += 1;
    }
    (false, w & 0x00ff_ffff)
}

/// Is `b` (the first bytes of an HTTP/1.x answer) an interim status line: `HTTP/1.x 1xx` other
/// than `101`? Such an answer (`100 Continue`, `102`, `103 Early Hints`) does not end a request.
#[inline(always)]
pub fn is_interim(b: &[u8; 12]) -> bool {
    is_status_line(b)
        && b[9] == b'1'
        && b[10].is_ascii_digit()
        && b[11].is_ascii_digit()
        && !(b[10] == b'0' && b[11] == b'1')
}

/// `HTTP/1.x ` at the start of an answer.
#[inline(always)]
pub fn is_status_line(b: &[u8; 12]) -> bool {
    b[0] == b'H'
        && b[1] == b'T'
        && b[2] == b'T'
        && b[3] == b'P'
        && b[4] == b'/'
        && b[5] == b'1'
        && b[6] == b'.'
        && b[8] == b' '
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &[u8]) -> ([u8; HEAD_BYTES], usize) {
        let mut h = [0u8; HEAD_BYTES];
        let n = s.len().min(HEAD_BYTES);
        h[..n].copy_from_slice(&s[..n]);
        (h, n)
    }

    #[test]
    fn classifies_first_bytes() {
        let mut response = [0u8; 40];
        response[..9].copy_from_slice(&[0x24, 0, 0, 1, 0x84, 0xa2, 0xbf, 0, 0]);
        response[36..].copy_from_slice(b"app\0");
        let mut bad_filler = response;
        bad_filler[20] = 7;
        let cases: [(&[u8], u8); 15] = [
            // MariaDB's first read of a handshake response: the packet header alone.
            (&[0xce, 0, 0, 1], proto::MYSQL),
            (&response, proto::MYSQL),
            (&bad_filler, proto::OTHER),
            // A header of a body too short for a handshake response, or of sequence 0.
            (&[0x05, 0, 0, 1], proto::OTHER),
            (&[0xce, 0, 0, 0], proto::OTHER),
            (&[0xce, 0, 1], proto::OTHER),
            (b"GET / HTTP/1.1\r\n", proto::HTTP1),
            (b"DELETE /x HTTP/1.1\r\n", proto::HTTP1),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", proto::HTTP2),
            (&[0x16, 0x03, 0x01, 0x02, 0x00], proto::TLS),
            (&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], proto::POSTGRES),
            (&[0, 0, 0, 40, 0, 3, 0, 0, b'u'], proto::POSTGRES),
            (b"GETX / HTTP/1.1", proto::OTHER),
            (b"get / HTTP/1.1", proto::OTHER),
            (b"", proto::UNKNOWN),
        ];
        assert_eq!(classify(&head(&response).0, 36), proto::MYSQL);
        for (bytes, want) in cases {
            let (h, n) = head(bytes);
            assert_eq!(classify(&h, n), want, "{bytes:?}");
        }
    }

    #[test]
    fn route_keys_end_at_the_query_and_report_split_lines() {
        let mut d = [0u8; ROUTE_KEY_DATA];
        let (h, n) = head(b"POST /upload/a?x=1 HTTP/1.1\r\n");
        assert_eq!(
            route_key(8080, &h, n, &mut d),
            KeyOutcome::Key((3 + 9 + 1) * 8)
        );
        assert_eq!(&d[..3], &[0x1f, 0x90, 3]);
        assert_eq!(&d[3..13], b"/upload/a\0");
        let (h, n) = head(b"GET /slo");
        assert_eq!(route_key(1, &h, n, &mut d), KeyOutcome::Split);
        let (h, n) = head(b"\x00\x01binary");
        assert_eq!(route_key(1, &h, n, &mut d), KeyOutcome::NotHttp);
        let long = [b"GET /".as_slice(), &[b'a'; 200]].concat();
        let (h, n) = head(&long);
        assert_eq!(
            route_key(1, &h, n, &mut d),
            KeyOutcome::Key((ROUTE_KEY_DATA * 8) as u32)
        );
    }

    #[test]
    fn pattern_keys_are_prefixes_of_the_request_keys_they_match() {
        let mut d = [0u8; ROUTE_KEY_DATA];
        let (h, n) = head(b"GET /reports/2024 HTTP/1.1\r\n");
        let KeyOutcome::Key(bits) = route_key(80, &h, n, &mut d) else {
            panic!()
        };
        let (pbits, pdata) = pattern_key(80, 1, b"/reports/", true).unwrap();
        assert!(pbits < bits);
        assert_eq!(&pdata[..(pbits / 8) as usize], &d[..(pbits / 8) as usize]);
        let (ebits, edata) = pattern_key(80, 1, b"/reports/2024", false).unwrap();
        assert_eq!((ebits, &edata[..]), (bits, &d[..]));
    }
}
