//! Record framing. The handshake and the JSON protocol end every message with
//! the ASCII record separator 0x1E; MessagePack puts a VarInt length (7 bits a
//! byte, low bits first, at most 5 bytes) before each message. A transport
//! frame may hold several messages, and a message may arrive split across
//! frames. `RecordReader` keeps the incomplete tail between feeds (no
//! allocation while it is empty) and enforces the maximum message size on
//! complete and incomplete records alike, so a client cannot grow the buffer
//! without bound by never finishing a record. The framing switches from text
//! to length-prefixed right after the handshake record, inside one feed if
//! need be, which is why records are taken one at a time.

use super::ProtocolError;

pub const RECORD_SEPARATOR: u8 = 0x1e;

/// Longest VarInt the protocol allows: 5 bytes carry up to 2^31 - 1.
const MAX_VARINT_BYTES: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Records end with 0x1E (the handshake, JSON).
    Text,
    /// Records start with a VarInt length (MessagePack).
    LengthPrefixed,
}

#[derive(Debug)]
pub struct RecordReader {
    buf: Vec<u8>,
    /// Start of the unread part of `buf`.
    pos: usize,
    max_message: usize,
    framing: Framing,
}

/// Outcome of reading a VarInt at the start of a slice.
#[derive(Debug, PartialEq, Eq)]
enum VarInt {
    /// Value and the number of bytes it took.
    Done(u64, usize),
    Incomplete,
}

fn read_varint(bytes: &[u8]) -> Result<VarInt, ProtocolError> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().take(MAX_VARINT_BYTES).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if value > i32::MAX as u64 {
                return Err(ProtocolError::InvalidMessage("Messages over 2GB in size are not supported.".into()));
            }
            return Ok(VarInt::Done(value, i + 1));
        }
    }
    if bytes.len() >= MAX_VARINT_BYTES {
        return Err(ProtocolError::InvalidMessage("Messages over 2GB in size are not supported.".into()));
    }
    Ok(VarInt::Incomplete)
}

/// Appends the VarInt length prefix of `len` to `out`.
pub fn write_varint(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

impl RecordReader {
    pub fn new(max_message: usize) -> Self {
        RecordReader { buf: Vec::new(), pos: 0, max_message, framing: Framing::Text }
    }

    /// Switches framing for every record after the one just taken.
    pub fn set_framing(&mut self, framing: Framing) {
        self.framing = framing;
    }

    /// Queues transport bytes; take records with `next_record`.
    pub fn feed(&mut self, data: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    fn fail(&mut self, e: ProtocolError) -> Result<Option<Vec<u8>>, ProtocolError> {
        self.buf = Vec::new();
        self.pos = 0;
        Err(e)
    }

    /// The next complete record (without separator or length prefix), or
    /// `None` when the rest is incomplete. An error leaves the reader empty.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        let limit = self.max_message;
        let rest = &self.buf[self.pos..];
        let found = match self.framing {
            Framing::Text => match rest.iter().position(|&b| b == RECORD_SEPARATOR) {
                Some(n) if n > limit => return self.fail(ProtocolError::TooLarge { limit }),
                Some(n) => Some((0, n, n + 1)),
                None if rest.len() > limit => return self.fail(ProtocolError::TooLarge { limit }),
                None => None,
            },
            Framing::LengthPrefixed => match read_varint(rest) {
                Err(e) => return self.fail(e),
                Ok(VarInt::Done(len, _)) if len > limit as u64 => {
                    return self.fail(ProtocolError::TooLarge { limit });
                }
                Ok(VarInt::Done(len, head)) if rest.len() - head >= len as usize => {
                    Some((head, len as usize, head + len as usize))
                }
                Ok(_) => None,
            },
        };
        match found {
            Some((start, len, consumed)) => {
                let record = rest[start..start + len].to_vec();
                self.pos += consumed;
                Ok(Some(record))
            }
            None => {
                // Keep only the incomplete tail, and no capacity when there is none.
                self.buf.drain(..self.pos);
                self.pos = 0;
                if self.buf.is_empty() {
                    self.buf = Vec::new();
                }
                Ok(None)
            }
        }
    }
}

/// Appends the separator, producing one wire record.
pub fn frame(mut json: Vec<u8>) -> Vec<u8> {
    json.push(RECORD_SEPARATOR);
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(r: &mut RecordReader) -> Result<Vec<Vec<u8>>, ProtocolError> {
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    fn feed(r: &mut RecordReader, data: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
        r.feed(data);
        all(r)
    }

    #[test]
    fn several_records_in_one_frame() {
        let mut r = RecordReader::new(100);
        let got = feed(&mut r, b"{\"a\":1}\x1e{\"b\":2}\x1e").unwrap();
        assert_eq!(got, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
    }

    #[test]
    fn a_record_split_across_frames_is_joined() {
        let mut r = RecordReader::new(100);
        assert!(feed(&mut r, b"{\"a\"").unwrap().is_empty());
        assert_eq!(feed(&mut r, b":1}\x1e{").unwrap(), vec![b"{\"a\":1}".to_vec()]);
        assert_eq!(feed(&mut r, b"}\x1e").unwrap(), vec![b"{}".to_vec()]);
        assert_eq!(r.buf.capacity(), 0, "no memory kept once everything is read");
    }

    #[test]
    fn oversized_records_fail_complete_or_not() {
        let mut r = RecordReader::new(4);
        assert_eq!(feed(&mut r, b"12345\x1e"), Err(ProtocolError::TooLarge { limit: 4 }));
        let mut r = RecordReader::new(4);
        assert!(feed(&mut r, b"123").unwrap().is_empty());
        assert!(feed(&mut r, b"45").is_err());
        let mut r = RecordReader::new(4);
        assert_eq!(feed(&mut r, b"1234\x1e").unwrap(), vec![b"1234".to_vec()]);
    }

    #[test]
    fn varints_round_trip() {
        for n in [0usize, 1, 127, 128, 300, 16_383, 16_384, 2_097_151, 2_097_152, i32::MAX as usize] {
            let mut out = Vec::new();
            write_varint(&mut out, n);
            assert_eq!(read_varint(&out), Ok(VarInt::Done(n as u64, out.len())), "{n}");
            assert_eq!(read_varint(&out[..out.len() - 1]), Ok(VarInt::Incomplete), "{n} truncated");
        }
    }

    #[test]
    fn the_framing_switches_after_the_handshake_within_one_feed() {
        let mut r = RecordReader::new(100);
        r.feed(b"{\"protocol\":\"messagepack\",\"version\":1}\x1e\x02\x91\x06\x01");
        assert_eq!(r.next_record().unwrap(), Some(b"{\"protocol\":\"messagepack\",\"version\":1}".to_vec()));
        r.set_framing(Framing::LengthPrefixed);
        assert_eq!(r.next_record().unwrap(), Some(vec![0x91, 0x06]));
        assert_eq!(r.next_record().unwrap(), None, "a one-byte record whose payload has not arrived");
        assert_eq!(feed(&mut r, b"\x1e").unwrap(), vec![vec![0x1e]]);
    }

    #[test]
    fn length_prefixed_records_split_anywhere() {
        let mut wire = Vec::new();
        for payload in [&b"abc"[..], &[7u8; 200][..], b""] {
            write_varint(&mut wire, payload.len());
            wire.extend_from_slice(payload);
        }
        for chunk in 1..wire.len() {
            let mut r = RecordReader::new(1000);
            r.set_framing(Framing::LengthPrefixed);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                got.extend(feed(&mut r, piece).unwrap());
            }
            assert_eq!(got, vec![b"abc".to_vec(), vec![7u8; 200], Vec::new()], "chunks of {chunk}");
        }
    }

    #[test]
    fn bad_length_prefixes_are_refused() {
        let mut r = RecordReader::new(100);
        r.set_framing(Framing::LengthPrefixed);
        // 101 > limit: refused before the payload arrives.
        assert_eq!(feed(&mut r, &[101]), Err(ProtocolError::TooLarge { limit: 100 }));
        let mut r = RecordReader::new(100);
        r.set_framing(Framing::LengthPrefixed);
        assert!(feed(&mut r, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err(), "six-byte VarInt");
        let mut r = RecordReader::new(100);
        r.set_framing(Framing::LengthPrefixed);
        assert!(feed(&mut r, &[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err(), "above 2 GB");
        let mut r = RecordReader::new(100);
        r.set_framing(Framing::LengthPrefixed);
        assert_eq!(feed(&mut r, &[0x80, 0x80]).unwrap(), Vec::<Vec<u8>>::new(), "a truncated VarInt waits");
    }
}
