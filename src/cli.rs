//! The command line: `sbmon call`, `sbmon targets`, `sbmon tools`, `sbmon demo`, `sbmon
//! profile`. It adapts the tool catalog for scripts: JSON on stdout (or, with `call --text`,
//! the summary people read), errors on stderr, exit codes 0 (success), 1 (the tool failed)
//! and 2 (usage: unknown tool, malformed arguments, bad flags). `sbmon check` (`check.rs`)
//! speaks to monitoring systems instead, with their exit codes 0..3; `sbmon top` is in `top/`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use tokio::sync::broadcast::error::RecvError;

use crate::agent::{Address, AgentClient, ClientOptions, address};
use crate::audit::Audit;
use crate::config::Config;
use crate::launch::AgentAllow;
use crate::samples::Settings;
use crate::serve::{ServeError, ServeOptions};
use crate::targets::{Listing, Target, default_name};
use crate::tools::{self, Allow, Catalog};

pub mod check;

#[derive(Debug, Parser)]
#[command(name = "sbmon", version, about = "Watch and steer live SBCL images")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one tool and print its JSON result (or, with --text, its summary).
    Call(CallArgs),
    /// List the agents found in the runtime directory.
    Targets {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// First remove the sockets of processes that no longer exist (only agent sockets of
        /// the runtime directory).
        #[arg(long)]
        prune: bool,
    },
    /// Load the agent into a running image through its Swank server, start it, print its
    /// target spec.
    Attach(AttachArgs),
    /// Stop the agent of an image through its Swank server, leaving the image as before the
    /// attach.
    Detach(DetachArgs),
    /// List the tools this sbmon would offer (read tools; --allow adds control and eval).
    Tools {
        /// Also list control and/or eval tools, as `--allow` on serve or call offers them.
        #[arg(long, value_delimiter = ',', value_name = "CLASS")]
        allow: Vec<AllowClass>,
    },
    /// Serve the tools: MCP over stdio and/or HTTP (MCP at /mcp, JSON-RPC at /rpc).
    Serve(ServeArgs),
    /// Start SBCL with the agent and serve it as `serve` would; SBCL stops when sbmon does.
    Launch(LaunchArgs),
    /// Start a demo workload in SBCL with the agent and show a live summary.
    Demo(DemoArgs),
    /// Print each garbage collection of an image as it happens, one JSON object per line.
    Events(EventsArgs),
    /// Grade an image's health as a Nagios/Icinga check plugin: one status line with
    /// performance data; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Check(check::CheckArgs),
    /// Profile an image (profile_cpu, so it needs --allow control) and write a flame graph
    /// (SVG), a speedscope file, folded stacks or a table.
    Profile(ProfileArgs),
    /// A full-screen live view of one image: health, heap, GC, and its threads.
    Top(TopArgs),
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub agent: TargetArgs,
    /// Seconds between refreshes (0.2..60).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub interval: f64,
    /// Print one plain-text frame and exit (exit 1 when the image does not answer).
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// How to talk to agents, shared by the commands that do.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Seconds an agent call may take.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Health thresholds (TOML; see the README).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Tool classes beyond `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AllowClass {
    /// memory_gc, gc_tune, thread_kill, profile_cpu
    Control,
    /// repl_eval, code_reload_system
    Eval,
}

fn allow_of(classes: &[AllowClass]) -> Allow {
    Allow {
        control: classes.contains(&AllowClass::Control),
        eval: classes.contains(&AllowClass::Eval),
    }
}

/// What this sbmon may do beyond reading, and where its actions are recorded.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Offer control and/or eval tools, e.g. --allow control,eval (default: read-only).
    #[arg(long, value_delimiter = ',', value_name = "CLASS")]
    pub allow: Vec<AllowClass>,
    /// Also append the audit log of control and eval calls to FILE (JSON Lines; always on
    /// stderr).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
}

impl PolicyArgs {
    fn allow(&self) -> Allow {
        allow_of(&self.allow)
    }

    fn audit(&self) -> Result<Audit, String> {
        match &self.audit_log {
            Some(path) => Audit::to_file(path)
                .map_err(|e| format!("cannot open the audit log {}: {e}", path.display())),
            None => Ok(Audit::default()),
        }
    }
}

/// Which one agent a command talks to.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The agent: unix:PATH, tcp:HOST:PORT or pid:N. Default: the only live agent in the
    /// runtime directory.
    #[arg(long, value_name = "SPEC")]
    pub target: Option<String>,
    /// File holding the token of a TCP agent (default ~/.sbmon-secret).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// How to reach an image's Swank server.
#[derive(Debug, Args)]
pub struct SwankArgs {
    /// The image's Swank server, HOST:PORT (this machine only).
    #[arg(long, value_name = "HOST:PORT")]
    pub swank: crate::attach::SwankAddress,
    /// The Swank secret (default: ~/.slime-secret when it exists, as SLIME does).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Seconds loading and starting (or stopping) the agent may take.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    pub timeout: f64,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub swank: SwankArgs,
    /// Name the image (the target's name, kept across restarts).
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// Where the agent listens (default: <runtime dir>/<pid>[-<name>].sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Operation classes the agent serves beyond read, e.g. --allow control,eval.
    #[arg(long, value_delimiter = ',', value_name = "CLASS")]
    pub allow: Vec<AllowClass>,
    /// Print the outcome as JSON instead of the target spec.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    #[command(flatten)]
    pub swank: SwankArgs,
    /// The agent to stop, checked to be that of the image behind --swank before anything is
    /// stopped.
    #[arg(long, value_name = "SPEC")]
    pub target: Option<String>,
}

fn parse_name(name: &str) -> Result<String, String> {
    crate::attach::check_name(name).map(|()| name.to_string())
}

#[derive(Debug, Args)]
pub struct CallArgs {
    /// Tool name (see `sbmon tools`).
    pub tool: String,
    /// Arguments as a JSON object, e.g. '{"thread_id": "worker-1"}'.
    pub args: Option<String>,
    /// Print the tool's text summary (what MCP shows a person) instead of JSON.
    #[arg(long, conflicts_with = "json")]
    pub text: bool,
    /// Print the tool's JSON result (the default).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub agent: TargetArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// What `sbmon profile` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileFormat {
    /// An interactive SVG flame graph (open it in a browser).
    Svg,
    /// speedscope's JSON file format (https://www.speedscope.app).
    Speedscope,
    /// Folded stacks, `a;b;c N` per line (what flame graph tools read).
    Folded,
    /// The top functions by self samples, as text.
    Table,
}

/// What `sbmon profile` samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileModeArg {
    /// Where CPU time goes.
    Cpu,
    /// Where allocation happens.
    Alloc,
    /// Wall-clock samples, waiting threads included.
    Time,
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// How long to sample (0.1..60 seconds).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub seconds: f64,
    #[arg(long, value_enum, default_value_t = ProfileModeArg::Cpu)]
    pub mode: ProfileModeArg,
    #[arg(long, value_enum, default_value_t = ProfileFormat::Svg)]
    pub format: ProfileFormat,
    /// Write to FILE instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Draw a differential flame graph against BASE.folded (an earlier `--format folded`):
    /// this profile's shape, red where it has more samples, blue where fewer (SVG only).
    #[arg(long, value_name = "BASE.folded")]
    pub diff: Option<PathBuf>,
    /// Keep trampolines, foreign frames, SB-THREAD::RUN and sb-sprof's own frames.
    #[arg(long)]
    pub keep_runtime_frames: bool,
    #[command(flatten)]
    pub agent: TargetArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub agent: TargetArgs,
    /// Stop after N events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after SECONDS.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct FrontEndArgs {
    /// MCP on stdin/stdout (stdout then carries protocol only; logs go to stderr).
    #[arg(long)]
    pub stdio: bool,
    /// Serve HTTP on ADDR (IP:PORT, localhost:PORT or [::1]:PORT): MCP at /mcp, JSON-RPC at
    /// /rpc, the web console at /.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9405",
          value_parser = parse_listen)]
    pub http: Option<std::net::SocketAddr>,
    /// The URL Prometheus and people reach this sbmon at, when not the listen address (behind
    /// a proxy, or listening on 0.0.0.0); `/sd` advertises its host and port.
    #[arg(long, value_name = "URL")]
    pub external_url: Option<String>,
    /// Require `Authorization: Bearer TOKEN` on every HTTP endpoint but /health/live; needed
    /// to bind an address other than loopback.
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the bearer token from FILE.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// File holding the token of TCP agents (default ~/.sbmon-secret).
    #[arg(long, value_name = "FILE")]
    pub agent_token_file: Option<PathBuf>,
    /// Read every target every SECONDS (1..60) for memory_trend and windowed health checks.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub sample_interval: u64,
    /// Keep SECONDS of samples per target (up to 86400; 160 bytes a sample).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub sample_history: u64,
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// An image to watch, as [NAME=]SPEC (SPEC: unix:PATH, tcp:HOST:PORT, pid:N); repeatable.
    /// Without it, sbmon watches every live agent of the runtime directory.
    #[arg(long = "target", value_name = "[NAME=]SPEC")]
    pub targets: Vec<String>,
    /// Attach to the image behind a Swank server, at start and again whenever its agent is
    /// gone (the image restarted); repeatable. NAME (default swank-PORT) names the target.
    #[arg(long = "attach", value_name = "[NAME=]swank:HOST:PORT")]
    pub attach: Vec<String>,
    /// The Swank secret for --attach (default: ~/.slime-secret when it exists).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub front: FrontEndArgs,
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub front: FrontEndArgs,
    /// The SBCL executable.
    #[arg(long, default_value = "sbcl")]
    pub sbcl: PathBuf,
    /// Name the image (the target's name).
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// Arguments for SBCL, after `--` (e.g. -- --dynamic-space-size 2GB --load app.lisp).
    #[arg(last = true, value_name = "SBCL-ARGS")]
    pub sbcl_args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// The SBCL executable.
    #[arg(long, default_value = "sbcl")]
    pub sbcl: PathBuf,
}

/// Parse the command line. A mistake in it exits as clap does (2 with its message), except
/// under `check`, whose callers (monitoring systems) read 3 as "could not check".
pub fn parse() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        let under_check = std::env::args_os().nth(1).is_some_and(|a| a == "check");
        if under_check && e.use_stderr() {
            let _ = e.print();
            check::bad_arguments(&e.to_string())
        } else {
            e.exit()
        }
    })
}

/// Entry point of the binary.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sbmon: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Call(args) => call(args).await,
            Command::Serve(args) => serve(args).await,
            Command::Launch(args) => launch(args).await,
            Command::Targets { json, prune } => targets(json, prune).await,
            Command::Attach(args) => attach(args).await,
            Command::Detach(args) => detach(args).await,
            Command::Tools { allow } => tools(&allow),
            Command::Demo(args) => crate::demo::run(args.sbcl, args.duration).await,
            Command::Events(args) => events(args).await,
            Command::Check(args) => check::run(args).await,
            Command::Top(args) => top(args).await,
            Command::Profile(args) => profile(args).await,
        }
    })
}

const USAGE: u8 = 2;

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("sbmon: {message}");
    ExitCode::from(code)
}

fn print_json<T: Serialize>(value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

/// The address to use: `--target`, else the only live agent of the runtime directory.
fn choose_address(spec: Option<&str>) -> Result<Address, (u8, String)> {
    if let Some(spec) = spec {
        return spec.parse().map_err(|e| (USAGE, format!("{e}")));
    }
    let dir = address::runtime_dir();
    let found = address::discover_in(&dir);
    let live: Vec<_> = found.iter().filter(|f| f.process_alive).collect();
    match live.as_slice() {
        [one] => Ok(Address::Unix(one.path.clone())),
        [] => Err((
            1,
            format!(
                "no live agent in {}{}; start one with (sbmon-agent:start), or pass --target",
                dir.display(),
                if found.is_empty() {
                    String::new()
                } else {
                    format!(" ({} stale socket(s))", found.len())
                }
            ),
        )),
        several => Err((
            1,
            format!(
                "several agents are running; pass --target with one of: {}",
                several
                    .iter()
                    .map(|f| format!("pid:{}", f.pid))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn client_options(
    args: &ClientArgs,
    token_file: Option<&PathBuf>,
) -> Result<ClientOptions, String> {
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        return Err("--timeout must be between 0 and 3600 seconds".into());
    }
    Ok(ClientOptions {
        call_timeout: Duration::from_secs_f64(args.timeout),
        token_file: token_file.cloned(),
        ..ClientOptions::default()
    })
}

fn client_and_config(
    args: &ClientArgs,
    token_file: Option<&PathBuf>,
) -> Result<(ClientOptions, Config), String> {
    let options = client_options(args, token_file)?;
    let config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    Ok((options, config))
}

/// An HTTP token that is long, and made of visible characters only: a header value is
/// trimmed, so a token of spaces would be a token anyone could send.
fn check_token(token: &str) -> Result<(), String> {
    if token.chars().count() < 16 {
        return Err("the HTTP token must be at least 16 characters".into());
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(
            "the HTTP token must be visible ASCII characters only (no spaces or control \
             characters); e.g. openssl rand -hex 16"
                .into(),
        );
    }
    Ok(())
}

/// `IP:PORT`, or `localhost:PORT` (loopback, the name people type).
fn parse_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    match text.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => port
            .parse::<u16>()
            .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|_| format!("{port:?} is not a port number")),
        _ => Err(format!(
            "{text:?} is not an address: use IP:PORT (127.0.0.1:9405, [::1]:9405) or \
             localhost:PORT"
        )),
    }
}

fn serve_options(front: &FrontEndArgs) -> Result<ServeOptions, String> {
    let (client, config) = client_and_config(&front.client, front.agent_token_file.as_ref())?;
    let token = match (&front.token, &front.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Some(token) = &token {
        check_token(token)?;
    }
    if let Some(url) = &front.external_url
        && crate::serve::url_authority(url).is_none()
    {
        return Err(format!(
            "--external-url {url:?} has no host: give e.g. http://mon.example:9405"
        ));
    }
    let sampling = Settings::new(
        Duration::from_secs(front.sample_interval),
        Duration::from_secs(front.sample_history),
    )?;
    Ok(ServeOptions {
        sampling,
        allow: front.policy.allow(),
        audit: front.policy.audit()?,
        token,
        external_url: front.external_url.clone(),
        stdio: front.stdio,
        // Neither front end named: serve HTTP on the default address.
        http: match (front.stdio, front.http) {
            (false, None) => Some(([127, 0, 0, 1], 9405).into()),
            (_, http) => http,
        },
        client,
        config,
    })
}

/// `[NAME=]SPEC` from the command line.
fn parse_target(arg: &str, options: &ClientOptions) -> Result<Target, String> {
    let (name, spec) = match arg.split_once('=') {
        Some((name, spec)) if !name.contains(':') => (Some(name), spec),
        _ => (None, arg),
    };
    let address: Address = spec.parse().map_err(|e| format!("{e}"))?;
    let name = name.map_or_else(|| default_name(&address), str::to_string);
    Ok(Target::new(name, address, options.clone()))
}

async fn serve(args: ServeArgs) -> ExitCode {
    let options = match serve_options(&args.front) {
        Ok(o) => o,
        Err(e) => return fail(USAGE, e),
    };
    let targets = if args.targets.is_empty() {
        None
    } else {
        let parsed: Result<Vec<Target>, String> = args
            .targets
            .iter()
            .map(|t| parse_target(t, &options.client))
            .collect();
        match parsed {
            Ok(list) => Some(list),
            Err(e) => return fail(USAGE, e),
        }
    };
    let attach = match args
        .attach
        .iter()
        .map(|spec| crate::attach::parse_attach_spec(spec))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(list) => list,
        Err(e) => return fail(USAGE, e),
    };
    let attach = crate::serve::AttachAll {
        images: attach,
        secret_file: args.secret_file.clone(),
        allow: AgentAllow {
            control: options.allow.control,
            eval: options.allow.eval,
        },
    };
    match crate::serve::serve_attaching(options, targets, attach).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ServeError::NoFrontEnd | e @ ServeError::NotLoopback(_)) => fail(USAGE, e),
        Err(e) => fail(1, e),
    }
}

async fn launch(args: LaunchArgs) -> ExitCode {
    let options = match serve_options(&args.front) {
        Ok(o) => o,
        Err(e) => return fail(USAGE, e),
    };
    match crate::serve::launch(options, args.sbcl, args.name, args.sbcl_args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ServeError::NoFrontEnd | e @ ServeError::NotLoopback(_)) => fail(USAGE, e),
        Err(e) => fail(1, e),
    }
}

/// A one-target catalog for running `tool` from the command line, under the policy the
/// operator gave; or the exit that says why not (usage, or no agent found).
fn catalog_for(
    tool: &str,
    agent: &TargetArgs,
    client: &ClientArgs,
    policy: &PolicyArgs,
) -> Result<Catalog, ExitCode> {
    let (options, config) =
        client_and_config(client, agent.token_file.as_ref()).map_err(|e| fail(USAGE, e))?;
    let audit = policy.audit().map_err(|e| fail(USAGE, e))?;
    let address =
        choose_address(agent.target.as_deref()).map_err(|(code, message)| fail(code, message))?;
    let catalog = Catalog::single_target(address, options, config, policy.allow(), audit);
    catalog.check(tool).map_err(|e| fail(USAGE, e))?;
    Ok(catalog)
}

async fn call(args: CallArgs) -> ExitCode {
    let tool_args: serde_json::Value = match &args.args {
        None => serde_json::Value::Null,
        Some(text) => match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return fail(USAGE, format!("arguments are not valid JSON: {e}")),
        },
    };
    if tools::find(&args.tool).is_none() {
        return fail(
            USAGE,
            format!(
                "unknown tool {:?}; `sbmon tools` lists the tools",
                args.tool
            ),
        );
    }
    let catalog = match catalog_for(&args.tool, &args.agent, &args.client, &args.policy) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    match catalog.call_from("cli", &args.tool, tool_args).await {
        Ok(called) if args.text => {
            println!("{}", called.summary);
            ExitCode::SUCCESS
        }
        Ok(called) => print_json(&called.value),
        Err(e) if e.is_usage() => fail(USAGE, e),
        Err(e) => fail(1, e),
    }
}

/// Largest BASE.folded `sbmon profile --diff` reads.
const MAX_FOLDED_BYTES: u64 = 64 << 20;

fn read_folded(path: &std::path::Path) -> Result<Vec<crate::flame::FoldedStack>, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if size > MAX_FOLDED_BYTES {
        return Err(format!(
            "{} is {size} bytes; a folded profile of sbmon's is far below {MAX_FOLDED_BYTES}",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    crate::flame::parse_folded(&text).map_err(|e| format!("{}: {e}", path.display()))
}

async fn profile(args: ProfileArgs) -> ExitCode {
    use crate::flame;
    use crate::tools::control::Profile;
    if args.diff.is_some() && args.format != ProfileFormat::Svg {
        return fail(USAGE, "--diff draws an SVG: use it with --format svg");
    }
    let base = match args.diff.as_deref().map(read_folded) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => return fail(USAGE, e),
    };
    let catalog = match catalog_for("profile_cpu", &args.agent, &args.client, &args.policy) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    let mode = match args.mode {
        ProfileModeArg::Cpu => "cpu",
        ProfileModeArg::Alloc => "alloc",
        ProfileModeArg::Time => "time",
    };
    let request = serde_json::json!({
        "seconds": args.seconds,
        "mode": mode,
        "max_rows": 40,
        "max_stacks": 1000,
        "keep_runtime_frames": args.keep_runtime_frames,
    });
    let called = match catalog.call_from("cli", "profile_cpu", request).await {
        Ok(called) => called,
        Err(e) if e.is_usage() => return fail(USAGE, e),
        Err(e) => return fail(1, e),
    };
    let profile: Profile = match serde_json::from_value(called.value) {
        Ok(p) => p,
        Err(e) => return fail(1, format!("cannot read profile_cpu's result: {e}")),
    };
    let count_name = if mode == "alloc" {
        "samples (allocation regions)"
    } else {
        "samples"
    };
    let title = format!(
        "sbmon profile: {} mode, {} s, {} samples",
        profile.mode, profile.seconds, profile.samples
    );
    let bytes = match (args.format, &base) {
        (ProfileFormat::Table, _) => called.summary.into_bytes(),
        (ProfileFormat::Folded, _) => flame::folded_text(&profile.stacks).into_bytes(),
        (ProfileFormat::Speedscope, _) => {
            let file = flame::speedscope(&title, &profile.stacks);
            match serde_json::to_vec(&file) {
                Ok(v) => v,
                Err(e) => return fail(1, e),
            }
        }
        (ProfileFormat::Svg, None) if profile.stacks.is_empty() => {
            return fail(1, "the profile has no samples: nothing to draw");
        }
        (ProfileFormat::Svg, None) => match flame::svg(&title, count_name, &profile.stacks) {
            Ok(v) => v,
            Err(e) => return fail(1, format!("cannot draw the flame graph: {e}")),
        },
        (ProfileFormat::Svg, Some(base)) => {
            match flame::diff_svg(
                &format!("{title} (differential)"),
                count_name,
                base,
                &profile.stacks,
            ) {
                Ok(v) => v,
                Err(e) => return fail(1, format!("cannot draw the flame graph: {e}")),
            }
        }
    };
    let written = match &args.output {
        Some(path) => std::fs::write(path, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|()| {
                    if args.format == ProfileFormat::Table {
                        out.write_all(b"\n")
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| format!("cannot write to stdout: {e}"))
        }
    };
    match written {
        Ok(()) => {
            eprintln!(
                "sbmon: {} samples over {} s ({} mode, {} distinct stacks{})",
                profile.samples,
                profile.seconds,
                profile.mode,
                profile.stacks.len(),
                args.output
                    .as_ref()
                    .map_or(String::new(), |p| format!(", written to {}", p.display()))
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

async fn events(args: EventsArgs) -> ExitCode {
    let options = match client_options(&args.client, args.agent.token_file.as_ref()) {
        Ok(o) => o,
        Err(e) => return fail(USAGE, e),
    };
    let duration = match args.duration {
        Some(s) if !(s.is_finite() && s > 0.0 && s <= 1e9) => {
            return fail(USAGE, "--duration must be a positive number of seconds");
        }
        d => d.map(Duration::from_secs_f64),
    };
    let address = match choose_address(args.agent.target.as_deref()) {
        Ok(a) => a,
        Err((code, message)) => return fail(code, message),
    };
    let target = Target::new(default_name(&address), address, options);
    // Fail at once on an agent that is not there; later outages are ridden out.
    if let Err(e) = target.client.welcome().await {
        return fail(1, e);
    }
    let feed = target.gc_feed();
    let mut rx = feed.follow();
    let mut status = feed.status();
    let until = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let mut seen = 0;
    while args.count.is_none_or(|n| seen < n) {
        tokio::select! {
            event = rx.recv() => match event {
                Ok(gc) => {
                    let line = serde_json::to_string(&gc).unwrap_or_default();
                    // A closed pipe (`| head -3`) ends the command quietly.
                    if writeln!(std::io::stdout(), "{line}").is_err() {
                        break;
                    }
                    seen += 1;
                }
                Err(RecvError::Lagged(n)) => tracing::warn!("this terminal fell behind: {n} events not shown"),
                Err(RecvError::Closed) => break,
            },
            Ok(()) = status.changed() => {
                // Only stdout is data; say on stderr when the stream goes blind and back.
                if *status.borrow_and_update() {
                    tracing::info!("following the GC events of {}", target.name);
                } else {
                    tracing::warn!("lost the agent of {}; reconnecting", target.name);
                }
            }
            () = &mut until => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    ExitCode::SUCCESS
}

async fn top(args: TopArgs) -> ExitCode {
    if !(args.interval.is_finite() && (0.2..=60.0).contains(&args.interval)) {
        return fail(USAGE, "--interval must be 0.2..60 seconds");
    }
    let (options, config) = match client_and_config(&args.client, args.agent.token_file.as_ref()) {
        Ok(both) => both,
        Err(e) => return fail(USAGE, e),
    };
    let address = match choose_address(args.agent.target.as_deref()) {
        Ok(a) => a,
        Err((code, message)) => return fail(code, message),
    };
    let catalog =
        Catalog::single_target(address, options, config, Allow::default(), Audit::default());
    let options = crate::top::Options {
        interval: args.interval,
        once: args.once,
    };
    crate::top::run(catalog, options).await
}

async fn targets(json: bool, prune: bool) -> ExitCode {
    let dir = address::runtime_dir();
    if prune {
        match address::prune_in(&dir) {
            Ok(removed) => {
                for f in removed {
                    eprintln!(
                        "sbmon: removed {} (process {} is gone)",
                        f.path.display(),
                        f.pid
                    );
                }
            }
            Err(e) => return fail(1, format!("cannot prune {}: {e}", dir.display())),
        }
    }
    let found = address::discover_in(&dir);
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    };
    let probes = found.iter().map(|f| {
        let client = AgentClient::new(Address::Unix(f.path.clone()), options.clone());
        async move { Listing::probe(f.name.clone(), &client, Some(f.pid), f.process_alive).await }
    });
    let mut rows = futures::future::join_all(probes).await;
    // Two live images with one name are reported, each under its own pid.
    for i in 0..rows.len() {
        let Some(name) = rows[i].name.clone() else {
            continue;
        };
        let live = |r: &Listing| r.status == "live" && r.name.as_deref() == Some(&name);
        if live(&rows[i]) && rows.iter().filter(|r| live(r)).count() > 1 {
            rows[i].error = Some(format!(
                "{} live images are named {name:?}; sbmon serve watches them as {name} and \
                 {name}@PID",
                rows.iter().filter(|r| live(r)).count()
            ));
        }
    }
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("no agents in {}", dir.display());
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<8} {:<12} {:<14} {:<18} ADDRESS",
        "PID", "NAME", "STATUS", "LISP"
    );
    for r in &rows {
        println!(
            "{:<8} {:<12} {:<14} {:<18} {}{}",
            r.pid.map_or("?".into(), |p| p.to_string()),
            r.name.as_deref().unwrap_or("-"),
            r.status,
            r.lisp_version.as_deref().unwrap_or("-"),
            r.address,
            r.error
                .as_deref()
                .filter(|e| e.contains("live images are named"))
                .map_or(String::new(), |e| format!("  ({e})"))
        );
    }
    ExitCode::SUCCESS
}

fn swank_timeout(args: &SwankArgs) -> Result<Duration, String> {
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        return Err("--timeout must be between 0 and 3600 seconds".into());
    }
    Ok(Duration::from_secs_f64(args.timeout))
}

async fn attach(args: AttachArgs) -> ExitCode {
    let timeout = match swank_timeout(&args.swank) {
        Ok(t) => t,
        Err(e) => return fail(USAGE, e),
    };
    let allow = allow_of(&args.allow);
    let options = crate::attach::AttachOptions {
        swank: args.swank.swank.clone(),
        secret_file: args.swank.secret_file.clone(),
        name: args.name.clone(),
        socket: args.socket.clone(),
        allow: AgentAllow {
            control: allow.control,
            eval: allow.eval,
        },
        timeout,
    };
    match crate::attach::attach(&options).await {
        Ok(done) => {
            for w in &done.warnings {
                eprintln!("sbmon: the agent's compilation warned: {w}");
            }
            eprintln!(
                "sbmon: {} (pid {}, agent {}{}) in {:.2} s",
                match done.outcome {
                    "started" => "started the agent".to_string(),
                    "replaced" => format!(
                        "replaced agent {} with",
                        done.replaced_version.as_deref().unwrap_or("?")
                    ),
                    "running" => "the agent already runs; nothing changed".to_string(),
                    _ => "a newer agent already runs; left it alone".to_string(),
                },
                done.pid,
                done.agent_version,
                done.name
                    .as_deref()
                    .map_or(String::new(), |n| format!(", named {n}")),
                done.seconds
            );
            if args.json {
                print_json(&done)
            } else {
                println!("{}", done.target);
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(1, e),
    }
}

async fn detach(args: DetachArgs) -> ExitCode {
    let timeout = match swank_timeout(&args.swank) {
        Ok(t) => t,
        Err(e) => return fail(USAGE, e),
    };
    let target = match args.target.as_deref().map(str::parse::<Address>) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => return fail(USAGE, e),
    };
    match crate::attach::detach(
        &args.swank.swank,
        args.swank.secret_file.as_deref(),
        target.as_ref(),
        timeout,
    )
    .await
    {
        Ok(done) => {
            eprintln!(
                "sbmon: {} (pid {})",
                match done.outcome.as_str() {
                    "stopped" => "stopped the agent",
                    "not-running" => "the agent was loaded but not running; removed it",
                    _ => "no agent was loaded; nothing changed",
                },
                done.pid
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

fn tools(allow: &[AllowClass]) -> ExitCode {
    let allow = allow_of(allow);
    for tool in tools::TOOLS.iter().filter(|t| allow.permits(t.class)) {
        let class = tool.class.name();
        let summary = tool.description.split(". ").next().unwrap_or_default();
        println!(
            "{:<18} {:<8} {}",
            tool.name,
            class,
            summary.trim_end_matches('.')
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        // clap checks names, conflicts and defaults of every subcommand here, not at run time.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn http_accepts_localhost_and_refuses_garbage() {
        use super::parse_listen;
        assert_eq!(
            parse_listen("localhost:9405").unwrap().to_string(),
            "127.0.0.1:9405"
        );
        assert_eq!(parse_listen("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(parse_listen("0.0.0.0:1").unwrap().to_string(), "0.0.0.0:1");
        assert!(parse_listen("localhost:http").is_err());
        assert!(parse_listen("evil.com:80").is_err());
    }

    #[test]
    fn blank_or_short_tokens_are_refused() {
        use super::check_token;
        assert!(check_token(&" ".repeat(16)).is_err());
        assert!(check_token("0123456789abcde").is_err());
        assert!(check_token("0123456789abcdef\t").is_err());
        assert!(check_token("0123456789abcdef").is_ok());
    }
}
