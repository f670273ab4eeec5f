//! Round-trip latency of the figures behind `memory_stats`, measured against a real SBCL:
//! - `agent :ping`        the bare protocol round trip;
//! - `agent :memory`      the heap figures through the agent client;
//! - `tool memory_stats`  the whole tool (agent call + /proc reading + JSON result);
//! - `/proc memory`       the tool's /proc and cgroup reads alone (`process::memory`), which
//!   the tool makes while the agent answers;
//! - `swank eval`         the same heap figures fetched through SLIME's Swank server in the
//!   same image (when Debian's cl-swank is installed), the usual way to ask a live image.
//!
//! Figures for `tools/bench`: `ping`, `memory_op`, `memory_stats`, `proc_memory`, `swank`
//! (`.p50`, `.p99`, `.rate`), and the checked ratios `memory_stats.tool_over_swank`,
//! `memory_stats.op_over_swank` and `memory_stats.tool_over_op` (p50 over p50).
//!
//! Run: `cargo bench --bench roundtrip` (ITERATIONS=N to change the sample size).

use std::time::Duration;

use support::Latencies;

mod support;

const BENCH: &str = "roundtrip";

use sbmon::agent::{Address, AgentClient, ClientOptions};
use sbmon::config::Config;
use sbmon::launch::{LaunchOptions, Sbcl};
use sbmon::wire::Sexp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SWANK_LOADER: &str = "/usr/share/common-lisp/source/slime/swank-loader.lisp";
/// The figures `:memory` returns, as one Lisp expression for Swank to evaluate.
const HEAP_FORM: &str = "(list (sb-kernel:dynamic-usage) (sb-ext:dynamic-space-size) \
    (sb-ext:get-bytes-consed) (sb-ext:bytes-consed-between-gcs) \
    (loop for g below 7 collect (list (sb-ext:generation-bytes-allocated g) \
    (sb-ext:generation-number-of-gcs g) (sb-ext:generation-average-age g))))";

fn print(name: &str, l: &Latencies) {
    println!(
        "{name:<20} n={:<6} p50={:>8.1}µs p90={:>8.1}µs p99={:>8.1}µs max={:>8.1}µs  {:>7.0} calls/s",
        l.len(),
        l.micros(0.50),
        l.micros(0.90),
        l.micros(0.99),
        l.micros(1.0),
        l.rate(),
    );
}

/// A minimal Swank client: `(:emacs-rex FORM PACKAGE THREAD ID)` and wait for `(:return ...)`.
struct Swank {
    stream: tokio::net::TcpStream,
    next_id: u64,
}

impl Swank {
    async fn eval(&mut self, code: &str) -> String {
        self.next_id += 1;
        let request = format!(
            "(:emacs-rex (swank:eval-and-grab-output {}) \"COMMON-LISP-USER\" t {})",
            Sexp::string(code),
            self.next_id
        );
        let frame = format!("{:06x}{request}", request.len());
        self.stream.write_all(frame.as_bytes()).await.unwrap();
        loop {
            let mut header = [0u8; 6];
            self.stream.read_exact(&mut header).await.unwrap();
            let len = usize::from_str_radix(std::str::from_utf8(&header).unwrap(), 16).unwrap();
            let mut body = vec![0u8; len];
            self.stream.read_exact(&mut body).await.unwrap();
            let body = String::from_utf8(body).unwrap();
            if body.starts_with("(:return") {
                assert!(body.contains(":ok"), "swank failed: {body}");
                return body;
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations = support::iterations(5000);
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("bench.sock");
    let swank_port = std::path::Path::new(SWANK_LOADER).exists().then(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let mut before_start = Vec::new();
    if let Some(port) = swank_port {
        before_start.push(format!("(load {})", Sexp::string(SWANK_LOADER)));
        before_start.push("(funcall (intern \"INIT\" \"SWANK-LOADER\"))".into());
        before_start.push(format!(
            "(funcall (intern \"CREATE-SERVER\" \"SWANK\") :port {port} :dont-close t)"
        ));
    }
    let mut sbcl = Sbcl::spawn(&LaunchOptions {
        listen: Some(Address::Unix(socket.clone())),
        before_start,
        ..LaunchOptions::default()
    })
    .expect("start sbcl");
    // Loading Swank compiles it the first time: allow for that.
    sbcl.wait_ready(Duration::from_secs(180), &ClientOptions::default())
        .await
        .expect("agent ready");

    let client = AgentClient::new(Address::Unix(socket.clone()), ClientOptions::default());
    let catalog = sbmon::tools::Catalog::single_target(
        Address::Unix(socket.clone()),
        ClientOptions::default(),
        Config::default(),
        Default::default(),
        Default::default(),
    );
    println!(
        "sbmon round trips against SBCL {} (pid {}), {iterations} calls each, one at a time",
        client.welcome().await.unwrap().lisp_version,
        sbcl.pid
    );
    let mut results = vec![
        (
            "ping",
            support::sequential(iterations, || async {
                client.ping().await.unwrap();
            })
            .await,
        ),
        (
            "memory_op",
            support::sequential(iterations, || async {
                client.memory().await.unwrap();
            })
            .await,
        ),
        (
            "proc_memory",
            support::sequential(iterations, || async {
                sbmon::process::memory(sbcl.pid).unwrap();
            })
            .await,
        ),
        (
            "memory_stats",
            support::sequential(iterations, || async {
                catalog
                    .call("memory_stats", serde_json::Value::Null)
                    .await
                    .unwrap();
            })
            .await,
        ),
    ];
    match swank_port {
        Some(port) => {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect to swank");
            stream.set_nodelay(true).unwrap();
            let swank = tokio::sync::Mutex::new(Swank { stream, next_id: 0 });
            results.push((
                "swank",
                support::sequential(iterations, || async {
                    swank.lock().await.eval(HEAP_FORM).await;
                })
                .await,
            ));
        }
        None => println!("(swank comparison skipped: install cl-swank to run it)"),
    }
    for (name, latencies) in &results {
        print(name, latencies);
        support::record_latencies(BENCH, name, latencies);
    }
    let p50 = |name: &str| {
        results
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, l)| l.micros(0.5))
    };
    let (op, tool) = (p50("memory_op").unwrap(), p50("memory_stats").unwrap());
    support::record_ratio(BENCH, "memory_stats.tool_over_op", tool, op);
    if let Some(swank) = p50("swank") {
        let r = support::record_ratio(BENCH, "memory_stats.tool_over_swank", tool, swank);
        let b = support::record_ratio(BENCH, "memory_stats.op_over_swank", op, swank);
        println!(
            "Swank takes {:.1}x as long as memory_stats and {:.1}x as long as the bare :memory op (p50)",
            1.0 / r,
            1.0 / b
        );
    }
    sbcl.stop();
}
