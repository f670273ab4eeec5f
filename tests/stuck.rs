//! Stuck and hot threads against a real SBCL: a lock-order deadlock, a wait on a mutex held
//! by a sleeping thread, a thread in the debugger, and the CPU percent of a spinning and a
//! sleeping thread. Each thread the test starts writes its own kernel tid (gettid(2), not the
//! agent's reading) to a file, so owners and cycles are checked against the kernel; CPU
//! against /proc/PID/task/TID/stat read by the test.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Image, Sbmon, Setup, lock_order_deadlock, proc_cpu_seconds};
use sbmon::config::Config;
use sbmon::wire::Sexp;
use serde_json::{Value, json};

/// Lisp: `(sbmon-test::note-tid NAME)` writes the calling thread's gettid(2) to DIR/NAME.
fn note_tid_fn(dir: &Path) -> String {
    format!(
        r#"(defun sbmon-test::note-tid (name)
             (with-open-file (s (concatenate 'string {dir} "/" name)
                                :direction :output :if-exists :supersede)
               (format s "~d" (sb-alien:alien-funcall
                               (sb-alien:extern-alien "gettid" (function sb-alien:int))))))"#,
        dir = Sexp::string(dir.to_string_lossy())
    )
}

/// The tid a test thread wrote (waiting for it to be written).
async fn noted_tid(dir: &Path, name: &str) -> i64 {
    let path = dir.join(name);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(tid) = text.trim().parse()
        {
            return tid;
        }
        assert!(
            Instant::now() < deadline,
            "thread {name} never wrote its tid"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn thread<'a>(list: &'a Value, name: &str) -> &'a Value {
    let found: Vec<&Value> = list["threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one thread named {name}: {list:#}");
    found[0]
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report:#}"))
}

/// The value of the series `name{target="test"}` in a Prometheus text.
fn series(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{target=\"test\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
        .parse()
        .unwrap()
}

/// A thread running BODY that first notes its tid, under SBCL's own debugger: the harness
/// starts SBCL with --disable-debugger, which would end the image at the first unhandled
/// error; with no hook the thread enters the debugger and stays there, as in an image
/// started without that flag.
fn test_thread(name: &str, body: &str) -> String {
    format!(
        "(sb-thread:make-thread (lambda () (let ((sb-ext:*invoke-debugger-hook* nil)) \
           (sbmon-test::note-tid {n}) {body})) :name {n})",
        n = Sexp::string(name)
    )
}

#[tokio::test]
async fn a_lock_order_deadlock_is_one_cycle_and_critical() {
    let tids = tempfile::tempdir().unwrap();
    // t-ab takes lock-a then lock-b, t-ba lock-b then lock-a; each takes its first before
    // either tries its second. SBCL sees the cycle close and signals THREAD-DEADLOCK in the
    // second thread to wait, which then sits in the debugger holding its first lock.
    let deadlock = lock_order_deadlock(test_thread);
    let image = Image::start(Setup {
        forms: vec![note_tid_fn(tids.path()), deadlock],
        ..Setup::default()
    })
    .await;
    let ab = noted_tid(tids.path(), "t-ab").await;
    let ba = noted_tid(tids.path(), "t-ba").await;
    let catalog = image.catalog();
    let list = catalog.call("thread_list", Value::Null).await.unwrap();

    let deadlocks = list["deadlocks"].as_array().unwrap();
    assert_eq!(deadlocks.len(), 1, "{list:#}");
    let cycle = deadlocks[0]["threads"].as_array().unwrap();
    assert_eq!(cycle.len(), 2, "{cycle:#?}");
    let mut in_cycle: Vec<i64> = cycle.iter().map(|e| e["tid"].as_i64().unwrap()).collect();
    in_cycle.sort();
    let mut expected = vec![ab, ba];
    expected.sort();
    assert_eq!(in_cycle, expected, "the cycle's threads are t-ab and t-ba");
    for e in cycle {
        // t-ab holds lock-a and wants lock-b, held by t-ba; and the reverse.
        let (wants, owner) = if e["tid"] == ab {
            ("lock-b", ba)
        } else {
            ("lock-a", ab)
        };
        assert_eq!(e["mutex"], wants, "{e:#}");
        assert_eq!(e["owner_tid"], owner, "{e:#}");
    }
    // SBCL stopped exactly one of them; the other waits on.
    let stopped: Vec<&Value> = cycle
        .iter()
        .filter(|e| e["stopped_in_debugger"] == true)
        .collect();
    assert_eq!(stopped.len(), 1, "{cycle:#?}");
    let stopped_name = stopped[0]["name"].as_str().unwrap();
    let stopped_thread = thread(&list, stopped_name);
    assert_eq!(stopped_thread["in_debugger"], true);
    assert_eq!(
        stopped_thread["debugger_condition"]["type"],
        "SB-THREAD:THREAD-DEADLOCK"
    );
    let waiter_name = if stopped_name == "t-ab" {
        "t-ba"
    } else {
        "t-ab"
    };
    let waiter = thread(&list, waiter_name);
    assert_eq!(waiter["lisp_wait_type"], "mutex");
    assert_eq!(waiter["owner_name"], stopped_name);
    assert_eq!(list["in_debugger"], 1);

    let dump = catalog.call("thread_dump_all", Value::Null).await.unwrap();
    assert_eq!(
        dump["deadlocks"], list["deadlocks"],
        "the same cycle in the dump"
    );

    let health = catalog.call("health_check", Value::Null).await.unwrap();
    assert_eq!(
        check(&health, "threads.stuck")["status"],
        "critical",
        "{health:#}"
    );
    assert_eq!(health["status"], "critical");
    let reason = check(&health, "threads.stuck")["reason"].as_str().unwrap();
    assert!(
        reason.contains("lock-a") && reason.contains("lock-b"),
        "{reason}"
    );

    let metrics = catalog.call("metrics_export", Value::Null).await.unwrap();
    let text = metrics["text"].as_str().unwrap();
    assert_eq!(series(text, "sbcl_threads_deadlocked"), 2.0);
    assert_eq!(series(text, "sbcl_threads_in_debugger"), 1.0);

    // Under serve, the watcher journals the deadlock as a critical event.
    let app = format!("app={}", image.sbcl.address);
    let sbmon = Sbmon::start(
        "serve",
        &["--target", app.as_str(), "--sample-interval", "1"],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let event = loop {
        let (status, body) = sbmon.get("/monitoring/events?kind=deadlock").await;
        assert_eq!(status, 200, "{body}");
        let events: Value = serde_json::from_str(&body).unwrap();
        if let Some(e) = events["events"].as_array().and_then(|e| e.first()) {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no deadlock event: {events:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(event["severity"], "critical", "{event:#}");
    assert_eq!(event["target"], "app", "{event:#}");
    let message = event["message"].as_str().unwrap();
    assert!(message.contains("threads.stuck"), "{event:#}");
}

#[tokio::test]
async fn a_wait_on_a_sleeping_holder_names_the_owner_and_is_no_deadlock() {
    let tids = tempfile::tempdir().unwrap();
    let forms = format!(
        r#"(let ((m (sb-thread:make-mutex :name "shared-lock"))
                 (held (sb-thread:make-semaphore)))
             (declare (ignorable m held))
             {holder}
             (sb-thread:wait-on-semaphore held)
             {waiter}
             (sleep 0.2))"#,
        holder = test_thread(
            "holder",
            "(sb-thread:with-mutex (m) (sb-thread:signal-semaphore held) (loop (sleep 1)))"
        ),
        waiter = test_thread("waiter", "(sb-thread:with-mutex (m) nil)"),
    );
    let image = Image::start(Setup {
        forms: vec![note_tid_fn(tids.path()), forms],
        ..Setup::default()
    })
    .await;
    let holder = noted_tid(tids.path(), "holder").await;
    noted_tid(tids.path(), "waiter").await;
    let catalog = image.catalog();
    let first = catalog.call("thread_list", Value::Null).await.unwrap();
    let seen = Instant::now();
    assert_eq!(first["deadlocks"], json!([]), "a wait is not a deadlock");
    assert_eq!(first["in_debugger"], 0);
    let w = thread(&first, "waiter");
    assert_eq!(w["lisp_wait"], "shared-lock");
    assert_eq!(
        w["owner_tid"], holder,
        "the owner's tid, as the kernel gave it"
    );
    assert_eq!(w["owner_name"], "holder");
    assert_eq!(thread(&first, "holder")["owner_tid"], Value::Null);
    assert_eq!(thread(&first, "holder")["waited_seconds"], Value::Null);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = catalog.call("thread_list", Value::Null).await.unwrap();
    let elapsed = seen.elapsed().as_secs_f64();
    let waited = thread(&second, "waiter")["waited_seconds"]
        .as_f64()
        .unwrap();
    // Seen waiting since the first listing at the latest, and not before the image started.
    assert!(waited >= 1.4, "waited {waited} s");
    let up = proc_uptime_of(image.pid());
    assert!(waited <= up, "waited {waited} s, image up {up} s");
    assert!(
        waited >= elapsed - 1.0,
        "waited {waited} s, {elapsed} s since seen"
    );

    let healthy = catalog.call("health_check", Value::Null).await.unwrap();
    assert_eq!(check(&healthy, "threads.stuck")["status"], "healthy");
    let short = Config::parse("[health.threads]\nstuck = { warning = 1 }\n").unwrap();
    let report = image
        .catalog_with(short)
        .call("health_check", Value::Null)
        .await
        .unwrap();
    let stuck = check(&report, "threads.stuck");
    assert_eq!(stuck["status"], "degraded", "{stuck:#}");
    assert!(stuck["observed"].as_f64().unwrap() >= 1.4, "{stuck:#}");
    let text = catalog.call("metrics_export", Value::Null).await.unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(series(&text, "sbcl_threads_deadlocked"), 0.0);
    assert_eq!(series(&text, "sbcl_threads_in_debugger"), 0.0);
}

/// Seconds since process `pid` started, from /proc/PID/stat and /proc/uptime.
fn proc_uptime_of(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // After the comm, starttime is field 19 (22nd of the line), in clock ticks since boot.
    let start: f64 = fields[19].parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    uptime - start / ticks
}

#[tokio::test]
async fn a_thread_in_the_debugger_is_reported_with_its_condition() {
    let tids = tempfile::tempdir().unwrap();
    let image = Image::start(Setup {
        forms: vec![
            note_tid_fn(tids.path()),
            test_thread("failing", r#"(error "sbmon test failure ~d" 42)"#),
            "(sleep 0.3)".into(),
        ],
        ..Setup::default()
    })
    .await;
    let tid = noted_tid(tids.path(), "failing").await;
    let catalog = image.catalog();
    let list = catalog.call("thread_list", Value::Null).await.unwrap();
    let failing = thread(&list, "failing");
    assert_eq!(failing["tid"], tid);
    assert_eq!(failing["in_debugger"], true, "{failing:#}");
    let condition = &failing["debugger_condition"];
    assert_eq!(condition["type"], "SIMPLE-ERROR");
    assert_eq!(condition["message"], "sbmon test failure 42");
    assert_eq!(condition["found_by"], "sb-debug:*debug-condition*");
    assert_eq!(list["in_debugger"], 1);
    assert_eq!(list["deadlocks"], json!([]));
    // No other thread is reported in the debugger.
    for t in list["threads"].as_array().unwrap() {
        if t["name"] != "failing" {
            assert_eq!(t["in_debugger"], false, "{t:#}");
        }
    }

    let dump = catalog.call("thread_dump_all", Value::Null).await.unwrap();
    let dumped = dump["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tid"] == tid)
        .unwrap();
    assert_eq!(dumped["debugger_condition"]["type"], "SIMPLE-ERROR");

    let health = catalog.call("health_check", Value::Null).await.unwrap();
    let stuck = check(&health, "threads.stuck");
    assert_eq!(stuck["status"], "degraded", "{stuck:#}");
    assert!(
        stuck["reason"].as_str().unwrap().contains("failing"),
        "{stuck:#}"
    );
    let text = catalog.call("metrics_export", Value::Null).await.unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(series(&text, "sbcl_threads_in_debugger"), 1.0);
    assert_eq!(series(&text, "sbcl_threads_deadlocked"), 0.0);
}

/// CPU percent of `tid` over the time `during` takes, as the test reads /proc itself.
async fn proc_percent<F: Future<Output = Value>>(
    pid: i32,
    tids: &[i64],
    during: F,
) -> (Vec<f64>, Value) {
    let path = |tid: i64| format!("/proc/{pid}/task/{tid}/stat");
    let before: Vec<f64> = tids.iter().map(|t| proc_cpu_seconds(&path(*t))).collect();
    let started = Instant::now();
    let value = during.await;
    let wall = started.elapsed().as_secs_f64();
    let after: Vec<f64> = tids.iter().map(|t| proc_cpu_seconds(&path(*t))).collect();
    let percent = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) / wall * 100.0)
        .collect();
    (percent, value)
}

/// The `cpu_percent` of the "spinner" and "napper" threads in `list` against what /proc said
/// of them (`proc`, in that order). The kernel's figure over the whole call encloses sbmon's
/// interval; a spinning thread runs all the time it is given, so both agree within the ticks'
/// resolution plus the machine's other load.
fn spinner_and_napper_match_proc(list: &Value, proc: &[f64]) {
    let spin = thread(list, "spinner")["cpu_percent"].as_f64().unwrap();
    let nap = thread(list, "napper")["cpu_percent"].as_f64().unwrap();
    eprintln!(
        "cpu_percent ({:?}, {:?} s): spinner {spin:.1}% (/proc {:.1}%), napper {nap:.1}% (/proc {:.1}%)",
        list["cpu_interval"]["source"], list["cpu_interval"]["seconds"], proc[0], proc[1]
    );
    assert!(
        (spin - proc[0]).abs() < 25.0,
        "spinner {spin}% vs /proc {}%",
        proc[0]
    );
    assert!(spin > 50.0, "a spinning thread: {spin}%");
    assert!(
        nap < 5.0 && proc[1] < 5.0,
        "a sleeping thread: {nap}%, /proc {}%",
        proc[1]
    );
}

#[tokio::test]
async fn cpu_percent_of_a_spinning_and_a_sleeping_thread_matches_proc() {
    let tids = tempfile::tempdir().unwrap();
    let image = Image::start(Setup {
        forms: vec![
            note_tid_fn(tids.path()),
            test_thread(
                "spinner",
                "(let ((x 0)) (declare (fixnum x)) (loop (setf x (logand (1+ x) #xffff))))",
            ),
            test_thread("napper", "(loop (sleep 0.05))"),
        ],
        ..Setup::default()
    })
    .await;
    let spinner = noted_tid(tids.path(), "spinner").await;
    let napper = noted_tid(tids.path(), "napper").await;
    let pid = image.pid();

    // One-shot: the call measures over half a second by itself, and says so.
    let catalog = image.catalog();
    let (proc, list) = proc_percent(pid, &[spinner, napper], async {
        catalog.call("thread_list", Value::Null).await.unwrap()
    })
    .await;
    assert_eq!(list["cpu_interval"]["source"], "this_call");
    let seconds = list["cpu_interval"]["seconds"].as_f64().unwrap();
    assert!((0.45..1.5).contains(&seconds), "interval {seconds} s");
    spinner_and_napper_match_proc(&list, &proc);

    // Under serve: the sampler's last interval (1 s here).
    let app = format!("app={}", image.sbcl.address);
    let sbmon = Sbmon::start(
        "serve",
        &["--target", app.as_str(), "--sample-interval", "1"],
        &[],
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (proc, answer) = proc_percent(pid, &[spinner, napper], async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        sbmon
            .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "thread_list", "params": {}}))
            .await
    })
    .await;
    let list = &answer["result"];
    assert_eq!(list["cpu_interval"]["source"], "sampler", "{answer:#}");
    let seconds = list["cpu_interval"]["seconds"].as_f64().unwrap();
    assert!(
        (0.8..2.5).contains(&seconds),
        "sampler interval {seconds} s"
    );
    spinner_and_napper_match_proc(list, &proc);
}
