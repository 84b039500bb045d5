//! Owns decoding of the HTTP/1.1 chunked transfer coding, incrementally, across read boundaries.
//!
//! The decoder never copies payload: it hands out sub-slices of whatever input it is fed and keeps
//! only a few integers of state between calls, so a chunk header, a CRLF or the trailer may be
//! split anywhere. Bare LF is accepted where CRLF is expected (as most clients do).

/// Why a chunked body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// A chunk-size line did not start with a hex digit or had a stray byte.
    BadSize,
    /// A chunk size does not fit in 64 bits.
    SizeOverflow,
    /// The CRLF after a chunk's data was missing.
    MissingDataCrlf,
}

/// What one call to [`ChunkedDecoder::feed`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the input that belong to the body (all of it unless `done`).
    pub consumed: usize,
    /// The terminating zero-size chunk and the trailer section have been read.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size; `digits` counts them.
    Size {
        size: u64,
        digits: u8,
    },
    /// Skipping a chunk extension (`;name=value`) or whitespace up to the line end.
    SizeExtension {
        size: u64,
    },
    /// Saw CR after the size line; expecting LF.
    SizeLf {
        size: u64,
    },
    /// Inside chunk data with this many bytes still to come.
    Data {
        remaining: u64,
    },
    /// After chunk data; expecting CR or LF.
    DataCr,
    /// After chunk data and CR; expecting LF.
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line; skipping to LF.
    TrailerLine,
    /// Saw CR at the start of a trailer line; expecting the final LF.
    EndLf,
    Done,
}

/// Incremental decoder for one chunked body.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size { size: 0, digits: 0 },
        }
    }

    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds the next bytes of the body; `data` is called with each run of payload bytes, in order.
    pub fn feed(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<Fed, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Size { size, digits } => match hex_value(b) {
                    Some(v) => {
                        if digits >= 16 {
                            return Err(ChunkError::SizeOverflow);
                        }
                        State::Size {
                            size: (size << 4) | u64::from(v),
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => return Err(ChunkError::BadSize),
                    None => match b {
                        b'\r' => State::SizeLf { size },
                        b'\n' => after_size_line(size),
                        b';' | b' ' | b'\t' => State::SizeExtension { size },
                        _ => return Err(ChunkError::BadSize),
                    },
                },
                State::SizeExtension { size } => match b {
                    b'\r' => State::SizeLf { size },
                    b'\n' => after_size_line(size),
                    _ => State::SizeExtension { size },
                },
                State::SizeLf { size } => match b {
                    b'\n' => after_size_line(size),
                    _ => return Err(ChunkError::BadSize),
                },
                State::Data { remaining } => {
                    let avail = (input.len() - i) as u64;
                    let take = remaining.min(avail) as usize;
                    data(&input[i..i + take]);
                    i += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining: left }
                    };
                    continue;
                }
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    b'\n' => State::Size { size: 0, digits: 0 },
                    _ => return Err(ChunkError::MissingDataCrlf),
                },
                State::DataLf => match b {
                    b'\n' => State::Size { size: 0, digits: 0 },
                    _ => return Err(ChunkError::MissingDataCrlf),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => State::Done,
                    _ => State::TrailerLine,
                },
                State::TrailerLine => match b {
                    b'\n' => State::TrailerStart,
                    _ => State::TrailerLine,
                },
                State::EndLf => match b {
                    b'\n' => State::Done,
                    _ => return Err(ChunkError::BadSize),
                },
                State::Done => {
                    return Ok(Fed {
                        consumed: i,
                        done: true,
                    })
                }
            };
            i += 1;
        }
        Ok(Fed {
            consumed: i,
            done: self.state == State::Done,
        })
    }
}

fn after_size_line(size: u64) -> State {
    if size == 0 {
        State::TrailerStart
    } else {
        State::Data { remaining: size }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` in order and returns (payload, total consumed, done).
    fn run(pieces: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut dec = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut consumed = 0;
        for p in pieces {
            let fed = dec.feed(p, |d| out.extend_from_slice(d))?;
            consumed += fed.consumed;
            if fed.done {
                return Ok((out, consumed, true));
            }
        }
        Ok((out, consumed, dec.is_done()))
    }

    const BODY: &[u8] =
        b"6\r\ndata: \r\n1A;ext=1\r\n{\"a\":1}\n\nabcdefghijklmnopq\r\n0\r\nX-T: y\r\n\r\n";
    const PAYLOAD: &[u8] = b"data: {\"a\":1}\n\nabcdefghijklmnopq";

    #[test]
    fn whole_body_in_one_read() {
        let (out, consumed, done) = run(&[BODY]).unwrap();
        assert_eq!(out, PAYLOAD);
        assert_eq!(consumed, BODY.len());
        assert!(done);
    }

    #[test]
    fn split_at_every_byte_boundary() {
        for cut in 0..=BODY.len() {
            let (out, consumed, done) = run(&[&BODY[..cut], &BODY[cut..]]).unwrap();
            assert_eq!(out, PAYLOAD, "cut at {cut}");
            assert_eq!(consumed, BODY.len(), "cut at {cut}");
            assert!(done, "cut at {cut}");
        }
    }

    #[test]
    fn split_at_every_pair_of_boundaries() {
        for a in 0..=BODY.len() {
            for b in a..=BODY.len() {
                let (out, _, done) = run(&[&BODY[..a], &BODY[a..b], &BODY[b..]]).unwrap();
                assert_eq!(out, PAYLOAD, "cuts at {a},{b}");
                assert!(done);
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let pieces: Vec<&[u8]> = BODY.chunks(1).collect();
        let (out, consumed, done) = run(&pieces).unwrap();
        assert_eq!(out, PAYLOAD);
        assert_eq!(consumed, BODY.len());
        assert!(done);
    }

    #[test]
    fn stops_at_end_and_reports_trailing_bytes() {
        let mut input = BODY.to_vec();
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let (out, consumed, done) = run(&[&input]).unwrap();
        assert_eq!(out, PAYLOAD);
        assert_eq!(consumed, BODY.len());
        assert!(done);
    }

    #[test]
    fn bare_lf_line_endings() {
        let (out, _, done) = run(&[b"3\nabc\n0\n\n"]).unwrap();
        assert_eq!(out, b"abc");
        assert!(done);
    }

    #[test]
    fn incomplete_body_is_not_done() {
        let (out, _, done) = run(&[b"5\r\nab"]).unwrap();
        assert_eq!(out, b"ab");
        assert!(!done);
        let (_, _, done) = run(&[b"0\r\n"]).unwrap();
        assert!(!done);
    }

    #[test]
    fn bad_framing_is_an_error() {
        assert_eq!(run(&[b"zz\r\n"]), Err(ChunkError::BadSize));
        assert_eq!(run(&[b"\r\n"]), Err(ChunkError::BadSize));
        assert_eq!(run(&[b"3\r\nabcX"]), Err(ChunkError::MissingDataCrlf));
        assert_eq!(
            run(&[b"11111111111111111\r\n"]),
            Err(ChunkError::SizeOverflow)
        );
    }
}
