//! sbmon's wire layer, compiled on its own for libFuzzer: the very files of `src/wire`
//! (which depend on nothing else of sbmon), so a fuzz build does not compile the whole server.

#[path = "../../src/wire/mod.rs"]
#[allow(dead_code)]
pub mod wire;
