//! An SBCL image that runs SLIME's Swank server (Debian's cl-swank) and a counter thread of
//! its own, but not the agent: what `sbmon attach` meets in the field.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sbmon::swank::Swank;
use sbmon::wire::Sexp;

pub const SWANK_LOADER: &str = "/usr/share/common-lisp/source/slime/swank-loader.lisp";

/// Swank's compiled files, kept under cargo's target directory so runs share them and nothing is
/// left in /tmp. Test binaries run in parallel may get here at once: a file lock makes one compile
/// while the others wait, then they find the fasls fresh and only load them.
fn fasl_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        assert!(
            std::path::Path::new(SWANK_LOADER).exists(),
            "{SWANK_LOADER} is missing: tools/setup installs Debian's cl-swank"
        );
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("swank-fasl");
        std::fs::create_dir_all(&dir).unwrap();
        let lock = std::fs::File::create(dir.join(".lock")).unwrap();
        lock.lock().expect("lock the Swank fasl directory");
        let out = Command::new("sbcl")
            .args([
                "--noinform",
                "--no-sysinit",
                "--no-userinit",
                "--non-interactive",
            ])
            .args(["--eval", &load_swank(&dir)])
            .output()
            .expect("run sbcl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn load_swank(fasl: &std::path::Path) -> String {
    format!(
        "(progn (load {}) (setf (symbol-value (find-symbol \"*FASL-DIRECTORY*\" \"SWANK-LOADER\")) {}) (funcall (find-symbol \"INIT\" \"SWANK-LOADER\")))",
        Sexp::string(SWANK_LOADER),
        Sexp::string(format!("{}/", fasl.display()))
    )
}

/// A free TCP port on loopback (for a moment).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True when some process listens on TCP `port` of this machine.
pub fn listening(port: u16) -> bool {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(3) == Some(&"0A")
            && fields
                .get(1)
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

pub struct SwankImage {
    child: Child,
    pub pid: i32,
    pub port: u16,
    pub home: PathBuf,
    /// `$XDG_RUNTIME_DIR` of the image (and of the sbmon the test runs).
    pub runtime: PathBuf,
}

impl SwankImage {
    /// Start SBCL with Swank on `port`, HOME and XDG_RUNTIME_DIR under `dir`; `slime_secret`
    /// writes `~/.slime-secret` first.
    pub async fn start(dir: &std::path::Path, port: u16, slime_secret: Option<&str>) -> SwankImage {
        let home = dir.join("home");
        let runtime = dir.join("run");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&runtime).unwrap();
        if let Some(secret) = slime_secret {
            std::fs::write(home.join(".slime-secret"), format!("{secret}\n")).unwrap();
        }
        let fasl = fasl_dir().clone();
        let counter = r#"(progn
  (defvar cl-user::*ticks* 0)
  (defvar cl-user::*max-gap-us* 0)
  (defvar cl-user::*orig-gc* (fdefinition 'sb-ext:gc))
  (defvar cl-user::*orig-sub-gc* (fdefinition 'sb-kernel::sub-gc))
  (sb-thread:make-thread
   (lambda ()
     (let ((last (get-internal-real-time)) (keep nil))
       (loop (sleep 0.001)
             (setf keep (make-list 100))
             (let ((now (get-internal-real-time)))
               (setf cl-user::*max-gap-us*
                     (max cl-user::*max-gap-us*
                          (round (* (- now last) 1000000) internal-time-units-per-second))
                     last now)
               (incf cl-user::*ticks*)))))
   :name "counter"))"#;
        let log = std::fs::File::create(dir.join(format!("sbcl-{port}.log"))).unwrap();
        let child = Command::new("sbcl")
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &runtime)
            .args([
                "--noinform",
                "--no-sysinit",
                "--no-userinit",
                "--disable-debugger",
            ])
            .args(["--eval", &load_swank(&fasl)])
            .args(["--eval", counter])
            .args([
                "--eval",
                &format!(
                    "(funcall (find-symbol \"CREATE-SERVER\" \"SWANK\") :port {port} :dont-close t)"
                ),
            ])
            .args(["--eval", "(loop (sleep 3600))"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sbcl");
        let pid = child.id() as i32;
        let image = SwankImage {
            child,
            pid,
            port,
            home,
            runtime,
        };
        // Wait by reading the kernel's socket table: a connection that closes without the
        // secret would make Swank give up its listener.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !listening(port) {
            assert!(Instant::now() < deadline, "Swank did not start on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        image
    }

    /// Evaluate `form` through a Swank connection of the test's own; the printed value.
    pub async fn eval(&self, form: &str) -> String {
        let secret = std::fs::read_to_string(self.home.join(".slime-secret"))
            .ok()
            .map(|s| {
                (
                    s.trim_end_matches('\n').to_string(),
                    self.home.join(".slime-secret"),
                )
            });
        let mut swank = Swank::connect("127.0.0.1", self.port, secret, Duration::from_secs(10))
            .await
            .expect("connect to swank");
        swank
            .eval(form, Duration::from_secs(30))
            .await
            .expect("swank eval")
    }

    /// The names of the image's threads (/proc/PID/task/*/comm), sorted.
    pub fn thread_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .map(|s| s.trim_end().to_string())
            .collect();
        names.sort();
        names
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .unwrap()
            .count()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SwankImage {
    fn drop(&mut self) {
        self.stop();
    }
}
