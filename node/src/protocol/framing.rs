//! Record framing for the JSON protocol: every message ends with the ASCII
//! record separator 0x1E, a transport frame may hold several messages, and a
//! message may arrive split across frames. `RecordReader` keeps the incomplete
//! tail between feeds (no allocation while it is empty) and enforces the
//! maximum message size on complete and incomplete records alike, so a client
//! cannot grow the buffer without bound by never sending the separator.

use super::ProtocolError;

pub const RECORD_SEPARATOR: u8 = 0x1e;

#[derive(Debug)]
pub struct RecordReader {
    pending: Vec<u8>,
    max_message: usize,
}

impl RecordReader {
    pub fn new(max_message: usize) -> Self {
        RecordReader { pending: Vec::new(), max_message }
    }

    /// Feeds transport bytes; returns each complete record without its separator.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
        let limit = self.max_message;
        let mut out = Vec::new();
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|&b| b == RECORD_SEPARATOR) {
            let (head, tail) = rest.split_at(pos);
            if self.pending.len() + head.len() > limit {
                self.pending = Vec::new();
                return Err(ProtocolError::TooLarge { limit });
            }
            if self.pending.is_empty() {
                out.push(head.to_vec());
            } else {
                let mut record = std::mem::take(&mut self.pending);
                record.extend_from_slice(head);
                out.push(record);
            }
            rest = &tail[1..];
        }
        if self.pending.len() + rest.len() > limit {
            self.pending = Vec::new();
            return Err(ProtocolError::TooLarge { limit });
        }
        self.pending.extend_from_slice(rest);
        if self.pending.is_empty() {
            self.pending = Vec::new(); // give back capacity kept from a split record
        }
        Ok(out)
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

    #[test]
    fn several_records_in_one_frame() {
        let mut r = RecordReader::new(100);
        let got = r.feed(b"{\"a\":1}\x1e{\"b\":2}\x1e").unwrap();
        assert_eq!(got, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
    }

    #[test]
    fn a_record_split_across_frames_is_joined() {
        let mut r = RecordReader::new(100);
        assert!(r.feed(b"{\"a\"").unwrap().is_empty());
        assert_eq!(r.feed(b":1}\x1e{").unwrap(), vec![b"{\"a\":1}".to_vec()]);
        assert_eq!(r.feed(b"}\x1e").unwrap(), vec![b"{}".to_vec()]);
    }

    #[test]
    fn oversized_records_fail_complete_or_not() {
        let mut r = RecordReader::new(4);
        assert_eq!(r.feed(b"12345\x1e"), Err(ProtocolError::TooLarge { limit: 4 }));
        let mut r = RecordReader::new(4);
        assert!(r.feed(b"123").unwrap().is_empty());
        assert!(r.feed(b"45").is_err());
        let mut r = RecordReader::new(4);
        assert_eq!(r.feed(b"1234\x1e").unwrap(), vec![b"1234".to_vec()]);
    }
}
