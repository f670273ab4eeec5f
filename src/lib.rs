//! sbmon: watch and steer live SBCL images. A Lisp agent inside the image answers over a
//! local socket; this crate talks to it, adds what `/proc` knows, and exposes one catalog of
//! tools to the front ends.

pub mod agent;
pub mod attach;
pub mod audit;
pub mod blocking;
pub mod cli;
pub mod config;
pub mod context;
pub mod deadlock;
pub mod demo;
pub mod echo;
pub mod events;
pub mod figures;
pub mod flame;
pub mod health;
pub mod histogram;
pub mod http;
pub mod journal;
pub mod launch;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod process;
pub mod rpc;
pub mod sampler;
pub mod samples;
pub mod serve;
pub mod snapshot;
pub mod swank;
pub mod targets;
pub mod thread_cpu;
pub mod tools;
pub mod top;
pub mod trend;
pub mod watch;
pub mod wire;
