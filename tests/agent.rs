//! The agent protocol against a real SBCL: bad input on the wire, many calls in flight, GC
//! events, TCP tokens, and a client that survives an agent that hangs, dies and comes back.

mod common;

use std::time::{Duration, Instant};

use common::{Image, Sbmon, Setup, deaf_thread, process_exists};
use sbmon::agent::{Address, AgentClient, AgentError, ClientOptions};
use sbmon::audit::Audit;
use sbmon::launch::{LaunchOptions, Sbcl};
use sbmon::tools::Allow;
use sbmon::wire::Sexp;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn frame(payload: &str) -> Vec<u8> {
    let mut out = format!("{:06x}", payload.len()).into_bytes();
    out.extend_from_slice(payload.as_bytes());
    out
}

async fn read_frame(stream: &mut UnixStream) -> Option<String> {
    let mut header = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header))
        .await
        .ok()?
        .ok()?;
    let len = usize::from_str_radix(std::str::from_utf8(&header).ok()?, 16).ok()?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    String::from_utf8(body).ok()
}

/// A raw connection that has completed the handshake.
async fn raw(image: &Image) -> UnixStream {
    let Address::Unix(path) = &image.sbcl.address else {
        panic!("unix agent expected")
    };
    let mut s = UnixStream::connect(path).await.unwrap();
    s.write_all(&frame("(:hello :protocol 1 :client \"test\")"))
        .await
        .unwrap();
    let welcome = read_frame(&mut s).await.unwrap();
    assert!(welcome.starts_with("(:welcome"), "{welcome}");
    s
}

/// Read until the agent closes the connection; returns what it said before closing.
async fn drain_until_closed(s: &mut UnixStream) -> String {
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    assert!(read.is_ok(), "the agent did not close the connection");
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let image = Image::start(Setup::default()).await;
    let client = image.client();
    client.ping().await.unwrap();

    let cases: [&[u8]; 5] = [
        b"zzzzzz(:ping)",
        b"ffffff",
        b"000100(:call 1 :pi",
        &frame("(:call 1 foo nil)"),
        &frame("(:call 1 #.(sb-ext:quit) nil)"),
    ];
    for bytes in cases {
        let mut s = raw(&image).await;
        s.write_all(bytes).await.unwrap();
        if bytes.starts_with(b"000100") {
            // Closed by the client mid-frame.
            drop(s);
        } else {
            let said = drain_until_closed(&mut s).await;
            assert!(said.is_empty() || said.contains("(:bye"), "{said}");
        }
        // The image is alive and another connection is served.
        assert!(process_exists(image.pid()));
        client.ping().await.unwrap();
    }

    // A call before the hello is refused.
    let Address::Unix(path) = &image.sbcl.address else {
        unreachable!()
    };
    let mut s = UnixStream::connect(path).await.unwrap();
    s.write_all(&frame("(:call 1 :ping nil)")).await.unwrap();
    assert!(drain_until_closed(&mut s).await.contains("(:bye"));
}

#[tokio::test]
async fn bad_calls_get_error_replies_on_a_live_connection() {
    let image = Image::start(Setup::default()).await;
    let mut s = raw(&image).await;
    for (call, expected) in [
        ("(:call 1 :no-such-op nil)", "UNKNOWN-OPERATION"),
        ("(:call 2 :backtrace (:tid \"abc\"))", "BAD-ARGUMENT"),
        ("(:call 3 :backtrace (:tid 1))", "UNKNOWN-THREAD"),
        (
            "(:call 4 :backtrace (:tid 1 :max-frames -5))",
            "BAD-ARGUMENT",
        ),
    ] {
        s.write_all(&frame(call)).await.unwrap();
        let reply = read_frame(&mut s).await.expect("an error reply");
        let reply = Sexp::parse(&reply).unwrap();
        let items = reply.as_list().unwrap();
        assert_eq!(items[0], Sexp::keyword("return"));
        let error = items[2].as_list().unwrap();
        assert_eq!(error[0], Sexp::keyword("error"), "{call} -> {reply}");
        let details = Sexp::List(error[1..].to_vec());
        assert_eq!(
            details.get("type").and_then(Sexp::as_str),
            Some(expected),
            "{call}"
        );
    }
    // Still usable.
    s.write_all(&frame("(:call 9 :ping nil)")).await.unwrap();
    assert!(read_frame(&mut s).await.unwrap().contains(":pong"));
}

#[tokio::test]
async fn many_calls_in_flight_are_matched_by_id() {
    let image = Image::start(Setup {
        forms: vec![common::sleeper("alpha")],
        ..Setup::default()
    })
    .await;
    let client = image.client();
    let threads = client.threads().await.unwrap();
    let alpha = threads
        .iter()
        .find(|t| t.name.as_deref() == Some("alpha"))
        .unwrap()
        .tid
        .unwrap();
    let calls = (0..48).map(|i| {
        let client = &client;
        async move {
            match i % 3 {
                0 => client
                    .memory()
                    .await
                    .map(|m| format!("memory {}", m.heap_limit)),
                1 => client
                    .backtrace(alpha, 5, 1000)
                    .await
                    .map(|b| format!("bt {:?}", b.tid)),
                _ => client.ping().await.map(|_| "ping".to_string()),
            }
        }
    });
    let results = futures::future::join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap();
        let expected = ["memory", "bt", "ping"][i % 3];
        assert!(r.starts_with(expected), "call {i} got {r}");
        if expected == "bt" {
            assert_eq!(r, format!("bt Some({alpha})"));
        }
    }
}

#[tokio::test]
async fn gc_events_are_pushed_to_subscribers() {
    let image = Image::start(Setup {
        collector: true,
        ..Setup::default()
    })
    .await;
    let client = image.client();
    // Read the count before subscribing: a GC of the image's own (start-up allocation can
    // trigger one) then arrives with a seq above it instead of looking like a stale event.
    let before = client.gc().await.unwrap().pauses.count;
    let conn = client.connection().await.unwrap();
    let mut events = conn.events();
    let reply = conn
        .call(
            "subscribe",
            Sexp::plist([("events", Sexp::List(vec![Sexp::keyword("gc")]))]),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(reply.to_string().contains(":gc"), "{reply}");
    image.collect().await;
    let (kind, record) = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event within 10 s")
        .unwrap();
    assert_eq!(kind, "gc");
    let record: sbmon::agent::reply::PauseRecord = sbmon::wire::from_sexp(&record).unwrap();
    assert!(
        record.seq > before,
        "seq {} after {before} pauses",
        record.seq
    );
    assert!(record.wall_seconds > 0.0);
}

#[tokio::test]
async fn client_times_out_on_a_stopped_image_and_recovers() {
    let image = Image::start(Setup::default()).await;
    let client = AgentClient::new(
        image.sbcl.address.clone(),
        ClientOptions {
            call_timeout: Duration::from_millis(500),
            ..ClientOptions::default()
        },
    );
    client.ping().await.unwrap();
    // SAFETY: signalling the SBCL this test started.
    unsafe { libc::kill(image.pid(), libc::SIGSTOP) };
    // The signal is asynchronous: wait until the kernel reports the process stopped.
    let stat = format!("/proc/{}/stat", image.pid());
    while !std::fs::read_to_string(&stat)
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .trim_start()
        .starts_with('T')
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let err = client.ping().await.unwrap_err();
    unsafe { libc::kill(image.pid(), libc::SIGCONT) };
    assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
    client.ping().await.unwrap();
}

#[tokio::test]
async fn client_fails_fast_when_the_image_dies_mid_call_and_reconnects_later() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let options = LaunchOptions {
        listen: Some(Address::Unix(socket.clone())),
        before_start: vec![deaf_thread("deaf")],
        ..LaunchOptions::default()
    };
    let mut first = Sbcl::spawn(&options).unwrap();
    first
        .wait_ready(Duration::from_secs(60), &ClientOptions::default())
        .await
        .unwrap();
    let client = AgentClient::new(Address::Unix(socket.clone()), ClientOptions::default());
    let deaf = client
        .threads()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name.as_deref() == Some("deaf"))
        .unwrap()
        .tid
        .unwrap();
    // This call would wait 20 s for a thread that never answers; kill the image meanwhile.
    let started = Instant::now();
    let pending = client.backtrace(deaf, 10, 20_000);
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.stop();
    };
    let (result, ()) = tokio::join!(pending, killer);
    let err = result.unwrap_err();
    // SIGTERM makes SBCL exit, and the agent's exit hook says so (ImageExited); should the
    // SIGKILL that follows a second later come first, the connection is simply lost.
    assert!(
        matches!(err, AgentError::ImageExited { .. } | AgentError::Lost(_)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not the call timeout"
    );
    let err = client.ping().await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");

    // Another image on the same socket: the same client reconnects.
    let mut second = Sbcl::spawn(&LaunchOptions {
        before_start: vec![],
        ..options
    })
    .unwrap();
    second
        .wait_ready(Duration::from_secs(60), &ClientOptions::default())
        .await
        .unwrap();
    client.ping().await.unwrap();
    assert_eq!(client.welcome().await.unwrap().pid, second.pid);
}

#[tokio::test]
async fn tcp_agent_requires_the_token() {
    let home = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = vec![(
        "HOME".to_string(),
        home.path().to_string_lossy().into_owned(),
    )];
    let image = Image::start(Setup {
        listen: common::Listen::At(Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        }),
        env: env.clone(),
        ..Setup::default()
    })
    .await;
    let secret = home.path().join(".sbmon-secret");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&secret).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the agent created its secret private");

    let good = AgentClient::new(image.sbcl.address.clone(), common::token_options(&env));
    assert_eq!(good.welcome().await.unwrap().pid, image.pid());
    let bad = AgentClient::new(
        image.sbcl.address.clone(),
        ClientOptions {
            token: Some("wrong".into()),
            ..ClientOptions::default()
        },
    );
    let err = bad.ping().await.unwrap_err();
    assert!(matches!(err, AgentError::Refused(_)), "{err}");
    // The listener is bound to loopback only (/proc/net/tcp: 0100007F is 127.0.0.1).
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let listening: Vec<&str> = tcp
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&format!(":{port:04X}")) && f[3] == "0A"
        })
        .collect();
    assert_eq!(listening.len(), 1, "{listening:?}");
    assert!(
        listening[0]
            .split_whitespace()
            .nth(1)
            .unwrap()
            .starts_with("0100007F:")
    );
}

#[tokio::test]
async fn unix_socket_and_directory_are_private() {
    let runtime = tempfile::tempdir().unwrap();
    let env = vec![(
        "XDG_RUNTIME_DIR".to_string(),
        runtime.path().to_string_lossy().into_owned(),
    )];
    let mut sbcl = Sbcl::spawn(&LaunchOptions {
        env,
        ..LaunchOptions::default()
    })
    .unwrap();
    sbcl.wait_ready(Duration::from_secs(60), &ClientOptions::default())
        .await
        .unwrap();
    let dir = runtime.path().join("sbmon");
    let socket = dir.join(format!("{}.sock", sbcl.pid));
    assert_eq!(sbcl.address, Address::Unix(socket.clone()));
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&socket), 0o600);
}

#[tokio::test]
async fn stop_removes_the_socket_and_every_agent_thread() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("restart");
    let second = dir.path().join("second.sock");
    // When the trigger file appears, the image stops its agent and starts it elsewhere.
    let restarter = format!(
        "(sb-thread:make-thread (lambda () (loop (when (probe-file {t}) \
           (sbmon-agent:stop) (sbmon-agent:start :socket {s}) (delete-file {t}) (return)) \
           (sleep 0.02))) :name \"restarter\")",
        t = Sexp::string(trigger.to_string_lossy()),
        s = Sexp::string(second.to_string_lossy())
    );
    let image = Image::start(Setup {
        forms: vec![restarter],
        ..Setup::default()
    })
    .await;
    let first = image.client();
    let agent_threads = |threads: Vec<sbmon::agent::reply::LispThread>| {
        let mut names: Vec<String> = threads
            .into_iter()
            .filter(|t| t.agent)
            .map(|t| t.name.unwrap_or_default())
            .collect();
        names.sort();
        names
    };
    let before = agent_threads(first.threads().await.unwrap());
    assert!(before.iter().any(|n| n.contains("listener")), "{before:?}");
    std::fs::write(&trigger, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while trigger.exists() {
        assert!(Instant::now() < deadline, "the agent did not restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Address::Unix(old) = &image.sbcl.address else {
        unreachable!()
    };
    assert!(!old.exists(), "stop removed its socket");
    assert!(first.ping().await.is_err(), "stop closed our connection");
    let again = AgentClient::new(Address::Unix(second), ClientOptions::default());
    // Only the new agent's listener, event thread and this one connection: nothing of the
    // first agent (its listener, its connections) is left.
    let after = agent_threads(again.threads().await.unwrap());
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!(
        after.iter().filter(|n| n.contains("listener")).count(),
        1,
        "{after:?}"
    );
    assert_eq!(
        after.iter().filter(|n| n.contains("conn")).count(),
        1,
        "{after:?}"
    );
}

#[tokio::test]
async fn replies_carry_any_text_exactly_and_oversized_replies_become_errors() {
    // Quotes, backslashes, two-, three- and four-byte UTF-8 all survive the agent's printer.
    let awkward = "wörker \"q\" \\ ✓ 😀";
    // A thread named with 17 MB of text, made when the test asks (trigger file), turns the
    // :threads reply into more than the 16 MiB frame limit.
    let scratch = tempfile::tempdir().unwrap();
    let trigger = scratch.path().join("big");
    let big_thread_on_trigger = format!(
        r#"(sb-thread:make-thread
             (lambda ()
               (loop until (probe-file {trigger}) do (sleep 0.02))
               (sb-thread:make-thread #'sbmon-test::sbmon-test-sleeper
                                      :name (make-string 17000000 :initial-element #\x)))
             :name "big-maker")"#,
        trigger = Sexp::string(trigger.to_string_lossy())
    );
    let image = Image::start(Setup {
        forms: vec![common::sleeper(awkward), big_thread_on_trigger],
        ..Setup::default()
    })
    .await;
    let client = image.client();
    let threads = client.threads().await.unwrap();
    assert!(
        threads.iter().any(|t| t.name.as_deref() == Some(awkward)),
        "{threads:?}"
    );

    std::fs::write(&trigger, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match client.threads().await {
            Err(err) => break err,
            Ok(_) => {
                assert!(Instant::now() < deadline, "the big thread never appeared");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(err.to_string().contains("TOO-LARGE"), "{err}");
    assert!(err.to_string().contains("frame limit"), "{err}");
    client.ping().await.unwrap();
}

/// A thread that collects garbage every half second, as a busy image does.
const GC_EVERY_HALF_SECOND: &str = r#"(sb-thread:make-thread
  (lambda () (loop (sb-ext:gc) (sleep 0.5))) :name "gc-every-half-second")"#;

fn unix_path(image: &Image) -> std::path::PathBuf {
    match &image.sbcl.address {
        Address::Unix(path) => path.clone(),
        other => panic!("unix agent expected, got {other}"),
    }
}

#[tokio::test]
async fn idle_connections_do_not_lock_out_new_clients_while_image_collects() {
    let hello_timeout = Duration::from_secs(2);
    let image = Image::start(Setup {
        forms: vec![GC_EVERY_HALF_SECOND.to_string()],
        hello_timeout: Some(hello_timeout),
        ..Setup::default()
    })
    .await;
    let path = unix_path(&image);
    // The handshake connection of Image::start is gone once the agent has seen it close.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Every connection slot (16) taken by a peer that never completes its hello: 15 say
    // nothing, one sends a hello a byte at a time, slowly, and never finishes it.
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..15 {
        idle.push(UnixStream::connect(&path).await.unwrap());
    }
    let (mut dribble_read, mut dribble_write) =
        UnixStream::connect(&path).await.unwrap().into_split();
    let dribbler = tokio::spawn(async move {
        let hello = frame("(:hello :protocol 1 :client \"slow\")");
        for byte in &hello[..hello.len() - 1] {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if dribble_write.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
        // Never the last byte; the connection stays open until the test ends.
        std::future::pending::<()>().await;
    });
    // The agent is full: a 17th peer is turned away at once.
    let mut probe = UnixStream::connect(&path).await.unwrap();
    let refused = drain_until_closed(&mut probe).await;
    assert!(refused.contains("too many connections"), "{refused}");

    // A real client gets in once the idle peers' hello deadline has passed, GC or not.
    let client = image.client();
    let bound = hello_timeout + Duration::from_secs(8);
    let mut last_error = None;
    while opened.elapsed() < bound {
        match client.ping().await {
            Ok(_) => {
                last_error = None;
                break;
            }
            Err(e) => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let waited = opened.elapsed();
    assert!(
        last_error.is_none(),
        "locked out for {waited:?}: {last_error:?}"
    );
    eprintln!("a new client was served {waited:?} after the idle peers connected");

    // Each idle peer, the slow one too, was told why and disconnected.
    for mut s in idle {
        let said = drain_until_closed(&mut s).await;
        assert!(said.contains("timeout waiting for hello"), "{said}");
    }
    let mut said = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), dribble_read.read_to_end(&mut said))
        .await
        .expect("the slow peer was cut")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&said).contains("timeout waiting for hello"),
        "{}",
        String::from_utf8_lossy(&said)
    );
    dribbler.abort();
}

#[test]
fn loading_the_agent_file_warns_nothing() {
    let agent = concat!(env!("CARGO_MANIFEST_DIR"), "/lisp/sbmon-agent.lisp");
    // Loading the source, as the README says to.
    let out = std::process::Command::new("sbcl")
        .args(["--non-interactive", "--no-sysinit", "--no-userinit"])
        .args(["--load", agent])
        .output()
        .expect("run sbcl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for needle in ["WARNING", "undefined", "Undefined", "caught"] {
        assert!(
            !text.contains(needle),
            "loading printed {needle:?}:\n{text}"
        );
    }
    // Compiling it, as ASDF does: no warning of any kind.
    let fasl = tempfile::tempdir().unwrap();
    let form = format!(
        "(multiple-value-bind (fasl warnings failure) (compile-file {} :output-file {}) \
           (declare (ignore fasl)) (format t \"~&RESULT ~s ~s~%\" warnings failure))",
        Sexp::string(agent),
        Sexp::string(fasl.path().join("agent.fasl").to_string_lossy())
    );
    let out = std::process::Command::new("sbcl")
        .args(["--non-interactive", "--no-sysinit", "--no-userinit"])
        .args(["--eval", &form])
        .output()
        .expect("run sbcl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("RESULT NIL NIL"), "{text}");
    // The parts loaded on first use, compiled into an image that has loaded the agent: no
    // warning either.
    for part in ["sbmon-agent-heap.lisp", "sbmon-agent-control.lisp"] {
        let source = format!("{}/lisp/{part}", env!("CARGO_MANIFEST_DIR"));
        let form = format!(
            "(multiple-value-bind (fasl warnings failure) (compile-file {} :output-file {}) \
               (declare (ignore fasl)) (format t \"~&RESULT ~s ~s~%\" warnings failure))",
            Sexp::string(&source),
            Sexp::string(fasl.path().join("part.fasl").to_string_lossy())
        );
        let out = std::process::Command::new("sbcl")
            .args(["--non-interactive", "--no-sysinit", "--no-userinit"])
            .args(["--load", agent, "--eval", &form])
            .output()
            .expect("run sbcl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("RESULT NIL NIL"), "{part}: {text}");
    }
}

/// Send `(:call ID OP ARGS)` on a raw connection and return the outcome, `(:ok VALUE)` or
/// `(:error ...)`, of its `(:return ID ...)`.
async fn raw_call(s: &mut UnixStream, id: i64, op: &str, args: &str) -> Sexp {
    s.write_all(&frame(&format!("(:call {id} {op} {args})")))
        .await
        .unwrap();
    let reply = read_frame(s).await.expect("a reply");
    let reply = Sexp::parse(&reply).unwrap();
    let items = reply.as_list().unwrap();
    assert_eq!(items[0], Sexp::keyword("return"), "{reply}");
    assert_eq!(items[1], Sexp::Int(id), "{reply}");
    items[2].clone()
}

/// `(type message)` of an `(:error ...)` outcome; panics on `(:ok ...)`.
fn error_of(outcome: &Sexp) -> (String, String) {
    let items = outcome.as_list().unwrap();
    assert_eq!(items[0], Sexp::keyword("error"), "{outcome}");
    let details = Sexp::List(items[1..].to_vec());
    let text = |k| details.get(k).and_then(Sexp::as_str).unwrap().to_string();
    (text("type"), text("message"))
}

fn is_ok(outcome: &Sexp) -> bool {
    outcome.as_list().and_then(|l| l.first()) == Some(&Sexp::keyword("ok"))
}

const ALL: Allow = Allow {
    control: true,
    eval: true,
};

#[tokio::test]
async fn agent_refuses_control_and_eval_ops_by_default() {
    let image = Image::start(Setup::default()).await;
    let marker = image.dir.path().join("evaluated");
    let mut s = raw(&image).await;
    let nursery = image.client().memory().await.unwrap().nursery_size;
    let eval_args = format!(
        "(:code {})",
        Sexp::string(format!(
            "(close (open {} :direction :output))",
            Sexp::string(marker.to_string_lossy())
        ))
    );
    let kill_args = format!("(:tid {})", image.pid());
    let calls = [
        (":eval", eval_args.as_str(), ":eval"),
        (":reload-system", "(:system \"sbmon-agent\")", ":eval"),
        (":gc-run", "(:full t)", ":control"),
        (":gc-tune", "(:nursery-size 1234567)", ":control"),
        (":kill-thread", kill_args.as_str(), ":control"),
        (":profile", "(:seconds 0.1)", ":control"),
    ];
    let gc_before = image.client().gc().await.unwrap().pauses.count;
    for (id, (op, args, class)) in (1..).zip(calls) {
        let (kind, message) = error_of(&raw_call(&mut s, id, op, args).await);
        assert_eq!(kind, "NOT-ALLOWED", "{op}: {message}");
        let option = format!("(sbmon-agent:start :allow '(:read {class}))");
        assert!(
            message.contains(op) && message.contains(&option),
            "{op}: {message}"
        );
    }
    // Read operations are served, on the same connection.
    for (id, op) in (10..).zip([":ping", ":memory", ":gc", ":runtime", ":threads"]) {
        let outcome = raw_call(&mut s, id, op, "nil").await;
        assert!(is_ok(&outcome), "{op}: {outcome}");
    }
    // Nothing of what was refused happened.
    assert!(!marker.exists(), "the refused :eval ran");
    let client = image.client();
    assert_eq!(client.memory().await.unwrap().nursery_size, nursery);
    assert_eq!(client.gc().await.unwrap().pauses.count, gc_before);

    // sbmon says why, even when it was itself allowed to offer the tool.
    let err = client
        .call_raw("gc-run", Sexp::Nil, None)
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::NotAllowed(_)), "{err}");
    assert!(
        err.to_string()
            .contains("(sbmon-agent:start :allow '(:read :control))"),
        "{err}"
    );
    let err = common::catalog_over(&image, ALL, Audit::default())
        .call("repl_eval", json!({"code": "(+ 1 2)"}))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("(sbmon-agent:start :allow '(:read :eval))"),
        "{err}"
    );
    assert!(!marker.exists());
}

#[tokio::test]
async fn agent_serves_ops_it_was_allowed() {
    let (control, all) = tokio::join!(
        Image::start(Setup {
            allow: Allow {
                control: true,
                eval: false,
            },
            ..Setup::default()
        }),
        Image::start(Setup {
            allow: ALL,
            ..Setup::default()
        })
    );

    // Control only: control operations run, eval is refused with the set that would serve it.
    let mut s = raw(&control).await;
    let before = control.client().gc().await.unwrap().pauses.count;
    let outcome = raw_call(&mut s, 1, ":gc-run", "(:full t)").await;
    assert!(is_ok(&outcome), "{outcome}");
    assert!(control.client().gc().await.unwrap().pauses.count > before);
    let outcome = raw_call(&mut s, 2, ":gc-tune", "nil").await;
    assert!(is_ok(&outcome), "{outcome}");
    let (kind, message) = error_of(&raw_call(&mut s, 3, ":eval", "(:code \"1\")").await);
    assert_eq!(kind, "NOT-ALLOWED");
    assert!(
        message.contains("(sbmon-agent:start :allow '(:read :control :eval))"),
        "{message}"
    );

    // Everything allowed: eval and reload-system run (an unknown system is the system's
    // problem, not the policy's).
    let mut s = raw(&all).await;
    let outcome = raw_call(&mut s, 1, ":eval", "(:code \"(+ 1 2)\")").await;
    assert!(outcome.to_string().contains("(\"3\")"), "{outcome}");
    let (kind, _) = error_of(
        &raw_call(
            &mut s,
            2,
            ":reload-system",
            "(:system \"no-such-system-x\")",
        )
        .await,
    );
    assert_eq!(kind, "MISSING-SYSTEM");
    let outcome = raw_call(&mut s, 3, ":gc-run", "nil").await;
    assert!(is_ok(&outcome), "{outcome}");
}

#[tokio::test]
async fn welcome_reports_the_allow_set() {
    let (default, eval, all) = tokio::join!(
        Image::start(Setup::default()),
        Image::start(Setup {
            allow: Allow {
                control: false,
                eval: true,
            },
            ..Setup::default()
        }),
        Image::start(Setup {
            allow: ALL,
            ..Setup::default()
        })
    );
    for (image, expected) in [
        (&default, vec!["read"]),
        (&eval, vec!["read", "eval"]),
        (&all, vec!["read", "control", "eval"]),
    ] {
        let welcome = image.client().welcome().await.unwrap();
        assert_eq!(welcome.allow, expected);
        assert_eq!(welcome.allows("control"), expected.contains(&"control"));
        // :capabilities lists what the agent implements, allowed or not.
        for op in ["ping", "gc-run", "eval", "reload-system"] {
            assert!(welcome.capabilities.iter().any(|c| c == op), "{op}");
        }
    }
}

/// The agent of an image that `sbmon launch` started in runtime directory `runtime`.
async fn launched_agent(sbmon: &Sbmon, runtime: &std::path::Path) -> AgentClient {
    let answer = sbmon
        .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "runtime_stats", "params": {}}))
        .await;
    let pid = answer["result"]["pid"].as_i64().expect("a pid");
    let socket = runtime.join("sbmon").join(format!("{pid}.sock"));
    AgentClient::new(Address::Unix(socket), ClientOptions::default())
}

#[tokio::test]
async fn launch_allow_starts_agent_with_same_set() {
    let (both_dir, none_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let both_env = both_dir.path().to_string_lossy().into_owned();
    let none_env = none_dir.path().to_string_lossy().into_owned();
    let both = Sbmon::start(
        "launch",
        &["--allow", "control,eval"],
        &[("XDG_RUNTIME_DIR", &both_env)],
    );
    let none = Sbmon::start("launch", &[], &[("XDG_RUNTIME_DIR", &none_env)]);

    let agent = launched_agent(&both, both_dir.path()).await;
    assert_eq!(
        agent.welcome().await.unwrap().allow,
        ["read", "control", "eval"]
    );
    // The tools sbmon offers work end to end.
    let gc = both
        .rpc(json!({"jsonrpc": "2.0", "id": 2, "method": "memory_gc", "params": {}}))
        .await;
    assert!(gc["result"]["heap_before"].is_u64(), "{gc}");
    let eval = both
        .rpc(json!({"jsonrpc": "2.0", "id": 3, "method": "repl_eval", "params": {"code": "(* 6 7)"}}))
        .await;
    assert_eq!(eval["result"]["values"], json!(["42"]), "{eval}");

    let agent = launched_agent(&none, none_dir.path()).await;
    assert_eq!(agent.welcome().await.unwrap().allow, ["read"]);
}

#[tokio::test]
async fn eval_of_exit_reports_image_exited() {
    let (image, other) = tokio::join!(
        Image::start(Setup {
            allow: ALL,
            ..Setup::default()
        }),
        Image::start(Setup {
            allow: ALL,
            ..Setup::default()
        })
    );
    let exited = format!("the SBCL image exited (pid {})", image.pid());

    // Through the agent client: the call that exits, and one still waiting, both say so.
    let client = image.client();
    let eval = |code: &str| {
        client.call_raw(
            "eval",
            Sexp::plist([("code", Sexp::string(code))]),
            Some(Duration::from_secs(60)),
        )
    };
    let started = Instant::now();
    let (waiting, exiting) = tokio::join!(eval("(sleep 30)"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        eval("(sb-ext:exit)").await
    });
    for err in [waiting.unwrap_err(), exiting.unwrap_err()] {
        assert!(
            matches!(err, AgentError::ImageExited { pid } if pid == image.pid()),
            "{err:?}"
        );
        assert!(err.to_string().contains(&exited), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not the call timeout"
    );
    // The next call finds no agent: the exiting image removed its socket.
    let err = client.ping().await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");

    // Through the repl_eval tool.
    let err = common::catalog_over(&other, ALL, Audit::default())
        .call("repl_eval", json!({"code": "(sb-ext:exit :code 3)"}))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("the SBCL image exited (pid {})", other.pid())),
        "{err}"
    );
}

/// Wait until a new client can ping the agent at `address`; returns how long that took.
async fn reachable_within(address: &Address, bound: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let client = AgentClient::new(address.clone(), ClientOptions::default());
        match client.ping().await {
            Ok(_) => return started.elapsed(),
            Err(e) => assert!(
                started.elapsed() < bound,
                "unreachable for {:?}: {e}",
                started.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn deleted_socket_file_is_recreated() {
    let runtime = tempfile::tempdir().unwrap();
    let image = Image::start(Setup {
        listen: common::Listen::AgentDefault,
        env: vec![(
            "XDG_RUNTIME_DIR".into(),
            runtime.path().to_string_lossy().into_owned(),
        )],
        ..Setup::default()
    })
    .await;
    let dir = runtime.path().join("sbmon");
    let socket = dir.join(format!("{}.sock", image.pid()));
    assert_eq!(image.sbcl.address, Address::Unix(socket.clone()));
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    let connected = image.client();
    connected.ping().await.unwrap();

    // The socket file deleted (a /tmp cleaner, a careless rm): the agent listens again at the
    // same path, privately, and the connection made before keeps working.
    std::fs::remove_file(&socket).unwrap();
    let waited = reachable_within(&image.sbcl.address, Duration::from_secs(3)).await;
    eprintln!("reachable again {waited:?} after the socket file was deleted");
    assert_eq!(mode(&socket), 0o600);
    connected.ping().await.unwrap();

    // Its directory gone too: both come back, the directory 0700.
    std::fs::remove_dir_all(&dir).unwrap();
    reachable_within(&image.sbcl.address, Duration::from_secs(3)).await;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&socket), 0o600);
    connected.ping().await.unwrap();
}

#[tokio::test]
async fn stop_ends_only_its_own_threads_and_removes_its_exit_hook() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("stop");
    let report = dir.path().join("report.sexp");
    let report_tmp = dir.path().join("report.tmp");
    // Before the agent starts: a user thread whose name looks like the agent's, the threads
    // and exit hooks of the image, and a thread that stops the agent when the test says so
    // and writes down what is left.
    let forms = vec![
        "(defun sbmon-test::lisp-threads () \
           (remove-if #'sb-thread::thread-ephemeral-p (sb-thread:list-all-threads)))"
            .to_string(),
        "(defvar sbmon-test::*user* \
           (sb-thread:make-thread #'sbmon-test::sbmon-test-sleeper :name \"sbmon-agent user\"))"
            .to_string(),
        deaf_thread("deaf"),
        format!(
            r#"(sb-thread:make-thread
                 (lambda ()
                   (loop until (probe-file {trigger}) do (sleep 0.02))
                   (sbmon-agent:stop)
                   (let* ((after (sbmon-test::lisp-threads))
                          (before sbmon-test::*threads-before*)
                          (report
                            (list :user-alive (and (sb-thread:thread-alive-p sbmon-test::*user*) t)
                                  :new-threads (mapcar #'sb-thread:thread-name
                                                       (set-difference after before))
                                  :gone-threads (mapcar #'sb-thread:thread-name
                                                        (set-difference before after))
                                  :hooks-unchanged (equal sb-ext:*exit-hooks*
                                                          sbmon-test::*hooks-before*))))
                     (with-open-file (out {tmp} :direction :output)
                       (let ((*print-case* :downcase)) (prin1 report out)))
                     (rename-file {tmp} {report})))
                 :name "stopper")"#,
            trigger = Sexp::string(trigger.to_string_lossy()),
            tmp = Sexp::string(report_tmp.to_string_lossy()),
            report = Sexp::string(report.to_string_lossy()),
        ),
        "(defvar sbmon-test::*threads-before* (sbmon-test::lisp-threads))".to_string(),
        "(defvar sbmon-test::*hooks-before* (copy-list sb-ext:*exit-hooks*))".to_string(),
    ];
    let image = Image::start(Setup {
        forms,
        allow: ALL,
        ..Setup::default()
    })
    .await;

    // Keep the agent busy with every kind of thread it starts: connections, a handshake that
    // never ends, a worker waiting for a deaf thread, an evaluation, an event subscriber.
    let client = image.client();
    let threads = client.threads().await.unwrap();
    let user = threads
        .iter()
        .find(|t| t.name.as_deref() == Some("sbmon-agent user"))
        .unwrap();
    assert!(!user.agent, "a user thread is not the agent's: {user:?}");
    let deaf = threads
        .iter()
        .find(|t| t.name.as_deref() == Some("deaf"))
        .unwrap()
        .tid
        .unwrap();
    let _silent = UnixStream::connect(unix_path(&image)).await.unwrap();
    let evaluator = image.client();
    let subscriber = image.client();
    subscriber
        .call_raw(
            "subscribe",
            Sexp::plist([("events", Sexp::List(vec![Sexp::keyword("gc")]))]),
            None,
        )
        .await
        .unwrap();
    let busy = async {
        let _ = tokio::join!(
            client.backtrace(deaf, 10, 30_000),
            evaluator.call_raw(
                "eval",
                Sexp::plist([("code", Sexp::string("(sleep 60)"))]),
                Some(Duration::from_secs(60)),
            )
        );
    };
    let stop = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let agent = image.client().threads().await.unwrap();
        let names: Vec<_> = agent
            .iter()
            .filter(|t| t.agent)
            .map(|t| t.name.clone())
            .collect();
        assert!(names.len() >= 6, "{names:?}");
        std::fs::write(&trigger, "").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !report.exists() {
            assert!(Instant::now() < deadline, "stop did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::join!(busy, stop);

    let text = std::fs::read_to_string(&report).unwrap();
    let report = Sexp::parse(&text).unwrap();
    assert_eq!(report.get("user-alive"), Some(&Sexp::T), "{text}");
    assert_eq!(report.get("new-threads"), Some(&Sexp::Nil), "{text}");
    assert_eq!(report.get("gone-threads"), Some(&Sexp::Nil), "{text}");
    assert_eq!(report.get("hooks-unchanged"), Some(&Sexp::T), "{text}");
}

/// Bytes waiting to be read on `stream` (FIONREAD).
fn unread_bytes(stream: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer; the fd is open (we own the stream).
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD");
    n as usize
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_delays_no_other_connection() {
    // An image that collects all the time: a GC event every few milliseconds.
    let image = Image::start(Setup {
        forms: vec![
            r#"(sb-thread:make-thread (lambda () (loop (sb-ext:gc) (sleep 0.002)))
                 :name "gc-storm")"#
                .to_string(),
        ],
        ..Setup::default()
    })
    .await;
    let subscribe = "(:events (:gc))";

    // A subscriber that reads its subscription's reply and then nothing more.
    let mut stuck = raw(&image).await;
    stuck
        .write_all(&frame(&format!("(:call 1 :subscribe {subscribe})")))
        .await
        .unwrap();
    loop {
        let message = read_frame(&mut stuck).await.expect("the subscribe reply");
        if message.starts_with("(:return 1") {
            break;
        }
    }
    // A subscriber that reads, and a client that calls.
    let follower = image.client();
    let conn = follower.connection().await.unwrap();
    let mut events = conn.events();
    conn.call(
        "subscribe",
        Sexp::plist([("events", Sexp::List(vec![Sexp::keyword("gc")]))]),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let arrivals = tokio::spawn(async move {
        let mut times = Vec::new();
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
            times.push(Instant::now());
        }
        times
    });
    let caller = image.client();

    // Wait until the stuck subscriber's socket is full: its unread bytes stop growing.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut steady_since) = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = unread_bytes(&stuck);
        if now != last || now == 0 {
            (last, steady_since) = (now, Instant::now());
        } else if steady_since.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the buffer never filled ({now} bytes)"
        );
    }
    eprintln!("the stuck subscriber holds {last} unread bytes");

    // For the next 4 s: calls are answered and the other subscriber's events keep coming.
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(4) {
        let asked = Instant::now();
        caller.ping().await.unwrap();
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = Instant::now();
    drop(conn);
    drop(follower);
    let times = arrivals.await.unwrap();
    let mut marks: Vec<Instant> = times
        .into_iter()
        .filter(|t| *t >= window && *t <= end)
        .collect();
    marks.insert(0, window);
    marks.push(end);
    let longest = marks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest < Duration::from_secs(2),
        "the reading subscriber waited {longest:?} for an event"
    );

    // The stuck subscriber is dropped once its socket has taken nothing for the send timeout
    // (10 s). Watched without reading, which would unblock the agent.
    let deadline = Instant::now() + Duration::from_secs(40);
    while !peer_hung_up(&stuck) {
        assert!(
            Instant::now() < deadline,
            "the stuck subscriber was never disconnected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// True once the other end of `stream` has shut down (POLLRDHUP), without reading anything.
fn peer_hung_up(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

#[tokio::test]
async fn a_missing_sbcl_internal_clears_its_capability() {
    // An SBCL without two of the internals the agent uses, as a newer release might be: the
    // symbols are removed from their packages and the agent is loaded again.
    let agent = concat!(env!("CARGO_MANIFEST_DIR"), "/lisp/sbmon-agent.lisp");
    let image = Image::start(Setup {
        forms: vec![
            "(sb-ext:without-package-locks \
               (unintern 'sb-thread::thread-waiting-for :sb-thread) \
               (unintern 'sb-kernel::dynamic-usage :sb-kernel))"
                .to_string(),
            format!("(load {})", Sexp::string(agent)),
            common::held_mutex("the-lock", "holder", "waiter"),
        ],
        ..Setup::default()
    })
    .await;
    let client = image.client();
    let welcome = client.welcome().await.unwrap();
    assert_eq!(
        welcome.missing_internals,
        ["SB-KERNEL::DYNAMIC-USAGE", "SB-THREAD::THREAD-WAITING-FOR"]
    );
    let has = |flag: &str| welcome.capabilities.iter().any(|c| c == flag);
    assert!(!has("thread-waits"), "{:?}", welcome.capabilities);
    assert!(
        has("thread-tids") && has("pause-timing"),
        "{:?}",
        welcome.capabilities
    );
    // Everything still answers, with what it can still know.
    let waiter = client
        .threads()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name.as_deref() == Some("waiter"))
        .unwrap();
    assert_eq!(waiter.waiting_for, None);
    let memory = client.memory().await.unwrap();
    assert!(memory.heap_used > 0 && memory.heap_used < memory.heap_limit);
}

/// A thread of the image's own, started before the agent, that evaluates the form the test
/// writes to `<dir>/ask.sexp` and writes what it printed to `<dir>/answer.sexp`: a look inside
/// the image that does not go through the agent (whose `:eval` would load the part under test).
fn side_channel(dir: &std::path::Path) -> String {
    format!(
        r#"(sb-thread:make-thread
             (lambda ()
               (loop
                 (if (probe-file {ask})
                     (let ((form (with-open-file (in {ask}) (read in))))
                       (delete-file {ask})
                       (with-open-file (out {tmp} :direction :output :if-exists :supersede)
                         (let ((*print-case* :downcase) (*package* (find-package "CL-USER")))
                           (prin1 (handler-case (eval form) (error (c) (list :failed (princ-to-string c))))
                                  out)))
                       (rename-file {tmp} {answer}))
                     (sleep 0.02))))
             :name "side channel")"#,
        ask = Sexp::string(dir.join("ask.sexp").to_string_lossy()),
        tmp = Sexp::string(dir.join("answer.part").to_string_lossy()),
        answer = Sexp::string(dir.join("answer.sexp").to_string_lossy()),
    )
}

/// Evaluate `form` through the side channel and read back what it printed.
async fn ask(dir: &std::path::Path, form: &str) -> Sexp {
    let answer = dir.join("answer.sexp");
    let _ = std::fs::remove_file(&answer);
    std::fs::write(dir.join("ask.part"), form).unwrap();
    std::fs::rename(dir.join("ask.part"), dir.join("ask.sexp")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answer.exists() {
        assert!(Instant::now() < deadline, "no answer to {form}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Sexp::parse(&std::fs::read_to_string(&answer).unwrap()).unwrap()
}

/// What the image holds of the agent's parts: the parts loaded, whether the control and heap
/// parts' operation functions exist, whether sb-bsd-sockets is loaded, and the classes whose
/// name is in the agent's package (none: every class costs each nursery collection).
const PARTS_FORM: &str = r#"(let ((p (find-package "SBMON-AGENT")))
  (flet ((defined (name) (let ((s (find-symbol name p))) (and s (fboundp s) t))))
    (list :parts (symbol-value (find-symbol "*PARTS-LOADED*" p))
          :control (defined "OP-EVAL")
          :heap (defined "OP-HEAP-HISTOGRAM")
          :sockets (and (find-package "SB-BSD-SOCKETS") t)
          :classes (let ((out '()))
                     (do-symbols (s p out)
                       (when (and (eq (symbol-package s) p) (find-class s nil))
                         (push (symbol-name s) out)))))))"#;

#[tokio::test]
async fn parts_load_on_first_use_once_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let image = Image::start(Setup {
        forms: vec![side_channel(dir.path())],
        allow: ALL,
        ..Setup::default()
    })
    .await;
    let client = image.client();

    // A started agent that has only answered reads carries neither part, no contrib and no
    // class of its own.
    client.threads().await.unwrap();
    client.memory().await.unwrap();
    let before = ask(dir.path(), PARTS_FORM).await;
    for key in ["parts", "control", "heap", "sockets", "classes"] {
        assert_eq!(before.get(key), Some(&Sexp::Nil), "{key}: {before}");
    }

    // A part whose file is missing: a clear error naming it, the agent unharmed, and the next
    // call (the file back) loads it.
    let control_file = r#"(merge-pathnames "sbmon-agent-control.lisp" (symbol-value (find-symbol "*AGENT-DIRECTORY*" "SBMON-AGENT")))"#;
    let moved = ask(
        dir.path(),
        &format!("(progn (rename-file {control_file} \"sbmon-agent-control.away\") t)"),
    )
    .await;
    assert_eq!(moved, Sexp::T, "{moved}");
    let err = client
        .call_raw("gc-run", Sexp::List(vec![]), None)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("UNAVAILABLE") && text.contains("sbmon-agent-control.lisp"),
        "{text}"
    );
    client.memory().await.unwrap();
    let back = ask(
        dir.path(),
        &format!(
            "(progn (rename-file (merge-pathnames \"sbmon-agent-control.away\" {control_file}) {control_file}) t)"
        ),
    )
    .await;
    assert_eq!(back, Sexp::T, "{back}");

    // Several first uses at once, on separate connections: each is answered, and each part is
    // loaded once.
    let clients: Vec<AgentClient> = (0..3).map(|_| image.client()).collect();
    let gc_runs = clients
        .iter()
        .map(|c| c.call_raw("gc-run", Sexp::List(vec![]), Some(Duration::from_secs(60))));
    let histogram = client.call_raw(
        "heap-histogram",
        Sexp::plist([("top", Sexp::Int(3))]),
        Some(Duration::from_secs(60)),
    );
    let (runs, histogram) = tokio::join!(futures::future::join_all(gc_runs), histogram);
    for run in runs {
        let run = run.expect("gc-run after its part loaded");
        assert!(run.get("gc-count-after").is_some(), "{run}");
    }
    histogram.expect("heap-histogram after its part loaded");

    let after = ask(dir.path(), PARTS_FORM).await;
    assert_eq!(after.get("control"), Some(&Sexp::T), "{after}");
    assert_eq!(after.get("heap"), Some(&Sexp::T), "{after}");
    let parts = after.get("parts").and_then(Sexp::as_list).unwrap();
    assert_eq!(parts.len(), 2, "each part once: {after}");
    assert!(parts.contains(&Sexp::keyword("control")) && parts.contains(&Sexp::keyword("heap")));
    // The classes are the parts' own (the control part's output stream, the heap part's
    // records), none of the resident agent's.
    let mut classes: Vec<&str> = after
        .get("classes")
        .and_then(Sexp::as_list)
        .unwrap()
        .iter()
        .filter_map(Sexp::as_str)
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        ["BOUNDED-OUTPUT-STREAM", "HEAP-SNAPSHOT", "WALK"],
        "{after}"
    );
}
