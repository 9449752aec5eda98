//! A hub message on its way to one or many connections, serialized lazily
//! and at most once per protocol: a broadcast to ten thousand JSON clients
//! and a few MessagePack clients costs two encodings, and the frames are
//! reference-counted, not copied, per recipient.

use super::{HubMessage, HubProtocol};
use bytes::Bytes;
use std::sync::OnceLock;

pub struct Outgoing {
    message: HubMessage,
    encoded: [OnceLock<Bytes>; 2],
}

impl Outgoing {
    pub fn new(message: HubMessage) -> Self {
        Outgoing { message, encoded: [OnceLock::new(), OnceLock::new()] }
    }

    #[cfg(test)]
    pub fn message(&self) -> &HubMessage {
        &self.message
    }

    /// The framed bytes for `protocol`, encoded on first use.
    pub fn bytes(&self, protocol: HubProtocol) -> Bytes {
        self.encoded[protocol as usize].get_or_init(|| Bytes::from(protocol.encode(&self.message))).clone()
    }

    pub fn is_sequenced(&self) -> bool {
        self.message.is_sequenced()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_is_encoded_once_and_shared() {
        let out = Outgoing::new(HubMessage::event("E", vec![serde_json::json!("x")]));
        let a = out.bytes(HubProtocol::Json);
        let b = out.bytes(HubProtocol::Json);
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same buffer, not a copy");
        assert_eq!(
            &a[..],
            br#"{"type":1,"target":"E","arguments":["x"]}"#.iter().chain(b"\x1e").copied().collect::<Vec<_>>()
        );
        let m = out.bytes(HubProtocol::MessagePack);
        assert_eq!(m.as_ptr(), out.bytes(HubProtocol::MessagePack).as_ptr());
        assert_eq!(HubProtocol::MessagePack.parse(&m[1..]).unwrap(), *out.message());
    }
}
