//! `sbmon demo`: start the example workload in SBCL with the agent and print a compact live
//! summary every 2 s, through the same catalog every front end uses, then a summary of the
//! whole run when it ends. The SBCL it starts is stopped on every exit path (end of
//! `--duration`, Ctrl-C, SIGTERM, an error).

use std::collections::BTreeMap;
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
    let mut tally = Tally::default();
    let outcome = tokio::select! {
        code = show(&catalog, &mut sbcl, duration, &mut tally) => code,
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        _ = sigterm() => ExitCode::SUCCESS,
    };
    if sbcl.is_running() {
        // The pause figures at the end; a stuck agent must not hold the exit.
        let gc = tokio::time::timeout(
            Duration::from_secs(2),
            catalog.call("gc_stats", Value::Null),
        )
        .await;
        if let Ok(Ok(gc)) = gc {
            tally.final_gc = Some(gc);
        }
    }
    print!("{}", tally.report());
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

async fn show(
    catalog: &Catalog,
    sbcl: &mut Sbcl,
    duration: Option<f64>,
    tally: &mut Tally,
) -> ExitCode {
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
        "in another terminal: sbmon call --text health_check --target pid:{0}; \
         sbmon check --target pid:{0}",
        sbcl.pid
    );
    let mut next = tally.started;
    loop {
        if !sbcl.is_running() {
            eprintln!("sbmon: SBCL exited:\n{}", sbcl.log_tail());
            return ExitCode::FAILURE;
        }
        println!("{}", summary_line(catalog, tally).await);
        let elapsed = tally.started.elapsed().as_secs_f64();
        if duration.is_some_and(|d| elapsed + INTERVAL.as_secs_f64() > d) {
            let rest = duration.unwrap_or(0.0) - elapsed;
            tokio::time::sleep(Duration::from_secs_f64(rest.max(0.0))).await;
            return ExitCode::SUCCESS;
        }
        // Readings take time (thread_list measures CPU over half a second): keep the lines
        // on a fixed schedule instead of drifting by that much each time.
        next += INTERVAL;
        tokio::time::sleep_until(next.max(Instant::now()).into()).await;
    }
}

/// What the demo saw over its run, for the summary it prints on exit.
struct Tally {
    started: Instant,
    readings: u64,
    statuses: BTreeMap<String, u64>,
    first_gc_count: Option<u64>,
    last_gc_count: Option<u64>,
    /// The image's CPU seconds (user + system) when last read, and when.
    last_cpu: Option<(f64, Instant)>,
    cpu_first: Option<(f64, Instant)>,
    peak_heap: u64,
    heap_limit: u64,
    /// Per mutex name: readings in which a thread waited on it, threads seen waiting, and
    /// how often each thread was seen holding it.
    mutexes: BTreeMap<String, Contention>,
    /// Per thread name: the sum of its CPU percents and the readings that gave one.
    thread_cpu: BTreeMap<String, (f64, u64)>,
    final_gc: Option<Value>,
}

#[derive(Default)]
struct Contention {
    readings: u64,
    waiters: u64,
    owners: BTreeMap<String, u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            started: Instant::now(),
            readings: 0,
            statuses: BTreeMap::new(),
            first_gc_count: None,
            last_gc_count: None,
            last_cpu: None,
            cpu_first: None,
            peak_heap: 0,
            heap_limit: 0,
            mutexes: BTreeMap::new(),
            thread_cpu: BTreeMap::new(),
            final_gc: None,
        }
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / 1048576.0
}

fn ms(seconds: &Value) -> String {
    seconds
        .as_f64()
        .map_or("-".to_string(), |s| format!("{:.2}", s * 1e3))
}

/// The name of a thread as the lines show it.
fn thread_name(name: &Value, tid: &Value) -> String {
    match (name.as_str(), tid.as_i64()) {
        (Some(n), _) => n.to_string(),
        (None, Some(tid)) => format!("tid {tid}"),
        _ => "an unnamed thread".to_string(),
    }
}

/// One line: health, heap, RSS, the image's CPU, GCs since the last line with pause figures,
/// threads with the mutex they wait on and its owner, and the busiest thread.
async fn summary_line(catalog: &Catalog, tally: &mut Tally) -> String {
    let (health, memory, gc, threads, runtime) = tokio::join!(
        catalog.call("health_check", Value::Null),
        catalog.call("memory_stats", Value::Null),
        catalog.call("gc_stats", Value::Null),
        catalog.call("thread_list", Value::Null),
        catalog.call("runtime_stats", Value::Null),
    );
    let mut line = format!("[{:>4.0}s]", tally.started.elapsed().as_secs_f64());
    match health {
        Ok(h) => {
            let status = h["status"].as_str().unwrap_or("?").to_string();
            line += &format!(" {status:<8}");
            tally.readings += 1;
            *tally.statuses.entry(status).or_default() += 1;
        }
        Err(e) => return format!("{line} error: {e}"),
    }
    if let Ok(m) = memory {
        let used = m["heap_used_bytes"].as_u64().unwrap_or(0);
        tally.peak_heap = tally.peak_heap.max(used);
        tally.heap_limit = m["heap_limit_bytes"].as_u64().unwrap_or(0);
        line += &format!(
            " heap {:.1}/{:.0} MiB ({:.1}%)  rss {:.1} MiB",
            mib(used as f64),
            mib(tally.heap_limit as f64),
            m["heap_used_ratio"].as_f64().unwrap_or(0.0) * 100.0,
            mib(m["rss_bytes"].as_f64().unwrap_or(0.0)),
        );
    }
    if let Ok(r) = runtime {
        // The whole process, all threads: 100% is one CPU busy all the time.
        let cpu = r["cpu_user_seconds"].as_f64().unwrap_or(0.0)
            + r["cpu_system_seconds"].as_f64().unwrap_or(0.0);
        let now = Instant::now();
        line += &match tally.last_cpu {
            Some((before, at)) => format!(
                "  image CPU {:.0}%",
                (cpu - before) / now.duration_since(at).as_secs_f64() * 100.0
            ),
            // The first line: the average since the image started (its start included).
            None => format!(
                "  image CPU {:.0}% since start",
                cpu / r["uptime_seconds"].as_f64().unwrap_or(f64::INFINITY) * 100.0
            ),
        };
        tally.last_cpu = Some((cpu, now));
        tally.cpu_first.get_or_insert((cpu, now));
    }
    if let Ok(g) = gc {
        let count = g["gc_count"].as_u64().unwrap_or(0);
        let delta = tally.last_gc_count.map_or(0, |c| count.saturating_sub(c));
        tally.last_gc_count = Some(count);
        tally.first_gc_count.get_or_insert(count);
        let p = &g["pauses"];
        let pause = |v: &Value| match p["count"].as_u64() {
            Some(n) if n > 0 => ms(v),
            _ => "-".to_string(),
        };
        line += &format!(
            "  gc {count} (+{delta}) GC CPU {:.2}s pause last {} p99 {} max {} ms",
            g["gc_cpu_seconds"].as_f64().unwrap_or(0.0),
            pause(&p["last_seconds"]),
            pause(&p["p99_seconds"]),
            pause(&p["max_seconds"]),
        );
    }
    if let Ok(t) = threads {
        let list = t["threads"].as_array().cloned().unwrap_or_default();
        line += &format!("  threads {}", list.len());
        line += &threads_part(&list, tally);
    }
    line
}

/// `(2 waiting on mutex "shared-state" held by worker-3)  busiest worker-2 9%`, tallying
/// the contention and the per-thread CPU.
fn threads_part(list: &[Value], tally: &mut Tally) -> String {
    // Per mutex: its waiters and its owner in this reading.
    let mut waits: BTreeMap<String, (u64, Option<String>)> = BTreeMap::new();
    let mut other_waits = 0;
    for t in list {
        match (t["lisp_wait"].as_str(), t["lisp_wait_type"].as_str()) {
            (Some(name), Some("mutex")) => {
                let entry = waits.entry(name.to_string()).or_default();
                entry.0 += 1;
                if !t["owner_name"].is_null() || !t["owner_tid"].is_null() {
                    entry.1 = Some(thread_name(&t["owner_name"], &t["owner_tid"]));
                }
            }
            (Some(_), _) => other_waits += 1,
            _ => {}
        }
    }
    let mut parts: Vec<String> = waits
        .iter()
        .map(|(mutex, (n, owner))| {
            format!(
                "{n} waiting on mutex {mutex:?} held by {}",
                owner.as_deref().unwrap_or("nobody (just released)")
            )
        })
        .collect();
    if other_waits > 0 {
        parts.push(format!("{other_waits} waiting on other objects"));
    }
    for (mutex, (n, owner)) in waits {
        let c = tally.mutexes.entry(mutex).or_default();
        c.readings += 1;
        c.waiters += n;
        if let Some(owner) = owner {
            *c.owners.entry(owner).or_default() += 1;
        }
    }
    let mut out = if parts.is_empty() {
        " (none waiting)".to_string()
    } else {
        format!(" ({})", parts.join(", "))
    };
    // The busiest of the workload's threads (not the agent's, which serve this demo).
    let busiest = list
        .iter()
        .filter(|t| t["agent"] != true)
        .filter_map(|t| Some((t, t["cpu_percent"].as_f64()?)))
        .inspect(|(t, cpu)| {
            let entry = tally
                .thread_cpu
                .entry(thread_name(&t["name"], &t["tid"]))
                .or_default();
            entry.0 += cpu;
            entry.1 += 1;
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((t, cpu)) = busiest {
        out += &format!(
            "  busiest thread {} {cpu:.0}% CPU",
            thread_name(&t["name"], &t["tid"])
        );
    }
    out
}

impl Tally {
    /// The summary printed on exit.
    fn report(&self) -> String {
        let mut out = format!(
            "summary of {:.1} s, {} readings:\n",
            self.started.elapsed().as_secs_f64(),
            self.readings
        );
        if self.readings == 0 {
            return out;
        }
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        out += &format!("  health: {}\n", statuses.join(", "));
        let gc = self.final_gc.as_ref();
        let count = gc
            .and_then(|g| g["gc_count"].as_u64())
            .or(self.last_gc_count);
        if let (Some(first), Some(last)) = (self.first_gc_count, count) {
            out += &format!(
                "  GCs: {} during the run ({last} since SBCL started)",
                last - first.min(last)
            );
            if let Some(g) = gc {
                let p = &g["pauses"];
                if p["count"].as_u64().is_some_and(|n| n > 0) {
                    out += &format!(
                        "; pauses since start: {} measured, p99 {} ms, max {} ms; GC CPU {:.2} s",
                        p["count"],
                        ms(&p["p99_seconds"]),
                        ms(&p["max_seconds"]),
                        g["gc_cpu_seconds"].as_f64().unwrap_or(0.0)
                    );
                }
            }
            out += "\n";
        }
        out += &format!(
            "  peak heap seen: {:.1} of {:.0} MiB (one reading every {} s)\n",
            mib(self.peak_heap as f64),
            mib(self.heap_limit as f64),
            INTERVAL.as_secs()
        );
        if let (Some((first, t0)), Some((last, t1))) = (self.cpu_first, self.last_cpu)
            && t1 > t0
        {
            out += &format!(
                "  image CPU: {:.0}% on average between the first and last readings (100% = one CPU)\n",
                (last - first) / t1.duration_since(t0).as_secs_f64() * 100.0
            );
        }
        match self
            .mutexes
            .iter()
            .max_by_key(|(_, c)| (c.readings, c.waiters))
        {
            Some((mutex, c)) => {
                let mut owners: Vec<(&String, &u64)> = c.owners.iter().collect();
                owners.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                let owners: Vec<String> =
                    owners.iter().map(|(o, n)| format!("{o} ({n})")).collect();
                out += &format!(
                    "  most contended mutex: {mutex:?}, waited on in {} of {} readings, {:.1} \
                     waiters on average then; held by {}\n",
                    c.readings,
                    self.readings,
                    c.waiters as f64 / c.readings as f64,
                    if owners.is_empty() {
                        "-".to_string()
                    } else {
                        owners.join(", ")
                    }
                );
            }
            None => out += "  no thread was seen waiting on a mutex\n",
        }
        let busiest = self
            .thread_cpu
            .iter()
            .map(|(name, (sum, n))| (name, sum / *n as f64))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((name, cpu)) = busiest {
            out += &format!("  busiest thread: {name}, {cpu:.0}% CPU on average (its own)\n");
        }
        out
    }
}
