//! The chunked transfer coding, incrementally, as a state machine fed any split of the
//! bytes. Two uses: decoding a client's chunked request body, and finding where a worker's
//! chunked response ends while its bytes are relayed untouched.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    BadSize,
    SizeTooLarge,
    BadLineEnding,
    LineTooLong,
}

impl std::fmt::Display for ChunkedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkedError::BadSize => "invalid chunk size",
            ChunkedError::SizeTooLarge => "chunk size too large",
            ChunkedError::BadLineEnding => "invalid chunk framing (expected CRLF)",
            ChunkedError::LineTooLong => "chunk size line or trailer too long",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size,
    /// After the size: optional whitespace and `;ext`, up to CR.
    SizeExt,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: a trailer field line or the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// Longest chunk-size line or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: u32,
    line: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Between chunks: a new chunk (or the last one) may follow cleanly.
    pub fn at_chunk_start(&self) -> bool {
        self.state == State::Size && self.digits == 0
    }

    /// Consumes bytes of `input` until the body ends or the input runs out; payload bytes
    /// are appended to `out` when given. Returns how many bytes were consumed: fewer than
    /// `input.len()` only when the body ended (the rest belongs to what follows).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => {
                    if let Some(d) = hex(b) {
                        if self.digits >= 15 {
                            return Err(ChunkedError::SizeTooLarge);
                        }
                        self.size = self.size * 16 + d as u64;
                        self.digits += 1;
                    } else if self.digits == 0 {
                        return Err(ChunkedError::BadSize);
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = State::SizeExt;
                        self.line = 0;
                    } else {
                        return Err(ChunkedError::BadSize);
                    }
                    i += 1;
                }
                State::SizeExt => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n' {
                        return Err(ChunkedError::BadLineEnding);
                    } else {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(ChunkedError::LineTooLong);
                        }
                    }
                    i += 1;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadLineEnding);
                    }
                    i += 1;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let n = (input.len() - i).min(self.size as usize);
                    if let Some(o) = out.as_deref_mut() {
                        o.extend_from_slice(&input[i..i + n]);
                    }
                    i += n;
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkedError::BadLineEnding);
                    }
                    i += 1;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadLineEnding);
                    }
                    i += 1;
                    self.state = State::Size;
                    self.size = 0;
                    self.digits = 0;
                }
                State::TrailerStart => {
                    i += 1;
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else if b == b'\n' {
                        return Err(ChunkedError::BadLineEnding);
                    } else {
                        self.state = State::Trailer;
                        self.line = 1;
                    }
                }
                State::Trailer => {
                    i += 1;
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(ChunkedError::LineTooLong);
                        }
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadLineEnding);
                    }
                    i += 1;
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadLineEnding);
                    }
                    i += 1;
                    self.state = State::Done;
                    return Ok(i);
                }
                State::Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

fn hex(b: u8) -> Option<u8> {
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

    const SSE: &[u8] =
        b"18\r\ndata: {\"text\":\"hello\"}\n\n\r\ne;ext=1\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";

    fn decode_split(input: &[u8], split: usize) -> (Vec<u8>, usize, bool) {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let a = d.feed(&input[..split], Some(&mut out)).unwrap();
        let mut consumed = a;
        if !d.is_done() {
            consumed += d.feed(&input[split..], Some(&mut out)).unwrap();
        }
        (out, consumed, d.is_done())
    }

    #[test]
    fn decodes_at_every_split_point() {
        for split in 0..=SSE.len() {
            let (out, consumed, done) = decode_split(SSE, split);
            assert_eq!(
                out, b"data: {\"text\":\"hello\"}\n\ndata: [DONE]\n\n",
                "split {split}"
            );
            assert_eq!(consumed, SSE.len());
            assert!(done);
        }
    }

    #[test]
    fn stops_at_the_end_of_the_body() {
        let mut input = SSE.to_vec();
        input.extend_from_slice(b"POST /next HTTP/1.1\r\n");
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(&input, None).unwrap(), SSE.len());
        assert!(d.is_done());
    }

    #[test]
    fn trailers_are_consumed() {
        let body = b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n";
        for split in 0..=body.len() {
            let (out, consumed, done) = decode_split(body, split);
            assert_eq!(out, b"abc");
            assert_eq!(consumed, body.len());
            assert!(done);
        }
    }

    #[test]
    fn rejects_bad_framing() {
        let cases: &[&[u8]] = &[
            b"x\r\n",
            b"3\r\nabcd\r\n",
            b"3\nabc\r\n",
            b"ffffffffffffffffff\r\n",
            b"\r\n",
        ];
        for c in cases {
            let mut d = ChunkedDecoder::new();
            assert!(d.feed(c, None).is_err(), "{:?}", String::from_utf8_lossy(c));
        }
    }
}
