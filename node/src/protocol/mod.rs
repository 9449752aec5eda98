//! The ASP.NET Core SignalR protocol as pure code: bytes in, types out, types
//! in, bytes out, with no I/O. `framing` splits the records a transport
//! delivers (0x1E-terminated text or VarInt-prefixed binary), `handshake`
//! answers the first record, `messages` is the JSON hub protocol and
//! `messagepack` the binary one, both behind the same `HubMessage` type, and
//! `negotiate` builds the negotiate answer for versions 0 and 1.

pub mod framing;
pub mod handshake;
pub mod messagepack;
pub mod messages;
pub mod negotiate;
pub mod outgoing;

pub use framing::{Framing, RecordReader};
pub use handshake::{handshake_response, parse_handshake, transfer_format_error};
pub use messages::HubMessage;
pub use outgoing::Outgoing;

/// The official server's error for invocation arguments of the wrong type
/// (its Completion's text, after "Failed to invoke '…' due to an error on
/// the server.").
pub const BINDING_ERROR: &str = "InvalidDataException: Error binding arguments. Make sure that the types of the provided values match the types of the hub method being invoked.";

/// A hub protocol a client can choose in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HubProtocol {
    Json = 0,
    MessagePack = 1,
}

impl HubProtocol {
    pub fn from_name(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("json") {
            Some(HubProtocol::Json)
        } else if name.eq_ignore_ascii_case("messagepack") {
            Some(HubProtocol::MessagePack)
        } else {
            None
        }
    }

    pub fn from_u8(v: u8) -> Self {
        if v == HubProtocol::MessagePack as u8 {
            HubProtocol::MessagePack
        } else {
            HubProtocol::Json
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HubProtocol::Json => "json",
            HubProtocol::MessagePack => "messagepack",
        }
    }

    /// MessagePack needs a transport that carries binary data.
    pub fn is_binary(self) -> bool {
        self == HubProtocol::MessagePack
    }

    pub fn framing(self) -> Framing {
        match self {
            HubProtocol::Json => Framing::Text,
            HubProtocol::MessagePack => Framing::LengthPrefixed,
        }
    }

    /// Parses one record (without separator or length prefix).
    pub fn parse(self, record: &[u8]) -> Result<HubMessage, ProtocolError> {
        match self {
            HubProtocol::Json => messages::parse_message(record),
            HubProtocol::MessagePack => messagepack::parse_message(record),
        }
    }

    /// Serializes one message, framed for the wire.
    pub fn encode(self, m: &HubMessage) -> Vec<u8> {
        match self {
            HubProtocol::Json => m.to_record(),
            HubProtocol::MessagePack => messagepack::to_frame(m),
        }
    }
}

/// Why bytes from a client could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message exceeds the maximum size of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    #[error("{0}")]
    Handshake(String),
}
