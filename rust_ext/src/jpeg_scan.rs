//! Does a baseline JPEG's scan data hold the whole image?
//!
//! A JPEG whose entropy-coded data was cut short but whose end-of-image marker (EOI) is still there
//! (a copy that lost a block, a writer that appended the EOI first) passes [`crate::decode::check_ending`];
//! the JPEG decoder (zune-jpeg, also in strict mode) then fills every MCU it could not decode with zero
//! bits, a flat grey, and reports success. This module walks the scan instead: it parses the frame
//! header (SOF0/SOF1), the Huffman tables (DHT), the restart interval (DRI) and each scan header (SOS),
//! then decodes the Huffman symbols of every block (the DC category and AC run/size codes, skipping
//! the coefficient bits; no dequantisation, no IDCT), across byte stuffing (`FF 00`) and restart
//! markers, and counts the MCUs until the data runs out.
//!
//! * [`check`] returns [`Scan::Complete`], [`Scan::Short`] (the data ended, at a marker that is not the
//!   expected restart marker or at the end of the bytes, before the last MCU) or [`Scan::NotChecked`]
//!   (progressive, lossless, arithmetic-coded or hierarchical JPEG; no scan). `Err` means the headers or
//!   the Huffman data are malformed: the caller leaves that to the decoder.
//! * Bounded work, no allocation from sizes the file claims: every decoded Huffman code consumes at
//!   least one bit of real data (bits past the data count as "ran out"), so the walk is linear in the
//!   file's length; tables are fixed-size arrays.

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Every scan decoded all its MCUs.
    Complete,
    /// A scan's data ran out after `mcus` of `total` MCUs (`rows` MCU rows of `total_rows`).
    Short { mcus: u64, total: u64, rows: u64, total_rows: u64 },
    /// Not a kind of JPEG this module walks (the reason).
    NotChecked(&'static str),
}

impl Scan {
    /// The user-facing reason for a short scan, `None` otherwise.
    pub fn short_reason(&self) -> Option<String> {
        match self {
            Scan::Short { rows, total_rows, mcus, total } => Some(format!(
                "JPEG: the scan data ends after {rows} of {total_rows} MCU rows ({mcus} of {total} MCUs) although the \
                 end-of-image marker is there: the rest of the image is missing (a decoder would fill it in grey); \
                 the file is cut short or damaged"
            )),
            _ => None,
        }
    }
}

/// A canonical Huffman table (JPEG Annex C): a 9-bit lookup for short codes, `maxcode` for the rest.
#[derive(Clone)]
struct Huffman {
    /// `(symbol, length)` for every 9-bit prefix of a code of length <= 9; length 0 = not a short code.
    fast: [(u8, u8); 512],
    /// Largest code of each length 1..=16 (-1: none), the index of its first symbol, its smallest code.
    maxcode: [i32; 17],
    valptr: [i32; 17],
    mincode: [i32; 17],
    symbols: [u8; 256],
}

const FAST_BITS: u32 = 9;

impl Huffman {
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<Huffman, String> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total > 256 || total != symbols.len() {
            return Err("Huffman table with more than 256 codes".into());
        }
        let mut h = Huffman {
            fast: [(0, 0); 512],
            maxcode: [-1; 17],
            valptr: [0; 17],
            mincode: [0; 17],
            symbols: [0; 256],
        };
        h.symbols[..total].copy_from_slice(symbols);
        let (mut code, mut k) = (0i32, 0usize);
        for len in 1..=16usize {
            let n = counts[len - 1] as usize;
            h.valptr[len] = k as i32;
            h.mincode[len] = code;
            for _ in 0..n {
                if code >= (1 << len) {
                    // more codes of this length than it has bit patterns: checked before `code`
                    // indexes the fast table
                    return Err("Huffman table whose code lengths overflow".into());
                }
                if len as u32 <= FAST_BITS {
                    let shift = FAST_BITS - len as u32;
                    let base = (code as usize) << shift;
                    for e in &mut h.fast[base..base + (1 << shift)] {
                        *e = (symbols[k], len as u8);
                    }
                }
                code += 1;
                k += 1;
            }
            if n > 0 {
                h.maxcode[len] = code - 1;
            }
            code <<= 1;
        }
        Ok(h)
    }
}

/// The entropy-coded data of one scan as bits, MSB first, with stuffing removed. It stops at any
/// marker; bits asked for past the real data are padding and make [`Bits::take`] report running out.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    /// bits in `acc` (top-aligned), of which the last `padded` are padding (not data)
    nbits: u32,
    padded: u32,
    /// `pos` is at a marker (or the end of the data)
    stopped: bool,
}

struct RanOut;

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Bits<'a> {
        Bits { data, pos, acc: 0, nbits: 0, padded: 0, stopped: false }
    }

    fn fill(&mut self) {
        while self.nbits <= 56 {
            let byte = if self.stopped {
                None
            } else {
                match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
                    (Some(0xFF), Some(0x00)) => {
                        self.pos += 2;
                        Some(0xFF)
                    }
                    (Some(0xFF), _) | (None, _) => {
                        self.stopped = true;
                        None
                    }
                    (Some(&b), _) => {
                        self.pos += 1;
                        Some(b)
                    }
                }
            };
            self.acc |= (byte.unwrap_or(0xFF) as u64) << (56 - self.nbits);
            self.nbits += 8;
            if byte.is_none() {
                self.padded += 8;
            }
        }
    }

    fn peek(&mut self, n: u32) -> u32 {
        if self.nbits < n {
            self.fill();
        }
        (self.acc >> (64 - n)) as u32
    }

    fn consume(&mut self, n: u32) -> Result<(), RanOut> {
        if n > self.nbits - self.padded {
            return Err(RanOut);
        }
        self.acc <<= n;
        self.nbits -= n;
        self.padded = self.padded.min(self.nbits);
        Ok(())
    }

    fn skip(&mut self, n: u32) -> Result<(), RanOut> {
        if n == 0 {
            return Ok(());
        }
        self.peek(n);
        self.consume(n)
    }

    /// One Huffman symbol; `Err(None)` ran out, `Err(Some)` an invalid code.
    fn symbol(&mut self, h: &Huffman) -> Result<u8, Option<String>> {
        let p = self.peek(16);
        let (sym, len) = h.fast[(p >> (16 - FAST_BITS)) as usize];
        if len > 0 {
            self.consume(len as u32).map_err(|_| None)?;
            return Ok(sym);
        }
        for len in FAST_BITS as usize + 1..=16 {
            let code = (p >> (16 - len)) as i32;
            if h.maxcode[len] >= 0 && code <= h.maxcode[len] && code >= h.mincode[len] {
                self.consume(len as u32).map_err(|_| None)?;
                return Ok(h.symbols[(h.valptr[len] + code - h.mincode[len]) as usize]);
            }
        }
        if self.nbits - self.padded < 16 {
            return Err(None); // no valid code within the data left: the padding 1-bits ran out
        }
        Err(Some("invalid Huffman code in the scan data".into()))
    }

    /// Drop the bits left (the padding before a restart marker) and step over the marker at the
    /// current position when it is a restart marker. False when the data does not go on with one.
    fn restart(&mut self) -> bool {
        self.acc = 0;
        self.nbits = 0;
        self.padded = 0;
        self.stopped = false;
        // bytes left before the marker (should be none) are skipped, as decoders do
        while let Some(&b) = self.data.get(self.pos) {
            if b == 0xFF {
                match self.data.get(self.pos + 1) {
                    Some(0x00) => self.pos += 2,
                    Some(0xFF) => self.pos += 1,
                    Some(0xD0..=0xD7) => {
                        self.pos += 2;
                        return true;
                    }
                    _ => return false,
                }
            } else {
                self.pos += 1;
            }
        }
        false
    }
}

#[derive(Clone, Copy, Default)]
struct Component {
    id: u8,
    h: u32,
    v: u32,
}

struct Frame {
    width: u32,
    height: u32,
    comps: [Component; 4],
    ncomp: usize,
    hmax: u32,
    vmax: u32,
}

/// One component of a scan: its blocks per MCU (`h x v`, or 1 when the scan has one component)
/// and its tables.
struct ScanComp {
    blocks: u32,
    dc: usize,
    ac: usize,
}

fn be16(b: &[u8], i: usize) -> Option<usize> {
    b.get(i..i + 2).map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
}

/// Walk a JPEG (see the module docs). Never panics.
pub fn check(bytes: &[u8]) -> Result<Scan, String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("no JPEG start-of-image marker".into());
    }
    let mut dc: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac: [Option<Huffman>; 4] = [None, None, None, None];
    let mut frame: Option<Frame> = None;
    let mut restart_interval = 0u64;
    let mut scans = 0;
    let mut i = 2usize;
    loop {
        while bytes.get(i) == Some(&0xFF) && bytes.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        let marker = match (bytes.get(i), bytes.get(i + 1)) {
            (Some(0xFF), Some(&m)) => m,
            (None, _) | (Some(_), None) if scans > 0 => return Ok(Scan::Complete), // no EOI: check_ending's part
            _ => return Err(format!("no marker at byte {i}")),
        };
        if marker == 0xD9 {
            return Ok(if scans > 0 { Scan::Complete } else { Scan::NotChecked("no scan") });
        }
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            i += 2;
            continue;
        }
        let len = be16(bytes, i + 2).ok_or("a marker segment is cut off")?;
        if len < 2 {
            return Err("a marker segment with a length below 2".into());
        }
        let seg = bytes.get(i + 4..i + 2 + len).ok_or("a marker segment is cut off")?;
        i += 2 + len;
        match marker {
            0xC0 | 0xC1 => frame = Some(parse_frame(seg)?),
            0xC2 => return Ok(Scan::NotChecked("progressive JPEG")),
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Ok(Scan::NotChecked("lossless, hierarchical or arithmetic-coded JPEG"))
            }
            0xC4 => parse_dht(seg, &mut dc, &mut ac)?,
            0xDD => restart_interval = be16(seg, 0).ok_or("a DRI segment is cut off")? as u64,
            0xDA => {
                let f = frame.as_ref().ok_or("a scan before the frame header")?;
                let comps = parse_sos(seg, f)?;
                let mut tables = Vec::with_capacity(comps.len());
                for c in &comps {
                    match (dc[c.dc].as_ref(), ac[c.ac].as_ref()) {
                        (Some(d), Some(a)) => tables.push((c.blocks, d, a)),
                        // decoders may fall back to the standard tables (Motion-JPEG frames)
                        _ => return Ok(Scan::NotChecked("a scan uses a Huffman table the file does not define")),
                    }
                }
                let (per_row, rows) = scan_mcus(seg, f)?;
                match walk(bytes, i, &tables, per_row * rows, restart_interval)? {
                    (done, None) => {
                        return Ok(Scan::Short {
                            mcus: done,
                            total: per_row * rows,
                            rows: done / per_row,
                            total_rows: rows,
                        })
                    }
                    (_, Some(end)) => i = end,
                }
                scans += 1;
            }
            _ => {}
        }
    }
}

fn parse_frame(seg: &[u8]) -> Result<Frame, String> {
    let cut = || "the frame header is cut off".to_string();
    let height = be16(seg, 1).ok_or_else(cut)? as u32;
    let width = be16(seg, 3).ok_or_else(cut)? as u32;
    let ncomp = *seg.get(5).ok_or_else(cut)? as usize;
    if width == 0 || height == 0 || !(1..=4).contains(&ncomp) {
        return Err(format!("frame header of {width}x{height} with {ncomp} components"));
    }
    let mut f = Frame { width, height, comps: [Component::default(); 4], ncomp, hmax: 1, vmax: 1 };
    for k in 0..ncomp {
        let c = seg.get(6 + 3 * k..9 + 3 * k).ok_or_else(cut)?;
        let (h, v) = ((c[1] >> 4) as u32, (c[1] & 15) as u32);
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
            return Err(format!("sampling factors {h}x{v}"));
        }
        f.comps[k] = Component { id: c[0], h, v };
        f.hmax = f.hmax.max(h);
        f.vmax = f.vmax.max(v);
    }
    Ok(f)
}

fn parse_dht(mut seg: &[u8], dc: &mut [Option<Huffman>; 4], ac: &mut [Option<Huffman>; 4]) -> Result<(), String> {
    while !seg.is_empty() {
        let tc_th = seg[0];
        let counts: [u8; 16] = seg.get(1..17).ok_or("a Huffman table is cut off")?.try_into().map_err(|_| "DHT")?;
        let n: usize = counts.iter().map(|&c| c as usize).sum();
        let symbols = seg.get(17..17 + n).ok_or("a Huffman table is cut off")?;
        let (class, id) = (tc_th >> 4, (tc_th & 15) as usize);
        if class > 1 || id > 3 {
            return Err(format!("Huffman table class {class} id {id}"));
        }
        let h = Huffman::new(&counts, symbols)?;
        if class == 0 {
            dc[id] = Some(h);
        } else {
            ac[id] = Some(h);
        }
        seg = &seg[17 + n..];
    }
    Ok(())
}

fn parse_sos(seg: &[u8], f: &Frame) -> Result<Vec<ScanComp>, String> {
    let n = *seg.first().ok_or("the scan header is cut off")? as usize;
    if !(1..=4).contains(&n) {
        return Err(format!("a scan of {n} components"));
    }
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let c = seg.get(1 + 2 * k..3 + 2 * k).ok_or("the scan header is cut off")?;
        let comp = f.comps[..f.ncomp]
            .iter()
            .find(|fc| fc.id == c[0])
            .ok_or("a scan names a component the frame does not have")?;
        let (td, ta) = ((c[1] >> 4) as usize, (c[1] & 15) as usize);
        if td > 3 || ta > 3 {
            return Err("a scan names a Huffman table above 3".into());
        }
        out.push(ScanComp { blocks: if n == 1 { 1 } else { comp.h * comp.v }, dc: td, ac: ta });
    }
    Ok(out)
}

/// MCUs per row and MCU rows of a scan: interleaved, the frame's MCUs (`8 hmax x 8 vmax` pixels);
/// one component, that component's 8x8 blocks.
fn scan_mcus(seg: &[u8], f: &Frame) -> Result<(u64, u64), String> {
    let div = |a: u32, b: u32| a.div_ceil(b) as u64;
    if seg[0] == 1 {
        let c = f.comps[..f.ncomp].iter().find(|fc| fc.id == seg[1]).ok_or("unknown scan component")?;
        let (cw, ch) = ((f.width * c.h).div_ceil(f.hmax), (f.height * c.v).div_ceil(f.vmax));
        Ok((div(cw, 8), div(ch, 8)))
    } else {
        Ok((div(f.width, 8 * f.hmax), div(f.height, 8 * f.vmax)))
    }
}

/// Decode the blocks of `total` MCUs from `start`. Returns the MCUs decoded and, when all were,
/// the position of the marker after the scan (`None`: the data ran out first).
fn walk(bytes: &[u8], start: usize, tables: &[(u32, &Huffman, &Huffman)], total: u64, ri: u64) -> Result<(u64, Option<usize>), String> {
    let mut bits = Bits::new(bytes, start);
    let mut done = 0u64;
    while done < total {
        if ri > 0 && done > 0 && done.is_multiple_of(ri) && !bits.restart() {
            return Ok((done, None));
        }
        for &(blocks, dc, ac) in tables {
            for _ in 0..blocks {
                match block(&mut bits, dc, ac) {
                    Ok(()) => {}
                    Err(None) => return Ok((done, None)),
                    Err(Some(e)) => return Err(e),
                }
            }
        }
        done += 1;
    }
    // the marker after the scan (bytes before it are padding)
    let mut i = bits.pos;
    loop {
        match (bytes.get(i), bytes.get(i + 1)) {
            (Some(0xFF), Some(0x00)) => i += 2,
            (Some(0xFF), Some(0xD0..=0xD7)) => i += 2,
            (Some(0xFF), Some(0xFF)) => i += 1,
            (Some(0xFF), Some(_)) => return Ok((done, Some(i))),
            (Some(_), _) => i += 1,
            (None, _) => return Ok((done, Some(i))),
        }
    }
}

/// One 8x8 block: the DC category and its bits, then the AC run/size codes until EOB or 63 coefficients.
fn block(bits: &mut Bits<'_>, dc: &Huffman, ac: &Huffman) -> Result<(), Option<String>> {
    let s = bits.symbol(dc)?;
    if s > 16 {
        return Err(Some(format!("DC category {s}")));
    }
    bits.skip(s as u32).map_err(|_| None)?;
    let mut k = 1u32;
    while k < 64 {
        let rs = bits.symbol(ac)?;
        let (r, s) = ((rs >> 4) as u32, (rs & 15) as u32);
        if s == 0 {
            if r != 15 {
                break; // end of block
            }
            k += 16;
        } else {
            k += r;
            bits.skip(s).map_err(|_| None)?;
            k += 1;
        }
    }
    if k > 64 {
        return Err(Some("AC coefficients past the end of a block".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::encode;
    use image::{DynamicImage, ImageBuffer, ImageFormat};

    fn textured(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + y * 3) as u8, ((y * 13) ^ x) as u8, ((x * y) % 251) as u8])
        }))
    }

    /// The scan's first byte (after the SOS segment) and the EOI's position.
    fn scan_span(jpg: &[u8]) -> (usize, usize) {
        let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let start = sos + 2 + be16(jpg, sos + 2).unwrap();
        (start, jpg.len() - 2)
    }

    /// `keep` of the scan's bytes, then EOI (as the "70 % of its scan data cut").
    fn cut_scan(jpg: &[u8], keep: f64) -> Vec<u8> {
        let (start, end) = scan_span(jpg);
        let mut v = jpg[..start + ((end - start) as f64 * keep) as usize].to_vec();
        v.extend_from_slice(&[0xFF, 0xD9]);
        v
    }

    fn short_rows(s: &Scan) -> (u64, u64) {
        match s {
            Scan::Short { rows, total_rows, .. } => (*rows, *total_rows),
            other => panic!("not short: {other:?}"),
        }
    }

    #[test]
    fn complete_jpegs_pass_and_short_scans_are_found() {
        for (w, h) in [(64u32, 48u32), (450, 450), (17, 9), (8, 8), (1, 1)] {
            let jpg = encode(&textured(w, h), ImageFormat::Jpeg);
            assert_eq!(check(&jpg), Ok(Scan::Complete), "{w}x{h}");
            if w >= 64 {
                // the image crate writes 4:4:4 (8x8-pixel MCUs)
                let short = cut_scan(&jpg, 0.3);
                let (rows, total) = short_rows(&check(&short).unwrap());
                assert!(rows < total && total == (h as u64).div_ceil(8), "{rows} of {total}");
                // an almost complete scan is still short
                let (rows, total) = short_rows(&check(&cut_scan(&jpg, 0.98)).unwrap());
                assert!(rows >= total - 2, "{rows} of {total}");
            }
        }
    }

    #[test]
    fn grey_and_subsampled_and_restart_intervals() {
        // greyscale: one component, 8x8 MCUs
        let grey = DynamicImage::ImageLuma8(textured(96, 80).to_luma8());
        let jpg = encode(&grey, ImageFormat::Jpeg);
        assert_eq!(check(&jpg), Ok(Scan::Complete));
        assert_eq!(short_rows(&check(&cut_scan(&jpg, 0.3)).unwrap()).1, 10);
        for (comps, (w, h), ri, mcus) in [
            (&[0x11u8][..], (32u16, 16u16), 3u16, 8u64), // grey, restart every 3 MCUs
            (&[0x22, 0x11, 0x11][..], (48, 32), 0, 6),    // 4:2:0: 16x16-pixel MCUs of 6 blocks
            (&[0x22, 0x11, 0x11][..], (40, 20), 2, 6),    // 4:2:0, partial MCUs at the edges, restarts
            (&[0x21, 0x11, 0x11][..], (40, 20), 1, 9),    // 4:2:2
        ] {
            let jpg = hand_built(comps, w, h, ri);
            let img = image::load_from_memory_with_format(&jpg, ImageFormat::Jpeg).unwrap();
            assert_eq!((img.width(), img.height()), (w as u32, h as u32));
            assert_eq!(check(&jpg), Ok(Scan::Complete), "{comps:?} {w}x{h} ri {ri}");
            // cut in the middle, EOI kept
            let (start, end) = scan_span(&jpg);
            let mut cut = jpg[..start + (end - start) / 3].to_vec();
            cut.extend_from_slice(&[0xFF, 0xD9]);
            match check(&cut) {
                Ok(Scan::Short { mcus: done, total, .. }) => assert!(done < total && total == mcus, "{done} of {total}"),
                other => panic!("{comps:?} {w}x{h} ri {ri}: {other:?}"),
            }
            if ri > 0 {
                // the last restart marker missing (the data goes on with EOI): short too
                let p = jpg.windows(2).rposition(|w| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1])).unwrap();
                let mut no_rst = jpg[..p].to_vec();
                no_rst.extend_from_slice(&[0xFF, 0xD9]);
                assert!(matches!(check(&no_rst), Ok(Scan::Short { .. })), "{:?}", check(&no_rst));
            }
        }
    }

    /// A baseline JPEG built by hand (the image crate writes neither subsampling nor restart markers):
    /// components with sampling factors `comps` (`0xHV` each), `w x h` pixels, a restart interval of `ri`
    /// MCUs (0 = none); one DC table {category 0: code `0`} and one AC table {EOB: code `0`}, so every block
    /// is the two bits `00` (a flat image).
    fn hand_built(comps: &[u8], w: u16, h: u16, ri: u16) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        let seg = |v: &mut Vec<u8>, m: u8, body: &[u8]| {
            v.extend_from_slice(&[0xFF, m]);
            v.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
            v.extend_from_slice(body);
        };
        let mut dqt = vec![0u8];
        dqt.extend_from_slice(&[1u8; 64]);
        seg(&mut v, 0xDB, &dqt);
        let mut sof = vec![8];
        sof.extend_from_slice(&h.to_be_bytes());
        sof.extend_from_slice(&w.to_be_bytes());
        sof.push(comps.len() as u8);
        for (k, &hv) in comps.iter().enumerate() {
            sof.extend_from_slice(&[k as u8 + 1, hv, 0]);
        }
        seg(&mut v, 0xC0, &sof);
        let mut dht = vec![0x00, 1];
        dht.extend_from_slice(&[0u8; 15]);
        dht.push(0); // DC: one code of length 1 -> category 0
        dht.extend_from_slice(&[0x10, 1]);
        dht.extend_from_slice(&[0u8; 15]);
        dht.push(0x00); // AC: one code of length 1 -> EOB
        seg(&mut v, 0xC4, &dht);
        if ri > 0 {
            seg(&mut v, 0xDD, &ri.to_be_bytes());
        }
        let mut sos = vec![comps.len() as u8];
        for k in 0..comps.len() {
            sos.extend_from_slice(&[k as u8 + 1, 0x00]);
        }
        sos.extend_from_slice(&[0, 63, 0]);
        seg(&mut v, 0xDA, &sos);
        let (hmax, vmax) = (comps.iter().map(|c| c >> 4).max().unwrap(), comps.iter().map(|c| c & 15).max().unwrap());
        let blocks: usize = if comps.len() == 1 { 1 } else { comps.iter().map(|c| ((c >> 4) * (c & 15)) as usize).sum() };
        let total = (w.div_ceil(8 * hmax as u16) * h.div_ceil(8 * vmax as u16)) as usize;
        let ri = if ri == 0 { total } else { ri as usize };
        let (mut m, mut rst) = (0usize, 0u8);
        while m < total {
            let n = ri.min(total - m);
            let bits = 2 * n * blocks; // n MCUs of `blocks` blocks of two zero bits, padded with 1-bits
            let mut bytes = vec![0u8; bits.div_ceil(8)];
            if !bits.is_multiple_of(8) {
                *bytes.last_mut().unwrap() |= 0xFF >> (bits % 8);
            }
            v.extend_from_slice(&bytes);
            m += n;
            if m < total {
                v.extend_from_slice(&[0xFF, 0xD0 + rst]);
                rst = (rst + 1) % 8;
            }
        }
        v.extend_from_slice(&[0xFF, 0xD9]);
        v
    }

    #[test]
    fn not_checked_kinds_and_junk_never_panic() {
        let mut prog = encode(&textured(32, 32), ImageFormat::Jpeg);
        let sof = prog.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        prog[sof + 1] = 0xC2;
        assert_eq!(check(&prog), Ok(Scan::NotChecked("progressive JPEG")));
        assert!(check(b"not a jpeg").is_err());
        assert!(check(&[0xFF, 0xD8]).is_err());
        // junk Huffman tables: a count that overflows the code space, a cut-off table
        let jpg = encode(&textured(64, 48), ImageFormat::Jpeg);
        let dht = jpg.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
        let mut bad = jpg.clone();
        bad[dht + 5] = 3; // three codes of length 1
        assert!(check(&bad).is_err(), "{:?}", check(&bad));
        // the same overflow with the table's total kept (so the segment still parses): found by
        // the CI fuzzer, it once indexed the fast table past its end
        let mut kept = jpg.clone();
        let counts = dht + 5;
        let donor = (counts + 1..counts + 16).find(|&j| kept[j] >= 3).unwrap();
        kept[donor] -= 3;
        kept[counts] += 3;
        assert_eq!(check(&kept), Err("Huffman table whose code lengths overflow".to_string()));
        // every single-byte corruption and every cut: an answer, never a panic
        for k in 0..jpg.len() {
            let mut m = jpg.clone();
            m[k] ^= 0xA5;
            let _ = check(&m);
            let _ = check(&jpg[..k]);
        }
        // all-FF and all-zero scans
        let (start, end) = scan_span(&jpg);
        for fill in [0x00u8, 0xFF] {
            let mut m = jpg.clone();
            m[start..end].fill(fill);
            let _ = check(&m);
        }
    }

    #[test]
    fn huffman_tables_of_any_counts_never_panic() {
        // more codes of one length than it has bit patterns, and two lengths that together overflow
        let mut cases: Vec<[u8; 16]> = (1..=7usize)
            .map(|len| {
                let mut c = [0u8; 16];
                c[len - 1] = (1u8 << len) + 1;
                c
            })
            .collect();
        cases.push([2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        cases.push([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 0, 0, 0, 0]);
        for counts in cases {
            let symbols: Vec<u8> = (0..counts.iter().map(|&c| c as usize).sum::<usize>()).map(|k| k as u8).collect();
            assert!(Huffman::new(&counts, &symbols).is_err(), "{counts:?}");
        }
        // every count vector of a small pseudo-random family: Ok or Err, never a panic, and a table
        // that is accepted fits its code space (Kraft sum at most 1)
        let mut state = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            let mut counts = [0u8; 16];
            for c in counts.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *c = if state.is_multiple_of(3) { (state >> 8) as u8 % 9 } else { 0 };
            }
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let symbols: Vec<u8> = (0..total).map(|k| k as u8).collect();
            let kraft: f64 = counts.iter().enumerate().map(|(l, &c)| c as f64 / f64::powi(2.0, l as i32 + 1)).sum();
            match Huffman::new(&counts, &symbols) {
                Ok(_) => assert!(kraft <= 1.0, "{counts:?}"),
                Err(_) => assert!(kraft > 1.0 || total > 256, "{counts:?}"),
            }
        }
    }
}
