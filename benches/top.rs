//! What `sbmon top` costs while it runs: the real binary in a real pseudo-terminal (120x40),
//! refreshing every second against a real SBCL whose 8 threads each sleep 0.05 s in a loop.
//! Over the same window it reads sbmon's CPU (utime + stime from `/proc/PID/stat`, 10 ms
//! ticks) and peak RSS (`VmHWM`), and the image's CPU; for comparison, the image's CPU with
//! nothing watching, and `sbmon serve --sample-interval 1` (the sampler alone) over the same
//! window.
//!
//! Figures for `tools/bench`: `top.cpu_percent`, `top.rss_max`, `top.screen_bytes_per_s`,
//! `serve.cpu_percent`, `image.cpu_percent.quiet|serve|top`.
//!
//! Run: `cargo bench --bench top` (BENCH_SECONDS=N per window).

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod support;

use sbmon::launch::LaunchOptions;

const BENCH: &str = "top";

const NAPPERS: &str = "(dotimes (i 8) (sb-thread:make-thread (lambda () (loop (sleep 0.05))) \
    :name (format nil \"bench napper ~d\" i)))";

/// `sbmon top`, killed and reaped when dropped, also when the bench panics.
struct Top(std::process::Child);

impl Drop for Top {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak resident set of `pid`, bytes (`VmHWM`).
fn rss_max(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// A pseudo-terminal of 120x40: (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors, which we then own.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// CPU percent of `pid` over `window`.
async fn cpu_over(pid: i32, window: Duration) -> f64 {
    let before = support::cpu_seconds(pid);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    (support::cpu_seconds(pid) - before) / start.elapsed().as_secs_f64() * 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let window = support::window(30.0, 5.0);
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("bench.sock");
    let mut sbcl = support::start_image(
        &socket,
        LaunchOptions {
            before_start: vec![NAPPERS.into()],
            ..LaunchOptions::default()
        },
        Duration::from_secs(60),
    )
    .await;
    let target = format!("unix:{}", socket.display());
    let quiet = cpu_over(sbcl.pid, window).await;

    // The sampler alone, as `serve` runs it every second; image and sbmon over one window.
    let serve = support::Sbmon::serve(&[
        "--target".into(),
        format!("app={target}"),
        "--sample-interval".into(),
        "1".into(),
    ]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (serve_before, image_before) = (
        support::cpu_seconds(serve.pid()),
        support::cpu_seconds(sbcl.pid),
    );
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = start.elapsed().as_secs_f64();
    let serve_cpu = (support::cpu_seconds(serve.pid()) - serve_before) / elapsed * 100.0;
    let image_serve = (support::cpu_seconds(sbcl.pid) - image_before) / elapsed * 100.0;
    drop(serve);

    // `sbmon top` in a pseudo-terminal, its session's controlling terminal.
    let (master, slave) = pty();
    let mut command = Command::new(env!("CARGO_BIN_EXE_sbmon"));
    command
        .args(["top", "--interval", "1", "--target", &target])
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut top = Top(command.spawn().expect("start sbmon top"));
    // The command holds our copies of the terminal's slave side: closed, the master sees the
    // end of the screen when top exits.
    drop(command);
    // The screen goes to the master side; it is read (and counted) so top never blocks.
    let screen_bytes = Arc::new(AtomicU64::new(0));
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    let counted = screen_bytes.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            counted.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let pid = top.0.id() as i32;
    // Its first frames and the sampler's first readings, then the window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        top.0.try_wait().unwrap().is_none(),
        "sbmon top exited early ({} bytes of screen)",
        screen_bytes.load(Ordering::Relaxed)
    );
    let (top_before, image_before, bytes_before) = (
        support::cpu_seconds(pid),
        support::cpu_seconds(sbcl.pid),
        screen_bytes.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = start.elapsed().as_secs_f64();
    let top_cpu = (support::cpu_seconds(pid) - top_before) / elapsed * 100.0;
    let image_top = (support::cpu_seconds(sbcl.pid) - image_before) / elapsed * 100.0;
    let bytes = (screen_bytes.load(Ordering::Relaxed) - bytes_before) as f64 / elapsed;
    let peak = rss_max(pid);
    assert!(bytes > 0.0, "top drew nothing in {elapsed:.0} s");
    // `q` quits top as a person would; kill it if it does not within 5 s.
    let mut writer = std::fs::File::from(master);
    let _ = std::io::Write::write_all(&mut writer, b"q");
    let deadline = Instant::now() + Duration::from_secs(5);
    while top.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(top);
    sbcl.stop();

    println!(
        "{:.0} s windows, load average {:.2}:",
        window.as_secs_f64(),
        support::load_average()
    );
    println!("  nothing watching:                  image {quiet:.2} % CPU");
    println!(
        "  sbmon serve --sample-interval 1:   sbmon {serve_cpu:.2} % CPU, image {image_serve:.2} % CPU"
    );
    println!(
        "  sbmon top --interval 1:            sbmon {top_cpu:.2} % CPU, {:.1} MiB peak RSS, {:.0} bytes of screen a second; image {image_top:.2} % CPU",
        peak as f64 / 1048576.0,
        bytes
    );
    support::record(BENCH, "top.cpu_percent", top_cpu, "percent");
    support::record(BENCH, "top.rss_max", peak as f64, "bytes");
    support::record(BENCH, "top.screen_bytes_per_s", bytes, "count");
    support::record(BENCH, "serve.cpu_percent", serve_cpu, "percent");
    support::record(BENCH, "image.cpu_percent.quiet", quiet, "percent");
    support::record(BENCH, "image.cpu_percent.serve", image_serve, "percent");
    support::record(BENCH, "image.cpu_percent.top", image_top, "percent");
}
