//! The `relay-loadtest` binary: parses flags and the scenario, runs it, prints the
//! human summary and writes the JSON and HTML reports. With `--worker` it is one
//! worker process of a split fleet instead.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use relay_loadtest::cli::{Cli, Sub};
use relay_loadtest::coordinator::{self, RunOptions};
use relay_loadtest::scenario::Scenario;
use relay_loadtest::{compare, html, limits, worker};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.worker {
        let _ = limits::raise_nofile();
        return match worker::child_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay-loadtest worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(cli) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("relay-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenario; returns the exit status its verdict asks for.
fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Some(Sub::Compare { a, b, html }) = &cli.command {
        let load = |p: &std::path::Path| -> anyhow::Result<relay_loadtest::report::Report> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a relay-loadtest JSON report", p.display()))
        };
        let (ra, rb) = (load(a)?, load(b)?);
        let (la, lb) = (a.display().to_string(), b.display().to_string());
        print!("{}", compare::text(&ra, &rb, &la, &lb));
        if let Some(p) = html {
            let page = html::render_compare(&ra, &rb, &la, &lb)?;
            std::fs::write(p, page).with_context(|| format!("writing {}", p.display()))?;
            println!("HTML comparison: {}", p.display());
        }
        return Ok(0);
    }
    let (mut s, origin) = match &cli.scenario {
        Some(p) => (Scenario::load(p)?, p.display().to_string()),
        None => (Scenario::default(), "flags".to_string()),
    };
    cli.apply(&mut s);
    s.validate(&origin)?;
    if cli.print_scenario {
        print!("{}", toml::to_string(&s).context("printing the scenario")?);
        return Ok(0);
    }
    let opts = RunOptions {
        progress: !cli.no_progress && std::io::stderr().is_terminal(),
        worker_exe: std::env::current_exe().ok(),
    };
    let report = coordinator::run(&s, &opts)?;
    for p in [&s.report.json, &s.report.html].into_iter().flatten() {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    print!("{}", report.human());
    if let Some(p) = &s.report.json {
        std::fs::write(p, report.to_json()).with_context(|| format!("writing {}", p.display()))?;
        println!("JSON report: {}", p.display());
    }
    if let Some(p) = &s.report.html {
        let page = html::render(&report)?;
        std::fs::write(p, page).with_context(|| format!("writing {}", p.display()))?;
        println!("HTML report: {}", p.display());
    }
    if !report.verdict.passed {
        eprintln!("relay-loadtest: {}", report.verdict.headline());
    }
    Ok(report.verdict.exit_code.clamp(0, 255) as u8)
}
