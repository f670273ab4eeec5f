//! `sbmon attach` and `detach` against real SBCL images running Debian's Swank (no agent until
//! sbmon loads it), `serve --attach` across a restart of the image, named images in discovery,
//! `targets --prune`, and the errors of a wrong secret, no Swank, and a Swank port given as an
//! agent target.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::swank::{SwankImage, free_port};
use common::text;
use sbmon::agent::{Address, ClientOptions};
use sbmon::config::Config;
use sbmon::targets::{Target, Targets};
use sbmon::tools::Catalog;
use serde_json::{Value, json};

fn sbmon(args: &[&str], image: &SwankImage) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(args)
        .env("XDG_RUNTIME_DIR", &image.runtime)
        .env("HOME", &image.home)
        .output()
        .expect("run sbmon")
}

fn swank_arg(image: &SwankImage) -> String {
    format!("127.0.0.1:{}", image.port)
}

/// The image's Lisp threads by name, as a Swank evaluation of the test sees them (the test's
/// own Swank connection threads are in every such list alike).
async fn lisp_threads(image: &SwankImage) -> String {
    // The threads of an earlier connection end a moment after it closed.
    settled(image).await;
    image
        .eval(
            "(sort (mapcar (lambda (th) (princ-to-string (sb-thread:thread-name th))) \
                           (sb-thread:list-all-threads)) \
                   #'string<)",
        )
        .await
}

/// How many threads named `name` the agent's thread_list reports.
async fn threads_named(catalog: &Catalog, name: &str) -> usize {
    let threads = catalog
        .call_from("cli", "thread_list", json!({}))
        .await
        .unwrap()
        .value;
    threads["threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == name)
        .count()
}

fn catalog_at(address: &Address) -> Catalog {
    Catalog::new(
        Arc::new(Targets::new(vec![Target::new(
            "orders",
            address.clone(),
            ClientOptions::default(),
        )])),
        Arc::new(Config::default()),
    )
}

/// The image as the test sees it from outside: OS thread names and open descriptors.
async fn settled(image: &SwankImage) -> (Vec<String>, usize) {
    // Swank's threads for the test's own connection end a moment after it closes.
    let mut last = (image.thread_names(), image.fd_count());
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = (image.thread_names(), image.fd_count());
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn attach_serves_every_read_tool_and_detach_leaves_the_image_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let image = SwankImage::start(dir.path(), free_port(), None).await;
    image.eval("(setf cl-user::*max-gap-us* 0)").await;
    let lisp_before = lisp_threads(&image).await;
    assert!(lisp_before.contains("\"counter\""), "{lisp_before}");
    assert!(!lisp_before.contains("sbmon"), "{lisp_before}");
    let before = settled(&image).await;

    // Attach, measuring what the image's own counter thread saw meanwhile.
    let began = Instant::now();
    let out = sbmon(
        &[
            "attach",
            "--swank",
            &swank_arg(&image),
            "--name",
            "orders",
            "--json",
        ],
        &image,
    );
    let attach_seconds = began.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["outcome"], "started", "{done}");
    assert_eq!(done["pid"], image.pid);
    assert_eq!(done["name"], "orders");
    assert_eq!(
        done["warnings"],
        json!([]),
        "the agent compiled with warnings"
    );
    assert_eq!(done["output"], "", "loading the agent printed something");
    let gap_us: u64 = image
        .eval("(prog1 cl-user::*max-gap-us* (setf cl-user::*max-gap-us* 0))")
        .await
        .parse()
        .unwrap();
    let ticks: u64 = image.eval("cl-user::*ticks*").await.parse().unwrap();
    eprintln!(
        "attach took {attach_seconds:.3} s (agent side {:.3} s); the counter thread's longest \
         gap meanwhile was {:.1} ms",
        done["seconds"].as_f64().unwrap(),
        gap_us as f64 / 1000.0
    );
    assert!(ticks > 0);
    assert!(
        gap_us < 500_000,
        "the image's own thread stalled {gap_us} µs during the attach"
    );
    let target = done["target"].as_str().unwrap().to_string();
    let socket = image
        .runtime
        .join("sbmon")
        .join(format!("{}-orders.sock", image.pid));
    assert_eq!(target, format!("unix:{}", socket.display()));

    // Every read tool answers, and its figures are the process's.
    let address: Address = target.parse().unwrap();
    let catalog = catalog_at(&address);
    for tool in common::READ_TOOLS {
        let args = match tool {
            "thread_inspect" => json!({"thread_id": "counter"}),
            "gc_watch" => json!({"seconds": 0.2}),
            "heap_retainers" => json!({"type": "CONS", "max_paths": 1}),
            "memory_trend" => json!({"window_s": 10}),
            _ => json!({}),
        };
        let called = catalog.call_from("cli", tool, args).await;
        assert!(called.is_ok(), "{tool}: {:?}", called.err());
    }
    // Swank's threads for sbmon's connection may still be ending: /proc is read on both
    // sides of the call.
    let tasks_before = common::proc_tids(image.pid).len() as u64;
    let runtime = catalog
        .call_from("cli", "runtime_stats", json!({}))
        .await
        .unwrap()
        .value;
    let tasks_after = common::proc_tids(image.pid).len() as u64;
    assert_eq!(runtime["pid"], image.pid);
    let os_threads = runtime["os_thread_count"].as_u64().unwrap();
    assert!(
        (tasks_before.min(tasks_after)..=tasks_before.max(tasks_after)).contains(&os_threads),
        "{os_threads} tasks reported, /proc had {tasks_before} then {tasks_after}"
    );
    let threads = catalog
        .call_from("cli", "thread_list", json!({}))
        .await
        .unwrap()
        .value;
    let counter = threads["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "counter")
        .expect("the image's counter thread is listed");
    assert!(std::path::Path::new(&format!("/proc/{}/task/{}", image.pid, counter["tid"])).exists());
    let memory = catalog
        .call_from("cli", "memory_stats", json!({}))
        .await
        .unwrap()
        .value;
    let rss = common::proc_status_bytes(image.pid, "VmRSS") as f64;
    let reported = memory["rss_bytes"].as_f64().unwrap();
    assert!((reported - rss).abs() / rss < 0.2, "{reported} vs {rss}");

    // Attaching again changes nothing: one agent, same socket.
    let out = sbmon(
        &["attach", "--swank", &swank_arg(&image), "--name", "orders"],
        &image,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), target);
    assert!(
        text(&out.stderr).contains("already runs"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(threads_named(&catalog, "sbmon-agent listener").await, 1);
    assert_eq!(threads_named(&catalog, "sbmon-agent events").await, 1);
    drop(catalog);

    // Discovery names the image by its name; --prune removes only a dead process's socket.
    let dead = image.runtime.join("sbmon").join("99999999-gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let out = sbmon(&["targets", "--json", "--prune"], &image);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["name"], "orders");
    assert_eq!(rows[0]["status"], "live");
    assert!(!dead.exists());
    assert!(socket.exists());

    // Detach: threads, descriptors, socket and GC functions as before the attach.
    let out = sbmon(
        &["detach", "--swank", &swank_arg(&image), "--target", &target],
        &image,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("stopped the agent"));
    assert!(!socket.exists());
    let restored = image
        .eval(
            "(list (eq (fdefinition 'sb-ext:gc) cl-user::*orig-gc*) \
                   (eq (fdefinition 'sb-kernel::sub-gc) cl-user::*orig-sub-gc*) \
                   (find-package \"SBMON-AGENT\") \
                   (count-if (lambda (h) (and (symbolp h) (symbol-package h) \
                                              (search \"SBMON\" (package-name (symbol-package h))))) \
                             sb-ext:*exit-hooks*))",
        )
        .await;
    assert_eq!(restored, "(T T NIL 0)");
    let after = settled(&image).await;
    assert_eq!(lisp_threads(&image).await, lisp_before);
    assert_eq!(after, before, "threads and descriptors after detach");
    // The image kept serving its own work throughout.
    let later: u64 = image.eval("cl-user::*ticks*").await.parse().unwrap();
    assert!(later > ticks);
}

#[tokio::test]
async fn an_older_agent_is_replaced_and_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let image = SwankImage::start(dir.path(), free_port(), None).await;

    // Swank counts octets: a non-ASCII form goes through intact both ways.
    assert_eq!(
        image.eval("(list (length \"é€😀\") \"é€😀\")").await,
        "(3 \"é€😀\")"
    );

    // A Swank port given as an agent target is recognised.
    let out = sbmon(
        &[
            "call",
            "memory_stats",
            "--target",
            &format!("tcp:127.0.0.1:{}", image.port),
        ],
        &image,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let said = text(&out.stderr);
    assert!(
        said.contains("is a Swank server") && said.contains("sbmon attach --swank"),
        "{said}"
    );

    // No Swank at all: exit 1, saying so.
    let nobody = free_port();
    let out = sbmon(
        &["attach", "--swank", &format!("127.0.0.1:{nobody}")],
        &image,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot connect to a Swank server"),
        "{}",
        text(&out.stderr)
    );

    // An older agent, started by the image itself, is stopped and replaced.
    let old = dir.path().join("old-agent.lisp");
    std::fs::write(
        &old,
        sbmon::launch::AGENT_SOURCE.replace(
            &format!(
                "(defparameter *version* \"{}\"",
                sbmon::launch::agent_version()
            ),
            "(defparameter *version* \"0.0.1\"",
        ),
    )
    .unwrap();
    let started = image
        .eval(&format!(
            "(progn (load {:?}) (funcall (find-symbol \"START\" \"SBMON-AGENT\")))",
            old.display().to_string()
        ))
        .await;
    assert!(started.contains(".sock"), "{started}");
    let out = sbmon(&["attach", "--swank", &swank_arg(&image), "--json"], &image);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["outcome"], "replaced");
    assert_eq!(done["replaced_version"], "0.0.1");
    assert_eq!(done["warnings"], json!([]));
    assert_eq!(done["agent_version"], sbmon::launch::agent_version());
    let address: Address = done["target"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        threads_named(&catalog_at(&address), "sbmon-agent listener").await,
        1
    );
    let welcome = sbmon::agent::AgentClient::new(address, ClientOptions::default())
        .welcome()
        .await
        .unwrap();
    assert_eq!(welcome.agent_version, sbmon::launch::agent_version());
}

#[tokio::test]
async fn a_wrong_secret_is_an_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = SwankImage::start(dir.path(), free_port(), Some("the-right-secret")).await;
    let wrong = dir.path().join("wrong-secret");
    std::fs::write(&wrong, "not-the-secret\n").unwrap();
    let began = Instant::now();
    let out = sbmon(
        &[
            "attach",
            "--swank",
            &swank_arg(&image),
            "--secret-file",
            wrong.to_str().unwrap(),
        ],
        &image,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(began.elapsed() < Duration::from_secs(30));
    let said = text(&out.stderr);
    assert!(
        said.contains("holds another: sbmon sent nothing")
            && said.contains(&image.home.join(".slime-secret").display().to_string()),
        "{said}"
    );
    assert!(out.stdout.is_empty());
    // Untouched: Swank still answers (the right secret), no agent was loaded, and its own
    // work goes on.
    assert!(common::process_exists(image.pid));
    assert!(!image.runtime.join("sbmon").exists());
    assert_eq!(
        image
            .eval("(list (find-package \"SBMON-AGENT\") (> cl-user::*ticks* 0))")
            .await,
        "(NIL T)"
    );
    // Without --secret-file, the image's own secret is found and used.
    let out = sbmon(&["attach", "--swank", &swank_arg(&image)], &image);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let counter = counter_switches(&image);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        counter_switches(&image) > counter + 50,
        "the counter thread stalled"
    );
}

/// Voluntary context switches of the image's thread named `counter` (it sleeps 1 ms a turn).
fn counter_switches(image: &SwankImage) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", image.pid)).unwrap();
    for task in tasks.filter_map(Result::ok) {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "counter" {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap();
        }
    }
    panic!(
        "no thread named counter in the image: {:?}",
        image.thread_names()
    );
}

#[tokio::test]
async fn serve_attach_attaches_again_after_the_image_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut first = SwankImage::start(dir.path(), port, None).await;
    let runtime = first.runtime.clone();
    let home = first.home.clone();
    let spec = format!("orders=swank:127.0.0.1:{port}");
    let server = common::Sbmon::start(
        "serve",
        &["--attach", &spec],
        &[
            ("XDG_RUNTIME_DIR", runtime.to_str().unwrap()),
            ("HOME", home.to_str().unwrap()),
        ],
    );
    let pid_of_orders = || async {
        let v = server
            .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "runtime_stats",
                        "params": {"target": "orders"}}))
            .await;
        v["result"]["pid"].as_i64()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while pid_of_orders().await != Some(first.pid as i64) {
        assert!(Instant::now() < deadline, "serve did not attach");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.stop();
    let second = SwankImage::start(dir.path(), port, None).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while pid_of_orders().await != Some(second.pid as i64) {
        assert!(
            Instant::now() < deadline,
            "serve did not attach to the restarted image"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
