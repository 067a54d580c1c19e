//! The function names of a mapped file, from its `.symtab` and `.dynsym` as `elf.rs` read them
//! into our own buffers: a table sorted by address (counted against the file budget), looked
//! up by the address's place in the file, demangled (Rust, then C++).

use goblin::container::{Container, Ctx, Endian};

use super::elf::{cstr, Buf, Charge, ElfError};

const STT_FUNC: u8 = 2;
const STT_GNU_IFUNC: u8 = 10;
/// The longest name demangled (past it the raw name is shown).
const MAX_DEMANGLED: usize = 1024;

/// One function symbol: its address in the file, size, name offset, and which string table.
#[derive(Clone, Copy, Debug)]
struct Entry {
    addr: u64,
    size: u64,
    name: u32,
    table: u32,
}

/// A file's function symbols, sorted by address.
pub(super) struct Symbols {
    entries: Vec<Entry>,
    strings: Vec<Buf>,
    charge: Charge,
}

impl std::fmt::Debug for Symbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Symbols({} functions)", self.entries.len())
    }
}

/// A little- or big-endian integer of `N` bytes at `at`.
fn int<const N: usize>(b: &[u8], at: usize, little: bool) -> u64 {
    let mut v = [0u8; 8];
    let src = &b[at..at + N];
    if little {
        v[..N].copy_from_slice(src);
        u64::from_le_bytes(v)
    } else {
        v[8 - N..].copy_from_slice(src);
        u64::from_be_bytes(v)
    }
}

impl Symbols {
    /// The function symbols of (symbol table, its string table) pairs.
    pub(super) fn new(tables: Vec<(Buf, Buf)>, ctx: Ctx) -> Result<Symbols, ElfError> {
        let big = matches!(ctx.container, Container::Big);
        let little = ctx.le == Endian::Little;
        let size = if big { 24 } else { 16 };
        let count: usize = tables.iter().map(|(s, _)| s.len() / size).sum();
        let charge = Charge::reserve(count * std::mem::size_of::<Entry>())?;
        let mut entries = Vec::with_capacity(count);
        for (table, (syms, strings)) in tables.iter().enumerate() {
            for e in syms.chunks_exact(size) {
                let (name, value, size, info, shndx) = if big {
                    (
                        int::<4>(e, 0, little),
                        int::<8>(e, 8, little),
                        int::<8>(e, 16, little),
                        e[4],
                        int::<2>(e, 6, little),
                    )
                } else {
                    (
                        int::<4>(e, 0, little),
                        int::<4>(e, 4, little),
                        int::<4>(e, 8, little),
                        e[12],
                        int::<2>(e, 14, little),
                    )
                };
                let kind = info & 0xf;
                if (kind == STT_FUNC || kind == STT_GNU_IFUNC)
                    && shndx != 0
                    && value != 0
                    && (name as usize) < strings.len()
                {
                    entries.push(Entry {
                        addr: value,
                        size,
                        name: name as u32,
                        table: table as u32,
                    });
                }
            }
        }
        entries.sort_unstable_by_key(|e| (e.addr, std::cmp::Reverse(e.size)));
        entries.dedup_by_key(|e| e.addr);
        Ok(Symbols {
            entries,
            strings: tables.into_iter().map(|(_, s)| s).collect(),
            charge,
        })
    }

    /// The bytes this holds against the budget.
    pub(super) fn bytes(&self) -> usize {
        self.charge.bytes() + self.strings.iter().map(|s| s.len()).sum::<usize>()
    }

    /// The function containing `svma` (an address as the file places it) and the offset into
    /// it.
    pub(super) fn lookup(&self, svma: u64) -> Option<(String, u64)> {
        let i = self.entries.partition_point(|e| e.addr <= svma);
        // The nearest symbol below may be a small one inside a bigger function: look a few back.
        let e = self.entries[..i]
            .iter()
            .rev()
            .take(8)
            .find(|e| svma < e.addr.saturating_add(e.size.max(1)))?;
        let raw = cstr(self.strings.get(e.table as usize)?, e.name as usize)?;
        Some((demangle(raw), svma - e.addr))
    }
}

/// A symbol's name as a person reads it.
fn demangle(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    if raw.len() > MAX_DEMANGLED || !text.starts_with('_') {
        return text.into_owned();
    }
    if let Ok(d) = rustc_demangle::try_demangle(&text) {
        return format!("{d:#}");
    }
    if let Ok(d) = cpp_demangle::Symbol::new(raw).and_then(|s| {
        s.demangle()
            .map_err(|_| cpp_demangle::error::Error::Overflow)
    }) {
        return d;
    }
    text.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_as_a_person_reads_them() {
        assert_eq!(demangle(b"clock_nanosleep"), "clock_nanosleep");
        assert_eq!(
            demangle(b"_ZN2v88internal4Heap2GCEv"),
            "v8::internal::Heap::GC()"
        );
        assert_eq!(
            demangle(b"_ZN3std2rt10lang_start17h0123456789abcdefE"),
            "std::rt::lang_start"
        );
        assert_eq!(demangle(b"_Zgarbage"), "_Zgarbage");
    }
}
