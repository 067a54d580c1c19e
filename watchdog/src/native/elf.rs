//! What unwinding and symbolization need of a file that a traced process maps, read without
//! trusting the file or its owner: the owner can truncate it, grow it, swap it for a FIFO, or
//! write headers that claim anything.
//!
//! - No mmap: every byte is copied with `pread` into a buffer of our own, so a file truncated
//!   during the read ends in a short read (an error), never in SIGBUS.
//! - Bounded: each section has a cap ([`MAX_UNWIND_SECTION`] for `.eh_frame` and `.debug_frame`,
//!   [`MAX_SYMBOL_SECTION`] for each symbol and string table, less for headers), its claimed
//!   range must lie inside the file's size, and every buffer alive in the daemon counts against
//!   one budget ([`MAX_LIVE_BYTES`]): a sparse 4 KiB file that claims a 512 MiB `.eh_frame` is
//!   refused before anything is allocated.
//! - Regular files only: opened `O_NONBLOCK` (a FIFO or device never blocks the open), `fstat`ed
//!   and refused unless regular; a path (not `map_files`) is opened `O_NOFOLLOW` and must be the
//!   very inode the process maps.

use std::{
    fs::File,
    ops::{Deref, Range},
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use goblin::{
    container::{Container, Ctx},
    elf::{
        program_header::{ProgramHeader, PT_LOAD},
        section_header::{SectionHeader, SHT_NOBITS},
    },
};

use super::symbols::Symbols;

/// The most of `.eh_frame` or `.debug_frame` read from one file (node's 100 MB binary has a
/// 2.7 MiB `.eh_frame`, libpython's 290 KiB).
pub(super) const MAX_UNWIND_SECTION: u64 = 8 << 20;
/// The most of `.eh_frame_hdr` (node's: 600 KiB).
const MAX_EH_FRAME_HDR: u64 = 2 << 20;
/// The most of each of `.symtab`, `.strtab`, `.dynsym`, `.dynstr` (node's `.strtab`: 7.2 MiB).
pub(super) const MAX_SYMBOL_SECTION: u64 = 16 << 20;
/// The most of a program or section header table, and of the section names.
const MAX_HEADER_TABLE: u64 = 256 << 10;
/// All the bytes read from mapped files alive at once in the daemon (cached or being read, by
/// every reader): past it a read evicts the cache or is refused.
pub(super) const MAX_LIVE_BYTES: usize = 96 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The bytes held now against [`MAX_LIVE_BYTES`].
#[cfg(test)]
pub(super) fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// `n` bytes counted against [`MAX_LIVE_BYTES`] while this lives.
#[derive(Debug)]
pub(super) struct Charge(usize);

impl Charge {
    pub(super) fn reserve(n: usize) -> Result<Charge, ElfError> {
        LIVE.fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
            l.checked_add(n).filter(|&t| t <= MAX_LIVE_BYTES)
        })
        .map(|_| Charge(n))
        .map_err(|_| ElfError::Budget(n))
    }

    pub(super) fn bytes(&self) -> usize {
        self.0
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        LIVE.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// Bytes copied out of a file, shared by the cache and the readers, counted while they live.
#[derive(Clone, Debug)]
pub(super) struct Buf(Arc<(Vec<u8>, Charge)>);

/// Empty (framehop's section info wants a default).
impl Default for Buf {
    fn default() -> Buf {
        Buf(Arc::new((Vec::new(), Charge(0))))
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0 .0
    }
}

/// Why a mapped file was not read (the frames in it say so).
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be opened.
    #[error("unopenable: {0}")]
    Open(#[source] std::io::Error),
    /// A FIFO, socket, device or directory.
    #[error("not a regular file")]
    NotRegular,
    /// The path now names another file than the one mapped.
    #[error("the path names another file than the one mapped")]
    Replaced,
    /// A section or table claims more than its cap.
    #[error("its {0} claims {1} bytes, over the {2}-byte cap")]
    TooBig(&'static str, u64, u64),
    /// A section or table claims bytes past the file's end (a sparse or truncated file).
    #[error("its {0} ends at byte {1}, past the file's {2} bytes")]
    PastEnd(&'static str, u64, u64),
    /// The read failed or came short (the file shrank meanwhile).
    #[error("unreadable: {0}")]
    Read(#[source] std::io::Error),
    /// Not an ELF file, or a malformed one.
    #[error("not a valid ELF file: {0}")]
    Parse(String),
    /// Reading it would take the daemon past its budget for file bytes.
    #[error("{0} more bytes would exceed the {MAX_LIVE_BYTES}-byte budget for mapped files")]
    Budget(usize),
}

/// A mapped file, opened and checked: regular, the inode the process maps.
pub(super) struct Opened {
    file: File,
    size: u64,
}

/// Opens `path` without blocking and checks that it is a regular file; `expect` (device as
/// `major << 32 | minor`, inode) must match when the path is not the kernel's own link
/// (`/proc/PID/map_files/...`), which is then opened without following a last symlink.
pub(super) fn open(path: &str, expect: Option<(u64, u64)>) -> Result<Opened, ElfError> {
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    if expect.is_some() {
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(ElfError::Open)?;
    let meta = file.metadata().map_err(ElfError::Open)?;
    if !meta.file_type().is_file() {
        return Err(ElfError::NotRegular);
    }
    if let Some((dev, ino)) = expect {
        let d = meta.dev();
        let (major, minor) = (u64::from(libc::major(d)), u64::from(libc::minor(d)));
        if (major << 32 | minor) != dev || meta.ino() != ino {
            return Err(ElfError::Replaced);
        }
    }
    Ok(Opened {
        size: meta.len(),
        file,
    })
}

impl Opened {
    /// `len` bytes at `offset` of the file, named `what` in errors, at most `cap`.
    fn read(&self, what: &'static str, offset: u64, len: u64, cap: u64) -> Result<Buf, ElfError> {
        if len > cap {
            return Err(ElfError::TooBig(what, len, cap));
        }
        let end = offset
            .checked_add(len)
            .ok_or(ElfError::PastEnd(what, u64::MAX, self.size))?;
        if end > self.size {
            return Err(ElfError::PastEnd(what, end, self.size));
        }
        let charge = Charge::reserve(len as usize)?;
        let mut bytes = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(ElfError::Read)?;
        Ok(Buf(Arc::new((bytes, charge))))
    }

    /// A section's bytes (none for `SHT_NOBITS`).
    fn section(&self, what: &'static str, s: &SectionHeader, cap: u64) -> Result<Buf, ElfError> {
        if s.sh_type == SHT_NOBITS {
            return Err(ElfError::Parse(format!("{what} has no bytes in the file")));
        }
        self.read(what, s.sh_offset, s.sh_size, cap)
    }
}

/// What unwinding and symbolization need of one ELF file.
pub(super) struct Module {
    /// PT_LOAD segments: file offset, virtual address, file size.
    pub(super) loads: Vec<(u64, u64, u64)>,
    pub(super) text_svma: Option<Range<u64>>,
    pub(super) got_svma: Option<Range<u64>>,
    pub(super) eh_frame: Option<(Range<u64>, Buf)>,
    pub(super) eh_frame_hdr: Option<(Range<u64>, Buf)>,
    pub(super) debug_frame: Option<Buf>,
    /// The symbols, or why there are none.
    pub(super) symbols: Result<Symbols, String>,
}

impl Module {
    /// The bytes this holds against the budget (the few load segments aside).
    pub(super) fn bytes(&self) -> usize {
        let b = |o: Option<&Buf>| o.map_or(0, |b| b.len());
        b(self.eh_frame.as_ref().map(|e| &e.1))
            + b(self.eh_frame_hdr.as_ref().map(|e| &e.1))
            + b(self.debug_frame.as_ref())
            + self.symbols.as_ref().map_or(0, Symbols::bytes)
    }

    /// The load bias of a file whose bytes at `offset` are mapped at `start`.
    pub(super) fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let (off, vaddr, _) = self
            .loads
            .iter()
            .find(|(o, _, size)| (*o..o.saturating_add(*size.max(&1))).contains(&offset))
            .or_else(|| self.loads.first())?;
        start.checked_sub(vaddr.checked_add(offset.checked_sub(*off)?)?)
    }
}

/// Reads the headers, the unwind sections and the symbol tables of `f`, each bounded.
pub(super) fn read(f: &Opened) -> Result<Module, ElfError> {
    let parse = |e: goblin::error::Error| ElfError::Parse(e.to_string());
    let head = f.read("ELF header", 0, 64.min(f.size), 64)?;
    let h = goblin::elf::Elf::parse_header(&head).map_err(parse)?;
    let container = if h.e_ident[goblin::elf::header::EI_CLASS] == goblin::elf::header::ELFCLASS64 {
        Container::Big
    } else {
        Container::Little
    };
    let ctx = Ctx::new(container, h.endianness().map_err(parse)?);

    let ph_len = u64::from(h.e_phnum) * u64::from(h.e_phentsize);
    let ph = f.read("program headers", h.e_phoff, ph_len, MAX_HEADER_TABLE)?;
    let phs = ProgramHeader::parse(&ph, 0, usize::from(h.e_phnum), ctx).map_err(parse)?;
    let loads = phs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .map(|p| (p.p_offset, p.p_vaddr, p.p_filesz))
        .collect();

    let sh_len = u64::from(h.e_shnum) * u64::from(h.e_shentsize);
    let sh = f.read("section headers", h.e_shoff, sh_len, MAX_HEADER_TABLE)?;
    let shs = SectionHeader::parse_from(&sh, 0, usize::from(h.e_shnum), ctx).map_err(parse)?;
    let names = match shs.get(usize::from(h.e_shstrndx)) {
        Some(s) => f.section("section names", s, MAX_HEADER_TABLE)?,
        None => return Err(ElfError::Parse("no section names".into())),
    };
    let name_of = |s: &SectionHeader| cstr(&names, s.sh_name);
    let find = |name: &str| {
        shs.iter()
            .find(|s| name_of(s) == Some(name.as_bytes()) && s.sh_type != SHT_NOBITS)
    };
    let svma = |s: &SectionHeader| s.sh_addr..s.sh_addr.saturating_add(s.sh_size);
    let unwind = |name: &'static str, cap| -> Result<Option<(Range<u64>, Buf)>, ElfError> {
        find(name)
            .map(|s| Ok((svma(s), f.section(name, s, cap)?)))
            .transpose()
    };
    let eh_frame = unwind(".eh_frame", MAX_UNWIND_SECTION)?;
    let eh_frame_hdr = unwind(".eh_frame_hdr", MAX_EH_FRAME_HDR)?;
    // Rarely present in a mapped binary, and only a fallback: one too big is left out.
    let debug_frame = unwind(".debug_frame", MAX_UNWIND_SECTION)
        .ok()
        .flatten()
        .map(|d| d.1);

    // Symbols: `.symtab` (a binary not stripped) and `.dynsym` (exported ones), each with the
    // string table its `sh_link` names.
    let mut tables = Vec::new();
    let mut why = "no .symtab or .dynsym".to_string();
    for table in [".symtab", ".dynsym"] {
        let Some(s) = find(table) else { continue };
        let read = (|| {
            let strings = shs
                .get(s.sh_link as usize)
                .ok_or_else(|| ElfError::Parse(format!("{table} links no string table")))?;
            Ok::<_, ElfError>((
                f.section(table, s, MAX_SYMBOL_SECTION)?,
                f.section("string table", strings, MAX_SYMBOL_SECTION)?,
            ))
        })();
        match read {
            Ok(t) => tables.push(t),
            Err(e) => why = format!("{table}: {e}"),
        }
    }
    let symbols = if tables.is_empty() {
        Err(why)
    } else {
        Symbols::new(tables, ctx).map_err(|e| e.to_string())
    };
    Ok(Module {
        loads,
        text_svma: find(".text").map(svma),
        got_svma: find(".got").map(svma),
        eh_frame,
        eh_frame_hdr,
        debug_frame,
        symbols,
    })
}

/// The NUL-terminated string at `at` of a string table.
pub(super) fn cstr(table: &[u8], at: usize) -> Option<&[u8]> {
    let rest = table.get(at..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_our_own_binary_reads_within_the_caps() {
        let exe = std::env::current_exe().unwrap();
        let f = open(exe.to_str().unwrap(), None).unwrap();
        let m = read(&f).unwrap();
        assert!(m.eh_frame.is_some() && !m.loads.is_empty());
        assert!(m.bytes() > 0 && live_bytes() >= m.bytes());
    }

    #[test]
    fn a_section_claiming_more_than_the_file_holds_is_refused_before_any_allocation() {
        let dir = std::env::temp_dir().join(format!("elf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("small");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let f = open(p.to_str().unwrap(), None).unwrap();
        let before = live_bytes();
        assert!(matches!(
            f.read(".eh_frame", 0, 512 << 20, MAX_UNWIND_SECTION),
            Err(ElfError::TooBig(..))
        ));
        assert!(matches!(
            f.read(".eh_frame", 4000, 1000, MAX_UNWIND_SECTION),
            Err(ElfError::PastEnd(_, 5000, 4096))
        ));
        assert!(matches!(read(&f), Err(ElfError::Parse(_))));
        assert!(live_bytes() <= before + 4096);
        // A FIFO is refused without blocking.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            open(fifo.to_str().unwrap(), None),
            Err(ElfError::NotRegular)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
