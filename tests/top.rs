//! `sbmon top` against a real image: its rendering from real tool answers (ratatui's test
//! backend), `--once`, and the binary driven in a real terminal (tmux): names, CPU order, a
//! backtrace on Enter, a killed target, and the terminal given back after `q`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Image, Setup};
use sbmon::samples::Settings;
use sbmon::top::app::{App, SortBy};
use sbmon::top::{buffer_text, read, render_to_buffer};
use tokio_util::sync::CancellationToken;

/// A thread named `name` spinning in `sbmon-test::top-spin` (easy to find in a backtrace).
fn spinner(name: &str) -> Vec<String> {
    vec![
        // Fixnum arithmetic only: with generic arithmetic the thread spends much of its time in
        // an assembly routine (SB-VM::GENERIC-=) that has no frame of its own, and a backtrace
        // taken there names the routine in place of TOP-SPIN.
        "(defun sbmon-test::top-spin () (let ((x 0)) (declare (fixnum x)) (loop (setf x (mod (1+ x) 1000)))))".into(),
        format!(
            "(sb-thread:make-thread #'sbmon-test::top-spin :name {})",
            sbmon::wire::Sexp::string(name)
        ),
    ]
}

async fn image() -> Image {
    let mut forms = spinner("top-spinner");
    forms.push(common::sleeper("top-napper"));
    forms.push(common::sleeper("another-napper"));
    Image::start(Setup {
        forms,
        ..Setup::default()
    })
    .await
}

/// The table's data rows: the lines after the header, first word = thread name prefix.
fn table_rows(screen: &str) -> Vec<String> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("NAME"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn renders_real_answers_and_sorts_by_cpu_and_name() {
    let image = image().await;
    let catalog = image.catalog();
    // The sampler top runs, so memory_trend reads history instead of sampling for minutes.
    let stop = CancellationToken::new();
    let settings = Settings::new(Duration::from_secs(1), Duration::from_secs(60)).unwrap();
    let sampler = tokio::spawn(sbmon::sampler::run(
        catalog.context().targets.clone(),
        settings,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let mut app = App::new("test".into(), 1.0);
    app.apply(read(&catalog, Duration::from_secs(10)).await);
    assert!(app.not_answering.is_none(), "{:?}", app.part_errors);
    assert!(app.part_errors.is_empty(), "{:?}", app.part_errors);

    for (w, h) in [(100, 30), (80, 24)] {
        let screen = buffer_text(&render_to_buffer(&app, w, h));
        for name in ["top-spinner", "top-napper", "another-napper"] {
            assert!(
                screen.contains(name),
                "{name} missing at {w}x{h}:\n{screen}"
            );
        }
        assert!(screen.contains("heap"), "{screen}");
        assert!(screen.contains(&format!("pid {}", image.pid())), "{screen}");
        assert!(screen.contains("q quit"), "{screen}");
        let rows = table_rows(&screen);
        assert!(
            rows[0].starts_with("top-spinner"),
            "sorted by CPU, the spinning thread comes first at {w}x{h}:\n{screen}"
        );
    }

    app.sort_by(SortBy::Name);
    let screen = buffer_text(&render_to_buffer(&app, 100, 30));
    let rows = table_rows(&screen);
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r.split("  ").next().unwrap_or("").trim())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_by_key(|n| n.to_lowercase());
    assert_eq!(names, sorted, "sorted by name:\n{screen}");
    assert!(names[0] == "another-napper", "{screen}");

    // The target dies: the screen says so and keeps the last threads it saw.
    drop(image);
    app.apply(read(&catalog, Duration::from_secs(5)).await);
    assert!(app.not_answering.is_some());
    let screen = buffer_text(&render_to_buffer(&app, 80, 24));
    assert!(screen.contains("NOT ANSWERING"), "{screen}");
    assert!(screen.contains("top-spinner"), "{screen}");
    stop.cancel();
    sampler.await.unwrap();
}

#[tokio::test]
async fn once_prints_a_frame_with_the_threads_and_fails_on_a_dead_target() {
    let image = image().await;
    let target = image.sbcl.address.to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(["top", "--once", "--target", &target])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["top-spinner", "top-napper", "another-napper"] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert_eq!(text.lines().count(), 30, "a 100x30 frame:\n{text}");
    assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
    assert!(
        table_rows(&text)[0].starts_with("top-spinner"),
        "the spinner first:\n{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("unix:{}", dir.path().join("none.sock").display());
    let out = Command::new(env!("CARGO_BIN_EXE_sbmon"))
        .args(["top", "--once", "--target", &nowhere])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("NOT ANSWERING"), "{text}");
}

/// A tmux server of the test's own (its own socket name), killed when the test ends.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(name: &str) -> Tmux {
        Tmux {
            socket: format!("sbmon-test-{name}-{}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux is installed by tools/setup");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend(keys);
        self.run(&args);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// The screen once `ok` holds for it; fails with the screen after `within`.
    fn wait_for(&self, what: &str, within: Duration, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

#[tokio::test]
async fn top_in_a_real_terminal() {
    let image = image().await;
    let tmux = Tmux::new("top");
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "100",
        "-y",
        "30",
        "bash --norc --noprofile",
    ]);
    let command = format!(
        "echo BEFORE-TOP-MARK; {} top --interval 1 --target {}",
        env!("CARGO_BIN_EXE_sbmon"),
        image.sbcl.address
    );
    tmux.keys(&[&command, "Enter"]);
    let wait = Duration::from_secs(30);

    // The threads, the spinning one first (sorted by CPU is the default).
    let screen = tmux.wait_for("the spinner first", wait, |s| {
        s.contains("top-napper")
            && s.contains("another-napper")
            && table_rows(s)
                .first()
                .is_some_and(|r| r.starts_with("top-spinner"))
    });
    assert!(
        !screen.contains("BEFORE-TOP-MARK"),
        "the alternate screen:\n{screen}"
    );
    assert!(screen.contains("[c]cpu"), "{screen}");

    // Sorted by name, another-napper comes first; back to CPU.
    tmux.keys(&["n"]);
    tmux.wait_for("sorted by name", wait, |s| {
        s.contains("[n]name")
            && table_rows(s)
                .first()
                .is_some_and(|r| r.starts_with("another-napper"))
    });
    tmux.keys(&["c"]);
    tmux.wait_for("sorted by CPU again", wait, |s| {
        table_rows(s)
            .first()
            .is_some_and(|r| r.starts_with("top-spinner"))
    });

    // Home selects the first row (the spinner); Enter shows its backtrace; Esc goes back.
    tmux.keys(&["Home", "Enter"]);
    tmux.wait_for("the spinner's backtrace", wait, |s| {
        s.contains("backtrace of top-spinner") && s.contains("TOP-SPIN")
    });
    tmux.keys(&["Escape"]);
    tmux.wait_for("the table again", wait, |s| s.contains("WAITS FOR"));

    // The target dies: top stays up and says so.
    let pid = image.pid();
    drop(image);
    assert!(!common::process_exists(pid));
    tmux.wait_for("not answering", wait, |s| s.contains("NOT ANSWERING"));
    tmux.keys(&["j", "k"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(tmux.screen().contains("NOT ANSWERING"));

    // q: top exits, the shell's screen is back as it was, and the shell takes commands.
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("the shell's screen", wait, |s| {
        s.contains("BEFORE-TOP-MARK") && !s.contains("WAITS FOR")
    });
    assert!(!screen.contains("NOT ANSWERING"), "{screen}");
    tmux.keys(&["echo AFTER-TOP-$((6*7))", "Enter"]);
    tmux.wait_for("the shell to answer", wait, |s| s.contains("AFTER-TOP-42"));
    let command = tmux.run(&[
        "display-message",
        "-p",
        "-t",
        "top",
        "#{pane_current_command}",
    ]);
    assert_eq!(command.trim(), "bash");
    // Raw mode is off again: the terminal echoes and cooks lines (stty reports icanon).
    tmux.keys(&[
        "stty -a | tr ' ' '\\n' | grep -x -e icanon -e echo | tr '\\n' ,",
        "Enter",
    ]);
    tmux.wait_for("cooked mode", wait, |s| s.contains("icanon,echo,"));
}
