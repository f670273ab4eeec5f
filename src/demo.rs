//! `sbmon demo`: start the example workload in SBCL with the agent and print a compact live
//! summary every 2 s, through the same catalog every front end uses. The SBCL it starts is
//! stopped on every exit path (end of `--duration`, Ctrl-C, SIGTERM, an error).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::ClientOptions;
use crate::config::Config;
use crate::launch::{LaunchOptions, Sbcl, WORKLOAD_SOURCE};
use crate::tools::Catalog;
use crate::wire::Sexp;

const INTERVAL: Duration = Duration::from_secs(2);

/// Run the demo with `sbcl` for `duration` seconds (until Ctrl-C without one).
pub async fn run(sbcl: std::path::PathBuf, duration: Option<f64>) -> ExitCode {
    if let Some(d) = duration
        && !(d.is_finite() && d > 0.0)
    {
        eprintln!("sbmon: --duration must be a positive number of seconds");
        return ExitCode::from(2);
    }
    let scratch = match tempfile::Builder::new().prefix("sbmon-demo-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("sbmon: cannot create a scratch directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let workload = scratch.path().join("workload.lisp");
    if let Err(e) = std::fs::write(&workload, WORKLOAD_SOURCE) {
        eprintln!("sbmon: cannot write the workload: {e}");
        return ExitCode::FAILURE;
    }
    let options = LaunchOptions {
        sbcl,
        after_start: vec![format!(
            "(load {})",
            Sexp::string(workload.to_string_lossy())
        )],
        ..LaunchOptions::default()
    };
    let mut sbcl = match Sbcl::spawn(&options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sbmon: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = sbcl
        .wait_ready(Duration::from_secs(30), &ClientOptions::default())
        .await
    {
        eprintln!("sbmon: {e}");
        return ExitCode::FAILURE;
    }
    let catalog = Catalog::single_target(
        sbcl.address.clone(),
        ClientOptions::default(),
        Config::default(),
        Default::default(),
        Default::default(),
    );
    let outcome = tokio::select! {
        code = show(&catalog, &mut sbcl, duration) => code,
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        _ = sigterm() => ExitCode::SUCCESS,
    };
    sbcl.stop();
    println!("stopped SBCL pid {}", sbcl.pid);
    outcome
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

async fn show(catalog: &Catalog, sbcl: &mut Sbcl, duration: Option<f64>) -> ExitCode {
    let started = Instant::now();
    let runtime = catalog.call("runtime_stats", Value::Null).await;
    let version = runtime
        .as_ref()
        .ok()
        .and_then(|r| r["lisp_version"].as_str().map(str::to_string))
        .unwrap_or_default();
    println!(
        "sbmon demo: SBCL {version}, pid {}, agent at {}. Ctrl-C stops it.",
        sbcl.pid, sbcl.address
    );
    println!(
        "in another terminal: sbmon call health_check --target pid:{}",
        sbcl.pid
    );
    let mut last_gc_count = None;
    loop {
        if !sbcl.is_running() {
            eprintln!("sbmon: SBCL exited:\n{}", sbcl.log_tail());
            return ExitCode::FAILURE;
        }
        println!(
            "{}",
            summary_line(catalog, started, &mut last_gc_count).await
        );
        let elapsed = started.elapsed().as_secs_f64();
        if duration.is_some_and(|d| elapsed + INTERVAL.as_secs_f64() > d) {
            let rest = duration.unwrap_or(0.0) - elapsed;
            tokio::time::sleep(Duration::from_secs_f64(rest.max(0.0))).await;
            return ExitCode::SUCCESS;
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// One line: health, heap, RSS, GCs since the last line with pause figures, threads.
async fn summary_line(catalog: &Catalog, started: Instant, last_gc: &mut Option<u64>) -> String {
    let (health, memory, gc, threads) = tokio::join!(
        catalog.call("health_check", Value::Null),
        catalog.call("memory_stats", Value::Null),
        catalog.call("gc_stats", Value::Null),
        catalog.call("thread_list", Value::Null),
    );
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / 1048576.0;
    let ms = |v: &Value| {
        v.as_f64()
            .map_or("-".to_string(), |s| format!("{:.2}", s * 1e3))
    };
    let mut line = format!("[{:>4.0}s]", started.elapsed().as_secs_f64());
    match health {
        Ok(h) => line += &format!(" {:<8}", h["status"].as_str().unwrap_or("?")),
        Err(e) => return format!("{line} error: {e}"),
    }
    if let Ok(m) = memory {
        line += &format!(
            " heap {:.1}/{:.0} MiB ({:.1}%)  rss {:.1} MiB",
            mib(&m["heap_used_bytes"]),
            mib(&m["heap_limit_bytes"]),
            m["heap_used_ratio"].as_f64().unwrap_or(0.0) * 100.0,
            mib(&m["rss_bytes"]),
        );
    }
    if let Ok(g) = gc {
        let count = g["gc_count"].as_u64().unwrap_or(0);
        let delta = last_gc.map_or(0, |c| count.saturating_sub(c));
        *last_gc = Some(count);
        let p = &g["pauses"];
        let ms = |v: &Value| match p["count"].as_u64() {
            Some(n) if n > 0 => ms(v),
            _ => "-".to_string(),
        };
        line += &format!(
            "  gc {count} (+{delta}) cpu {:.2}s pause last {} p99 {} max {} ms",
            g["gc_cpu_seconds"].as_f64().unwrap_or(0.0),
            ms(&p["last_seconds"]),
            ms(&p["p99_seconds"]),
            ms(&p["max_seconds"]),
        );
    }
    if let Ok(t) = threads {
        let list = t["threads"].as_array().cloned().unwrap_or_default();
        let waiting = list.iter().filter(|t| !t["lisp_wait"].is_null()).count();
        line += &format!("  threads {} ({waiting} waiting)", list.len());
    }
    line
}
