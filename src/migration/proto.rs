//! The migration wire protocol (a sans-IO codec): messages to and from byte buffers.
//!
//! Every message is a fixed 12-byte little-endian header followed by a payload:
//!
//! ```text
//! 0..4   magic "VFMG"
//! 4..6   protocol version (1)
//! 6..8   message kind
//! 8..12  payload length in bytes
//! ```
//!
//! The decoder checks the magic, the version, the kind and the length against a cap
//! per kind *before* waiting for (or allocating) the payload, so a peer cannot make us
//! buffer more than one largest legal message. A malformed message is an error value;
//! nothing here panics on input. Page batches are decoded into a view over the receive
//! buffer, so page data is copied once, into guest memory.

use std::borrow::Cow;
use std::fmt;

use crate::memory::{MAX_MEMORY_BYTES, PAGE_SIZE};

/// Protocol magic: the first four bytes of every message.
pub const MAGIC: [u8; 4] = *b"VFMG";
/// The protocol version this build speaks (2: the verification step, `Rollback` and
/// `RolledBack`).
pub const VERSION: u16 = 2;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 12;

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: Range<usize> = 4..6;
    pub const KIND: Range<usize> = 6..8;
    pub const LEN: Range<usize> = 8..12;
}

/// Most pages in one `Pages` message (1 MiB of data).
pub const MAX_BATCH_PAGES: usize = 256;
/// Set in a page descriptor when the page is all zeroes and no data follows.
pub const ZERO_FLAG: u64 = 1 << 63;
const DESC_LEN: usize = 8;
const PAGES_PREFIX: usize = 8; // round u32, count u32
/// Largest `Pages` payload.
pub const MAX_PAGES_PAYLOAD: usize = PAGES_PREFIX + MAX_BATCH_PAGES * (DESC_LEN + PAGE_SIZE);
/// Largest message on the wire (a full page batch with its header).
pub const MAX_MESSAGE: usize = HEADER_LEN + MAX_PAGES_PAYLOAD;
/// Largest VM configuration (JSON) in `Hello`.
pub const MAX_CONFIG_LEN: usize = 16 << 10;
/// Largest device state (JSON).
pub const MAX_STATE_LEN: usize = 64 << 10;
/// Longest refusal or abort reason; longer reasons are cut when encoding.
pub const MAX_REASON_LEN: usize = 1024;
/// Most ranges in one pull request.
pub const MAX_PULL_RANGES: usize = 1024;
/// Most pages one pull request may ask for.
pub const MAX_PULL_PAGES: u64 = 1024;
/// Most pages of any guest.
pub const MAX_PAGES: u64 = MAX_MEMORY_BYTES / PAGE_SIZE as u64;

/// Message kinds, with their codes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// source → target: VM configuration (pre-check).
    Hello,
    /// target → source: admitted.
    Accept,
    /// target → source: not admitted, with a reason.
    Refuse,
    /// source → target: a batch of pages (pre-copy round ≥ 1, or pull answer: round 0).
    Pages,
    /// source → target: the VM is quiesced; the final dirty bitmap.
    Bitmap,
    /// target → source: send these pages.
    PullRequest,
    /// target → source: every page of the bitmap was requested.
    PullEnd,
    /// source → target: device state (JSON).
    DeviceState,
    /// target → source: the VM runs on the target.
    Resumed,
    /// source → target: the source's memory hash; the migration is over.
    Complete,
    /// either way: the sender gives up, with a reason.
    Abort,
    /// source → target: every page of a pre-copy round was sent.
    RoundEnd,
    /// target → source: every page of that round is in guest memory. The source waits
    /// for it before deciding, so the stream holds no backlog when the VM stops and
    /// the round's time measures the real bandwidth.
    RoundAck,
    /// source → target, instead of `Complete`: the target's memory digest is missing or
    /// differs from the source's. The target stops its copy and gives the disk lock
    /// back, then answers `RolledBack`; the VM resumes on the source.
    Rollback,
    /// target → source: the copy is stopped and the disk lock released.
    RolledBack,
}

impl Kind {
    pub fn code(self) -> u16 {
        match self {
            Kind::Hello => 1,
            Kind::Accept => 2,
            Kind::Refuse => 3,
            Kind::Pages => 4,
            Kind::Bitmap => 5,
            Kind::PullRequest => 6,
            Kind::PullEnd => 7,
            Kind::DeviceState => 8,
            Kind::Resumed => 9,
            Kind::Complete => 10,
            Kind::Abort => 11,
            Kind::RoundEnd => 12,
            Kind::RoundAck => 13,
            Kind::Rollback => 14,
            Kind::RolledBack => 15,
        }
    }

    pub fn from_code(code: u16) -> Option<Kind> {
        Some(match code {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::Bitmap,
            6 => Kind::PullRequest,
            7 => Kind::PullEnd,
            8 => Kind::DeviceState,
            9 => Kind::Resumed,
            10 => Kind::Complete,
            11 => Kind::Abort,
            12 => Kind::RoundEnd,
            13 => Kind::RoundAck,
            14 => Kind::Rollback,
            15 => Kind::RolledBack,
            _ => return None,
        })
    }

    /// Largest payload of this kind for a guest of `pages` pages.
    pub fn max_payload(self, pages: u64) -> usize {
        match self {
            Kind::Hello => MAX_CONFIG_LEN,
            Kind::Accept | Kind::PullEnd | Kind::RolledBack => 0,
            Kind::Refuse | Kind::Abort | Kind::Rollback => MAX_REASON_LEN,
            Kind::Pages => MAX_PAGES_PAYLOAD,
            Kind::Bitmap => BITMAP_PREFIX + bitmap_words(pages.min(MAX_PAGES)) * 8,
            Kind::PullRequest => 8 + MAX_PULL_RANGES * 16,
            Kind::DeviceState => MAX_STATE_LEN,
            Kind::Resumed => 8 + HASH_FIELD,
            Kind::Complete => HASH_FIELD,
            Kind::RoundEnd | Kind::RoundAck => 4,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

const HASH_FIELD: usize = 1 + 32; // present flag + SHA-256
const BITMAP_PREFIX: usize = 24; // quiesce_t_us u64, pages u64, flags u64
const BITMAP_CONVERGED: u64 = 1;

/// Number of 64-bit bitmap words for `pages` pages.
pub fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// Decoding errors. Any of them ends the migration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} not supported (this side speaks {VERSION})")]
    BadVersion(u16),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("{kind} message of {len} bytes exceeds the limit of {max}")]
    TooLong { kind: Kind, len: usize, max: usize },
    #[error("malformed {kind} message: {what}")]
    Malformed { kind: Kind, what: &'static str },
    #[error("page {page} is outside guest memory of {pages} pages")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("page batch is full")]
    BatchFull,
}

/// What the decoder knows of the session: the guest's page count once the pre-check
/// told it ([`MAX_PAGES`] before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub pages: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { pages: MAX_PAGES }
    }
}

/// A contiguous run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    pub start: u64,
    pub count: u64,
}

/// A decoded message. Borrowed parts point into the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Hello {
        config_json: &'a [u8],
    },
    Accept,
    Refuse {
        reason: Cow<'a, str>,
    },
    Pages(PagesView<'a>),
    Bitmap {
        quiesce_t_us: u64,
        pages: u64,
        /// Pre-copy converged (false: stopped by a limit).
        converged: bool,
        words: Cow<'a, [u64]>,
    },
    PullRequest {
        ranges: Cow<'a, [PageRange]>,
    },
    PullEnd,
    DeviceState {
        json: &'a [u8],
    },
    Resumed {
        t_us: u64,
        sha256: Option<[u8; 32]>,
    },
    Complete {
        sha256: Option<[u8; 32]>,
    },
    Abort {
        reason: Cow<'a, str>,
    },
    RoundEnd {
        round: u32,
    },
    RoundAck {
        round: u32,
    },
    Rollback {
        reason: Cow<'a, str>,
    },
    RolledBack,
}

impl Message<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Accept => Kind::Accept,
            Message::Refuse { .. } => Kind::Refuse,
            Message::Pages(_) => Kind::Pages,
            Message::Bitmap { .. } => Kind::Bitmap,
            Message::PullRequest { .. } => Kind::PullRequest,
            Message::PullEnd => Kind::PullEnd,
            Message::DeviceState { .. } => Kind::DeviceState,
            Message::Resumed { .. } => Kind::Resumed,
            Message::Complete { .. } => Kind::Complete,
            Message::Abort { .. } => Kind::Abort,
            Message::RoundEnd { .. } => Kind::RoundEnd,
            Message::RoundAck { .. } => Kind::RoundAck,
            Message::Rollback { .. } => Kind::Rollback,
            Message::RolledBack => Kind::RolledBack,
        }
    }
}

/// A validated batch of pages: `count` entries of an 8-byte descriptor (page number,
/// [`ZERO_FLAG`]) followed by the page's 4096 bytes unless the page is zero.
#[derive(Clone, PartialEq, Eq)]
pub struct PagesView<'a> {
    round: u32,
    count: u32,
    body: &'a [u8],
}

impl fmt::Debug for PagesView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagesView")
            .field("round", &self.round)
            .field("count", &self.count)
            .field("bytes", &self.body.len())
            .finish()
    }
}

/// One page of a batch: its number and its data (`None`: all zeroes).
pub type PageEntry<'a> = (u64, Option<&'a [u8; PAGE_SIZE]>);

impl<'a> PagesView<'a> {
    /// Pre-copy round (1, 2, …), or 0 for an answer to a pull request.
    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The entries, in wire order. The body was validated when decoding.
    pub fn iter(&self) -> impl Iterator<Item = PageEntry<'a>> + 'a {
        let mut rest = self.body;
        std::iter::from_fn(move || {
            let (desc, tail) = rest.split_first_chunk::<DESC_LEN>()?;
            let desc = u64::from_le_bytes(*desc);
            let page = desc & !ZERO_FLAG;
            if desc & ZERO_FLAG != 0 {
                rest = tail;
                return Some((page, None));
            }
            let (data, tail) = tail.split_first_chunk::<PAGE_SIZE>()?;
            rest = tail;
            Some((page, Some(data)))
        })
    }

    fn validate(round: u32, count: u32, body: &'a [u8], pages: u64) -> Result<Self, ProtoError> {
        let bad = |what| ProtoError::Malformed {
            kind: Kind::Pages,
            what,
        };
        if count as usize > MAX_BATCH_PAGES {
            return Err(bad("more pages than a batch holds"));
        }
        let mut rest = body;
        for _ in 0..count {
            let (desc, tail) = rest
                .split_first_chunk::<DESC_LEN>()
                .ok_or(bad("truncated descriptor"))?;
            let desc = u64::from_le_bytes(*desc);
            let page = desc & !ZERO_FLAG;
            if page >= pages {
                return Err(ProtoError::PageOutOfRange { page, pages });
            }
            rest = if desc & ZERO_FLAG != 0 {
                tail
            } else {
                tail.get(PAGE_SIZE..).ok_or(bad("truncated page data"))?
            };
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(PagesView { round, count, body })
    }
}

/// Builds one `Pages` message in place in a caller-owned buffer of at least
/// [`MAX_MESSAGE`] bytes, so the source copies each page once, from guest memory into
/// the send buffer, and allocates nothing per page.
pub struct PagesEncoder<'b> {
    buf: &'b mut [u8],
    len: usize,
    count: u32,
}

impl<'b> PagesEncoder<'b> {
    /// Starts a batch of `round` (0 = pull answer). `buf` must hold [`MAX_MESSAGE`].
    pub fn new(buf: &'b mut [u8], round: u32) -> Result<PagesEncoder<'b>, ProtoError> {
        if buf.len() < MAX_MESSAGE {
            return Err(ProtoError::BatchFull);
        }
        buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&round.to_le_bytes());
        Ok(PagesEncoder {
            buf,
            len: HEADER_LEN + PAGES_PREFIX,
            count: 0,
        })
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count as usize >= MAX_BATCH_PAGES
    }

    /// Adds page `page`; `fill` writes its contents. All-zero pages keep only their
    /// descriptor. Returns whether the page was zero.
    pub fn push_with(
        &mut self,
        page: u64,
        fill: impl FnOnce(&mut [u8; PAGE_SIZE]),
    ) -> Result<bool, ProtoError> {
        if self.is_full() {
            return Err(ProtoError::BatchFull);
        }
        let d = self.len;
        let slot: &mut [u8; PAGE_SIZE] = (&mut self.buf[d + DESC_LEN..d + DESC_LEN + PAGE_SIZE])
            .try_into()
            .map_err(|_| ProtoError::BatchFull)?;
        fill(slot);
        let zero = is_zero(slot);
        let desc = if zero { page | ZERO_FLAG } else { page };
        self.buf[d..d + DESC_LEN].copy_from_slice(&desc.to_le_bytes());
        self.len += DESC_LEN + if zero { 0 } else { PAGE_SIZE };
        self.count += 1;
        Ok(zero)
    }

    /// Writes the header; returns the message length (the bytes to send are
    /// `buf[..len]`).
    pub fn finish(self) -> usize {
        put_header(self.buf, Kind::Pages, self.len - HEADER_LEN);
        self.buf[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&self.count.to_le_bytes());
        self.len
    }
}

/// True when every byte of `page` is zero.
pub fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    // OR-fold of words: branch-free, vectorises.
    page.chunks_exact(8).fold(0u64, |acc, c| {
        acc | u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))
    }) == 0
}

fn put_header(buf: &mut [u8], kind: Kind, payload: usize) {
    buf[field::MAGIC].copy_from_slice(&MAGIC);
    buf[field::VERSION].copy_from_slice(&VERSION.to_le_bytes());
    buf[field::KIND].copy_from_slice(&kind.code().to_le_bytes());
    buf[field::LEN].copy_from_slice(&(payload as u32).to_le_bytes());
}

fn cut(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

fn put_hash(out: &mut Vec<u8>, h: &Option<[u8; 32]>) {
    out.push(h.is_some() as u8);
    out.extend_from_slice(&h.unwrap_or([0; 32]));
}

/// Appends `msg` to `out`. Reasons longer than [`MAX_REASON_LEN`] are cut; other
/// oversized fields are the caller's bug and are encoded as is (the peer refuses them).
pub fn encode(msg: &Message<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    match msg {
        Message::Hello { config_json } => out.extend_from_slice(config_json),
        Message::Accept | Message::PullEnd | Message::RolledBack => {}
        Message::Refuse { reason } | Message::Abort { reason } | Message::Rollback { reason } => {
            out.extend_from_slice(cut(reason).as_bytes())
        }
        Message::Pages(v) => {
            out.extend_from_slice(&v.round.to_le_bytes());
            out.extend_from_slice(&v.count.to_le_bytes());
            out.extend_from_slice(v.body);
        }
        Message::Bitmap {
            quiesce_t_us,
            pages,
            converged,
            words,
        } => {
            out.extend_from_slice(&quiesce_t_us.to_le_bytes());
            out.extend_from_slice(&pages.to_le_bytes());
            let flags = if *converged { BITMAP_CONVERGED } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
            for w in words.iter() {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        Message::PullRequest { ranges } => {
            out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            for r in ranges.iter() {
                out.extend_from_slice(&r.start.to_le_bytes());
                out.extend_from_slice(&r.count.to_le_bytes());
            }
        }
        Message::DeviceState { json } => out.extend_from_slice(json),
        Message::Resumed { t_us, sha256 } => {
            out.extend_from_slice(&t_us.to_le_bytes());
            put_hash(out, sha256);
        }
        Message::Complete { sha256 } => put_hash(out, sha256),
        Message::RoundEnd { round } | Message::RoundAck { round } => {
            out.extend_from_slice(&round.to_le_bytes())
        }
    }
    let payload = out.len() - start - HEADER_LEN;
    put_header(&mut out[start..], msg.kind(), payload);
}

/// Checks a header. Returns the kind and the whole message length (header + payload)
/// once at least [`HEADER_LEN`] bytes are in, `None` before.
pub fn peek(buf: &[u8], limits: &Limits) -> Result<Option<(Kind, usize)>, ProtoError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        // Reject garbage as soon as the magic can be seen.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&buf[..n]);
            return Err(ProtoError::BadMagic(m));
        }
        return Ok(None);
    };
    let magic: [u8; 4] = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[field::VERSION.start], h[field::VERSION.start + 1]]);
    if version != VERSION {
        return Err(ProtoError::BadVersion(version));
    }
    let code = u16::from_le_bytes([h[field::KIND.start], h[field::KIND.start + 1]]);
    let kind = Kind::from_code(code).ok_or(ProtoError::UnknownKind(code))?;
    let l = &h[field::LEN];
    let len = u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize;
    let max = kind.max_payload(limits.pages);
    if len > max {
        return Err(ProtoError::TooLong { kind, len, max });
    }
    Ok(Some((kind, HEADER_LEN + len)))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn hash_at(b: &[u8], kind: Kind) -> Result<Option<[u8; 32]>, ProtoError> {
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[1..33]);
    match b[0] {
        0 => Ok(None),
        1 => Ok(Some(h)),
        _ => Err(ProtoError::Malformed {
            kind,
            what: "bad hash flag",
        }),
    }
}

/// Decodes one message from the front of `buf`. `Ok(None)`: more bytes are needed
/// (the header was checked already, so waiting is safe). `Ok(Some((msg, used)))`: the
/// message and how many bytes it took.
pub fn decode<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Message<'a>, usize)>, ProtoError> {
    let Some((kind, total)) = peek(buf, limits)? else {
        return Ok(None);
    };
    let Some(p) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    let bad = |what| ProtoError::Malformed { kind, what };
    let exact = |n: usize| {
        if p.len() == n {
            Ok(())
        } else {
            Err(bad("wrong length"))
        }
    };
    let text = |p: &'a [u8]| {
        std::str::from_utf8(p)
            .map(Cow::Borrowed)
            .map_err(|_| bad("reason is not UTF-8"))
    };
    let msg = match kind {
        Kind::Hello => Message::Hello { config_json: p },
        Kind::Accept => Message::Accept,
        Kind::PullEnd => Message::PullEnd,
        Kind::RolledBack => Message::RolledBack,
        Kind::Rollback => Message::Rollback { reason: text(p)? },
        Kind::Refuse => Message::Refuse { reason: text(p)? },
        Kind::Abort => Message::Abort { reason: text(p)? },
        Kind::Pages => {
            if p.len() < PAGES_PREFIX {
                return Err(bad("wrong length"));
            }
            Message::Pages(PagesView::validate(
                u32_at(p, 0),
                u32_at(p, 4),
                &p[PAGES_PREFIX..],
                limits.pages,
            )?)
        }
        Kind::Bitmap => {
            if p.len() < BITMAP_PREFIX {
                return Err(bad("wrong length"));
            }
            let pages = u64_at(p, 8);
            if pages > limits.pages {
                return Err(bad("more pages than the guest has"));
            }
            let flags = u64_at(p, 16);
            if flags & !BITMAP_CONVERGED != 0 {
                return Err(bad("unknown flags"));
            }
            let n = bitmap_words(pages);
            exact(BITMAP_PREFIX + n * 8)?;
            let words: Vec<u64> = p[BITMAP_PREFIX..]
                .chunks_exact(8)
                .map(|c| u64_at(c, 0))
                .collect();
            if !pages.is_multiple_of(64) && words.last().is_some_and(|w| w >> (pages % 64) != 0) {
                return Err(bad("bits set past the last page"));
            }
            Message::Bitmap {
                quiesce_t_us: u64_at(p, 0),
                pages,
                converged: flags & BITMAP_CONVERGED != 0,
                words: Cow::Owned(words),
            }
        }
        Kind::PullRequest => {
            if p.len() < 8 {
                return Err(bad("wrong length"));
            }
            let n = u32_at(p, 0) as usize;
            if n > MAX_PULL_RANGES {
                return Err(bad("too many ranges"));
            }
            exact(8 + n * 16)?;
            let mut total = 0u64;
            let mut ranges = Vec::with_capacity(n);
            for c in p[8..].chunks_exact(16) {
                let r = PageRange {
                    start: u64_at(c, 0),
                    count: u64_at(c, 8),
                };
                if r.count == 0 {
                    return Err(bad("empty range"));
                }
                match r.start.checked_add(r.count) {
                    Some(end) if end <= limits.pages => {}
                    _ => {
                        return Err(ProtoError::PageOutOfRange {
                            page: r.start.saturating_add(r.count - 1),
                            pages: limits.pages,
                        })
                    }
                }
                total += r.count;
                if total > MAX_PULL_PAGES {
                    return Err(bad("too many pages in one request"));
                }
                ranges.push(r);
            }
            Message::PullRequest {
                ranges: Cow::Owned(ranges),
            }
        }
        Kind::DeviceState => Message::DeviceState { json: p },
        Kind::Resumed => {
            exact(8 + HASH_FIELD)?;
            Message::Resumed {
                t_us: u64_at(p, 0),
                sha256: hash_at(&p[8..], kind)?,
            }
        }
        Kind::Complete => {
            exact(HASH_FIELD)?;
            Message::Complete {
                sha256: hash_at(p, kind)?,
            }
        }
        Kind::RoundEnd => {
            exact(4)?;
            Message::RoundEnd {
                round: u32_at(p, 0),
            }
        }
        Kind::RoundAck => {
            exact(4)?;
            Message::RoundAck {
                round: u32_at(p, 0),
            }
        }
    };
    Ok(Some((msg, total)))
}

/// Splits the set pages of bitmap `words` into pull requests: runs of consecutive pages
/// as ranges, at most [`MAX_PULL_PAGES`] pages and [`MAX_PULL_RANGES`] ranges each.
pub fn pull_requests(words: &[u64]) -> Vec<Vec<PageRange>> {
    let mut out: Vec<Vec<PageRange>> = Vec::new();
    let mut cur: Vec<PageRange> = Vec::new();
    let mut cur_pages = 0u64;
    for page in crate::memory::set_pages(words) {
        if cur_pages == MAX_PULL_PAGES {
            out.push(std::mem::take(&mut cur));
            cur_pages = 0;
        }
        match cur.last_mut() {
            Some(r) if r.start + r.count == page => r.count += 1,
            _ => {
                if cur.len() == MAX_PULL_RANGES {
                    out.push(std::mem::take(&mut cur));
                    cur_pages = 0;
                }
                cur.push(PageRange {
                    start: page,
                    count: 1,
                });
            }
        }
        cur_pages += 1;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(msg: &Message<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        encode(msg, &mut v);
        v
    }

    fn dec(buf: &[u8], pages: u64) -> Result<Option<(Message<'_>, usize)>, ProtoError> {
        decode(buf, &Limits { pages })
    }

    #[test]
    fn header_fixture() {
        let b = enc(&Message::Accept);
        assert_eq!(b, [b'V', b'F', b'M', b'G', 1, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(dec(&b, 8).unwrap(), Some((Message::Accept, 12)));
        let b = enc(&Message::Abort {
            reason: "no".into(),
        });
        assert_eq!(
            b,
            [b'V', b'F', b'M', b'G', 1, 0, 11, 0, 2, 0, 0, 0, b'n', b'o']
        );
    }

    #[test]
    fn resumed_fixture_round_trips() {
        let m = Message::Resumed {
            t_us: 0x0102_0304_0506_0708,
            sha256: Some([0xab; 32]),
        };
        let b = enc(&m);
        assert_eq!(&b[12..20], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(b[20], 1);
        assert_eq!(b.len(), 12 + 41);
        assert_eq!(dec(&b, 8).unwrap(), Some((m, b.len())));
        let mut bad = b.clone();
        bad[20] = 2;
        assert!(matches!(dec(&bad, 8), Err(ProtoError::Malformed { .. })));
    }

    #[test]
    fn every_message_round_trips() {
        let words = vec![0b1011u64, 0, 1 << 63];
        let msgs = vec![
            Message::Hello {
                config_json: b"{\"name\":\"vm1\"}",
            },
            Message::Accept,
            Message::Refuse {
                reason: "no room".into(),
            },
            Message::Bitmap {
                quiesce_t_us: 77,
                pages: 192,
                converged: true,
                words: Cow::Borrowed(&words),
            },
            Message::PullRequest {
                ranges: Cow::Owned(vec![
                    PageRange { start: 0, count: 2 },
                    PageRange {
                        start: 100,
                        count: 3,
                    },
                ]),
            },
            Message::PullEnd,
            Message::DeviceState { json: b"{}" },
            Message::Resumed {
                t_us: 5,
                sha256: None,
            },
            Message::Complete {
                sha256: Some([1; 32]),
            },
            Message::Abort {
                reason: "bye".into(),
            },
            Message::RoundEnd { round: 3 },
            Message::RoundAck { round: 0x0102_0304 },
            Message::Rollback {
                reason: "memory digest differs".into(),
            },
            Message::RolledBack,
        ];
        for m in msgs {
            let b = enc(&m);
            let (got, used) = dec(&b, 192).unwrap().unwrap();
            assert_eq!(got, m);
            assert_eq!(used, b.len());
            // Every strict prefix asks for more bytes, never errors.
            for cut in 0..b.len() {
                assert_eq!(dec(&b[..cut], 192).unwrap(), None, "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn pages_encode_in_place_and_decode() {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut e = PagesEncoder::new(&mut buf, 3).unwrap();
        assert!(!e.push_with(7, |p| p.fill(0x5a)).unwrap());
        assert!(e.push_with(9, |p| p.fill(0)).unwrap());
        assert!(!e.push_with(1, |p| p[4095] = 1).unwrap());
        assert_eq!(e.count(), 3);
        let len = e.finish();
        assert_eq!(len, HEADER_LEN + 8 + 3 * 8 + 2 * PAGE_SIZE);
        assert_eq!(&buf[HEADER_LEN..HEADER_LEN + 8], &[3, 0, 0, 0, 3, 0, 0, 0]);
        // Zero page descriptor: page 9 with the top bit.
        let zero_desc = HEADER_LEN + 8 + 8 + PAGE_SIZE;
        assert_eq!(buf[zero_desc], 9);
        assert_eq!(buf[zero_desc + 7], 0x80);
        let (m, used) = dec(&buf[..len], 10).unwrap().unwrap();
        assert_eq!(used, len);
        let Message::Pages(v) = m else {
            panic!("not pages")
        };
        assert_eq!((v.round(), v.count()), (3, 3));
        let e: Vec<_> = v.iter().collect();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].0, 7);
        assert!(e[0].1.unwrap().iter().all(|&b| b == 0x5a));
        assert_eq!(e[1], (9, None));
        assert_eq!(e[2].1.unwrap()[4095], 1);
        // Re-encoding the view gives the same bytes.
        assert_eq!(enc(&Message::Pages(v)), &buf[..len]);
        // Page 9 is outside a 9-page guest.
        assert_eq!(
            dec(&buf[..len], 9).unwrap_err(),
            ProtoError::PageOutOfRange { page: 9, pages: 9 }
        );
    }

    #[test]
    fn batch_is_bounded() {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut e = PagesEncoder::new(&mut buf, 1).unwrap();
        for p in 0..MAX_BATCH_PAGES as u64 {
            e.push_with(p, |b| b.fill(1)).unwrap();
        }
        assert!(e.is_full());
        assert_eq!(e.push_with(0, |_| {}), Err(ProtoError::BatchFull));
        assert_eq!(e.finish(), MAX_MESSAGE);
        assert!(dec(&buf, 256).unwrap().is_some());
        let mut small = vec![0u8; 100];
        assert!(PagesEncoder::new(&mut small, 1).is_err());
    }

    #[test]
    fn malformed_messages_are_errors() {
        // Bad magic, seen from the first byte.
        assert!(matches!(dec(b"X", 8), Err(ProtoError::BadMagic(_))));
        let mut b = enc(&Message::Accept);
        b[4] = 2;
        assert_eq!(dec(&b, 8).unwrap_err(), ProtoError::BadVersion(2));
        let mut b = enc(&Message::Accept);
        b[6] = 99;
        assert_eq!(dec(&b, 8).unwrap_err(), ProtoError::UnknownKind(99));
        // Accept with a payload.
        let mut b = enc(&Message::Accept);
        b[8] = 1;
        b.push(0);
        assert!(matches!(dec(&b, 8), Err(ProtoError::TooLong { .. })));
        // Non-UTF-8 reason.
        let mut b = enc(&Message::Refuse {
            reason: "ab".into(),
        });
        b[12] = 0xff;
        assert!(matches!(dec(&b, 8), Err(ProtoError::Malformed { .. })));
        // Pages: count says 2, one entry present.
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut e = PagesEncoder::new(&mut buf, 1).unwrap();
        e.push_with(0, |p| p.fill(0)).unwrap();
        let len = e.finish();
        buf[HEADER_LEN + 4] = 2;
        assert!(matches!(
            dec(&buf[..len], 8),
            Err(ProtoError::Malformed { .. })
        ));
        // Pages: count above the batch limit.
        buf[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            dec(&buf[..len], 8),
            Err(ProtoError::Malformed { .. })
        ));
        // Bitmap with bits past the end, and with a page count above the guest's.
        let w = [1u64 << 10];
        let b = enc(&Message::Bitmap {
            quiesce_t_us: 0,
            pages: 10,
            converged: false,
            words: Cow::Borrowed(&w),
        });
        assert!(matches!(dec(&b, 10), Err(ProtoError::Malformed { .. })));
        let b = enc(&Message::Bitmap {
            quiesce_t_us: 0,
            pages: 64,
            converged: false,
            words: Cow::Borrowed(&[0]),
        });
        assert!(dec(&b, 64).is_ok());
        assert!(matches!(
            dec(&b, 63),
            Err(ProtoError::TooLong { .. } | ProtoError::Malformed { .. })
        ));
        // Pull request: empty range, range past the end, too many pages.
        let pr = |ranges: Vec<PageRange>| {
            enc(&Message::PullRequest {
                ranges: Cow::Owned(ranges),
            })
        };
        assert!(dec(&pr(vec![PageRange { start: 0, count: 0 }]), 8).is_err());
        assert!(matches!(
            dec(&pr(vec![PageRange { start: 7, count: 2 }]), 8),
            Err(ProtoError::PageOutOfRange { .. })
        ));
        assert!(dec(
            &pr(vec![PageRange {
                start: u64::MAX,
                count: 2
            }]),
            8
        )
        .is_err());
        assert!(dec(
            &pr(vec![PageRange {
                start: 0,
                count: MAX_PULL_PAGES + 1
            }]),
            1 << 20
        )
        .is_err());
    }

    #[test]
    fn oversized_lengths_fail_from_the_header_alone() {
        // A header claiming 4 GiB of Hello: refused before any payload arrives.
        let mut h = enc(&Message::Hello { config_json: b"" });
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            dec(&h, 8),
            Err(ProtoError::TooLong {
                kind: Kind::Hello,
                ..
            })
        ));
        let mut h = enc(&Message::Accept);
        h[6] = Kind::Pages.code() as u8;
        h[8..12].copy_from_slice(&((MAX_PAGES_PAYLOAD + 1) as u32).to_le_bytes());
        assert!(matches!(dec(&h, 8), Err(ProtoError::TooLong { .. })));
        // The bitmap cap follows the guest size.
        let mut h = enc(&Message::Accept);
        h[6] = Kind::Bitmap.code() as u8;
        h[8..12].copy_from_slice(&(24 + 8 * 2u32).to_le_bytes());
        assert!(matches!(dec(&h, 64), Err(ProtoError::TooLong { .. })));
        assert_eq!(dec(&h, 128).unwrap(), None);
    }

    #[test]
    fn random_bytes_never_panic() {
        // A tiny fuzz loop: random buffers, and valid messages with random bytes flipped.
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = vec![
            enc(&Message::PullRequest {
                ranges: Cow::Owned(vec![PageRange { start: 1, count: 3 }]),
            }),
            enc(&Message::Bitmap {
                quiesce_t_us: 1,
                pages: 100,
                converged: true,
                words: Cow::Owned(vec![5, 7]),
            }),
            enc(&Message::Resumed {
                t_us: 1,
                sha256: Some([3; 32]),
            }),
        ];
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut e = PagesEncoder::new(&mut buf, 2).unwrap();
        e.push_with(3, |p| p[0] = 1).unwrap();
        e.push_with(4, |_| {}).unwrap();
        let len = e.finish();
        valid.push(buf[..len].to_vec());
        for i in 0..20_000 {
            let b: Vec<u8> = if i % 2 == 0 {
                let n = (rnd() % 64) as usize;
                let mut b: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
                if n >= 4 && i % 4 == 0 {
                    b[..4].copy_from_slice(&MAGIC);
                    if n >= 6 {
                        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
                    }
                }
                b
            } else {
                let mut b = valid[(rnd() % valid.len() as u64) as usize].clone();
                for _ in 0..1 + rnd() % 3 {
                    let at = (rnd() % b.len() as u64) as usize;
                    b[at] = rnd() as u8;
                }
                b.truncate((rnd() % (b.len() as u64 + 1)) as usize);
                b
            };
            if let Ok(Some((Message::Pages(v), _))) = dec(&b, 100) {
                for (page, _) in v.iter() {
                    assert!(page < 100);
                }
            }
        }
    }

    #[test]
    fn pull_requests_cover_the_bitmap() {
        let mut words = vec![0u64; 64];
        // A run of 3000 pages and 1500 scattered pages.
        for p in 0..3000u64 {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        for p in (3001..4096u64).step_by(2) {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        let reqs = pull_requests(&words);
        let mut pages = Vec::new();
        for r in &reqs {
            assert!(r.len() <= MAX_PULL_RANGES);
            assert!(r.iter().map(|x| x.count).sum::<u64>() <= MAX_PULL_PAGES);
            for x in r {
                pages.extend(x.start..x.start + x.count);
            }
            // Each request is a valid message.
            let b = enc(&Message::PullRequest {
                ranges: Cow::Borrowed(r),
            });
            assert!(dec(&b, 4096).unwrap().is_some());
        }
        assert_eq!(pages, crate::memory::set_pages(&words).collect::<Vec<_>>());
        assert!(pull_requests(&[0, 0]).is_empty());
    }
}
