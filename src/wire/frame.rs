//! The Swank-style frame codec: 6 lowercase hex digits giving the payload length in UTF-8
//! bytes, then the payload, one s-expression.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::sexp::{ParseError, Sexp};

const HEADER_LEN: usize = 6;
/// The largest length 6 hex digits can state.
pub const MAX_ENCODABLE: usize = 0xff_ffff;
/// What sbmon accepts from an agent unless told otherwise (docs/protocol.md, "Transport and framing").
pub const DEFAULT_MAX_INCOMING: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame header {0:?}: expected 6 hex digits")]
    BadHeader(String),
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("frame payload is not valid UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes and decodes whole messages; one codec per connection.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_incoming: usize,
}

impl FrameCodec {
    pub fn new(max_incoming: usize) -> Self {
        FrameCodec { max_incoming }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_INCOMING)
    }
}

fn parse_header(header: &[u8]) -> Result<usize, FrameError> {
    let bad = || FrameError::BadHeader(String::from_utf8_lossy(header).into_owned());
    if !header.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    let text = std::str::from_utf8(header).map_err(|_| bad())?;
    usize::from_str_radix(text, 16).map_err(|_| bad())
}

impl Decoder for FrameCodec {
    type Item = Sexp;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Sexp>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = parse_header(&src[..HEADER_LEN])?;
        if len > self.max_incoming {
            return Err(FrameError::TooLarge {
                len,
                limit: self.max_incoming,
            });
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len);
        let text = std::str::from_utf8(&payload).map_err(|_| FrameError::NotUtf8)?;
        Ok(Some(Sexp::parse(text)?))
    }
}

impl Encoder<&Sexp> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &Sexp, dst: &mut BytesMut) -> Result<(), FrameError> {
        let payload = item.to_string();
        if payload.len() > MAX_ENCODABLE {
            return Err(FrameError::TooLarge {
                len: payload.len(),
                limit: MAX_ENCODABLE,
            });
        }
        dst.reserve(HEADER_LEN + payload.len());
        dst.put_slice(format!("{:06x}", payload.len()).as_bytes());
        dst.put_slice(payload.as_bytes());
        Ok(())
    }
}

impl Encoder<Sexp> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Sexp, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_counts_utf8_bytes() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(Sexp::string("é"), &mut buf).unwrap();
        // "é" is 2 bytes, plus two quotes.
        assert_eq!(&buf[..], "000004\"é\"".as_bytes());
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Sexp::string("é")));
        assert!(buf.is_empty());
    }

    #[test]
    fn waits_for_partial_frames_then_decodes_several() {
        let mut codec = FrameCodec::default();
        let mut whole = BytesMut::new();
        codec.encode(Sexp::Int(1), &mut whole).unwrap();
        codec.encode(Sexp::keyword("pong"), &mut whole).unwrap();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in whole.iter() {
            buf.put_u8(*byte);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                got.push(item);
            }
        }
        assert_eq!(got, vec![Sexp::Int(1), Sexp::keyword("pong")]);
    }

    #[test]
    fn rejects_bad_headers_and_oversized_frames() {
        let mut codec = FrameCodec::new(10);
        let mut buf = BytesMut::from(&b"zzzzzz()"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::BadHeader(_))
        ));
        let mut buf = BytesMut::from(&b"+0000a"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::BadHeader(_))
        ));
        let mut buf = BytesMut::from(&b"00000b"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { len: 11, limit: 10 })
        ));
        let mut buf = BytesMut::from(&b"000002\xff\xfe"[..]);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::NotUtf8)));
    }
}
