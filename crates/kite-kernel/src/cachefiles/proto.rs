//! The cachefiles on-demand protocol as pure functions over bytes.
//!
//! Parsing a message read from `/dev/cachefiles` and encoding the text
//! commands written back are sans-IO: no fds, no syscalls, so every rule
//! (sizes, trailing data, NUL termination, base-0 number syntax) is unit
//! tested without a kernel. Layout (host endian, `include/uapi/linux/
//! cachefiles.h`): header `{u32 msg_id, u32 opcode, u32 len, u32
//! object_id}`; OPEN adds `{u32 volume_key_size, u32 cookie_key_size, u32
//! fd, u32 flags}` + volume key (NUL-terminated) + cookie key (binary);
//! READ adds `{u64 off, u64 len}`; CLOSE adds nothing.

/// Largest message the kernel sends (`CACHEFILES_MSG_MAX_SIZE`).
pub const MSG_MAX_SIZE: usize = 1024;
pub const HEADER_SIZE: usize = 16;
pub const OPCODE_OPEN: u32 = 0;
pub const OPCODE_CLOSE: u32 = 1;
pub const OPCODE_READ: u32 = 2;

/// A decoded message. The OPEN's fd is a number here; the device layer
/// turns it into an owned fd the moment the message is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open {
        msg_id: u32,
        object_id: u32,
        /// Volume key without its NUL, e.g. `erofs,<domain or fsid>`.
        volume_key: Vec<u8>,
        /// Cookie key: the fsid for a bootstrap, the device tag for a blob.
        cookie_key: Vec<u8>,
        fd: u32,
        flags: u32,
    },
    Close {
        msg_id: u32,
        object_id: u32,
    },
    Read {
        msg_id: u32,
        object_id: u32,
        off: u64,
        len: u64,
    },
}

impl Message {
    pub fn msg_id(&self) -> u32 {
        match self {
            Message::Open { msg_id, .. }
            | Message::Close { msg_id, .. }
            | Message::Read { msg_id, .. } => *msg_id,
        }
    }
    pub fn object_id(&self) -> u32 {
        match self {
            Message::Open { object_id, .. }
            | Message::Close { object_id, .. }
            | Message::Read { object_id, .. } => *object_id,
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("message length field {field} does not match the {read} bytes read")]
    LengthMismatch { field: u32, read: usize },
    #[error("msg {msg_id}: unknown opcode {opcode}")]
    UnknownOpcode { msg_id: u32, opcode: u32 },
    #[error("msg {msg_id}: {what}")]
    Malformed { msg_id: u32, what: &'static str },
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Decode one message exactly as read (one `read()` returns one message).
pub fn parse(buf: &[u8]) -> Result<Message, ProtoError> {
    if buf.len() < HEADER_SIZE {
        return Err(ProtoError::Short(buf.len()));
    }
    let msg_id = u32_at(buf, 0);
    let opcode = u32_at(buf, 4);
    let len = u32_at(buf, 8);
    let object_id = u32_at(buf, 12);
    if len as usize != buf.len() {
        return Err(ProtoError::LengthMismatch {
            field: len,
            read: buf.len(),
        });
    }
    let body = &buf[HEADER_SIZE..];
    let malformed = |what| ProtoError::Malformed { msg_id, what };
    match opcode {
        OPCODE_OPEN => {
            if body.len() < 16 {
                return Err(malformed("OPEN body shorter than 16 bytes"));
            }
            let vsize = u32_at(body, 0) as usize;
            let csize = u32_at(body, 4) as usize;
            let fd = u32_at(body, 8);
            let flags = u32_at(body, 12);
            let keys = &body[16..];
            if vsize.checked_add(csize) != Some(keys.len()) {
                return Err(malformed("OPEN key sizes do not match the message length"));
            }
            let vkey = &keys[..vsize];
            let Some((&0, vkey)) = vkey.split_last() else {
                return Err(malformed("OPEN volume key is not NUL-terminated"));
            };
            Ok(Message::Open {
                msg_id,
                object_id,
                volume_key: vkey.to_vec(),
                cookie_key: keys[vsize..].to_vec(),
                fd,
                flags,
            })
        }
        OPCODE_CLOSE => {
            if !body.is_empty() {
                return Err(malformed("CLOSE with a body"));
            }
            Ok(Message::Close { msg_id, object_id })
        }
        OPCODE_READ => {
            if body.len() != 16 {
                return Err(malformed("READ body is not 16 bytes"));
            }
            Ok(Message::Read {
                msg_id,
                object_id,
                off: u64_at(body, 0),
                len: u64_at(body, 8),
            })
        }
        opcode => Err(ProtoError::UnknownOpcode { msg_id, opcode }),
    }
}

/// The `copen` reply: a size for success, or a negative errno to fail the
/// open. Numbers are parsed in base 0 by the kernel, so never zero-padded.
pub fn copen(msg_id: u32, size_or_errno: i64) -> String {
    format!("copen {msg_id},{size_or_errno}")
}

/// Encode a message the way the kernel does (for the simulated kernel and
/// tests).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut body = Vec::new();
    let opcode = match msg {
        Message::Open {
            volume_key,
            cookie_key,
            fd,
            flags,
            ..
        } => {
            body.extend_from_slice(&(volume_key.len() as u32 + 1).to_ne_bytes());
            body.extend_from_slice(&(cookie_key.len() as u32).to_ne_bytes());
            body.extend_from_slice(&fd.to_ne_bytes());
            body.extend_from_slice(&flags.to_ne_bytes());
            body.extend_from_slice(volume_key);
            body.push(0);
            body.extend_from_slice(cookie_key);
            OPCODE_OPEN
        }
        Message::Close { .. } => OPCODE_CLOSE,
        Message::Read { off, len, .. } => {
            body.extend_from_slice(&off.to_ne_bytes());
            body.extend_from_slice(&len.to_ne_bytes());
            OPCODE_READ
        }
    };
    let mut out = Vec::with_capacity(HEADER_SIZE + body.len());
    out.extend_from_slice(&msg.msg_id().to_ne_bytes());
    out.extend_from_slice(&opcode.to_ne_bytes());
    out.extend_from_slice(&((HEADER_SIZE + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&msg.object_id().to_ne_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_opcodes() {
        let msgs = [
            Message::Open {
                msg_id: 1,
                object_id: 7,
                volume_key: b"erofs,dom".to_vec(),
                cookie_key: b"a".repeat(64),
                fd: 12,
                flags: 0,
            },
            Message::Read {
                msg_id: 2,
                object_id: 7,
                off: 1 << 40,
                len: 4096,
            },
            Message::Close {
                msg_id: 3,
                object_id: 7,
            },
        ];
        for m in msgs {
            assert_eq!(parse(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn short_trailing_and_inconsistent_messages_are_refused() {
        let read = encode(&Message::Read {
            msg_id: 9,
            object_id: 1,
            off: 0,
            len: 4096,
        });
        assert_eq!(parse(&read[..10]), Err(ProtoError::Short(10)));
        let mut long = read.clone();
        long.push(0);
        assert!(matches!(
            parse(&long),
            Err(ProtoError::LengthMismatch { .. })
        ));
        let mut open = encode(&Message::Open {
            msg_id: 4,
            object_id: 2,
            volume_key: b"erofs,x".to_vec(),
            cookie_key: b"k".to_vec(),
            fd: 3,
            flags: 0,
        });
        // Claim a longer cookie key than present.
        open[HEADER_SIZE + 4] = 9;
        assert!(matches!(
            parse(&open),
            Err(ProtoError::Malformed { msg_id: 4, .. })
        ));
        let mut bad = read.clone();
        bad[4] = 7;
        assert_eq!(
            parse(&bad),
            Err(ProtoError::UnknownOpcode {
                msg_id: 9,
                opcode: 7
            })
        );
    }

    #[test]
    fn volume_key_must_be_nul_terminated() {
        let mut open = encode(&Message::Open {
            msg_id: 4,
            object_id: 2,
            volume_key: b"erofs,x".to_vec(),
            cookie_key: vec![],
            fd: 3,
            flags: 0,
        });
        let last = open.len() - 1;
        open[last] = b'!';
        assert!(matches!(parse(&open), Err(ProtoError::Malformed { .. })));
    }

    #[test]
    fn copen_is_not_zero_padded() {
        assert_eq!(copen(5, 8192), "copen 5,8192");
        assert_eq!(copen(6, -2), "copen 6,-2");
    }
}
