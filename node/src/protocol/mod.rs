//! The ASP.NET Core SignalR protocol as pure code: bytes in, types out, types
//! in, bytes out, with no I/O. `framing` splits the 0x1E-terminated records a
//! transport delivers, `handshake` answers the first record, `messages` is the
//! JSON hub protocol (message types 1–9) and `negotiate` builds the negotiate
//! answer for versions 0 and 1. A future MessagePack protocol would sit beside
//! `messages` behind the same `HubMessage` type.

pub mod framing;
pub mod handshake;
pub mod messages;
pub mod negotiate;

pub use framing::{RecordReader, RECORD_SEPARATOR};
pub use handshake::{handshake_response, parse_handshake};
pub use messages::{parse_message, HubMessage};

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
