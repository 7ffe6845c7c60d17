//! The http prober's response body, counted and optionally decompressed as it streams
//! in: blackbox_exporter's `compression` (gzip, deflate, br, identity) with its
//! `body_size_limit` applied after decompression.
//!
//! Nothing here holds more than a bounded amount of the body: the decoders write into a
//! [`Sink`] that counts every byte, keeps at most `keep` of them for the body regexes
//! and refuses to go past the size limit. A gzip bomb therefore costs CPU time (bounded
//! by the probe's deadline, and by the limit when one is set), never memory.

use std::io::{self, Write};

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
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.exceeded {
            return Err(io::Error::other("body_size_limit exceeded"));
        }
        let mut take = buf;
        if self.limit > 0 && self.total + buf.len() as u64 > self.limit {
            take = &buf[..(self.limit - self.total) as usize];
            self.exceeded = true;
        }
        self.total += take.len() as u64;
        let room = self.keep - self.kept.len();
        if take.len() > room {
            self.truncated = true;
        }
        self.kept.extend_from_slice(&take[..take.len().min(room)]);
        if self.exceeded {
            return Err(io::Error::other("body_size_limit exceeded"));
        }
        Ok(buf.len())
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
    /// bytes tell which, so both are accepted. Holds the bytes seen so far.
    DeflatePending(Sink, Vec<u8>),
    Zlib(Box<flate2::write::ZlibDecoder<Sink>>),
    RawDeflate(Box<flate2::write::DeflateDecoder<Sink>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Sink>>),
}

/// A body being read: feed it the bytes off the wire with [`Body::write`], then
/// [`Body::finish`].
pub(crate) struct Body {
    state: Option<State>,
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
        let sink = Sink::new(keep, limit);
        let state = match algorithm {
            None => State::Plain(sink),
            Some(Algorithm::Gzip) => {
                State::Gzip(Box::new(flate2::write::MultiGzDecoder::new(sink)))
            }
            Some(Algorithm::Deflate) => State::DeflatePending(sink, Vec::new()),
            Some(Algorithm::Brotli) => State::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(sink, 8 * 1024),
            )),
        };
        Self { state: Some(state) }
    }

    /// The sink as it is now (for the byte count while reading).
    pub(crate) fn sink(&self) -> &Sink {
        match self.state.as_ref().expect("body state") {
            State::Plain(s) | State::DeflatePending(s, _) => s,
            State::Gzip(d) => d.get_ref(),
            State::Zlib(d) => d.get_ref(),
            State::RawDeflate(d) => d.get_ref(),
            State::Brotli(d) => d.get_ref(),
        }
    }

    fn error(&self, e: io::Error) -> BodyError {
        if self.sink().exceeded {
            BodyError::TooLarge
        } else {
            BodyError::Corrupt(e.to_string())
        }
    }

    /// Feeds `data` (compressed, when an algorithm is set) into the body.
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), BodyError> {
        let state = self.state.as_mut().expect("body state");
        let result = match state {
            State::Plain(s) => s.write_all(data),
            State::Gzip(d) => d.write_all(data),
            State::Zlib(d) => d.write_all(data),
            State::RawDeflate(d) => d.write_all(data),
            State::Brotli(d) => d.write_all(data),
            State::DeflatePending(_, seen) => {
                seen.extend_from_slice(data);
                if seen.len() < 2 {
                    return Ok(());
                }
                let Some(State::DeflatePending(sink, seen)) = self.state.take() else {
                    unreachable!("matched above");
                };
                let zlib = is_zlib_header(seen[0], seen[1]);
                let (next, result) = if zlib {
                    let mut d = flate2::write::ZlibDecoder::new(sink);
                    let r = d.write_all(&seen);
                    (State::Zlib(Box::new(d)), r)
                } else {
                    let mut d = flate2::write::DeflateDecoder::new(sink);
                    let r = d.write_all(&seen);
                    (State::RawDeflate(Box::new(d)), r)
                };
                self.state = Some(next);
                result
            }
        };
        result.map_err(|e| self.error(e))
    }

    /// Ends the body: a compressed stream must be complete.
    pub(crate) fn finish(mut self) -> (Sink, Option<BodyError>) {
        let state = self.state.take().expect("body state");
        let (sink, result) = match state {
            State::Plain(s) => (s, Ok(())),
            State::DeflatePending(s, seen) if seen.is_empty() => (s, Ok(())),
            State::DeflatePending(s, _) => (s, Err(io::Error::other("truncated deflate stream"))),
            State::Gzip(mut d) => {
                let r = d.try_finish();
                (take_sink(d.get_mut()), r)
            }
            State::Zlib(mut d) => {
                let r = d.try_finish();
                (take_sink(d.get_mut()), r)
            }
            State::RawDeflate(mut d) => {
                let r = d.try_finish();
                (take_sink(d.get_mut()), r)
            }
            State::Brotli(mut d) => {
                let r = d.close();
                (take_sink(d.get_mut()), r)
            }
        };
        let error = result.err().map(|e| {
            if sink.exceeded {
                BodyError::TooLarge
            } else {
                BodyError::Corrupt(e.to_string())
            }
        });
        (sink, error)
    }
}

fn take_sink(sink: &mut Sink) -> Sink {
    std::mem::replace(sink, Sink::new(0, 0))
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
