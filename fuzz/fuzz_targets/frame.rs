//! The frame codec fed arbitrary bytes, as a hostile or broken agent could send them, at a
//! small and the default frame limit: it decodes, waits or refuses, and never panics; what it
//! decodes re-encodes into a frame that decodes again.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sbmon_fuzz::wire::FrameCodec;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    for max in [64, sbmon_fuzz::wire::frame::DEFAULT_MAX_INCOMING] {
        let mut codec = FrameCodec::new(max);
        let mut buf = BytesMut::from(data);
        while let Ok(Some(item)) = codec.decode(&mut buf) {
            let mut again = BytesMut::new();
            if codec.encode(&item, &mut again).is_ok() {
                let mut wide = FrameCodec::default();
                let back = wide.decode(&mut again).expect("re-encoded frame decodes");
                assert!(back.is_some());
            }
        }
    }
});
