//! gRPC's length-prefixed messages: a flag byte (0: not compressed), a 4-byte big-endian
//! length, the protobuf bytes. The router sends uncompressed messages and asks for none, so
//! a compressed message from a worker is a protocol error.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

/// Larger messages are refused (a tokenizer bundle arrives in chunks well below it).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub fn encode<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut buf).expect("capacity reserved");
    buf.freeze()
}

/// Messages out of DATA frames however the frames cut them.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether a message has started but not ended.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next whole message, if one has arrived.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(
                "the worker sent a compressed message, which the router did not ask for".into(),
            );
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(format!(
                "a message of {len} bytes exceeds the limit of {MAX_MESSAGE}"
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let bytes = self.buf.split_to(len);
        M::decode(bytes)
            .map(Some)
            .map_err(|e| format!("undecodable message: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpc_proto::engine::{GenerateStreamChunk, HealthCheckResponse};

    #[test]
    fn a_message_cut_anywhere_is_decoded_once_whole() {
        let a = GenerateStreamChunk {
            token_ids: vec![1, 2, 300_000],
            prompt_tokens: 7,
            ..Default::default()
        };
        let b = GenerateStreamChunk {
            token_ids: vec![9],
            ..Default::default()
        };
        let mut wire = encode(&a).to_vec();
        wire.extend_from_slice(&encode(&b));
        for cut in 0..wire.len() {
            let mut d = Decoder::default();
            d.push(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(m) = d.next_message::<GenerateStreamChunk>().unwrap() {
                got.push(m);
            }
            d.push(&wire[cut..]);
            while let Some(m) = d.next_message::<GenerateStreamChunk>().unwrap() {
                got.push(m);
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "cut at {cut}");
            assert!(!d.has_partial());
        }
    }

    #[test]
    fn an_empty_message_is_a_message() {
        let mut d = Decoder::default();
        d.push(&encode(&HealthCheckResponse::default()));
        assert_eq!(
            d.next_message::<HealthCheckResponse>().unwrap(),
            Some(Default::default())
        );
    }

    #[test]
    fn compressed_and_oversized_messages_are_refused() {
        let mut d = Decoder::default();
        d.push(&[1, 0, 0, 0, 0]);
        assert!(d.next_message::<HealthCheckResponse>().is_err());
        let mut d = Decoder::default();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(d.next_message::<HealthCheckResponse>().is_err());
    }
}
