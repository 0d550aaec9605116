//! The scenario files shipped in config/loadtest/ all load and validate, cover every
//! pattern, and print back (`--print-scenario`) to the same scenario.

use std::collections::HashSet;
use std::path::PathBuf;

use relay_loadtest::scenario::{Pattern, Scenario};

fn shipped() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/loadtest");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_shipped_scenario_is_valid_and_every_pattern_has_one() {
    let files = shipped();
    assert!(files.len() >= 12, "{files:?}");
    let mut patterns = HashSet::new();
    let mut names = HashSet::new();
    for f in &files {
        let s = Scenario::load(f).unwrap();
        s.validate(&f.display().to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !s.description.is_empty(),
            "{} has no description",
            f.display()
        );
        assert!(names.insert(s.name.clone()), "duplicate name {}", s.name);
        patterns.insert(s.pattern);
    }
    for p in Pattern::ALL {
        assert!(patterns.contains(&p), "no shipped scenario for {p}");
    }
}

#[test]
fn the_benchmark_scenarios_are_the_documented_ones() {
    let load = |n: &str| {
        let p =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../config/loadtest/{n}.toml"));
        Scenario::load(&p).unwrap()
    };
    let s = load("bench-p2p-1000-max");
    assert!(s.find_max.enabled);
    assert_eq!((s.pattern, s.load.controllers), (Pattern::Telemetry, 1000));
    assert_eq!(load("bench-p2p-20k").total_rate(), Some(20_000.0));
    assert_eq!(load("bench-p2p-50k").total_rate(), Some(50_000.0));
    let s = load("bench-fanout-1000");
    assert_eq!(
        (s.pattern, s.load.groups, s.load.members),
        (Pattern::Fanout, 1, 1000)
    );
    let s = load("bench-fanin-1000");
    assert_eq!(
        (s.pattern, s.load.controllers, s.load.dashboards),
        (Pattern::Fanin, 1000, 1)
    );
    let s = load("bench-idle-18000");
    assert_eq!((s.pattern, s.load.controllers), (Pattern::Idle, 18_000));
    assert_eq!(s.load.heartbeat.0.as_secs(), 30);
}

#[test]
fn print_scenario_round_trips() {
    for f in shipped() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay-loadtest"))
            .arg("--scenario")
            .arg(&f)
            .arg("--print-scenario")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        let back = Scenario::from_toml(&printed, "printed").unwrap();
        assert_eq!(back, Scenario::load(&f).unwrap(), "{}", f.display());
    }
}
