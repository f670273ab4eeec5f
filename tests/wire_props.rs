//! Property tests of the wire layer (`src/wire`): the frame codec and the s-expression reader
//! round-trip every value the protocol can carry, arbitrary bytes from a peer never panic
//! either, and nesting is refused past the reader's bound instead of exhausting the stack.
//! `fuzz/` runs the same two entry points under libFuzzer, outside CI (`tools/fuzz`).

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use sbmon::wire::{FrameCodec, FrameError, Sexp};
use tokio_util::codec::{Decoder, Encoder};

/// The reader's nesting bound (`MAX_DEPTH` in src/wire/sexp.rs): a list may hold lists this
/// deep and no deeper.
const MAX_DEPTH: usize = 256;

/// Keywords as the printer writes them: lowercase, from the reader's symbol characters.
fn keyword() -> impl Strategy<Value = Sexp> {
    "[a-z0-9*+/%.<>=!?&$_-]{1,24}".prop_map(Sexp::Keyword)
}

/// Every datum the protocol can carry. An empty list is `nil` on the wire, so generated lists
/// are never empty; floats are finite (the protocol has no infinities or NaN).
fn datum() -> impl Strategy<Value = Sexp> {
    let leaf = prop_oneof![
        Just(Sexp::Nil),
        Just(Sexp::T),
        keyword(),
        any::<String>().prop_map(Sexp::Str),
        any::<i64>().prop_map(Sexp::Int),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(Sexp::Float),
    ];
    leaf.prop_recursive(6, 256, 12, |inner| {
        prop::collection::vec(inner, 1..12).prop_map(Sexp::List)
    })
}

fn all_finite(s: &Sexp) -> bool {
    match s {
        Sexp::Float(x) => x.is_finite(),
        Sexp::List(items) => items.iter().all(all_finite),
        _ => true,
    }
}

/// Decode everything in `buf`, as a connection's reader does, until it needs more bytes or
/// the codec refuses the stream (after which a connection is dropped).
fn drain(codec: &mut FrameCodec, buf: &mut BytesMut) -> (Vec<Sexp>, Option<FrameError>) {
    let mut out = Vec::new();
    loop {
        match codec.decode(buf) {
            Ok(Some(item)) => out.push(item),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn nested(depth: usize) -> String {
    "(".repeat(depth) + &")".repeat(depth)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn printed_data_read_back_equal(value in datum()) {
        let printed = value.to_string();
        prop_assert_eq!(Sexp::parse(&printed).unwrap(), value);
    }

    #[test]
    fn frames_round_trip_whatever_the_read_sizes(
        values in prop::collection::vec(datum(), 1..6),
        chunk in 1usize..64,
    ) {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        for v in &values {
            codec.encode(v, &mut wire).unwrap();
        }
        // The peer's bytes arrive in reads of `chunk` bytes.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.put_slice(piece);
            let (items, error) = drain(&mut codec, &mut buf);
            prop_assert!(error.is_none(), "{:?}", error);
            got.extend(items);
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, values);
    }

    #[test]
    fn the_reader_never_panics_on_arbitrary_text(text in any::<String>()) {
        if let Ok(value) = Sexp::parse(&text) {
            // What it accepts prints back to the same datum (an out-of-range float such as
            // 1e999 reads as an infinity, which prints as nil: the protocol has none).
            if all_finite(&value) {
                prop_assert_eq!(Sexp::parse(&value.to_string()).unwrap(), value);
            }
        }
    }

    #[test]
    fn the_reader_never_panics_on_lisp_like_text(
        text in r#"[():"\\a-z0-9 .+/\-#'`,|;\n]{0,200}"#
    ) {
        let _ = Sexp::parse(&text);
    }

    #[test]
    fn the_codec_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        max in 0usize..4096,
    ) {
        let mut codec = FrameCodec::new(max);
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        let (items, error) = drain(&mut codec, &mut buf);
        // Whatever it made of them, it consumed no more than it was given and stopped.
        prop_assert!(buf.len() <= before);
        if error.is_none() && items.is_empty() {
            prop_assert_eq!(buf.len(), before, "nothing decoded, nothing consumed");
        }
    }

    #[test]
    fn the_codec_never_panics_on_valid_headers_with_garbage(
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_slice(format!("{:06x}", payload.len()).as_bytes());
        buf.put_slice(&payload);
        match codec.decode(&mut buf) {
            // A complete frame is always consumed whole, decoded or refused.
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => prop_assert!(false, "a complete frame was left waiting"),
        }
    }

    #[test]
    fn nesting_is_bounded(depth in 0usize..2048) {
        let result = Sexp::parse(&nested(depth));
        if depth <= MAX_DEPTH {
            prop_assert!(result.is_ok(), "depth {}: {:?}", depth, result);
        } else {
            let err = result.unwrap_err();
            prop_assert!(err.reason.contains("nesting too deep"), "{}", err);
        }
    }
}

/// Far past the bound, in one frame as large as the codec accepts by default: refused with a
/// clear error, not a stack overflow.
#[test]
fn a_frame_of_a_million_open_parens_is_refused() {
    let text = "(".repeat(1_000_000);
    let mut buf = BytesMut::new();
    buf.put_slice(format!("{:06x}", text.len()).as_bytes());
    buf.put_slice(text.as_bytes());
    let err = FrameCodec::default().decode(&mut buf).unwrap_err();
    assert!(err.to_string().contains("nesting too deep"), "{err}");
    // Nested just within the bound, lists with content read as such.
    let mut deepest = Sexp::Int(1);
    for _ in 0..MAX_DEPTH {
        deepest = Sexp::List(vec![deepest]);
    }
    assert_eq!(Sexp::parse(&deepest.to_string()).unwrap(), deepest);
}
