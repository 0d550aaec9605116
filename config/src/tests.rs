//! Tests of the whole loading path: shipped files, every validation rule,
//! many problems at once, unknown keys, types and environment overrides.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;

const NO_ENV: [(String, String); 0] = [];

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, "test.toml", NO_ENV)
}

fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(
        text,
        "test.toml",
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

fn problems(text: &str) -> Vec<Problem> {
    match load(text) {
        Ok(config) => panic!("expected problems for {text:?}, got {config:?}"),
        Err(err) => err.problems,
    }
}

fn keys(problems: &[Problem]) -> BTreeSet<String> {
    problems.iter().map(|p| p.key.clone()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ---- shipped files ------------------------------------------------------

#[test]
fn embedded_defaults_decode_to_exactly_the_default_config() {
    let parsed: Config = toml::from_str(DEFAULTS_TOML).expect("defaults.toml decodes");
    assert_eq!(parsed, Config::default());
    assert_eq!(
        Config::from_toml(DEFAULTS_TOML, DEFAULTS_ORIGIN, NO_ENV),
        Ok(Config::default())
    );
}

/// Collects the dotted path of every leaf (and empty table) of a document.
fn leaves(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(t) if !t.is_empty() => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &p, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

#[test]
fn embedded_defaults_list_every_key_of_the_schema() {
    let schema = toml::Value::try_from(Config::default()).unwrap();
    let shipped: toml::Value = toml::from_str(DEFAULTS_TOML).unwrap();
    let (mut want, mut have) = (BTreeSet::new(), BTreeSet::new());
    leaves(&schema, "", &mut want);
    leaves(&shipped, "", &mut have);
    assert_eq!(
        have, want,
        "defaults.toml and Config::default() list different keys"
    );
    // The one optional key without a default value is documented, commented out.
    assert!(DEFAULTS_TOML.contains("# api_token = "));
}

#[test]
fn embedded_defaults_explain_the_environment_naming() {
    assert!(DEFAULTS_TOML.contains("RELAY__<SECTION>__<KEY>=value"));
    assert!(DEFAULTS_TOML.contains("RELAY__LIMITS__MAX_FRAME=131072"));
}

#[test]
fn default_config_is_the_newcomer_setup() {
    let c = Config::default();
    assert_eq!(
        c.listeners.tcp,
        "127.0.0.1:7000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.listeners.http,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.shards.count, 0);
    assert_eq!(c.auth.mode, AuthMode::None);
    assert!(c.plugins.enabled && !c.redis.enabled && !c.mysql.enabled);
    assert_eq!(c.validate("defaults"), Ok(()));
    assert!(
        c.warnings("defaults").is_empty(),
        "{:?}",
        c.warnings("defaults")
    );
}

fn relay_toml_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml")
}

#[test]
fn shipped_relay_toml_loads_validates_and_has_the_production_shape() {
    let text = std::fs::read_to_string(relay_toml_path()).unwrap();
    let c = Config::from_toml(&text, "config/relay.toml", NO_ENV).expect("relay.toml is valid");
    assert_eq!(c.validate("config/relay.toml"), Ok(()));
    assert!(c.listeners.tcp.ip().is_unspecified() && c.listeners.http.ip().is_unspecified());
    assert_eq!(c.auth.mode, AuthMode::Hmac);
    assert!(!c.auth.secret.is_empty());
    assert!(c.http.api_token.is_some());
    assert!(c.redis.enabled && c.redis.url.starts_with("redis://127.0.0.1"));
    assert!(c.mysql.enabled && c.mysql.url.contains("@127.0.0.1"));
    // The placeholders load, but are pointed out.
    let warned = keys(&c.warnings("config/relay.toml"));
    assert!(
        warned.contains("auth.secret") && warned.contains("http.api_token"),
        "{warned:?}"
    );
}

#[test]
fn packaged_relay_toml_loads_with_the_service_paths() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/relay.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let c = Config::from_toml(&text, "packaging/relay.toml", NO_ENV)
        .expect("packaging/relay.toml is valid");
    assert_eq!(c.validate("packaging/relay.toml"), Ok(()));
    // The paths the unit provides: config and rules in /etc/relay, the spool
    // in the StateDirectory.
    assert_eq!(c.plugins.dir, "/etc/relay/rules");
    assert!(c.plugins.spool_dir.starts_with("/var/lib/relay/"));
    assert!(c.listeners.tcp.ip().is_unspecified());
    // Fits the unit's LimitNOFILE=20000.
    assert!(c.limits.max_connections <= crate::MAX_CONNECTIONS_CEILING);
    assert_eq!(c.log.format, LogFormat::Json);
    let warned = keys(&c.warnings("packaging/relay.toml"));
    assert!(warned.contains("auth.secret"), "{warned:?}");
}

#[test]
fn load_reads_a_file_and_names_it_in_problems() {
    let c = Config::load(Some(&relay_toml_path())).expect("relay.toml loads");
    assert_eq!(c.auth.mode, AuthMode::Hmac);

    let dir = std::env::temp_dir().join(format!("relay-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_frame = 3\n").unwrap();
    let err = Config::load(Some(&bad)).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].file, bad.display().to_string());
    assert_eq!(err.problems[0].key, "limits.max_frame");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_without_a_file_uses_the_embedded_defaults() {
    assert_eq!(Config::load(None), Ok(Config::default()));
}

#[test]
fn a_missing_file_is_one_problem_naming_it() {
    let path = Path::new("/nonexistent/relay/config.toml");
    let err = Config::load(Some(path)).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].file, "/nonexistent/relay/config.toml");
    assert!(
        err.problems[0].reason.starts_with("cannot read the file"),
        "{}",
        err
    );
}

#[test]
fn an_empty_file_is_the_default_config() {
    assert_eq!(load(""), Ok(Config::default()));
}

// ---- one test row per validation rule ----------------------------------

#[test]
fn each_rule_reports_its_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("[node]\nname = \"\"", "node.name", "empty"),
        ("[node]\nname = \"bad name\"", "node.name", "outside"),
        (
            &format!("[node]\nname = \"{}\"", "n".repeat(65)),
            "node.name",
            "at most 64",
        ),
        (
            "[listeners]\ntcp = \"127.0.0.1:9000\"\nhttp = \"127.0.0.1:9000\"",
            "listeners.http",
            "same address",
        ),
        ("[shards]\ncount = 5000", "shards.count", "at most 64"),
        (
            "[shards]\ncount = 65",
            "shards.count",
            "is 65, must be at most 64 (0 means one shard per core; the router tracks shards in 64-bit masks)",
        ),
        (
            "[shards]\nio_memory_kib = 1",
            "shards.io_memory_kib",
            "at least 64",
        ),
        (
            "[shards]\nring_depth = 4",
            "shards.ring_depth",
            "at least 8",
        ),
        (
            "[shards]\nring_depth = 65536",
            "shards.ring_depth",
            "at most 32768",
        ),
        (
            "[shards]\nmesh_capacity = 0",
            "shards.mesh_capacity",
            "at least 1",
        ),
        ("[shards]\nmax_batch = 0", "shards.max_batch", "at least 1"),
        (
            "[shards]\ncoalesce_us = 100001",
            "shards.coalesce_us",
            "at most 100000",
        ),
        (
            "[shards]\nslice_us = 20001",
            "shards.slice_us",
            "at most 20000",
        ),
        ("[limits]\nmax_frame = 8", "limits.max_frame", "at least 9"),
        (
            "[limits]\nmax_frame = 16777217\nqueue_bytes = 33554432",
            "limits.max_frame",
            "at most 16777216",
        ),
        (
            "[limits]\nmax_connections = 19001",
            "limits.max_connections",
            "open-file limit",
        ),
        (
            "[limits]\nmax_connections = 0",
            "limits.max_connections",
            "at least 1",
        ),
        (
            "[limits]\nqueue_bytes = 1000",
            "limits.queue_bytes",
            "max_frame + 4",
        ),
        (
            "[limits]\nslow_consumer_timeout_ms = 0",
            "limits.slow_consumer_timeout_ms",
            "at least 1",
        ),
        (
            "[limits]\nframes_per_sec = 0",
            "limits.frames_per_sec",
            "at least 1",
        ),
        ("[limits]\nburst = 0", "limits.burst", "at least 1"),
        (
            "[limits]\nhello_timeout_ms = 10",
            "limits.hello_timeout_ms",
            "at least 100",
        ),
        (
            "[limits]\nmax_meta_bytes = 2000000",
            "limits.max_meta_bytes",
            "at most",
        ),
        (
            "[heartbeat]\nmin_s = 60\nmax_s = 30\ninterval_s = 30",
            "heartbeat.min_s",
            "above heartbeat.max_s",
        ),
        (
            "[heartbeat]\ninterval_s = 2",
            "heartbeat.interval_s",
            "min_s..=heartbeat.max_s",
        ),
        (
            "[heartbeat]\nidle_factor = 1",
            "heartbeat.idle_factor",
            "at least 2",
        ),
        (
            "[heartbeat]\nmin_s = 0\ninterval_s = 30",
            "heartbeat.min_s",
            "at least 1",
        ),
        (
            "[heartbeat]\nmax_s = 100000",
            "heartbeat.max_s",
            "at most 86400",
        ),
        ("[auth]\nmode = \"hmac\"", "auth.secret", "must be set"),
        ("[http]\napi_token = \"\"", "http.api_token", "empty"),
        (
            "[http]\napi_token = \"has space\"",
            "http.api_token",
            "printable ASCII",
        ),
        ("[http]\nmax_body = 0", "http.max_body", "at least 1"),
        ("[log]\nlevel = \"\"", "log.level", "must not be empty"),
        (
            "[log]\nlevel = \"info,relay_shards=loud\"",
            "log.level",
            "unknown level",
        ),
        (
            "[shutdown]\ngrace_ms = 3600000",
            "shutdown.grace_ms",
            "at most 600000",
        ),
        // Rules of the plugin sections come through the same way.
        (
            "[plugins]\nworkers = 0",
            "plugins.workers",
            "between 1 and 256",
        ),
        (
            "[plugins]\nregistry_max_devices = 0",
            "plugins.registry_max_devices",
            "between 1 and 10000000",
        ),
        (
            "[plugins]\nregistry_retention_days = 100000",
            "plugins.registry_retention_days",
            "0 (no limit) and 36500 days",
        ),
        (
            "[plugins]\nregistry_flush_ms = 1",
            "plugins.registry_flush_ms",
            "between 10 and 600000 ms",
        ),
        (
            "[redis]\nenabled = true\nurl = \"http://x\"",
            "redis.url",
            "redis://",
        ),
        (
            "[mysql]\nenabled = true\nurl = \"\"",
            "mysql.url",
            "mysql://",
        ),
    ];
    for (text, key, reason) in cases {
        let found = problems(text);
        assert_eq!(found.len(), 1, "{text:?} gave {found:?}");
        assert_eq!(found[0].key, *key, "{text:?}");
        assert_eq!(found[0].file, "test.toml");
        assert!(
            found[0].reason.contains(reason),
            "{text:?}: reason {:?} lacks {reason:?}",
            found[0].reason
        );
    }
}

#[test]
fn bounds_themselves_are_accepted() {
    let ok = [
        "[limits]\nmax_frame = 9\nqueue_bytes = 13",
        "[limits]\nmax_frame = 16777216\nqueue_bytes = 16777220",
        "[limits]\nmax_connections = 19000",
        "[heartbeat]\nmin_s = 30\nmax_s = 30\ninterval_s = 30\nidle_factor = 2",
        "[auth]\nmode = \"hmac\"\nsecret = \"0123456789abcdef0123\"",
        "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"",
        "[listeners]\ntcp = \"127.0.0.1:9000\"\nhttp = \"127.0.0.1:9000\"\n[http]\nenabled = false",
        "[log]\nlevel = \"warn,relay_shards=debug,relay_core[conn{addr=x}]=trace,hyper\"",
        "[shards]\ncount = 64\n[shutdown]\ngrace_ms = 0",
    ];
    for text in ok {
        assert!(load(text).is_ok(), "{text:?}: {:?}", load(text));
    }
}

#[test]
fn validate_names_the_origin_and_finds_every_rule() {
    let mut c = Config::default();
    c.limits.max_frame = 1;
    c.auth.mode = AuthMode::Hmac;
    c.heartbeat.min_s = 100;
    c.heartbeat.max_s = 10;
    let err = c.validate("built.toml").unwrap_err();
    assert_eq!(
        keys(&err.problems),
        set(&["limits.max_frame", "auth.secret", "heartbeat.min_s"])
    );
    assert!(err.problems.iter().all(|p| p.file == "built.toml"));
}

// ---- many problems at once ---------------------------------------------

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
bogus_top = 1

[limits]
max_frame = 4
max_connections = 50000
typo_key = 3
hello_timeout_ms = "ten seconds"

[heartbeat]
min_s = 60
max_s = 10

[auth]
mode = "hmac"
secret = ""

[http]
api_token = ""
mystery = true

[listeners]
tcp = "not an address"

[notify]
[[notify.route]]
name = "r"
chain = [{ channel = "log", bogus = 1 }]
"#;
    let found = problems(text);
    assert_eq!(
        keys(&found),
        set(&[
            "bogus_top",
            "limits.max_frame",
            "limits.max_connections",
            "limits.typo_key",
            "limits.hello_timeout_ms",
            "heartbeat.min_s",
            "auth.secret",
            "http.api_token",
            "http.mystery",
            "listeners.tcp",
            "notify.route[0].chain[0].bogus",
        ]),
        "{found:#?}"
    );
    assert!(found.iter().all(|p| p.file == "test.toml"));
    // The Display form is one `file: key: reason` line per problem.
    let err = ConfigError {
        problems: found.clone(),
    };
    let text = err.to_string();
    assert_eq!(text.lines().count(), found.len());
    assert!(
        text.lines()
            .any(|l| l.starts_with("test.toml: limits.max_frame: is 4, must be at least 9"))
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("test.toml: listeners.tcp: invalid socket address syntax"))
    );
}

#[test]
fn a_key_that_cannot_be_decoded_gets_one_problem_not_two() {
    // max_frame is refused as a type; its default then must not also trip the
    // queue rule that compares with it.
    let found = problems("[limits]\nmax_frame = \"big\"\nqueue_bytes = 100");
    assert_eq!(
        keys(&found),
        set(&["limits.max_frame", "limits.queue_bytes"])
    );
    let found = problems("[limits]\nmax_frame = \"big\"");
    assert_eq!(keys(&found), set(&["limits.max_frame"]));
}

// ---- unknown keys ------------------------------------------------------

#[test]
fn unknown_keys_are_refused_at_every_level() {
    let text = r#"
unknown_section_key = 1
[unknown_section]
a = 1
[shards]
cuont = 2
[redis]
enabled = false
uri = "redis://x"
[mysql]
[[mysql.tables]]
name = "t"
columns = [{ name = "a", type = "int", extra = 1 }]
"#;
    let found = problems(text);
    assert_eq!(
        keys(&found),
        set(&[
            "unknown_section_key",
            "unknown_section",
            "shards.cuont",
            "redis.uri",
            "mysql.tables[0].columns[0].extra",
        ]),
        "{found:#?}"
    );
    let cuont = found.iter().find(|p| p.key == "shards.cuont").unwrap();
    assert!(
        cuont
            .reason
            .starts_with("unknown key; expected one of `count`"),
        "{}",
        cuont.reason
    );
}

// ---- types -------------------------------------------------------------

#[test]
fn wrong_types_name_the_key_and_the_expected_type() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[limits]\nmax_frame = \"x\"",
            "limits.max_frame",
            "expected u32",
        ),
        (
            "[limits]\nmax_frame = -1",
            "limits.max_frame",
            "integer `-1`",
        ),
        (
            "[limits]\nmax_frame = 5000000000",
            "limits.max_frame",
            "expected u32",
        ),
        (
            "[limits]\nmax_frame = 1.5",
            "limits.max_frame",
            "floating point",
        ),
        (
            "[shards]\npin = \"yes\"",
            "shards.pin",
            "expected a boolean",
        ),
        ("[node]\nname = 7", "node.name", "expected a string"),
        (
            "[listeners]\nhttp = \"localhost\"",
            "listeners.http",
            "(got \"localhost\")",
        ),
        (
            "[auth]\nmode = \"HMAC\"",
            "auth.mode",
            "expected `none` or `hmac`",
        ),
        ("[auth]\nmode = 1", "auth.mode", "expected a string"),
        (
            "[log]\nformat = \"xml\"",
            "log.format",
            "unknown value `xml`",
        ),
        (
            "[http]\napi_token = 5",
            "http.api_token",
            "expected a string",
        ),
        ("limits = 5", "limits", "expected struct LimitsConfig"),
        (
            "[plugins]\ntick_s = \"often\"",
            "plugins.tick_s",
            "expected f64",
        ),
    ];
    for (text, key, reason) in cases {
        let found = problems(text);
        assert_eq!(found.len(), 1, "{text:?} gave {found:?}");
        assert_eq!(found[0].key, *key, "{text:?}");
        assert!(
            found[0].reason.contains(reason),
            "{text:?}: {:?} lacks {reason:?}",
            found[0].reason
        );
    }
}

#[test]
fn a_syntax_error_gives_line_and_column() {
    let found = problems("[limits]\nmax_frame = = 3\n");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, "");
    assert!(
        found[0]
            .reason
            .starts_with("TOML syntax error at line 2, column"),
        "{}",
        found[0].reason
    );
    assert!(!found[0].reason.contains('\n'));
}

// ---- environment overrides ---------------------------------------------

#[test]
fn env_overrides_set_keys_and_win_over_the_file() {
    let c = load_env(
        "[limits]\nmax_frame = 1000\n",
        &[
            ("RELAY__LIMITS__MAX_FRAME", "131072"),
            ("RELAY__AUTH__MODE", "hmac"),
            ("RELAY__AUTH__SECRET", "0123456789abcdef0123"),
            ("RELAY__LISTENERS__TCP", "0.0.0.0:7100"),
            ("RELAY__SHARDS__PIN", "false"),
            ("RELAY__log__Level", "debug"),
            ("RELAY__REDIS__URL", "redis://127.0.0.1:6380/"),
            ("PATH", "/usr/bin"),
        ],
    )
    .expect("overrides apply");
    assert_eq!(c.limits.max_frame, 131072);
    assert_eq!(c.auth.mode, AuthMode::Hmac);
    assert_eq!(c.auth.secret, "0123456789abcdef0123");
    assert_eq!(
        c.listeners.tcp,
        "0.0.0.0:7100".parse::<SocketAddr>().unwrap()
    );
    assert!(!c.shards.pin);
    assert_eq!(c.log.level, "debug");
    assert_eq!(c.redis.url, "redis://127.0.0.1:6380/");
}

#[test]
fn env_values_that_read_as_the_wrong_type_are_taken_as_text() {
    let c = load_env(
        "",
        &[
            ("RELAY__HTTP__API_TOKEN", "12345"),
            ("RELAY__NODE__NAME", "true"),
        ],
    )
    .unwrap();
    assert_eq!(c.http.api_token.as_deref(), Some("12345"));
    assert_eq!(c.node.name, "true");
}

#[test]
fn env_problems_name_the_variable() {
    let err = load_env(
        "",
        &[
            ("RELAY__LIMITS__MAX_FRAMES", "1"),
            ("RELAY__NOPE__X", "1"),
            ("RELAY__LIMITS__MAX_FRAME", "4"),
            ("RELAY__LIMITS__BURST", "lots"),
        ],
    )
    .unwrap_err();
    let by_key = |k: &str| {
        err.find(k)
            .unwrap_or_else(|| panic!("no problem at {k}: {err}"))
    };
    assert_eq!(
        by_key("limits.max_frames").file,
        "env RELAY__LIMITS__MAX_FRAMES"
    );
    assert!(
        by_key("limits.max_frames")
            .reason
            .starts_with("unknown key")
    );
    assert_eq!(by_key("nope").file, "env RELAY__NOPE__X");
    // A rule broken by an override's value names the override too.
    assert_eq!(
        by_key("limits.max_frame").file,
        "env RELAY__LIMITS__MAX_FRAME"
    );
    assert_eq!(by_key("limits.burst").file, "env RELAY__LIMITS__BURST");
    assert!(
        by_key("limits.burst").reason.contains("\"lots\""),
        "{}",
        by_key("limits.burst").reason
    );
    assert_eq!(err.problems.len(), 4, "{err}");
}

#[test]
fn file_problems_and_env_problems_are_told_apart() {
    let err = load_env(
        "[limits]\nburst = 0\n",
        &[("RELAY__LIMITS__FRAMES_PER_SEC", "0")],
    )
    .unwrap_err();
    assert_eq!(err.find("limits.burst").unwrap().file, "test.toml");
    assert_eq!(
        err.find("limits.frames_per_sec").unwrap().file,
        "env RELAY__LIMITS__FRAMES_PER_SEC"
    );
}

#[test]
fn env_reaches_into_arrays_of_tables() {
    let text = "[[notify.route]]\nname = \"r\"\nchain = [{ channel = \"log\" }]\n";
    let c = load_env(
        text,
        &[("RELAY__NOTIFY__ROUTE__0__SEVERITIES", "[\"critical\"]")],
    )
    .unwrap();
    assert_eq!(
        c.notify.route[0].severities,
        vec![plugins::Severity::Critical]
    );
    let err = load_env(text, &[("RELAY__NOTIFY__ROUTE__3__NAME", "x")]).unwrap_err();
    assert_eq!(err.problems[0].file, "env RELAY__NOTIFY__ROUTE__3__NAME");
}

#[test]
fn env_cannot_set_a_key_below_a_value() {
    let err = load_env(
        "[limits]\nmax_frame = 100",
        &[("RELAY__LIMITS__MAX_FRAME__DEEP", "1")],
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].key, "limits.max_frame.deep");
    assert_eq!(err.problems[0].file, "env RELAY__LIMITS__MAX_FRAME__DEEP");
    // Without the key in the file, the override makes `max_frame` a table: a type problem.
    let err = load_env("", &[("RELAY__LIMITS__MAX_FRAME__DEEP", "1")]).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].key, "limits.max_frame");
    assert_eq!(err.problems[0].file, "env RELAY__LIMITS__MAX_FRAME__DEEP");
}

#[test]
fn process_env_reports_non_utf8_values() {
    use std::os::unix::ffi::OsStringExt;
    let vars = vec![
        (
            OsString::from("RELAY__NODE__NAME"),
            OsString::from_vec(vec![0xff, 0xfe]),
        ),
        (OsString::from("OTHER"), OsString::from_vec(vec![0xff])),
        (OsString::from("RELAY__LIMITS__BURST"), OsString::from("10")),
    ];
    let (env, problems) = process_env(vars);
    assert_eq!(
        env,
        vec![("RELAY__LIMITS__BURST".to_owned(), "10".to_owned())]
    );
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].file, "env RELAY__NODE__NAME");
}

// ---- derived values ----------------------------------------------------

#[test]
fn heartbeat_and_idle_timeout_follow_the_bounds() {
    let c = Config::default();
    assert_eq!(c.heartbeat_s(None), 30);
    assert_eq!(c.heartbeat_s(Some(0)), 30);
    assert_eq!(c.heartbeat_s(Some(1)), 5);
    assert_eq!(c.heartbeat_s(Some(60)), 60);
    assert_eq!(c.heartbeat_s(Some(u32::MAX)), 3600);
    assert_eq!(c.idle_timeout_ms(30), 90_000);
    assert_eq!(c.idle_timeout_ms(0), 15_000);
    assert_eq!(c.idle_timeout_ms(u32::MAX), 3 * 3600 * 1000);
}

#[test]
fn shard_count_resolves_zero_to_the_cores() {
    let mut c = Config::default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(c.shard_count(), cores);
    c.shards.count = 3;
    assert_eq!(c.shard_count(), 3);
}

#[test]
fn warnings_point_at_open_listeners_without_auth() {
    let c = load("[listeners]\ntcp = \"0.0.0.0:7000\"\nhttp = \"0.0.0.0:8080\"").unwrap();
    let warned = keys(&c.warnings("x.toml"));
    assert_eq!(warned, set(&["auth.mode", "http.api_token"]));
    let c = load("[auth]\nmode = \"hmac\"\nsecret = \"short\"").unwrap();
    let w = c.warnings("x.toml");
    assert_eq!(w.len(), 1);
    assert!(w[0].reason.contains("shorter than 16"));
    assert_eq!(w[0].file, "x.toml");
}

#[test]
fn to_toml_round_trips() {
    let text = std::fs::read_to_string(relay_toml_path()).unwrap();
    let c = Config::from_toml(&text, "relay.toml", NO_ENV).unwrap();
    assert_eq!(load(&c.to_toml()), Ok(c));
    assert_eq!(load(&Config::default().to_toml()), Ok(Config::default()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_valid_max_frame_round_trips_through_env(v in MIN_FRAME..=MAX_FRAME_CEILING) {
        let env = [
            ("RELAY__LIMITS__MAX_FRAME".to_owned(), v.to_string()),
            ("RELAY__LIMITS__QUEUE_BYTES".to_owned(), (u64::from(v) + 4).max(262_144).to_string()),
        ];
        let c = Config::from_toml("", "t", env).unwrap();
        prop_assert_eq!(c.limits.max_frame, v);
    }

    #[test]
    fn any_out_of_range_max_frame_is_exactly_one_env_problem(
        v in prop_oneof![0u32..MIN_FRAME, (MAX_FRAME_CEILING + 1)..=u32::MAX]
    ) {
        let env = [
            ("RELAY__LIMITS__MAX_FRAME".to_owned(), v.to_string()),
            ("RELAY__LIMITS__QUEUE_BYTES".to_owned(), "1073741824".to_owned()),
        ];
        let err = Config::from_toml("", "t", env).unwrap_err();
        prop_assert_eq!(err.problems.len(), 1);
        prop_assert_eq!(&err.problems[0].key, "limits.max_frame");
        prop_assert_eq!(&err.problems[0].file, "env RELAY__LIMITS__MAX_FRAME");
    }

    #[test]
    fn valid_limits_round_trip_through_toml(
        max_frame in MIN_FRAME..=65_536u32,
        max_connections in 1..=MAX_CONNECTIONS_CEILING,
        frames_per_sec in 1..=1_000_000u32,
        burst in 1..=1_000_000u32,
    ) {
        let mut c = Config::default();
        c.limits.max_frame = max_frame;
        c.limits.max_connections = max_connections;
        c.limits.frames_per_sec = frames_per_sec;
        c.limits.burst = burst;
        prop_assert_eq!(load(&c.to_toml()), Ok(c));
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = load(&text);
    }
}

#[test]
fn tls_listeners_need_a_certificate_and_sane_bounds() {
    let p = problems(
        "[listeners]\ntcp_tls = \"0.0.0.0:7443\"\nhttp_tls = \"0.0.0.0:7443\"\n\
         [tls]\nmax_fragment_size = 100\nclient_address = \"email\"\nhandshake_timeout_ms = 5\n\
         alpn = [\"\"]\ncrl_file = \"revoked.pem\"\n",
    );
    assert_eq!(
        keys(&p),
        set(&[
            "tls.crl_file",
            "tls.cert_file",
            "tls.key_file",
            "listeners.http_tls",
            "tls.max_fragment_size",
            "tls.client_address",
            "tls.handshake_timeout_ms",
            "tls.alpn[0]",
        ])
    );
    let cfg = load(
        "[listeners]\ntcp_tls = \"0.0.0.0:7443\"\n[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
         max_fragment_size = 512\n",
    )
    .unwrap();
    assert_eq!(cfg.listeners.tcp_tls, Some("0.0.0.0:7443".parse().unwrap()));
    assert_eq!(cfg.tls.max_fragment_size, 512);
    // Off by default: no TLS listener, nothing required.
    let d = Config::default();
    assert!(d.listeners.tcp_tls.is_none() && d.listeners.http_tls.is_none());
}

#[test]
fn acl_rules_compile_and_every_problem_is_reported() {
    let text = "[acl]\ndefault = \"deny\"\n\
        [[acl.rule]]\nname = \"sensors\"\neffect = \"allow\"\nactions = [\"send\"]\n\
        roles = [\"controller\"]\nfrom = [\"sensor-*\"]\nto = [\"collector-?\"]\n\
        [[acl.rule]]\neffect = \"deny\"\nactions = [\"*\"]\nauth = [\"certificate\"]\n";
    let cfg = load(text).unwrap();
    let acl = cfg.acl.compile().unwrap();
    assert!(!acl.default_allow());
    assert_eq!(acl.rules().len(), 2);
    assert_eq!(acl.rules()[1].name, "rule-1");

    let p = problems(
        "[acl]\ndefault = \"maybe\"\n\
         [[acl.rule]]\nname = \"a b\"\neffect = \"allow\"\nactions = [\"send\", \"sned\"]\n\
         roles = [\"device\"]\nauth = [\"password\"]\nfrom = [\"sen sor*\"]\nto = [\"\"]\n\
         member_of = [\"a/b\"]\n\
         [[acl.rule]]\neffect = \"permit\"\nactions = [\"join\"]\n\
         [[acl.rule]]\nname = \"dup\"\neffect = \"deny\"\nactions = []\n\
         [[acl.rule]]\nname = \"dup\"\neffect = \"deny\"\nactions = [\"watch\"]\n",
    );
    assert_eq!(
        keys(&p),
        set(&[
            "acl.default",
            "acl.rule[0].name",
            "acl.rule[0].actions[1]",
            "acl.rule[0].roles[0]",
            "acl.rule[0].auth[0]",
            "acl.rule[0].from[0]",
            "acl.rule[0].to[0]",
            "acl.rule[0].member_of[0]",
            "acl.rule[1].effect",
            "acl.rule[2].actions",
            "acl.rule[3].name",
        ]),
        "{p:#?}"
    );
    let text = p
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "unknown action \"sned\"",
        "unknown role \"device\"",
        "unknown authentication \"password\"",
        "' '",
        "names an earlier rule",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

#[test]
fn proxy_protocol_names_listeners_that_listen() {
    let cfg = load("[listeners]\nproxy_protocol = [\"tcp\", \"http\"]\n").unwrap();
    assert_eq!(cfg.listeners.proxy_protocol, ["tcp", "http"]);
    let p = problems(
        "[listeners]\nproxy_protocol = [\"tcp\", \"udp\", \"tcp_tls\"]\nproxy_header_timeout_ms = 1\n",
    );
    assert_eq!(
        keys(&p),
        set(&[
            "listeners.proxy_protocol[1]",
            "listeners.proxy_protocol[2]",
            "listeners.proxy_header_timeout_ms",
        ])
    );
}

#[test]
fn the_cluster_is_off_by_default_and_every_bound_has_a_default() {
    let c = Config::default();
    assert!(!c.cluster.enabled);
    assert!(c.cluster.batch_bytes > 0 && c.cluster.batch_bytes < 1024 * 1024);
    assert!(c.cluster.channel_capacity > 0);
    assert!(c.cluster.cache_size > 0);
    assert!(c.cluster.heartbeat_ms > 0);
}

#[test]
fn a_cluster_needs_a_nats_url_a_subject_safe_prefix_and_node_name() {
    let p = problems(
        "[node]\nname = \"n@1\"\n[cluster]\nenabled = true\nnats_url = \"http://x\"\nprefix = \"a.b\"\nbatch_bytes = 2000000\n",
    );
    assert_eq!(
        keys(&p),
        set(&[
            "node.name",
            "cluster.nats_url",
            "cluster.prefix",
            "cluster.batch_bytes"
        ])
    );
    let c = load("[node]\nname = \"edge-2\"\n[cluster]\nenabled = true\nprefix = \"site_a\"\n")
        .expect("a valid cluster section");
    assert_eq!(c.cluster.prefix, "site_a");
}

#[test]
fn mqtt_is_off_by_default_and_its_section_is_checked() {
    let c = Config::default();
    assert_eq!(c.listeners.mqtt, None);
    assert_eq!(c.mqtt.inbox_prefix, "relay/from");
    assert_eq!(c.mqtt.outbox_prefix, "relay/to");
    let p = problems(
        "[mqtt]\ninbox_prefix = \"a/#\"\noutbox_prefix = \"x/\"\nmax_inflight = 0\nmax_packet_size = 10\nconnect_timeout_ms = 1\n",
    );
    assert_eq!(
        keys(&p),
        set(&[
            "mqtt.inbox_prefix",
            "mqtt.outbox_prefix",
            "mqtt.max_inflight",
            "mqtt.max_packet_size",
            "mqtt.connect_timeout_ms"
        ])
    );
    let p = problems("[mqtt]\ninbox_prefix = \"same\"\noutbox_prefix = \"same\"\n");
    assert_eq!(keys(&p), set(&["mqtt.outbox_prefix"]));
    let c = load("[listeners]\nmqtt = \"127.0.0.1:1884\"\n[mqtt]\ninbox_prefix = \"dev/in\"\n")
        .expect("a valid mqtt section");
    assert_eq!(c.listeners.mqtt, Some("127.0.0.1:1884".parse().unwrap()));
    assert_eq!(c.mqtt.inbox_prefix, "dev/in");
}

#[test]
fn the_rules_lease_is_off_by_default_and_needs_the_plugins() {
    assert!(!Config::default().cluster.rules_lease);
    let p = problems(
        "[node]\nname = \"edge-1\"\n[cluster]\nenabled = true\nrules_lease = true\n[plugins]\nenabled = false\n",
    );
    assert_eq!(keys(&p), set(&["cluster.rules_lease"]));
    let c = load(
        "[node]\nname = \"edge-1\"\n[cluster]\nenabled = true\nrules_lease = true\n[plugins]\nenabled = true\n",
    )
    .expect("a cluster running its rules behind the lease");
    assert!(c.cluster.rules_lease);
}

#[test]
fn mqtt_tls_needs_a_certificate_and_its_own_address() {
    let p = problems("[listeners]\nmqtt = \"0.0.0.0:8883\"\nmqtt_tls = \"0.0.0.0:8883\"\n");
    assert_eq!(
        keys(&p),
        set(&["tls.cert_file", "tls.key_file", "listeners.mqtt_tls"])
    );
    let cfg = load(
        "[listeners]\nmqtt = \"0.0.0.0:1883\"\nmqtt_tls = \"0.0.0.0:8883\"\n\
         [tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n",
    )
    .unwrap();
    assert_eq!(
        cfg.listeners.mqtt_tls,
        Some("0.0.0.0:8883".parse().unwrap())
    );
    assert!(Config::default().listeners.mqtt_tls.is_none());
}
