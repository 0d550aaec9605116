//! `relay`: runs the relay, or checks and prints its configuration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use relay_config::{Config, DEFAULTS_TOML, LogFormat};
use relay_shards::Relay;

/// An IoT message relay: controllers on TCP, browsers on WebSocket, one
/// address per client, frames forwarded to an address, a group or a uid.
///
/// With no arguments it runs on built-in defaults: controllers on
/// 127.0.0.1:7000, one shard per core, auth off.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML). Without it the built-in defaults are used.
    /// Every key can also be set with RELAY__<SECTION>__<KEY>=value.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay (the default when no command is given).
    Run,
    /// Load and validate a configuration file, report every problem, and exit.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Show configuration.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    /// Check or dry-run the Rhai rules.
    Rules {
        #[command(subcommand)]
        what: RulesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Compile every *.rhai in DIR (default: [plugins] dir) and report errors
    /// with file, line and column.
    Check {
        /// The rules folder.
        dir: Option<PathBuf>,
    },
    /// Replay recorded events (JSON lines) against SCRIPT with Redis, MySQL and
    /// notifiers faked, and print every action it would take and when.
    Test {
        /// The script to test.
        script: PathBuf,
        /// Events, one JSON object per line (see docs/rules.md).
        #[arg(long, value_name = "FILE.jsonl")]
        events: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the commented built-in defaults (a starting point for a file).
    Print {
        /// Print the effective configuration (file + environment) instead.
        #[arg(long)]
        effective: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::CheckConfig { file } => match Config::load(Some(&file)) {
            Ok(cfg) => {
                for w in cfg.warnings(&file.display().to_string()) {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Rules { what } => rules(cli.config, what),
        Command::Config {
            what: ConfigCommand::Print { effective },
        } => {
            if effective {
                match Config::load(cli.config.as_deref()) {
                    Ok(cfg) => print!("{}", cfg.to_toml()),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{DEFAULTS_TOML}");
            }
            ExitCode::SUCCESS
        }
    }
}

fn rules(path: Option<PathBuf>, what: RulesCommand) -> ExitCode {
    let cfg = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let host_cfg = relay_plugins::HostConfig::from_config(&cfg);
    match what {
        RulesCommand::Check { dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&cfg.plugins.dir));
            match relay_plugins::cli::check_dir_with(&dir, &host_cfg) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(report) => {
                    eprint!("{report}");
                    ExitCode::from(1)
                }
            }
        }
        RulesCommand::Test { script, events } => {
            let mut out = std::io::stdout().lock();
            match relay_plugins::cli::test_script_with(&host_cfg, &script, &events, &mut out) {
                Ok(summary) => {
                    eprintln!(
                        "{} events, {} actions, {} errors",
                        summary.events, summary.actions, summary.errors
                    );
                    if summary.errors > 0 {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let cfg = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    raise_file_limit(cfg.limits.max_connections as u64);
    // Started by a running relay for an upgrade: its listening sockets.
    let handover = match relay_shards::receive_from_env() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("upgrade: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // The binary an upgrade starts: the path this one was started from (a
    // package upgrade puts the new binary there).
    let exe = std::env::current_exe().ok();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let leased = cfg.plugins.enabled && cfg.cluster.enabled && cfg.cluster.rules_lease;
    let (mut ext, host, leased) = if leased {
        match relay_shards::rules::attach_leased(&cfg) {
            Ok((ext, leased)) => (ext, None, Some(leased)),
            Err(e) => {
                tracing::error!("rules engine: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if cfg.plugins.enabled {
        match relay_shards::rules::attach(&cfg) {
            Ok((ext, host)) => (ext, Some(host), None),
            Err(e) => {
                tracing::error!("rules engine: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        (relay_shards::Extensions::default(), None, None)
    };
    let (inherited, ready) = match handover {
        Some((inherited, sock)) => (Some(inherited), Some(sock)),
        None => (None, None),
    };
    ext.inherited = inherited;
    let relay = match Relay::start_with(&cfg, ext) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    match ready {
        Some(sock) => {
            let unused = relay.close_unused_inherited();
            if unused > 0 {
                tracing::warn!(
                    "upgrade: {unused} handed-over sockets closed: this process has fewer shards \
                     than the previous one"
                );
            }
            if let Err(e) = relay_shards::ready(sock) {
                tracing::error!("upgrade: cannot tell the previous process: {e}");
            } else {
                tracing::info!("upgrade: took over the listening sockets");
            }
        }
        None => relay_shards::notify_main_pid(),
    }
    let stop = relay.stop_flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            tracing::error!("cannot handle signal {sig}: {e}");
            return ExitCode::FAILURE;
        }
    }
    // SIGHUP (`systemctl reload relay`): re-read the file and apply what can
    // change live. The rules engine recompiles its folder on the same signal.
    let hup = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone()) {
        tracing::error!("cannot handle SIGHUP: {e}");
        return ExitCode::FAILURE;
    }
    // SIGUSR2: hand over to a new process of the same binary (an upgrade).
    let usr2 = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGUSR2, usr2.clone()) {
        tracing::error!("cannot handle SIGUSR2: {e}");
        return ExitCode::FAILURE;
    }
    let mut upgrade_cfg = cfg.upgrade.clone();
    let mut drain_until: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if hup.swap(false, Ordering::SeqCst)
            && let Some(new) = reload(&relay, path.as_deref())
        {
            upgrade_cfg = new.upgrade;
        }
        if usr2.swap(false, Ordering::SeqCst) && drain_until.is_none() {
            drain_until = hand_over(&relay, exe.as_deref(), &args, &upgrade_cfg);
        }
        if let Some(t) = drain_until
            && Instant::now() >= t
        {
            // The drain is over: close the rest (they were told to go), let
            // the shards carry it out, then stop.
            relay.end_drain();
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::SeqCst);
        }
    }
    let joined = relay.join();
    if let Some(leased) = leased {
        leased.shutdown();
    }
    if let Some(host) = host {
        // Every other handle went with the relay: flush sinks and stop.
        match std::sync::Arc::try_unwrap(host) {
            Ok(host) => host.shutdown(),
            Err(_) => tracing::warn!("rules engine still referenced at exit; not flushed"),
        }
    }
    match joined {
        Ok(()) => {
            tracing::info!("relay stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the new process and hands it the listening sockets; returns when
/// the drain ends, or `None` when the upgrade failed (this process goes on).
fn hand_over(
    relay: &Relay,
    exe: Option<&Path>,
    args: &[std::ffi::OsString],
    cfg: &relay_config::UpgradeConfig,
) -> Option<Instant> {
    let Some(exe) = exe else {
        tracing::error!("upgrade: the path of this binary is unknown; not upgrading");
        return None;
    };
    tracing::info!("upgrade: starting {}", exe.display());
    match relay.hand_over(
        exe,
        args,
        Duration::from_millis(cfg.ready_timeout_ms),
        cfg.reconnect_window_ms,
    ) {
        Ok(pid) => {
            tracing::info!(
                "upgrade: the new process listens new_pid={pid}; clients are told to reconnect \
                 within {} ms, draining for {} ms",
                cfg.reconnect_window_ms,
                cfg.drain_ms
            );
            Some(Instant::now() + Duration::from_millis(cfg.drain_ms))
        }
        Err(e) => {
            tracing::error!("upgrade failed, this process goes on: {e:#}");
            None
        }
    }
}

/// Loads the configuration again and hands it to the relay; a file with
/// problems is refused whole and the running configuration kept.
fn reload(relay: &Relay, path: Option<&Path>) -> Option<Config> {
    let origin = path.map_or_else(|| "defaults".to_owned(), |p| p.display().to_string());
    tracing::info!("SIGHUP: reloading {origin}");
    match Config::load(path) {
        Ok(cfg) => {
            for w in cfg.warnings(&origin) {
                tracing::warn!("{w}");
            }
            relay.reload(&cfg);
            Some(cfg)
        }
        Err(e) => {
            relay.reload_failed();
            for p in &e.problems {
                tracing::error!("reload refused, running configuration kept: {p}");
            }
            None
        }
    }
}

/// Raises the soft open-file limit to the hard one (each client is a
/// descriptor), and says when even that is below `max_connections`.
fn raise_file_limit(max_connections: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if !got {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    // A few dozen descriptors go to rings, listeners and files.
    if lim.rlim_cur.saturating_sub(64) < max_connections {
        tracing::warn!(
            "the open-file limit ({}) caps connections below limits.max_connections ({max_connections}); \
             accepts pause while no descriptor is free",
            lim.rlim_cur
        );
    }
}

fn init_logging(cfg: &Config) {
    let filter = std::env::var("RELAY_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(&cfg.log.level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        _ => builder.init(),
    }
}
