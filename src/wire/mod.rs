//! The wire protocol v1 between sbmon and the Lisp agent: frames, the s-expression subset,
//! and typed decoding of values (docs/protocol.md is the contract).

pub mod de;
pub mod frame;
pub mod sexp;

pub use de::{DecodeError, from_sexp};
pub use frame::{FrameCodec, FrameError};
pub use sexp::{ParseError, Sexp};
