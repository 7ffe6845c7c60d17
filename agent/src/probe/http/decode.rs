//! The http prober's response body, counted and optionally decompressed as it streams
//! in: blackbox_exporter's `compression` (gzip, deflate, br, identity) with its
//! `body_size_limit` applied after decompression. blackbox_exporter knows no other
//! algorithm (no zstd), so neither does this.
//!
//! Nothing here holds more than a bounded amount of the body: the decoders write into a
//! [`Sink`] that counts every byte, keeps at most `keep` of them for the body regexes
//! and refuses to go past the size limit.
//!
//! Nothing here runs for long either. A few compressed bytes can stand for gigabytes
//! (brotli reaches about a million to one, deflate 1032 to one), so the body is fed in
//! [`Body::step`]s that each produce at most [`STEP_OUTPUT`] decompressed bytes, however
//! much the input would expand; the prober yields between steps, and its deadline ends
//! the probe between two of them. A decompression bomb therefore costs its probe's
//! timeout in CPU time, never memory, and never holds the thread its probe runs on (the
//! web thread for `/probe`, a probing thread beside other checks).

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use std::io::{self, Write};

/// The most decompressed bytes one [`Body::step`] produces: a few hundred microseconds
/// of work at most, so that the checks sharing the thread wait no longer than that.
pub(crate) const STEP_OUTPUT: usize = 64 * 1024;

/// Where decompressed bytes go: counted, the first `keep` bytes kept.
pub(crate) struct Sink {
    pub(crate) kept: Vec<u8>,
    keep: usize,
    pub(crate) total: u64,
    /// 0: no limit.
    limit: u64,
    /// Set once the body went past `limit`; the decoder then sees a write error.
    pub(crate) exceeded: bool,
    /// Set when a byte could not be kept for lack of room.
    pub(crate) truncated: bool,
    /// What the current step may still write. Past it a write fails with `WouldBlock`,
    /// which the decoders keep their state through: the next step goes on from there.
    budget: usize,
}

impl Sink {
    pub(crate) fn new(keep: usize, limit: u64) -> Self {
        Self {
            kept: Vec::new(),
            keep,
            total: 0,
            limit,
            exceeded: false,
            truncated: false,
            budget: 0,
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.exceeded {
            return Err(io::Error::other("body_size_limit exceeded"));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.budget == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut take = &buf[..buf.len().min(self.budget)];
        if self.limit > 0 && self.total + take.len() as u64 > self.limit {
            take = &take[..(self.limit - self.total) as usize];
            self.exceeded = true;
        }
        self.total += take.len() as u64;
        self.budget -= take.len();
        let room = self.keep - self.kept.len();
        if take.len() > room {
            self.truncated = true;
        }
        self.kept.extend_from_slice(&take[..take.len().min(room)]);
        if self.exceeded {
            return Err(io::Error::other("body_size_limit exceeded"));
        }
        Ok(take.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `compression` the prober cannot decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("http.compression: {0:?} is not one of gzip, deflate, br, identity")]
pub(crate) struct UnknownCompression(String);

/// The algorithm a module names, `None` for none (the body is taken as it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Gzip,
    Deflate,
    Brotli,
}

impl Algorithm {
    /// blackbox_exporter lower-cases the name; "" and "identity" mean no decoding.
    pub(crate) fn from_config(name: &str) -> Result<Option<Self>, UnknownCompression> {
        match name.to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(None),
            "gzip" => Ok(Some(Algorithm::Gzip)),
            "deflate" => Ok(Some(Algorithm::Deflate)),
            "br" => Ok(Some(Algorithm::Brotli)),
            other => Err(UnknownCompression(other.to_string())),
        }
    }
}

enum State {
    Plain(Sink),
    Gzip(Box<flate2::write::MultiGzDecoder<Sink>>),
    /// Deflate starts undecided: HTTP's "deflate" is zlib-wrapped (RFC 9110), Go's
    /// `flate.NewReader` (what blackbox_exporter uses) reads raw DEFLATE; the first two
    /// bytes tell which, so both are accepted. Holds the first byte when it came alone.
    DeflatePending(Sink, Option<u8>),
    Zlib(Box<flate2::write::ZlibDecoder<Sink>>),
    RawDeflate(Box<flate2::write::DeflateDecoder<Sink>>),
    Brotli(Box<Brotli>),
}

/// brotli through the decoder's own streaming call, which stops when its output buffer
/// is full: the `io::Write` wrapper around it decompresses a whole input in one call,
/// and again when dropped.
struct Brotli {
    state: BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>,
    out: Vec<u8>,
    total_out: usize,
    finished: bool,
    sink: Sink,
}

impl Brotli {
    fn new(sink: Sink, step_output: usize) -> Self {
        Self {
            // RFC 7932's windows (at most 16 MiB), as Go's decoder: "large window"
            // brotli would let the server choose a ring buffer of up to 1 GiB.
            state: BrotliState::new_strict(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            ),
            out: vec![0; step_output],
            total_out: 0,
            finished: false,
            sink,
        }
    }

    /// One call of the decoder: at most one output buffer, then into the sink.
    fn run(&mut self, input: &[u8]) -> io::Result<(usize, BrotliResult)> {
        let room = self.out.len().min(self.sink.budget);
        let (mut available_in, mut input_offset) = (input.len(), 0);
        let (mut available_out, mut output_offset) = (room, 0);
        let result = BrotliDecompressStream(
            &mut available_in,
            &mut input_offset,
            input,
            &mut available_out,
            &mut output_offset,
            &mut self.out[..room],
            &mut self.total_out,
            &mut self.state,
        );
        self.sink.write_all(&self.out[..output_offset])?;
        if let BrotliResult::ResultFailure = result {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid brotli data ({:?})", self.state.error_code),
            ));
        }
        if let BrotliResult::ResultSuccess = result {
            self.finished = true;
        }
        Ok((input_offset, result))
    }

    fn write(&mut self, input: &[u8]) -> io::Result<usize> {
        if self.finished {
            return Ok(0);
        }
        self.run(input).map(|(consumed, _)| consumed)
    }

    fn finish_step(&mut self) -> io::Result<bool> {
        if self.finished {
            return Ok(true);
        }
        match self.run(&[])?.1 {
            BrotliResult::NeedsMoreOutput => Ok(false),
            BrotliResult::NeedsMoreInput => Err(io::Error::other("truncated brotli stream")),
            BrotliResult::ResultSuccess | BrotliResult::ResultFailure => Ok(true),
        }
    }
}

/// A body being read: feed it the bytes off the wire with [`Body::step`] until each
/// piece is taken, then call [`Body::finish_step`] until it says done, then
/// [`Body::into_sink`].
pub(crate) struct Body {
    state: Option<State>,
    /// [`STEP_OUTPUT`], smaller in tests.
    step_output: usize,
}

/// Why a body could not be read to its end.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Past `body_size_limit`.
    TooLarge,
    /// The bytes do not decompress with the configured algorithm.
    Corrupt(String),
}

impl Body {
    pub(crate) fn new(algorithm: Option<Algorithm>, keep: usize, limit: u64) -> Self {
        Self::with_step_output(algorithm, keep, limit, STEP_OUTPUT)
    }

    fn with_step_output(
        algorithm: Option<Algorithm>,
        keep: usize,
        limit: u64,
        step_output: usize,
    ) -> Self {
        let sink = Sink::new(keep, limit);
        let state = match algorithm {
            None => State::Plain(sink),
            Some(Algorithm::Gzip) => {
                State::Gzip(Box::new(flate2::write::MultiGzDecoder::new(sink)))
            }
            Some(Algorithm::Deflate) => State::DeflatePending(sink, None),
            Some(Algorithm::Brotli) => State::Brotli(Box::new(Brotli::new(sink, step_output))),
        };
        Self {
            state: Some(state),
            step_output,
        }
    }

    /// The sink as it is now (for the byte count while reading).
    pub(crate) fn sink(&self) -> &Sink {
        match self.state.as_ref().expect("body state") {
            State::Plain(s) | State::DeflatePending(s, _) => s,
            State::Gzip(d) => d.get_ref(),
            State::Zlib(d) => d.get_ref(),
            State::RawDeflate(d) => d.get_ref(),
            State::Brotli(b) => &b.sink,
        }
    }

    fn sink_mut(&mut self) -> &mut Sink {
        match self.state.as_mut().expect("body state") {
            State::Plain(s) | State::DeflatePending(s, _) => s,
            State::Gzip(d) => d.get_mut(),
            State::Zlib(d) => d.get_mut(),
            State::RawDeflate(d) => d.get_mut(),
            State::Brotli(b) => &mut b.sink,
        }
    }

    fn error(&self, e: io::Error) -> BodyError {
        if self.sink().exceeded {
            BodyError::TooLarge
        } else {
            BodyError::Corrupt(e.to_string())
        }
    }

    /// Feeds the start of `input` (compressed, when an algorithm is set) into the body
    /// and returns how many of its bytes were taken. A step decompresses at most
    /// [`STEP_OUTPUT`] bytes; one that takes none still made progress (it produced what
    /// earlier bytes stand for), so the caller calls again with the same input.
    pub(crate) fn step(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        if input.is_empty() {
            return Ok(0);
        }
        let before = self.sink().total;
        let budget = self.step_output;
        self.sink_mut().budget = budget;
        let result = match self.state.as_mut().expect("body state") {
            State::Plain(s) => {
                // Counted as it is: a plain body costs what it weighs.
                s.budget = usize::MAX;
                s.write_all(input).map(|()| input.len())
            }
            State::Gzip(d) => d.write(input),
            State::Zlib(d) => d.write(input),
            State::RawDeflate(d) => d.write(input),
            State::Brotli(b) => b.write(input),
            State::DeflatePending(..) => return self.start_deflate(input),
        };
        match result {
            Ok(0) if self.sink().total == before => Err(BodyError::Corrupt(
                "data after the end of the compressed stream".into(),
            )),
            Ok(taken) => Ok(taken),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Picks zlib or raw DEFLATE once two bytes are known, then goes on as that.
    fn start_deflate(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        let Some(State::DeflatePending(mut sink, first)) = self.state.take() else {
            unreachable!("called in the pending state");
        };
        let (cmf, flg) = match first {
            Some(cmf) => (cmf, input[0]),
            None if input.len() >= 2 => (input[0], input[1]),
            None => {
                self.state = Some(State::DeflatePending(sink, Some(input[0])));
                return Ok(1);
            }
        };
        // One byte of DEFLATE stands for a few hundred bytes at most.
        sink.budget = usize::MAX;
        let mut decoder = if is_zlib_header(cmf, flg) {
            State::Zlib(Box::new(flate2::write::ZlibDecoder::new(sink)))
        } else {
            State::RawDeflate(Box::new(flate2::write::DeflateDecoder::new(sink)))
        };
        let held = match (&mut decoder, first) {
            (_, None) => Ok(1),
            (State::Zlib(d), Some(b)) => d.write(&[b]),
            (State::RawDeflate(d), Some(b)) => d.write(&[b]),
            _ => unreachable!("a deflate decoder"),
        };
        self.state = Some(decoder);
        match held {
            Ok(1) if first.is_some() => Ok(0),
            Ok(1) => self.step(input),
            Ok(_) => Err(BodyError::Corrupt("truncated deflate stream".into())),
            Err(e) => Err(self.error(e)),
        }
    }

    /// One step of ending the body: what the decoder still holds, at most
    /// [`STEP_OUTPUT`] bytes of it. `Ok(true)` once done; a compressed stream must be
    /// complete.
    pub(crate) fn finish_step(&mut self) -> Result<bool, BodyError> {
        let budget = self.step_output;
        self.sink_mut().budget = budget;
        let result = match self.state.as_mut().expect("body state") {
            State::Plain(_) | State::DeflatePending(_, None) => Ok(true),
            State::DeflatePending(_, Some(_)) => Err(io::Error::other("truncated deflate stream")),
            State::Gzip(d) => d.try_finish().map(|()| true),
            State::Zlib(d) => d.try_finish().map(|()| true),
            State::RawDeflate(d) => d.try_finish().map(|()| true),
            State::Brotli(b) => b.finish_step(),
        };
        match result {
            Ok(done) => Ok(done),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    /// What was read: the count and the kept bytes.
    pub(crate) fn into_sink(mut self) -> Sink {
        std::mem::replace(self.sink_mut(), Sink::new(0, 0))
    }

    /// Feeds all of `data` at once, without yielding: for callers with no deadline and
    /// no thread to share (the fuzz targets, tests). The prober calls [`Body::step`].
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), BodyError> {
        let mut rest = data;
        while !rest.is_empty() {
            let taken = self.step(rest)?;
            rest = &rest[taken..];
        }
        Ok(())
    }

    /// Ends the body at once ([`Body::write`]'s counterpart).
    pub(crate) fn finish(mut self) -> (Sink, Option<BodyError>) {
        let error = loop {
            match self.finish_step() {
                Ok(true) => break None,
                Ok(false) => {}
                Err(e) => break Some(e),
            }
        };
        (self.into_sink(), error)
    }
}

/// RFC 1950: compression method 8 (deflate), window ≤ 32 KiB, header checksum.
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) * 256 + u16::from(flg)) % 31 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};

    fn compress(algorithm: Algorithm, data: &[u8]) -> Vec<u8> {
        match algorithm {
            Algorithm::Gzip => {
                let mut e = GzEncoder::new(Vec::new(), Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Algorithm::Deflate => {
                let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Algorithm::Brotli => unreachable!("no brotli encoder here"),
        }
    }

    fn feed(body: &mut Body, data: &[u8], chunk: usize) -> Result<(), BodyError> {
        for piece in data.chunks(chunk) {
            body.write(piece)?;
        }
        Ok(())
    }

    /// A brotli stream of `units` meta-blocks of `unit_len` zeros each (2119 to 16 MiB),
    /// 14 bytes per unit whatever its length: a bomb. Each meta-block is one command
    /// (a literal 0, then a copy at distance 1) under one-symbol prefix codes, which take
    /// no bits; an empty metadata block after each aligns the next to a byte.
    fn brotli_zeros(units: usize, unit_len: u32) -> Vec<u8> {
        let mut bits = Bits::default();
        bits.put(0, 1); // WBITS: a 64 KiB window
        bits.empty_metadata();
        let nibbles = (32 - (unit_len - 1).leading_zeros()).div_ceil(4).max(4);
        for _ in 0..units {
            bits.put(0, 1); // ISLAST
            bits.put(u64::from(nibbles - 4), 2); // MNIBBLES
            bits.put(u64::from(unit_len - 1), 4 * nibbles); // MLEN - 1
            bits.put(0, 1); // ISUNCOMPRESSED
            bits.put(0, 3); // one block type for literals, commands, distances
            bits.put(0, 6); // NPOSTFIX, NDIRECT
            bits.put(0, 2); // the literal context mode
            bits.put(0, 2); // one literal and one distance prefix code
            // Simple prefix codes of one symbol each: literal 0; command 399 (insert
            // 1, copy code 23: 2118 + 24 extra bits); distance code 16 (1 + 1 extra bit).
            for (symbol, width) in [(0, 8), (399, 10), (16, 6)] {
                bits.put(1, 2);
                bits.put(0, 2);
                bits.put(symbol, width);
            }
            bits.put(u64::from(unit_len - 1 - 2118), 24);
            bits.put(0, 1);
            bits.empty_metadata();
        }
        bits.put(0b11, 2); // ISLAST, ISLASTEMPTY
        bits.align();
        bits.out
    }

    /// Bits written least significant first, as brotli and DEFLATE read them.
    #[derive(Default)]
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }

    impl Bits {
        fn put(&mut self, value: u64, count: u32) {
            for i in 0..count {
                self.acc |= ((value >> i) & 1) << self.n;
                self.n += 1;
                if self.n == 8 {
                    self.out.push(self.acc as u8);
                    (self.acc, self.n) = (0, 0);
                }
            }
        }

        fn align(&mut self) {
            if self.n > 0 {
                self.put(0, 8 - self.n);
            }
        }

        /// ISLAST 0, MNIBBLES 0 (metadata), reserved, MSKIPBYTES 0, then byte alignment.
        fn empty_metadata(&mut self) {
            self.put(0b0110, 6);
            self.align();
        }
    }

    /// Decodes `wire` fed in pieces of `chunk`, each step at most `step_output` bytes.
    fn stepped(
        algorithm: Algorithm,
        wire: &[u8],
        chunk: usize,
        step_output: usize,
    ) -> (Sink, Option<BodyError>) {
        let mut body = Body::with_step_output(Some(algorithm), 1 << 20, 0, step_output);
        for piece in wire.chunks(chunk) {
            let mut rest = piece;
            while !rest.is_empty() {
                let before = body.sink().total;
                match body.step(rest) {
                    Ok(taken) => rest = &rest[taken..],
                    Err(e) => return (body.into_sink(), Some(e)),
                }
                let made = body.sink().total - before;
                assert!(made <= step_output as u64, "a step made {made} bytes");
            }
        }
        loop {
            let before = body.sink().total;
            match body.finish_step() {
                Ok(true) => return (body.into_sink(), None),
                Ok(false) => {}
                Err(e) => return (body.into_sink(), Some(e)),
            }
            assert!(body.sink().total - before <= step_output as u64);
        }
    }

    #[test]
    fn every_step_is_bounded_and_the_steps_decode_the_whole_body() {
        let text: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut gzip_twice = compress(Algorithm::Gzip, &text[..20_000]);
        gzip_twice.extend(compress(Algorithm::Gzip, &text[20_000..]));
        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(&text).unwrap();
        let cases = [
            (Algorithm::Gzip, gzip_twice, text.clone()),
            (
                Algorithm::Deflate,
                compress(Algorithm::Deflate, &text),
                text.clone(),
            ),
            (Algorithm::Deflate, zlib.finish().unwrap(), text.clone()),
            (Algorithm::Brotli, brotli_zeros(3, 3000), vec![0; 9000]),
        ];
        for (algorithm, wire, plain) in cases {
            for chunk in [1, 5, 4096, wire.len()] {
                for step_output in [1, 7, 1000, STEP_OUTPUT] {
                    let (sink, err) = stepped(algorithm, &wire, chunk, step_output);
                    let case = format!("{algorithm:?}, chunks of {chunk}, steps of {step_output}");
                    assert_eq!(err, None, "{case}");
                    assert_eq!(sink.total, plain.len() as u64, "{case}");
                    assert!(sink.kept == plain, "{case}");
                }
            }
        }
    }

    #[test]
    fn a_bomb_is_decompressed_one_bounded_step_at_a_time() {
        // 16 MiB from 14 bytes, and 1 MiB of zeros from about a kilobyte of gzip: each
        // step still stops at STEP_OUTPUT, with the rest of the input left for the next.
        let brotli = brotli_zeros(1, 1 << 24);
        assert!(brotli.len() < 20, "{}", brotli.len());
        let gzip = compress(Algorithm::Gzip, &vec![0; 1 << 20]);
        for (algorithm, wire, plain) in [
            (Algorithm::Brotli, brotli, 1u64 << 24),
            (Algorithm::Gzip, gzip, 1 << 20),
        ] {
            let mut body = Body::new(Some(algorithm), 0, 0);
            let mut rest = &wire[..];
            let mut steps = 0u64;
            while !rest.is_empty() {
                let before = body.sink().total;
                rest = &rest[body.step(rest).unwrap()..];
                assert!(body.sink().total - before <= STEP_OUTPUT as u64);
                steps += 1;
            }
            while !body.finish_step().unwrap() {
                steps += 1;
            }
            assert_eq!(body.into_sink().total, plain, "{algorithm:?}");
            assert!(
                steps >= plain / STEP_OUTPUT as u64,
                "{algorithm:?}: {steps} steps"
            );
        }
    }

    #[test]
    fn brotli_errors_are_reported_not_decoded() {
        let corrupt = |wire: &[u8]| {
            let mut body = Body::new(Some(Algorithm::Brotli), 100, 0);
            let written = body.write(wire);
            let (_, finished) = body.finish();
            written.err().or(finished)
        };
        let bomb = brotli_zeros(2, 3000);
        // Truncated; data after its end; a "large window" stream (RFC 7932 has none),
        // whose window would be the server's to choose, up to 1 GiB.
        assert!(matches!(
            corrupt(&bomb[..bomb.len() - 1]),
            Some(BodyError::Corrupt(_))
        ));
        let mut trailing = bomb.clone();
        trailing.push(0);
        assert!(matches!(corrupt(&trailing), Some(BodyError::Corrupt(_))));
        let mut large = Bits::default();
        large.put(1, 1); // WBITS 1, 000, 001: the large window marker
        large.put(0, 3);
        large.put(1, 3);
        large.put(0, 1);
        large.put(30, 6);
        large.put(0b11, 2);
        large.align();
        assert!(matches!(corrupt(&large.out), Some(BodyError::Corrupt(_))));
        assert_eq!(corrupt(&bomb), None);
        // The limit still applies after decompression.
        let mut body = Body::new(Some(Algorithm::Brotli), 10, 4000);
        assert_eq!(body.write(&bomb), Err(BodyError::TooLarge));
        assert_eq!(body.sink().total, 4000);
    }

    #[test]
    fn gzip_and_both_deflates_decode_in_any_chunking() {
        let text = b"hello sonde ".repeat(1000);
        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(&text).unwrap();
        let zlib = zlib.finish().unwrap();
        for (algorithm, wire) in [
            (Algorithm::Gzip, compress(Algorithm::Gzip, &text)),
            (Algorithm::Deflate, compress(Algorithm::Deflate, &text)),
            (Algorithm::Deflate, zlib),
        ] {
            for chunk in [1, 7, 4096] {
                let mut body = Body::new(Some(algorithm), 1 << 20, 0);
                feed(&mut body, &wire, chunk).unwrap();
                let (sink, err) = body.finish();
                assert_eq!(err, None, "{algorithm:?} in chunks of {chunk}");
                assert_eq!(sink.total, text.len() as u64);
                assert_eq!(sink.kept, text);
            }
        }
    }

    #[test]
    fn brotli_decodes() {
        // "hello" compressed with brotli (quality 11): a fixed vector.
        let wire = [0x0b, 0x02, 0x80, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x03];
        let mut body = Body::new(Some(Algorithm::Brotli), 1024, 0);
        body.write(&wire).unwrap();
        let (sink, err) = body.finish();
        assert_eq!(err, None);
        assert_eq!(sink.kept, b"hello");
    }

    #[test]
    fn the_limit_applies_after_decompression() {
        let zeros = vec![0u8; 1 << 20];
        let wire = compress(Algorithm::Gzip, &zeros);
        assert!(wire.len() < 4096);
        let mut body = Body::new(Some(Algorithm::Gzip), 100, 1000);
        assert_eq!(feed(&mut body, &wire, 512), Err(BodyError::TooLarge));
        assert_eq!(body.sink().total, 1000);
        assert_eq!(body.sink().kept.len(), 100);
        assert!(body.sink().truncated);
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let mut body = Body::new(Some(Algorithm::Gzip), 100, 0);
        let r = body.write(b"this is not gzip at all");
        let fin = body.finish().1;
        assert!(r.is_err() || fin.is_some());
        let wire = compress(Algorithm::Gzip, b"a complete body");
        let mut body = Body::new(Some(Algorithm::Gzip), 100, 0);
        body.write(&wire[..wire.len() - 6]).unwrap();
        assert!(matches!(body.finish().1, Some(BodyError::Corrupt(_))));
        let mut body = Body::new(Some(Algorithm::Brotli), 100, 0);
        let r = body.write(&[0xff; 64]);
        let fin = body.finish().1;
        assert!(r.is_err() || fin.is_some());
    }

    #[test]
    fn plain_bodies_count_and_keep_a_prefix() {
        let mut body = Body::new(None, 4, 0);
        body.write(b"abcdef").unwrap();
        let (sink, err) = body.finish();
        assert_eq!(err, None);
        assert_eq!(
            (sink.total, sink.kept.as_slice(), sink.truncated),
            (6, &b"abcd"[..], true)
        );
        assert_eq!(Algorithm::from_config("GZIP"), Ok(Some(Algorithm::Gzip)));
        assert_eq!(Algorithm::from_config("identity"), Ok(None));
        assert!(Algorithm::from_config("zstd").is_err());
        assert!(is_zlib_header(0x78, 0x9c));
        assert!(!is_zlib_header(0x1f, 0x8b));
    }
}
