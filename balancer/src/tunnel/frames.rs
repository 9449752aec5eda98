//! Where each direction of a tunnel is in the WebSocket frame sequence, so
//! that the balancer, when it ends a tunnel itself (the node went away, or
//! the tunnel sat idle past its limit), can say so with a Close frame
//! (RFC 6455 §5.5.1; 1001 "going away") instead of only dropping the TCP
//! connection, which a client sees as 1006 (abnormal closure).
//!
//! A Close may only go out between frames: one written into the middle of a
//! frame would be read as that frame's payload. So every byte the relay has
//! *written* on a direction is fed to that direction's `FrameCursor`, which
//! follows the frame headers (2 to 14 bytes: lengths and the mask bit) and
//! skips payloads by count, without copying or buffering anything. A
//! direction on which the peer already sent a Close gets no second one, and
//! one whose write was abandoned midway gets none at all.

/// The close code the balancer sends when it ends a tunnel: the endpoint is
/// "going away" (RFC 6455 §7.4.1), which clients take as a reason to reconnect.
pub(super) const GOING_AWAY: u16 = 1001;

/// Both directions' positions: 0 the client's bytes to the node, 1 the node's to the client.
pub(super) type Cursors = [FrameCursor; 2];

/// The position in one direction's frame sequence.
#[derive(Debug, Default, Clone)]
pub(super) struct FrameCursor {
    /// The header read so far of the frame that begins next (0 bytes: at a boundary).
    header: [u8; 14],
    have: u8,
    /// The current frame's payload bytes still to pass.
    payload_left: u64,
    /// A Close frame went by: this direction's sender has closed.
    close_seen: bool,
    /// Bytes were lost midway (a write abandoned): the position is unknown.
    broken: bool,
}

impl FrameCursor {
    /// Follows `bytes`, written on this direction in order.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header[usize::from(self.have)] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have >= 2 && self.have == self.header_len() {
                self.end_of_header();
            }
        }
    }

    /// The length of the header being read (known once its first two bytes are).
    fn header_len(&self) -> u8 {
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn end_of_header(&mut self) {
        let length = match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        if self.header[0] & 0x0f == 0x8 {
            self.close_seen = true;
        }
        self.payload_left = length;
        self.have = 0;
    }

    /// Bytes were read for this direction but not all written.
    pub(super) fn lose_position(&mut self) {
        self.broken = true;
    }

    /// Whether the balancer may write a Close on this direction now: it is
    /// between frames, and its sender has not closed already.
    pub(super) fn may_close(&self) -> bool {
        !self.broken && !self.close_seen && self.have == 0 && self.payload_left == 0
    }
}

/// A Close frame with `code` and `reason` (at most 123 bytes), as a server
/// sends it (unmasked) or, with `mask`, as a client must (RFC 6455 §5.3).
pub(super) fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    let mut frame = vec![0x88, payload.len() as u8];
    if let Some(key) = mask {
        frame[1] |= 0x80;
        frame.extend_from_slice(&key);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// A masking key for a Close the balancer sends a node. RFC 6455 asks for an
/// unpredictable key so that a browser's script cannot steer the bytes a
/// proxy sees; the balancer's own Close carries no client data, so a key
/// from the clock's nanoseconds is enough.
pub(super) fn mask_key() -> [u8; 4] {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (nanos ^ 0x5bd1_e995).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a server sends it (or, with `mask`, a client).
    fn frame(opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn follows_frames_of_every_length_form_fed_in_any_pieces() {
        let mut stream = Vec::new();
        for (len, mask) in [(0, false), (5, true), (125, false), (126, true), (300, false), (70_000, true)] {
            stream.extend(frame(0x1, &vec![b'x'; len], mask));
        }
        for piece in [1, 3, 7, 1000, stream.len()] {
            let mut cursor = FrameCursor::default();
            let mut boundaries = 0;
            for chunk in stream.chunks(piece) {
                cursor.feed(chunk);
                boundaries += usize::from(cursor.may_close());
            }
            assert!(cursor.may_close(), "between frames at the end (pieces of {piece})");
            if piece == 1 {
                assert_eq!(boundaries, 6, "exactly once after each frame's last byte");
            }
        }
    }

    #[test]
    fn is_not_between_frames_inside_a_header_or_a_payload() {
        let f = frame(0x2, &[9; 200], false);
        let mut cursor = FrameCursor::default();
        cursor.feed(&f[..1]);
        assert!(!cursor.may_close(), "inside the header");
        cursor.feed(&f[1..50]);
        assert!(!cursor.may_close(), "inside the payload");
        cursor.feed(&f[50..]);
        assert!(cursor.may_close());
        cursor.lose_position();
        assert!(!cursor.may_close(), "a lost write leaves the position unknown");
    }

    #[test]
    fn a_close_from_the_sender_means_no_second_close() {
        let mut cursor = FrameCursor::default();
        cursor.feed(&frame(0x1, b"{}\x1e", false));
        cursor.feed(&close_frame(1000, "", None));
        assert!(!cursor.may_close());
    }

    #[test]
    fn a_tunnels_two_positions_stay_small() {
        // Held for every tunnel's life (about 2.3 KB each in all, see `relay`).
        assert!(std::mem::size_of::<Cursors>() <= 64, "{}", std::mem::size_of::<Cursors>());
    }

    #[test]
    fn close_frames_are_well_formed_masked_and_not() {
        assert_eq!(close_frame(1001, "bye", None), vec![0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']);
        let masked = close_frame(1001, "bye", Some([1, 2, 3, 4]));
        assert_eq!(&masked[..6], &[0x88, 0x85, 1, 2, 3, 4]);
        let unmasked: Vec<u8> = masked[6..].iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]).collect();
        assert_eq!(unmasked, vec![0x03, 0xe9, b'b', b'y', b'e']);
        assert_eq!(
            close_frame(1001, &"r".repeat(500), None).len(),
            2 + 125,
            "a control frame's payload is at most 125 bytes"
        );
        let mut cursor = FrameCursor::default();
        cursor.feed(&masked);
        assert!(!cursor.may_close(), "a cursor reads its own Close as one");
    }
}
