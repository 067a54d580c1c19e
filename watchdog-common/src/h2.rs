//! HTTP/2 on tracked connections (h2c, and gRPC without TLS): the frame header, and the HPACK
//! rules both sides apply to the first bytes of a stream's header block.
//!
//! On an HTTP/2 connection a request is a stream: it starts at the client's HEADERS frame and
//! ends at the server's first HEADERS frame on the same stream id (time to first byte) or an
//! RST_STREAM either way. The kernel walks the frame headers of every read and write of such a
//! connection (`watchdog-ebpf/src/programs/h2.rs`) with the frame header below; the daemon
//! reads a stream's `:method` and `:path` from its header block with `pseudo` (parsing HPACK in
//! the kernel cost the verifier more than a program may take).

use crate::head::HEAD_BYTES;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`: the client's first bytes, before its first frame.
pub const PREFACE_LEN: u64 = 24;
/// Bytes of a frame header: 24-bit length, type, flags, reserved bit and 31-bit stream id.
pub const FRAME_HEADER: usize = 9;

/// Frame types the watchdog acts on.
pub mod frame {
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
}

/// HEADERS flags that move the start of the header block.
pub mod flag {
    /// A pad-length byte comes first.
    pub const PADDED: u8 = 0x8;
    /// Five bytes of stream dependency and weight come (after the pad length).
    pub const PRIORITY: u8 = 0x20;
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    #[inline(always)]
    pub fn parse<const N: usize>(b: &[u8; N]) -> Self {
        const { assert!(N >= FRAME_HEADER) };
        Self {
            len: (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: ((u32::from(b[5]) & 0x7f) << 24)
                | (u32::from(b[6]) << 16)
                | (u32::from(b[7]) << 8)
                | u32::from(b[8]),
        }
    }

    /// Where the header block starts in a HEADERS frame's payload.
    #[inline(always)]
    pub fn block_offset(&self) -> u32 {
        let mut off = 0;
        if self.flags & flag::PADDED != 0 {
            off += 1;
        }
        if self.flags & flag::PRIORITY != 0 {
            off += 5;
        }
        off
    }
}

/// Fields of a header block looked at before giving up on finding `:method` and `:path`.
pub const MAX_FIELDS: usize = 12;

/// Why a stream's route could not be read from its header block (`port_stat::ROUTE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// `:path` (or `:method`) is a dynamic-table index: its text was sent on an earlier stream.
    Indexed,
    /// `:path` is Huffman-coded.
    Huffman,
    /// The block ends (in the bytes copied) before `:path` does, or its encoding is one the
    /// kernel does not follow (multi-byte lengths).
    Split,
}

/// Where a stream's `:path` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A literal, `len` bytes at `start` of the block (the whole value when `complete`).
    Literal { start: usize, len: usize },
    /// A static-table entry: `/` (4) or `/index.html` (5).
    Static(&'static [u8]),
}

/// `:method` (a `head::METHODS` code) and `:path` of a header block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pseudo {
    pub method: u8,
    pub path: Path,
}

/// Byte `i` of a block (masked, so always in bounds).
#[inline(always)]
fn at(b: &[u8; HEAD_BYTES], i: usize) -> u8 {
    b[i & (HEAD_BYTES - 1)]
}

/// Static-table names the watchdog reads: 2 and 3 are `:method`, 4 and 5 `:path`.
const NAME_METHOD: u8 = 2;
const NAME_PATH: u8 = 4;

/// The method code of a literal `:method` value at `start`, `len` bytes.
#[inline(always)]
fn method_code(b: &[u8; HEAD_BYTES], start: usize, len: usize) -> u8 {
    let mut m = 0;
    while m < crate::head::METHODS.len() {
        let name = crate::head::METHODS[m].as_bytes();
        if name.len() == len {
            let mut i = 0;
            let mut same = true;
            while i < name.len() {
                if at(b, start + i) != name[i] {
                    same = false;
                    break;
                }
                i += 1;
            }
            if same {
                return m as u8 + 1;
            }
        }
        m += 1;
    }
    0
}

/// Is the literal name at `start` (`len` bytes) `:path` / `:method`? Returns the static-table
/// name index it stands for, or 0.
#[inline(always)]
fn literal_name(b: &[u8; HEAD_BYTES], start: usize, len: usize) -> u8 {
    const PATH: &[u8] = b":path";
    const METHOD: &[u8] = b":method";
    let is = |want: &[u8]| {
        if len != want.len() {
            return false;
        }
        let mut i = 0;
        while i < want.len() {
            if at(b, start + i) != want[i] {
                return false;
            }
            i += 1;
        }
        true
    };
    if is(PATH) {
        NAME_PATH
    } else if is(METHOD) {
        NAME_METHOD
    } else {
        0
    }
}

/// Where a scan of a header block stands (`field`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Offset of the next field.
    pub p: u32,
    /// The literal `:path` value, when `path == PATH_LITERAL`.
    pub path_start: u32,
    pub path_len: u32,
    /// `head::METHODS` code, 0 until `:method` is read.
    pub method: u8,
    /// `PATH_*`: what `:path` was found to be.
    pub path: u8,
    /// `Unreadable` code of the last field that could have been the path.
    pub why: u8,
    /// The scan is over (both found, or a field it cannot follow).
    pub stop: u8,
}

const PATH_NONE: u8 = 0;
const PATH_LITERAL: u8 = 1;
const PATH_ROOT: u8 = 4;
const PATH_INDEX: u8 = 5;
const WHY_INDEXED: u8 = 1;
const WHY_HUFFMAN: u8 = 2;

impl Scan {
    /// `:method` and `:path`, or why they could not be read.
    pub fn result(&self) -> Result<Pseudo, Unreadable> {
        let path = match self.path {
            PATH_LITERAL => Path::Literal {
                start: self.path_start as usize,
                len: self.path_len as usize,
            },
            PATH_ROOT => Path::Static(b"/"),
            PATH_INDEX => Path::Static(b"/index.html"),
            _ => return Err(self.unreadable()),
        };
        if self.method == 0 {
            return Err(self.unreadable());
        }
        Ok(Pseudo {
            method: self.method,
            path,
        })
    }

    fn unreadable(&self) -> Unreadable {
        match self.why {
            WHY_INDEXED => Unreadable::Indexed,
            WHY_HUFFMAN => Unreadable::Huffman,
            _ => Unreadable::Split,
        }
    }
}

/// Reads one field of the first `len` bytes of a header block (HPACK, RFC 7541) into `s`:
/// indexed fields of the static table, and literals that are neither Huffman-coded nor longer
/// than 126 bytes. False once the scan is over.
#[inline(always)]
pub fn field(b: &[u8; HEAD_BYTES], len: usize, s: &mut Scan) -> bool {
    let len = if len > HEAD_BYTES { HEAD_BYTES } else { len };
    let mut p = s.p as usize;
    if s.stop != 0 || p >= len {
        s.stop = 1;
        return false;
    }
    let first = at(b, p);
    if first & 0x80 != 0 {
        // Indexed field.
        match first & 0x7f {
            2 => s.method = 1,
            3 => s.method = 3,
            4 => s.path = PATH_ROOT,
            5 => s.path = PATH_INDEX,
            // Beyond the static table: an earlier stream's field, possibly the path.
            62.. => s.why = WHY_INDEXED,
            _ => {}
        }
        p += 1;
    } else if first & 0xe0 == 0x20 {
        // Dynamic table size update, 5-bit prefix.
        if first & 0x1f == 0x1f {
            s.stop = 1;
            return false;
        }
        p += 1;
    } else {
        // A literal: incremental indexing (6-bit name index), or without / never indexed
        // (4-bit).
        let (name_idx, full) = if first & 0x40 != 0 {
            (first & 0x3f, 0x3f)
        } else {
            (first & 0x0f, 0x0f)
        };
        p += 1;
        let mut name = name_idx;
        if name_idx == full || p >= len {
            s.stop = 1;
            return false;
        }
        if name_idx == 0 {
            let nl = at(b, p);
            if nl & 0x80 != 0 || nl == 0x7f {
                // A Huffman-coded or long name: not a pseudo-header this can read.
                s.stop = 1;
                return false;
            }
            name = literal_name(b, p + 1, usize::from(nl));
            p += 1 + usize::from(nl);
            if p >= len {
                s.stop = 1;
                return false;
            }
        }
        let vl = at(b, p);
        let huffman = vl & 0x80 != 0;
        let vlen = usize::from(vl & 0x7f);
        if vlen == 0x7f {
            s.stop = 1;
            return false;
        }
        let start = p + 1;
        if name == NAME_PATH || name == NAME_PATH + 1 {
            if huffman {
                s.why = WHY_HUFFMAN;
            } else {
                s.path = PATH_LITERAL;
                s.path_start = start as u32;
                s.path_len = vlen as u32;
            }
        } else if (name == NAME_METHOD || name == NAME_METHOD + 1)
            && !huffman
            && start + vlen <= len
        {
            s.method = method_code(b, start, vlen);
        }
        p = start + vlen;
    }
    s.p = p as u32;
    if s.method != 0 && s.path != PATH_NONE {
        s.stop = 1;
        return false;
    }
    true
}

/// `:method` and `:path` of the first `len` bytes of a header block (see `field`).
pub fn pseudo(b: &[u8; HEAD_BYTES], len: usize) -> Result<Pseudo, Unreadable> {
    let mut s = Scan::default();
    let mut f = 0;
    while f < MAX_FIELDS && field(b, len, &mut s) {
        f += 1;
    }
    s.result()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(s: &[u8]) -> ([u8; HEAD_BYTES], usize) {
        let mut h = [0u8; HEAD_BYTES];
        let n = s.len().min(HEAD_BYTES);
        h[..n].copy_from_slice(&s[..n]);
        (h, n)
    }

    /// grpcio 1.85's first call on a channel, as captured with strace.
    const GRPC_FIRST: &[u8] =
        b"\x40\x05:path\x09/t.T/Echo\x40\x0a:authority\x0f127.0.0.1:19555\x83\x86";

    #[test]
    fn reads_grpc_first_call_and_refuses_indexed_repeats() {
        let (b, n) = block(GRPC_FIRST);
        let ps = pseudo(&b, n).unwrap();
        assert_eq!(ps.method, 3);
        assert_eq!(ps.path, Path::Literal { start: 8, len: 9 });
        assert_eq!(&b[8..17], b"/t.T/Echo");
        // The second call: every field from the dynamic table.
        let (b, n) = block(b"\xc4\xc3\x83\x86\xc2\xc1\xc0");
        assert_eq!(pseudo(&b, n), Err(Unreadable::Indexed));
    }

    #[test]
    fn static_huffman_and_cut_blocks() {
        let (b, n) = block(b"\x82\x84\x86");
        let ps = pseudo(&b, n).unwrap();
        assert_eq!((ps.method, ps.path), (1, Path::Static(b"/")));
        // curl: `:path` as a literal with an indexed name (4), Huffman-coded.
        let (b, n) = block(b"\x82\x04\x85\x62\x8d\x39\x2c\x7f\x86");
        assert_eq!(pseudo(&b, n), Err(Unreadable::Huffman));
        // The same without Huffman, and a query string.
        let (b, n) = block(b"\x82\x04\x0a/reports?a\x86");
        let ps = pseudo(&b, n).unwrap();
        assert_eq!(
            (ps.method, ps.path),
            (1, Path::Literal { start: 3, len: 10 })
        );
        // Cut inside the path: found, longer than the bytes there (`request::stream_line`
        // marks it incomplete).
        let (b, _) = block(b"\x83\x04\x10/a/very/long/pat");
        let ps = pseudo(&b, 10).unwrap();
        assert_eq!(ps.path, Path::Literal { start: 3, len: 16 });
        assert_eq!(pseudo(&b, 0), Err(Unreadable::Split));
    }

    #[test]
    fn frame_headers() {
        let mut h = [0u8; 9];
        h[..9].copy_from_slice(b"\x00\x00\xd7\x01\x24\x80\x00\x00\x05");
        let f = FrameHeader::parse(&h);
        assert_eq!(
            f,
            FrameHeader {
                len: 0xd7,
                kind: frame::HEADERS,
                flags: 0x24,
                stream: 5
            }
        );
        assert_eq!(f.block_offset(), 5);
    }
}
