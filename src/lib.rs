//! sbmon: watch and steer live SBCL images. A Lisp agent inside the image answers over a
//! local socket; this crate talks to it, adds what `/proc` knows, and exposes one catalog of
//! tools to the front ends.

pub mod wire;
