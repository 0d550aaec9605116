//! `relay rules check` and `relay rules test` on the shipped examples and on
//! broken input: compile reports with file/line/column, and dry runs that print
//! each action with the time it would happen.
use std::path::{Path, PathBuf};

use relay_plugins::HostConfig;
use relay_plugins::cli::{self, CliError};

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/rules")
}

fn run(script: &str, events: &str) -> String {
    let dir = rules_dir();
    let mut out = Vec::new();
    cli::test_script(
        &dir.join(script),
        &dir.join("events").join(events),
        &mut out,
    )
    .unwrap();
    String::from_utf8(out).unwrap()
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relay-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn shipped_rules_compile() {
    let report = cli::check_dir(&rules_dir()).unwrap();
    println!("{report}");
    for f in [
        "overheat.rhai",
        "offline.rhai",
        "visits.rhai",
        "status_history.rhai",
    ] {
        assert!(report.contains(&format!("ok    {f}")), "{report}");
    }
    assert!(report.contains("0 with errors"), "{report}");
}

#[test]
fn check_reports_line_and_column() {
    let d = temp("check");
    std::fs::write(d.join("good.rhai"), "fn on_tick(now) { log(now); }").unwrap();
    std::fs::write(
        d.join("bad.rhai"),
        "fn on_message(msg) {\n    let x = ;\n}\n",
    )
    .unwrap();
    std::fs::write(d.join("arity.rhai"), "fn on_disconnect(client) {}").unwrap();
    let report = cli::check_dir(&d).unwrap_err();
    assert!(report.contains("ok    good.rhai (on_tick)"), "{report}");
    assert!(report.contains("error bad.rhai:2:13:"), "{report}");
    assert!(report.contains("on_disconnect"), "{report}");
    assert!(report.contains("3 file(s)"), "{report}");
    assert!(cli::check_dir(&d.join("missing")).is_err());
}

#[test]
fn overheat_dry_run_prints_the_timeline() {
    let out = run("overheat.rhai", "overheat.jsonl");
    println!("{out}");
    // Raised 60 s after the reading that started the hot spell (at 30 s), not at 10 s
    // (that spell was broken at 20 s); the heater command goes out at 60 s; cleared
    // 60 s after the reading fell back (at 120 s).
    assert!(
        out.contains(
            "[+90.000s] alarm raised ctl-1/overheat critical: Controller ctl-1 reads 97.0 °C"
        ),
        "{out}"
    );
    assert!(
        out.contains("[+60.000s] send ctl-1 {\"cmd\":\"heater_off\",\"reason\":\"overheat\"}"),
        "{out}"
    );
    assert!(
        out.contains("[+180.000s] alarm cleared ctl-1/overheat"),
        "{out}"
    );
    assert!(!out.contains("[+70.000s] alarm raised"), "{out}");
    assert_eq!(out.matches("alarm raised").count(), 1, "{out}");
    assert!(
        out.contains("[+0.000s] state_set ctl-1 temp = 72.5"),
        "{out}"
    );
    assert!(
        out.trim_end()
            .ends_with("6 event(s), 9 action(s), 0 error(s)"),
        "{out}"
    );
}

#[test]
fn offline_dry_run_debounces_reconnects() {
    let out = run("offline.rhai", "offline.jsonl");
    assert!(
        out.contains(
            "[+50.000s] alarm raised ctl-1/offline major: Controller ctl-1 offline (error)"
        ),
        "{out}"
    );
    assert!(
        out.contains("[+90.000s] alarm cleared ctl-1/offline"),
        "{out}"
    );
    assert_eq!(
        out.matches("alarm raised").count(),
        1,
        "the 10 s outage raises nothing: {out}"
    );
}

#[test]
fn visits_and_status_dry_runs() {
    let out = run("visits.rhai", "visits.jsonl");
    assert!(
        out.contains("[+1.000s] counter_add visits/lobby +1 (= 2)"),
        "{out}"
    );
    assert!(
        out.contains("[+2.000s] counter_add visits/lab +1 (= 1)"),
        "{out}"
    );
    let out = run("status_history.rhai", "status_history.jsonl");
    assert!(
        out.contains("[+0.000s] persist controller_status {"),
        "{out}"
    );
    assert!(out.contains("\"temp\":72.5"), "{out}");
    assert!(
        out.contains("\"temp\":null"),
        "a non-number temperature is stored as NULL: {out}"
    );
    assert_eq!(
        out.matches("persist").count(),
        2,
        "the raw message is skipped: {out}"
    );
}

#[test]
fn dry_run_follows_escalation_and_ack() {
    let d = temp("esc");
    std::fs::write(
        d.join("r.rhai"),
        r#"fn on_message(msg) { alarm_raise(`${msg.src}/fire`, "critical", "fire!"); }"#,
    )
    .unwrap();
    std::fs::write(
        d.join("e.jsonl"),
        "{\"at_ms\":0,\"event\":\"message\",\"src\":\"a\",\"payload\":{}}\n\
         {\"at_ms\":1000,\"event\":\"message\",\"src\":\"b\",\"payload\":{}}\n\
         {\"at_ms\":200000,\"event\":\"ack\",\"key\":\"a/fire\",\"by\":\"alice\"}\n",
    )
    .unwrap();
    let cfg = HostConfig {
        notify: toml::from_str(
            r#"
            [[notifier]]
            name = "webhook"
            url = "http://127.0.0.1:9/hook"
            [[notifier]]
            name = "sms"
            url = "http://127.0.0.1:9/sms"
            [[notifier]]
            name = "phone"
            url = "http://127.0.0.1:9/call"
            [[route]]
            name = "oncall"
            severities = ["critical"]
            chain = [
                { channel = "webhook", target = "ops" },
                { channel = "sms", target = "+1", after_s = 120 },
                { channel = "phone", target = "+1", after_s = 300 },
            ]
            "#,
        )
        .unwrap(),
        ..Default::default()
    };
    let mut out = Vec::new();
    cli::test_script_with(&cfg, &d.join("r.rhai"), &d.join("e.jsonl"), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("[+0.000s] notify webhook ops [oncall] raised: fire!"),
        "{out}"
    );
    assert!(
        out.contains("[+120.000s] notify sms +1 [oncall] raised: fire!"),
        "{out}"
    );
    assert!(out.contains("[+121.000s] notify sms +1"), "{out}");
    assert!(
        out.contains("[+200.000s] alarm acknowledged a/fire critical by alice"),
        "{out}"
    );
    // a was acknowledged before its phone step; b was not.
    assert!(!out.contains("[+300.000s] notify phone"), "{out}");
    assert!(
        out.contains("[+301.000s] notify phone +1 [oncall] raised: fire!"),
        "{out}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = temp("bad");
    std::fs::write(d.join("ok.rhai"), "fn on_message(msg) { }").unwrap();
    std::fs::write(d.join("broken.rhai"), "fn on_message(msg) { let = 1; }").unwrap();
    std::fs::write(
        d.join("e.jsonl"),
        "{\"at_ms\":5,\"event\":\"message\",\"src\":\"a\"}\n{\"at_ms\":1,\"event\":\"tick\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("junk.jsonl"),
        "\n# comment\n{\"at_ms\":0,\"event\":\"teleport\"}\n",
    )
    .unwrap();
    let mut out = Vec::new();
    match cli::test_script(&d.join("broken.rhai"), &d.join("e.jsonl"), &mut out) {
        Err(CliError::Compile(e)) => assert_eq!((e.file.as_str(), e.line), ("broken.rhai", 1)),
        other => panic!("{other:?}"),
    }
    match cli::test_script(&d.join("ok.rhai"), &d.join("e.jsonl"), &mut out) {
        Err(CliError::Events {
            line: 2, reason, ..
        }) => assert!(reason.contains("back in time"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match cli::test_script(&d.join("ok.rhai"), &d.join("junk.jsonl"), &mut out) {
        Err(e @ CliError::Events { line: 3, .. }) => {
            assert!(e.to_string().contains("junk.jsonl:3:"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        cli::test_script(&d.join("nope.rhai"), &d.join("e.jsonl"), &mut out),
        Err(CliError::Io(..))
    ));
}

#[test]
fn runaway_script_in_a_dry_run_is_an_error_line() {
    let d = temp("loop");
    std::fs::write(d.join("l.rhai"), "fn on_message(msg) {\n  loop { }\n}\n").unwrap();
    std::fs::write(
        d.join("e.jsonl"),
        "{\"at_ms\":0,\"event\":\"message\",\"src\":\"a\",\"payload\":1}\n",
    )
    .unwrap();
    let mut out = Vec::new();
    let s = cli::test_script(&d.join("l.rhai"), &d.join("e.jsonl"), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(s.errors, 1);
    assert!(
        out.contains("error l.rhai:2: Too many operations (in on_message)"),
        "{out}"
    );
}

#[test]
fn check_reports_unknown_functions_unseen_variables_and_endless_loops() {
    let d = temp("lint");
    std::fs::write(
        d.join("typo.rhai"),
        "fn on_message(msg) {\n    let t = msg.payload.temp;\n    alarm_wen(`${msg.src}/hot`, t > 80, 60, \"major\", \"hot\");\n    alarm_raise(\"k\", \"major\");\n    helper(1);\n}\nfn helper(x) { x }\n",
    )
    .unwrap();
    std::fs::write(
        d.join("outside.rhai"),
        "let limit = 80.0;\n\nfn on_message(msg) {\n    if msg.payload.temp > limit { log(\"hot\"); }\n}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("spin.rhai"),
        "fn on_tick(now) {\n    let n = 0;\n    loop {\n        n += 1;\n    }\n}\nfn ok(now) {\n    loop { if now > 3 { break; } now += 1; }\n    while true { return 1; }\n}\n",
    )
    .unwrap();
    let report = cli::check_dir(&d).unwrap_err();
    println!("{report}");
    assert!(
        report.contains("error typo.rhai:3:5: no function `alarm_wen`"),
        "{report}"
    );
    assert!(
        report.contains("error typo.rhai:4:5: `alarm_raise` takes 3 argument(s), got 2"),
        "{report}"
    );
    assert!(
        !report.contains("helper"),
        "functions of the file are known: {report}"
    );
    assert!(
        report.contains("error outside.rhai:4:27: `limit` is defined outside the function, and functions cannot see it"),
        "{report}"
    );
    assert!(
        report.contains("error spin.rhai:3:5: endless loop"),
        "{report}"
    );
    assert_eq!(report.matches("endless loop").count(), 1, "{report}");
    assert!(
        report.contains("3 file(s)") && report.contains("3 with errors"),
        "{report}"
    );
}

#[test]
fn wrong_argument_types_and_endless_loops_in_a_dry_run_read_plainly() {
    let d = temp("words");
    std::fs::write(
        d.join("w.rhai"),
        "fn on_message(msg) {\n    alarm_when(\"k\", \"yes\", 5, \"major\", \"t\");\n}\nfn on_tick(now) {\n    let n = 0;\n    while n >= 0 {\n        n += 1;\n    }\n}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("e.jsonl"),
        "{\"at_ms\":0,\"event\":\"message\",\"src\":\"a\",\"payload\":1}\n{\"at_ms\":1,\"event\":\"tick\"}\n",
    )
    .unwrap();
    let mut out = Vec::new();
    let s = cli::test_script(&d.join("w.rhai"), &d.join("e.jsonl"), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(s.errors, 2, "{out}");
    assert!(
        out.contains(
            "w.rhai:2:5: alarm_when: the condition must be a bool (true or false), got string"
        ),
        "{out}"
    );
    // Stopped by a limit inside the loop: reported at the loop's line.
    assert!(out.contains("error w.rhai:6: "), "{out}");
}
