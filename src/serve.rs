//! `sbmon serve` and `sbmon launch`: run the front ends (MCP over stdio, HTTP with MCP and
//! JSON-RPC) over one catalog, with targets given on the command line or discovered in the
//! runtime directory (and followed as agents start and exit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent::{ClientOptions, address};
use crate::audit::Audit;
use crate::config::Config;
use crate::launch::{AgentAllow, LaunchError, LaunchOptions, Sbcl};
use crate::samples::Settings;
use crate::targets::{Target, Targets, default_name};
use crate::tools::{Allow, Catalog};

/// How often the runtime directory is scanned for agents that started or exited.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("give --stdio and/or --http")]
    NoFrontEnd,
    #[error(
        "refusing to serve HTTP on {0} without a token: beyond loopback (127.0.0.1, ::1) \
         sbmon requires --token or --token-file, and clients then send Authorization: Bearer"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("MCP over stdio failed: {0}")]
    Stdio(std::io::Error),
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

/// What to serve and how.
pub struct ServeOptions {
    pub stdio: bool,
    pub http: Option<SocketAddr>,
    /// Bearer token required on HTTP (all but /health/live); required beyond loopback.
    pub token: Option<String>,
    /// The URL Prometheus and people reach this sbmon at, when it is not the listen address
    /// (behind a proxy, or listening on 0.0.0.0); `/sd` advertises its host and port.
    pub external_url: Option<String>,
    pub client: ClientOptions,
    /// How often the sampler reads each target, and how much it keeps.
    pub sampling: Settings,
    pub config: Config,
    pub allow: Allow,
    pub audit: Audit,
}

/// Serve `targets` (or, when `None`, the agents of the runtime directory) until stdin closes
/// (with `--stdio`) or SIGINT/SIGTERM.
pub async fn serve(options: ServeOptions, targets: Option<Vec<Target>>) -> Result<(), ServeError> {
    if !options.stdio && options.http.is_none() {
        return Err(ServeError::NoFrontEnd);
    }
    if let Some(addr) = options.http
        && !addr.ip().is_loopback()
        && options.token.is_none()
    {
        return Err(ServeError::NotLoopback(addr));
    }
    let stop = CancellationToken::new();
    let discovered = targets.is_none();
    let targets = Arc::new(Targets::new(targets.unwrap_or_default()));
    if discovered {
        let (targets, client, stop) = (targets.clone(), options.client.clone(), stop.clone());
        // A scan lists the runtime directory and reads /proc/PID/stat per socket in it: on
        // the blocking pool, since a crowded or slow directory must not hold up requests.
        targets.sync_discovered(&crate::blocking::run(address::discover).await, &client);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(DISCOVERY_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let found = crate::blocking::run(address::discover).await;
                        targets.sync_discovered(&found, &client);
                    }
                    _ = stop.cancelled() => break,
                }
            }
        });
    }
    let sampling = options.sampling;
    tokio::spawn(crate::sampler::run(
        targets.clone(),
        options.sampling,
        stop.clone(),
    ));
    if options.allow.control || options.allow.eval {
        eprintln!(
            "sbmon: allowed beyond read: {}{}; every such call is audited",
            if options.allow.control {
                "control "
            } else {
                ""
            },
            if options.allow.eval { "eval" } else { "" }
        );
    }
    let catalog = Arc::new(Catalog::with_policy(
        targets,
        Arc::new(options.config),
        options.allow,
        options.audit,
    ));
    // What changes from one sample interval to the next goes into the event journal.
    tokio::spawn(crate::watch::run(
        catalog.context().clone(),
        sampling.interval,
        stop.clone(),
    ));

    let http = match options.http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            let local = listener.local_addr().unwrap_or(addr);
            eprintln!("sbmon: serving http://{local} (MCP at /mcp, JSON-RPC at /rpc)");
            let http_options = crate::http::HttpOptions {
                token: options.token.clone(),
                advertised: advertised(local, options.external_url.as_deref()),
            };
            let app = crate::http::router(catalog.clone(), stop.clone(), http_options);
            let stop = stop.clone();
            Some(tokio::spawn(async move {
                let shutdown = async move { stop.cancelled().await };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!("HTTP server failed: {e}");
                }
            }))
        }
        None => None,
    };

    let outcome = if options.stdio {
        tokio::select! {
            r = crate::mcp::serve_stdio(catalog.clone()) => r.map_err(ServeError::Stdio),
            _ = shutdown_signal() => Ok(()),
        }
    } else {
        shutdown_signal().await;
        Ok(())
    };
    stop.cancel();
    if let Some(server) = http {
        // Cancelling `stop` closed the MCP streams; a client that still holds a plain
        // connection open gets a moment, not a veto.
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    outcome
}

/// Images that `serve --attach` keeps attached (see `crate::attach`).
pub struct AttachAll {
    /// (name, Swank server) of each image.
    pub images: Vec<(Option<String>, crate::attach::SwankAddress)>,
    pub secret_file: Option<std::path::PathBuf>,
    /// What the agents serve: what this sbmon offers.
    pub allow: AgentAllow,
}

/// `serve`, attaching to the images of `attach` first and again whenever their agent is gone.
/// With discovered targets, an attached agent listens on its default socket and is found, by
/// its name, like any other; with `--target`, it listens on `<runtime dir>/attach-NAME.sock`,
/// a path that outlives the image's pid, and is watched there under its name.
pub async fn serve_attaching(
    options: ServeOptions,
    mut targets: Option<Vec<Target>>,
    attach: AttachAll,
) -> Result<(), ServeError> {
    let mut loops = Vec::new();
    for (name, swank) in attach.images {
        let name = name.unwrap_or_else(|| format!("swank-{}", swank.port));
        let socket = targets.as_mut().map(|list| {
            let path = address::runtime_dir().join(format!("attach-{name}.sock"));
            list.push(Target::new(
                name.clone(),
                crate::agent::Address::Unix(path.clone()),
                options.client.clone(),
            ));
            path
        });
        let options = crate::attach::AttachOptions {
            swank,
            secret_file: attach.secret_file.clone(),
            name: Some(name),
            socket,
            allow: attach.allow,
            timeout: Duration::from_secs(120),
        };
        loops.push(tokio::spawn(keep_attached(options)));
    }
    let outcome = serve(options, targets).await;
    for task in loops {
        task.abort();
    }
    outcome
}

/// How often `serve --attach` checks that an attached agent still answers.
const ATTACH_INTERVAL: Duration = Duration::from_secs(2);

async fn keep_attached(options: crate::attach::AttachOptions) {
    let mut agent: Option<crate::agent::AgentClient> = None;
    let mut last_error = String::new();
    loop {
        let alive = match &agent {
            Some(client) => client.welcome().await.is_ok(),
            None => false,
        };
        if !alive {
            match crate::attach::attach(&options).await {
                Ok(done) => {
                    tracing::info!(
                        "attached to the image behind swank {} (pid {}): {} at {}",
                        options.swank,
                        done.pid,
                        done.outcome,
                        done.target
                    );
                    last_error.clear();
                    agent = done.target.parse().ok().map(|address| {
                        let client_options = crate::agent::ClientOptions {
                            connect_timeout: Duration::from_secs(1),
                            ..crate::agent::ClientOptions::default()
                        };
                        crate::agent::AgentClient::new(address, client_options)
                    });
                }
                Err(e) => {
                    let message = e.to_string();
                    if message != last_error {
                        tracing::warn!(
                            "cannot attach to swank {}: {message}; trying again every {:?}",
                            options.swank,
                            ATTACH_INTERVAL
                        );
                        last_error = message;
                    }
                }
            }
        }
        tokio::time::sleep(ATTACH_INTERVAL).await;
    }
}

/// Start SBCL with the agent (`sbcl_args` after `--` on the command line), serve it exactly
/// as `serve` would, and stop it when sbmon exits, however that happens.
pub async fn launch(
    options: ServeOptions,
    sbcl: std::path::PathBuf,
    name: Option<String>,
    sbcl_args: Vec<String>,
) -> Result<(), ServeError> {
    let (runtime_args, toplevel_args) = split_sbcl_args(&sbcl_args);
    let mut image = Sbcl::spawn(&LaunchOptions {
        sbcl,
        runtime_args,
        toplevel_args,
        // The agent serves what this sbmon offers, and no more.
        allow: AgentAllow {
            control: options.allow.control,
            eval: options.allow.eval,
        },
        name,
        ..LaunchOptions::default()
    })?;
    eprintln!(
        "sbmon: started SBCL pid {} (its output goes to {})",
        image.pid,
        image.log_path().display()
    );
    let ready = tokio::select! {
        r = image.wait_ready(Duration::from_secs(60), &options.client) => r,
        _ = shutdown_signal() => return Ok(()),
    };
    ready?;
    let target = Target::new(
        default_name(&image.address),
        image.address.clone(),
        options.client.clone(),
    );
    let outcome = serve(options, Some(vec![target])).await;
    image.stop();
    outcome
}

/// The `host:port` that `/sd` hands to Prometheus: that of `--external-url`, else the listen
/// address (a wildcard address is no place to scrape, so it becomes loopback, with a hint).
fn advertised(local: SocketAddr, external_url: Option<&str>) -> String {
    if let Some(authority) = external_url.and_then(url_authority) {
        return authority.to_string();
    }
    if local.ip().is_unspecified() {
        tracing::warn!(
            "listening on {local}: /sd advertises 127.0.0.1:{}; pass --external-url to \
             advertise the address Prometheus should scrape",
            local.port()
        );
        return SocketAddr::new([127, 0, 0, 1].into(), local.port()).to_string();
    }
    local.to_string()
}

/// `host:port` of `scheme://host:port/path`, or of a bare `host:port`.
pub fn url_authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next()?;
    (!authority.is_empty() && !authority.contains('@')).then_some(authority)
}

/// SBCL's runtime options must come before `--end-runtime-options`, everything else after the
/// agent has started.
fn split_sbcl_args(args: &[String]) -> (Vec<String>, Vec<String>) {
    const WITH_VALUE: &[&str] = &[
        "--core",
        "--dynamic-space-size",
        "--control-stack-size",
        "--tls-limit",
    ];
    const FLAGS: &[&str] = &[
        "--merge-core-pages",
        "--no-merge-core-pages",
        "--disable-ldb",
        "--lose-on-corruption",
        "--debug-environment",
    ];
    let (mut runtime, mut toplevel) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if WITH_VALUE.contains(&arg.as_str()) {
            runtime.push(arg.clone());
            runtime.extend(it.next().cloned());
        } else if FLAGS.contains(&arg.as_str()) {
            runtime.push(arg.clone());
        } else if arg != "--noinform" && arg != "--end-runtime-options" {
            toplevel.push(arg.clone());
        }
    }
    (runtime, toplevel)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{advertised, split_sbcl_args, url_authority};

    #[test]
    fn sd_advertises_the_configured_address() {
        let local = "127.0.0.1:9405".parse().unwrap();
        assert_eq!(advertised(local, None), "127.0.0.1:9405");
        let any = "0.0.0.0:9405".parse().unwrap();
        assert_eq!(advertised(any, None), "127.0.0.1:9405");
        assert_eq!(
            advertised(any, Some("https://mon.example:443/sbmon")),
            "mon.example:443"
        );
        assert_eq!(url_authority("mon:9405"), Some("mon:9405"));
        assert_eq!(url_authority("http://user@mon:9405/"), None);
    }

    #[test]
    fn runtime_options_go_first() {
        let args: Vec<String> = [
            "--dynamic-space-size",
            "2GB",
            "--load",
            "app.lisp",
            "--merge-core-pages",
            "--eval",
            "(start)",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (runtime, toplevel) = split_sbcl_args(&args);
        assert_eq!(
            runtime,
            ["--dynamic-space-size", "2GB", "--merge-core-pages"]
        );
        assert_eq!(toplevel, ["--load", "app.lisp", "--eval", "(start)"]);
    }
}
