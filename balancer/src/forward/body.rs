//! Where a node's response body ends, found as its bytes pass: after a
//! `Content-Length`, after the last chunk of a chunked body (and its
//! trailers), or when the node closes. The forwarder copies the bytes as they
//! come (a Server-Sent Events stream is never held back) and only watches
//! them, so that it knows when the connection can carry the next request.

/// How a response body is framed, and how far it has got.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// Bytes still to come of a `Content-Length` body (0: done).
    Length(u64),
    Chunked(Chunked),
    /// Neither: the body ends when the node closes the connection.
    UntilClose,
}

/// A malformed chunked body: the connection cannot be trusted any further.
#[derive(Debug, PartialEq)]
pub struct Malformed;

impl Body {
    /// Takes the next bytes of the body; returns how many of them belong to
    /// it (any after its end are not the node's to send).
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, Malformed> {
        match self {
            Body::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                Ok(n as usize)
            }
            Body::Chunked(c) => c.feed(data),
            Body::UntilClose => Ok(data.len()),
        }
    }

    pub fn is_done(&self) -> bool {
        match self {
            Body::Length(left) => *left == 0,
            Body::Chunked(c) => c.state == State::Done,
            Body::UntilClose => false,
        }
    }
}

/// Where a chunked body is.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunked {
    state: State,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked { state: State::Size { value: 0, digits: 0 } }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// The chunk-size's hex digits.
    Size {
        value: u64,
        digits: u8,
    },
    /// A chunk extension (`;name=value`), skipped to the line's end.
    Extension {
        value: u64,
    },
    /// The size line's `\n`, after its `\r`.
    SizeEnd {
        value: u64,
    },
    Data {
        left: u64,
    },
    /// The `\r\n` after a chunk's data.
    DataEnd {
        seen_cr: bool,
    },
    /// The start of a trailer line, or of the blank line that ends the body.
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// The final `\n`, after its `\r`.
    LastEnd,
    Done,
}

/// Sizes of more than 15 hex digits are refused (no body is that large).
const MAX_DIGITS: u8 = 15;

impl Chunked {
    fn feed(&mut self, data: &[u8]) -> Result<usize, Malformed> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Data { left } => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    self.state =
                        if n == left { State::DataEnd { seen_cr: false } } else { State::Data { left: left - n } };
                    continue;
                }
                State::Size { value, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < MAX_DIGITS => {
                        State::Size { value: value << 4 | u64::from(d), digits: digits + 1 }
                    }
                    Some(_) => return Err(Malformed),
                    None if digits == 0 => return Err(Malformed),
                    None => match b {
                        b';' | b' ' | b'\t' => State::Extension { value },
                        b'\r' => State::SizeEnd { value },
                        b'\n' => Self::after_size(value),
                        _ => return Err(Malformed),
                    },
                },
                State::Extension { value } => match b {
                    b'\r' => State::SizeEnd { value },
                    b'\n' => Self::after_size(value),
                    _ => State::Extension { value },
                },
                State::SizeEnd { value } if b == b'\n' => Self::after_size(value),
                State::DataEnd { seen_cr: false } if b == b'\r' => State::DataEnd { seen_cr: true },
                State::DataEnd { .. } if b == b'\n' => State::Size { value: 0, digits: 0 },
                State::TrailerStart => match b {
                    b'\r' => State::LastEnd,
                    b'\n' => State::Done,
                    _ => State::Trailer,
                },
                State::Trailer if b == b'\n' => State::TrailerStart,
                State::Trailer => State::Trailer,
                State::LastEnd if b == b'\n' => State::Done,
                State::SizeEnd { .. } | State::DataEnd { .. } | State::LastEnd => return Err(Malformed),
            };
            i += 1;
        }
        Ok(i)
    }

    fn after_size(value: u64) -> State {
        if value == 0 {
            State::TrailerStart
        } else {
            State::Data { left: value }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed_in_pieces(body: &mut Body, data: &[u8], piece: usize) -> Result<usize, Malformed> {
        let mut taken = 0;
        for chunk in data.chunks(piece) {
            taken += body.feed(chunk)?;
            if body.is_done() {
                break;
            }
        }
        Ok(taken)
    }

    #[test]
    fn a_length_body_ends_after_its_length() {
        let mut body = Body::Length(5);
        assert_eq!(body.feed(b"abc"), Ok(3));
        assert!(!body.is_done());
        assert_eq!(body.feed(b"deHTTP"), Ok(2));
        assert!(body.is_done());
        assert!(Body::Length(0).is_done());
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_however_it_is_cut() {
        let wire: &[u8] = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for piece in 1..=wire.len() {
            let mut body = Body::Chunked(Chunked::default());
            assert_eq!(fed_in_pieces(&mut body, wire, piece), Ok(wire.len() - 4), "pieces of {piece}");
            assert!(body.is_done());
        }
    }

    #[test]
    fn an_event_stream_is_not_done_between_events() {
        let mut body = Body::Chunked(Chunked::default());
        assert_eq!(body.feed(b"c\r\ndata: hi\r\n\r\n\r\n"), Ok(17));
        assert!(!body.is_done());
        assert_eq!(body.feed(b"0\r\n\r\n"), Ok(5));
        assert!(body.is_done());
    }

    #[test]
    fn bare_line_feeds_are_accepted() {
        let mut body = Body::Chunked(Chunked::default());
        assert_eq!(body.feed(b"2\nab\n0\n\n"), Ok(8));
        assert!(body.is_done());
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [&b"x\r\n"[..], b"\r\n", b"2\r\nabX", b"2\r\nab\rX", b"1234567890abcdef0\r\n", b"0\r\n\rX"] {
            let mut body = Body::Chunked(Chunked::default());
            assert_eq!(body.feed(bad), Err(Malformed), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_body_until_close_never_ends() {
        let mut body = Body::UntilClose;
        assert_eq!(body.feed(b"anything"), Ok(8));
        assert!(!body.is_done());
    }
}
