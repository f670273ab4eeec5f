//! The web console in a real browser: Debian's Chromium, headless, driven over the DevTools
//! protocol (chromiumoxide), against `sbmon serve` watching real SBCL images. What the pages
//! show is checked against what the test arranged (threads, a deadlock, a forced GC, a killed
//! process) and against `/rpc` at the same moment. Every request the pages make is watched
//! (none may leave 127.0.0.1) and so is every JavaScript error; screenshots at 1280x800 and
//! 390x844 go to `target/test-artifacts/`.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chromiumoxide::Page;
use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::log::{EventEntryAdded, LogEntryLevel};
use chromiumoxide::cdp::browser_protocol::network::EventRequestWillBeSent;
use chromiumoxide::cdp::js_protocol::runtime::{
    ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown,
};
use chromiumoxide::page::ScreenshotParams;
use common::{Image, Sbmon, Setup, lock_order_deadlock, sleeper};
use futures::StreamExt;
use sbmon::wire::Sexp;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium with a profile directory of its own, stopped by its pid and its profile
/// removed when dropped.
struct Chromium {
    browser: Option<Browser>,
    pid: Option<u32>,
    handler: tokio::task::JoinHandle<()>,
    profile: PathBuf,
}

impl Chromium {
    async fn launch() -> Chromium {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: tools/setup installs Debian's chromium"
        );
        let profile = tempfile::Builder::new()
            .prefix("sbmon-chromium-")
            .tempdir()
            .unwrap()
            .keep();
        let config = BrowserConfig::builder()
            .chrome_executable(CHROMIUM)
            .no_sandbox()
            .user_data_dir(&profile)
            .window_size(1280, 800)
            .viewport(None)
            .args([
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .launch_timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let (mut browser, mut events) = Browser::launch(config).await.expect("chromium starts");
        let pid = browser.get_mut_child().and_then(|c| c.as_mut_inner().id());
        let handler = tokio::spawn(async move { while events.next().await.is_some() {} });
        Chromium {
            browser: Some(browser),
            pid,
            handler,
            profile,
        }
    }

    /// A blank tab whose requests and JavaScript errors are recorded from the start.
    async fn tab(&self) -> Tab {
        let page = self
            .browser
            .as_ref()
            .unwrap()
            .new_page("about:blank")
            .await
            .unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        page.enable_runtime().await.unwrap();
        page.enable_log().await.unwrap();
        let mut sent = page
            .event_listener::<EventRequestWillBeSent>()
            .await
            .unwrap();
        let r = requests.clone();
        tokio::spawn(async move {
            while let Some(e) = sent.next().await {
                r.lock().unwrap().push(e.request.url.clone());
            }
        });
        let mut thrown = page.event_listener::<EventExceptionThrown>().await.unwrap();
        let e = errors.clone();
        tokio::spawn(async move {
            while let Some(x) = thrown.next().await {
                let d = &x.exception_details;
                let what = d
                    .exception
                    .as_ref()
                    .and_then(|o| o.description.clone())
                    .unwrap_or_else(|| d.text.clone());
                e.lock().unwrap().push(format!("exception: {what}"));
            }
        });
        let mut console = page
            .event_listener::<EventConsoleApiCalled>()
            .await
            .unwrap();
        let e = errors.clone();
        tokio::spawn(async move {
            while let Some(x) = console.next().await {
                if matches!(x.r#type, ConsoleApiCalledType::Error) {
                    let args: Vec<String> = x
                        .args
                        .iter()
                        .map(|a| {
                            a.value
                                .as_ref()
                                .map(Value::to_string)
                                .or_else(|| a.description.clone())
                                .unwrap_or_default()
                        })
                        .collect();
                    e.lock()
                        .unwrap()
                        .push(format!("console.error: {}", args.join(" ")));
                }
            }
        });
        let mut log = page.event_listener::<EventEntryAdded>().await.unwrap();
        let e = errors.clone();
        tokio::spawn(async move {
            while let Some(x) = log.next().await {
                if matches!(x.entry.level, LogEntryLevel::Error) {
                    e.lock()
                        .unwrap()
                        .push(format!("log: {} ({:?})", x.entry.text, x.entry.url));
                }
            }
        });
        Tab {
            page,
            requests,
            errors,
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.handler.abort();
        if let Some(pid) = self.pid {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(mut browser) = self.browser.take()
            && let Some(child) = browser.get_mut_child()
        {
            // Reap it, so no zombie outlives the test.
            for _ in 0..50 {
                if !matches!(child.as_mut_inner().try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Its helper processes may still write for a moment after the browser is gone.
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

struct Tab {
    page: Page,
    requests: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Tab {
    async fn open(&self, url: &str) {
        self.page.goto(url).await.expect("the page loads");
    }

    async fn click(&self, selector: &str) {
        self.page
            .find_element(selector)
            .await
            .unwrap_or_else(|e| panic!("{selector}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {selector}: {e}"));
    }

    async fn eval(&self, js: &str) -> Value {
        self.try_eval(js)
            .await
            .unwrap_or_else(|e| panic!("{js}: {e}"))
    }

    async fn try_eval(&self, js: &str) -> Result<Value, String> {
        match self.page.evaluate(js).await {
            Ok(v) => Ok(v.into_value::<Value>().unwrap_or(Value::Null)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Evaluate `js` until it is truthy (its value) or `timeout` passes (a failure naming `what`).
    /// An evaluation that fails (the page is loading) counts as not yet.
    async fn until(&self, what: &str, timeout: Duration, js: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.try_eval(js).await.unwrap_or(Value::Null);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                let text = self
                    .try_eval("document.body.innerText.slice(0, 3000)")
                    .await
                    .unwrap_or_default();
                let errors = self.errors.lock().unwrap().clone();
                panic!(
                    "{what}: not seen within {timeout:?}; the page shows:\n{text}\nerrors: {errors:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// When the page first showed live figures and what its assets weigh (printed for the
    /// README; speed is not asserted in tests).
    async fn report_timing(&self, name: &str) {
        let t = self
            .eval(
                "(() => { const n = performance.getEntriesByType('navigation')[0]; \
                 const m = performance.getEntriesByName('sbmon-first-data')[0]; \
                 const assets = performance.getEntriesByType('resource') \
                   .filter((r) => r.name.includes('/console/assets/')); \
                 return { dom_content_loaded_ms: n.domContentLoadedEventEnd, \
                   load_ms: n.loadEventEnd, first_data_ms: m ? m.startTime : null, \
                   page_and_asset_bytes: n.decodedBodySize + \
                     assets.reduce((a, r) => a + r.decodedBodySize, 0) }; })()",
            )
            .await;
        eprintln!("console {name} page: {t}");
    }

    /// Every request went to 127.0.0.1 (or never left the browser: data:, blob:, about:).
    fn assert_loopback_only(&self) {
        let requests = self.requests.lock().unwrap();
        assert!(!requests.is_empty(), "no request was recorded at all");
        for url in requests.iter() {
            let local = url.starts_with("http://127.0.0.1:")
                || url.starts_with("data:")
                || url.starts_with("blob:http://127.0.0.1:")
                || url.starts_with("about:");
            assert!(local, "a request left 127.0.0.1: {url}");
        }
    }

    fn assert_no_errors(&self) {
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
    }

    /// Screenshots at a laptop's and a phone's size, each checked for horizontal overflow.
    async fn screenshots(&self, name: &str) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        for (w, h, mobile) in [(1280, 800, false), (390, 844, true)] {
            let metrics = SetDeviceMetricsOverrideParams::builder()
                .width(w)
                .height(h)
                .device_scale_factor(1.0)
                .mobile(mobile)
                .build()
                .unwrap();
            self.page.execute(metrics).await.unwrap();
            // Let the charts follow the new width.
            tokio::time::sleep(Duration::from_millis(600)).await;
            let (scroll, inner) = (
                self.eval("document.documentElement.scrollWidth").await,
                self.eval("window.innerWidth").await,
            );
            assert_eq!(inner, json!(w), "the emulated width");
            assert!(
                scroll.as_i64().unwrap() <= inner.as_i64().unwrap(),
                "{name} at {w}x{h} overflows: scrollWidth {scroll} > innerWidth {inner}"
            );
            self.eval("window.scrollTo(0, 0); true").await;
            let path = dir.join(format!("console-{name}-{w}x{h}.png"));
            self.page
                .save_screenshot(ScreenshotParams::builder().build(), &path)
                .await
                .unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() > 1000, "{path:?}");
        }
    }
}

/// The loopback address of an sbmon the browser can reach (`Sbmon::start` binds 127.0.0.1).
fn base(sbmon: &Sbmon) -> &str {
    assert!(
        sbmon.base.starts_with("http://127.0.0.1:"),
        "{}",
        sbmon.base
    );
    &sbmon.base
}

async fn heap_used(sbmon: &Sbmon, target: &str) -> u64 {
    let r = sbmon
        .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "memory_stats", "params": {"target": target}}))
        .await;
    r["result"]["heap_used_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("memory_stats: {r}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_shows_each_target_live_and_one_killed_goes_down() {
    let (a, b) = tokio::join!(
        Image::start(Setup::default()),
        Image::start(Setup::default())
    );
    let targets = [
        format!("alpha={}", a.sbcl.address),
        format!("beta={}", b.sbcl.address),
    ];
    let sbmon = Sbmon::start(
        "serve",
        &[
            "--target",
            &targets[0],
            "--target",
            &targets[1],
            "--sample-interval",
            "1",
        ],
        &[],
    );
    let chromium = Chromium::launch().await;
    let tab = chromium.tab().await;
    tab.open(&format!("{}/", base(&sbmon))).await;
    tab.until(
        "both cards up",
        Duration::from_secs(20),
        "document.querySelectorAll('.card[data-state=up] .heap[data-bytes]').length == 2",
    )
    .await;

    // The heap each card shows is what memory_stats says at the same moment, give or take
    // what an idle image allocates between two readings a second or two apart.
    tab.report_timing("fleet").await;
    for name in ["alpha", "beta"] {
        let before = heap_used(&sbmon, name).await;
        let shown = tab
            .eval(&format!(
                "Number(document.querySelector('.card[data-target=\"{name}\"] .heap').dataset.bytes)"
            ))
            .await
            .as_f64()
            .unwrap() as u64;
        let after = heap_used(&sbmon, name).await;
        let slack = 4 << 20;
        let (low, high) = (before.min(after), before.max(after));
        assert!(
            shown + slack >= low && shown <= high + slack,
            "{name}: the page shows {shown} bytes, memory_stats {before}..{after}"
        );
        let text = tab
            .eval(&format!(
                "document.querySelector('.card[data-target=\"{name}\"] .heap').textContent"
            ))
            .await;
        assert!(text.as_str().unwrap().contains("MiB"), "{text}");
    }
    let card_text = tab
        .eval("document.querySelector('.card[data-target=alpha]').innerText")
        .await;
    let card_text = card_text.as_str().unwrap();
    for needle in [
        "Lisp", "Uptime", "Health", "GC p99", "Threads", "metrics", "health",
    ] {
        assert!(card_text.contains(needle), "{needle} in {card_text}");
    }
    // The endpoint documentation is there, with the tools of this sbmon.
    tab.until(
        "the tools table",
        Duration::from_secs(5),
        "document.querySelector('#tools').innerText.includes('thread_dump_all')",
    )
    .await;

    tab.screenshots("fleet").await;

    // The console's endpoints answer mistakes clearly: an unknown target, a profile without
    // --allow control, a profile of a length it does not take.
    let (status, body) = sbmon.get("/console/api/targets/nope/samples").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("alpha") && body.contains("beta"), "{body}");
    let (status, body) = sbmon
        .post(
            "/console/api/targets/alpha/profile",
            r#"{"seconds": 1}"#.into(),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("--allow control"),
        "{body}"
    );
    let (status, body) = sbmon
        .post(
            "/console/api/targets/alpha/profile",
            r#"{"seconds": 1e9}"#.into(),
        )
        .await;
    assert_eq!(status, 400, "{body}");

    // SIGKILL one image: its card turns down without the page being loaded again (a load
    // would drop the mark this document carries).
    tab.eval("window.consoleTestMark = 'first load'; true")
        .await;
    // SAFETY: kill has no memory-safety preconditions; the pid is the test's own image.
    unsafe { libc::kill(b.pid(), libc::SIGKILL) };
    tab.until(
        "beta down",
        Duration::from_secs(20),
        "document.querySelector('.card[data-target=beta]').dataset.state == 'down'",
    )
    .await;
    assert_eq!(
        tab.eval("document.querySelector('.card[data-target=alpha]').dataset.state")
            .await,
        "up"
    );
    assert_eq!(
        tab.eval("window.consoleTestMark").await,
        "first load",
        "the page was loaded again"
    );
    tab.assert_loopback_only();
    tab.assert_no_errors();

    // A page for a target sbmon does not watch says so, and which it does.
    let unknown = chromium.tab().await;
    unknown
        .open(&format!("{}/targets/nope", base(&sbmon)))
        .await;
    let said = unknown
        .until(
            "the unknown target's message",
            Duration::from_secs(10),
            "!document.querySelector('#error').hidden && document.querySelector('#error').textContent",
        )
        .await;
    assert!(
        said.as_str()
            .unwrap()
            .contains("does not watch a target named \"nope\"")
            && said.as_str().unwrap().contains("alpha"),
        "{said}"
    );

    // With a token, the page asks for it, then shows the same cards.
    let token = "console-test-token-0123456789";
    let guarded = Sbmon::start(
        "serve",
        &[
            "--target",
            &targets[0],
            "--sample-interval",
            "1",
            "--token",
            token,
        ],
        &[],
    );
    let tab = chromium.tab().await;
    tab.open(&format!("{}/", base(&guarded))).await;
    tab.until(
        "the token form",
        Duration::from_secs(10),
        "!document.querySelector('#token-form').hidden",
    )
    .await;
    assert_eq!(
        tab.eval("document.querySelectorAll('.card').length").await,
        0
    );
    tab.eval(&format!(
        "document.querySelector('#token-input').value = '{token}'; \
         document.querySelector('#token-form').requestSubmit(); true"
    ))
    .await;
    tab.until(
        "the card after the token",
        Duration::from_secs(20),
        "document.querySelectorAll('.card[data-target=alpha][data-state=up]').length == 1",
    )
    .await;
    tab.assert_loopback_only();
    // The only error allowed: the refused request before the token was given.
    let errors = tab.errors.lock().unwrap().clone();
    assert!(
        errors.iter().all(|e| e.contains("401")),
        "errors other than the first refusal: {errors:#?}"
    );
}

/// A thread in SBCL's own debugger (see tests/stuck.rs): the harness starts SBCL with
/// --disable-debugger, which would end the image at the first unhandled error.
fn test_thread(name: &str, body: &str) -> String {
    format!(
        "(sb-thread:make-thread (lambda () (let ((sb-ext:*invoke-debugger-hook* nil)) {body})) \
         :name {})",
        Sexp::string(name)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_page_charts_samples_and_pauses_and_lists_threads() {
    let image = Image::start(Setup {
        collector: true,
        forms: vec![
            sleeper("console-sleeper-1"),
            sleeper("console-sleeper-2"),
            lock_order_deadlock(test_thread),
        ],
        allow: sbmon::tools::Allow {
            control: true,
            eval: false,
        },
        ..Setup::default()
    })
    .await;
    let app = format!("app={}", image.sbcl.address);
    let sbmon = Sbmon::start(
        "serve",
        &[
            "--target",
            &app,
            "--sample-interval",
            "1",
            "--allow",
            "control",
        ],
        &[],
    );
    let chromium = Chromium::launch().await;
    let tab = chromium.tab().await;
    tab.open(&format!("{}/targets/app", base(&sbmon))).await;

    // The heap chart gains points as the sampler takes them.
    let first = tab
        .until(
            "heap points",
            Duration::from_secs(15),
            "Number(document.querySelector('#chart-heap').dataset.points) >= 2 && \
             Number(document.querySelector('#chart-heap').dataset.points)",
        )
        .await
        .as_u64()
        .unwrap();
    tab.until(
        "more heap points",
        Duration::from_secs(10),
        &format!(
            "Number(document.querySelector('#chart-heap').dataset.points) >= {}",
            first + 2
        ),
    )
    .await;

    tab.report_timing("target").await;

    // A collection the test forces shows in the pauses chart within seconds, from /events.
    image.collect().await;
    let gc = sbmon
        .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "gc_stats", "params": {"target": "app"}}))
        .await;
    let seq = gc["result"]["recent"]
        .as_array()
        .and_then(|r| r.iter().filter_map(|p| p["seq"].as_u64()).max())
        .unwrap_or_else(|| panic!("gc_stats: {gc}"));
    tab.until(
        "the forced collection in the pauses chart",
        Duration::from_secs(5),
        &format!("Number(document.querySelector('#chart-pauses').dataset.lastSeq) >= {seq}"),
    )
    .await;

    // The threads table: the test's threads by name, the deadlock, flagged.
    tab.until(
        "the threads table",
        Duration::from_secs(15),
        "document.querySelector('#threads tr[data-name=\"console-sleeper-2\"]') !== null",
    )
    .await;
    for name in ["console-sleeper-1", "console-sleeper-2", "t-ab", "t-ba"] {
        let present = tab
            .eval(&format!(
                "document.querySelector('#threads tr[data-name=\"{name}\"]') !== null"
            ))
            .await;
        assert_eq!(present, true, "{name} in the threads table");
    }
    for name in ["t-ab", "t-ba"] {
        let row = tab
            .eval(&format!(
                "(() => {{ const r = document.querySelector('#threads tr[data-name=\"{name}\"]'); \
                 return [r.classList.contains('stuck'), r.innerText]; }})()"
            ))
            .await;
        assert_eq!(row[0], true, "{name} flagged stuck: {row}");
        assert!(row[1].as_str().unwrap().contains("DEADLOCK"), "{row}");
    }
    let cycle = tab
        .eval("document.querySelector('#deadlocks').innerText")
        .await;
    let cycle = cycle.as_str().unwrap();
    assert!(
        cycle.contains("lock-a") && cycle.contains("lock-b"),
        "{cycle}"
    );
    let sleeper_row = tab
        .eval("document.querySelector('#threads tr[data-name=\"console-sleeper-1\"]').classList.contains('stuck')")
        .await;
    assert_eq!(sleeper_row, false, "a sleeping thread is not stuck");

    // A click on a thread shows its backtrace.
    tab.click("#threads tr[data-name=\"console-sleeper-1\"]")
        .await;
    tab.until(
        "the backtrace",
        Duration::from_secs(10),
        "document.querySelector('#backtrace-frames').textContent.includes('SBMON-TEST-SLEEPER')",
    )
    .await;

    // Two heap histograms: the second shows its changes against the first.
    tab.click("#histogram-run").await;
    tab.until(
        "the first histogram",
        Duration::from_secs(30),
        "document.querySelectorAll('#histogram tbody tr').length > 0 && \
         document.querySelector('#histogram-note').textContent.includes('take another')",
    )
    .await;
    let types = tab
        .eval("document.querySelector('#histogram tbody').innerText")
        .await;
    assert!(
        types.as_str().unwrap().contains("CONS"),
        "the histogram names its types: {types}"
    );
    tab.until(
        "the button back",
        Duration::from_secs(5),
        "!document.querySelector('#histogram-run').disabled",
    )
    .await;
    tab.click("#histogram-run").await;
    tab.until(
        "the diff",
        Duration::from_secs(30),
        "document.querySelector('#histogram-note').textContent.includes('changes since histogram #')",
    )
    .await;

    // With --allow control: a profile, drawn as an interactive flame graph.
    assert_eq!(
        tab.eval("document.querySelector('#profile').hidden").await,
        false
    );
    tab.click("#profile-run").await;
    tab.until(
        "the flame graph",
        Duration::from_secs(20),
        "(() => { const f = document.querySelector('#flame'); \
         return !f.hidden && f.src.startsWith('blob:'); })()",
    )
    .await;

    // The journal's events of this target are listed.
    tab.until(
        "journal events",
        Duration::from_secs(10),
        "document.querySelectorAll('#events li[data-kind]').length > 0",
    )
    .await;

    tab.screenshots("target").await;
    tab.assert_loopback_only();
    tab.assert_no_errors();
}

/// Calls the agent answered on sbmon's connection to `target`, from its own counter.
async fn agent_calls(sbmon: &Sbmon, target: &str) -> f64 {
    let (status, text) = sbmon.get(&format!("/metrics?target={target}")).await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find(|l| l.starts_with("sbmon_agent_rtt_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sbmon_agent_rtt_seconds_count in {text}"))
}

/// sbmon asks nothing of the image between two sampler ticks at this interval, so what the
/// counter gains over the test's windows is the pages' doing (and the counting scrapes').
const QUIET_INTERVAL: &str = "60";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_page_asks_the_image_only_for_its_thread_listings() {
    let image = Image::start(Setup::default()).await;
    let app = format!("app={}", image.sbcl.address);
    let sbmon = Sbmon::start(
        "serve",
        &["--target", &app, "--sample-interval", QUIET_INTERVAL],
        &[],
    );
    let started = Instant::now();
    let window = Duration::from_secs(16);
    // The first tick (sampler and watcher) is taken at once; let it finish.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = agent_calls(&sbmon, "app").await;
    tokio::time::sleep(window).await;
    let c1 = agent_calls(&sbmon, "app").await;

    let chromium = Chromium::launch().await;
    let fleet = chromium.tab().await;
    fleet.open(&format!("{}/", base(&sbmon))).await;
    let tab = chromium.tab().await;
    tab.open(&format!("{}/targets/app", base(&sbmon))).await;
    tab.until(
        "the first thread listing",
        Duration::from_secs(15),
        "document.querySelectorAll('#threads tbody tr').length > 0",
    )
    .await;
    fleet
        .until(
            "the card",
            Duration::from_secs(10),
            "document.querySelectorAll('.card[data-state=up]').length == 1",
        )
        .await;
    let c2 = agent_calls(&sbmon, "app").await;
    tokio::time::sleep(window).await;
    let c3 = agent_calls(&sbmon, "app").await;
    assert!(
        started.elapsed() < Duration::from_secs(58),
        "the windows ran into the next sampler tick: measure again on a quieter machine"
    );
    let (without, with) = (c1 - c0, c3 - c2);
    eprintln!(
        "agent calls over {} s between sampler ticks: {without} without a page (the counting \
         scrape), {with} with the fleet page and a target page open",
        window.as_secs()
    );
    // The thread listing every 15 s is one call; the cards, charts, pauses and journal ask
    // the image nothing.
    assert!(
        with - without <= 2.0,
        "the pages asked the image {} times in {} s",
        with - without,
        window.as_secs()
    );
    fleet.assert_no_errors();
    tab.assert_no_errors();
}
