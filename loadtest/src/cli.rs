//! Command-line flags. Every flag overrides the matching scenario key, so a shipped
//! scenario can be reused with another target, size or rate.

use std::path::PathBuf;

use clap::Parser;

use crate::scenario::{Dur, Form, Pattern, RampBy, Scenario};

/// Open-loop load generator for the relay (and any MQTT 3.1.1 broker).
#[derive(Debug, Parser)]
#[command(name = "relay-loadtest", version, about, long_about = None)]
pub struct Cli {
    /// Scenario file (TOML); flags override its values.
    #[arg(short, long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,

    /// Traffic pattern: telemetry, command, fanout, fanin, idle, storm.
    #[arg(short, long)]
    pub pattern: Option<Pattern>,
    /// Controllers' URL: tcp://host:port (relay), mqtt://host:port (any MQTT broker),
    /// or over TLS tcps://host:port, mqtts://host:port. Repeat it (or give a comma
    /// list) for the nodes of a relay cluster: clients are placed on them round-robin.
    #[arg(short, long, value_name = "URL")]
    pub target: Vec<String>,
    /// Browsers' URL: ws://host:port/ws or wss://host:port/ws (relay only). With
    /// several --target, one per target in the same order (repeat it or a comma list).
    #[arg(long, value_name = "URL")]
    pub browsers: Vec<String>,
    /// CA certificates (PEM) TLS targets are verified against.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs --client-key.
    #[arg(long, value_name = "PEM")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, value_name = "PEM")]
    pub client_key: Option<PathBuf>,
    /// Name the server's certificate is verified for and sent as SNI (default: the
    /// URL's host).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Form controllers speak: binary or json.
    #[arg(long)]
    pub controller_form: Option<Form>,
    /// Form browsers speak: json (text, hello in the URL) or binary.
    #[arg(long)]
    pub browser_form: Option<Form>,
    /// Prefix of every address, group and topic of the run.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Pid of the server to sample (default: found from the controllers' port).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Also report the CPU of this process: name=pid or name=:port (repeatable),
    /// e.g. --watch redis=:6379 --watch mysql=:3306.
    #[arg(long, value_name = "NAME=PID|:PORT")]
    pub watch: Vec<String>,

    /// Controllers.
    #[arg(short = 'n', long)]
    pub controllers: Option<u32>,
    /// Browsers per controller (telemetry).
    #[arg(long)]
    pub browsers_per_controller: Option<u32>,
    /// Groups, one publisher each (fanout).
    #[arg(long)]
    pub groups: Option<u32>,
    /// Members per group (fanout).
    #[arg(long)]
    pub members: Option<u32>,
    /// Dashboards (fanin).
    #[arg(long)]
    pub dashboards: Option<u32>,
    /// Messages per second per sender.
    #[arg(short, long)]
    pub rate: Option<f64>,
    /// Messages per second for the whole fleet.
    #[arg(long)]
    pub total_rate: Option<f64>,
    /// Connections per second (storm; pacing otherwise).
    #[arg(long)]
    pub connect_rate: Option<f64>,
    /// Storm: close each connection after its handshake.
    #[arg(long)]
    pub storm_close: bool,
    /// Payload bytes per message (≥ 16).
    #[arg(long)]
    pub payload: Option<u32>,
    /// JSON payload template, e.g. '{"temp": {{rand 20..90}}}'.
    #[arg(long, value_name = "JSON")]
    pub payload_template: Option<String>,
    /// Heartbeat interval (e.g. 30s).
    #[arg(long)]
    pub heartbeat: Option<Dur>,
    /// Sending time of the step (e.g. 10s).
    #[arg(short, long)]
    pub duration: Option<Dur>,
    /// Wait after sending for messages in flight.
    #[arg(long)]
    pub drain: Option<Dur>,
    /// Wake (and write) on a grid of this step per connection; 0 = at intended times.
    #[arg(long)]
    pub tick: Option<Dur>,

    /// Worker processes (0 = as the open-file limit requires).
    #[arg(short, long)]
    pub workers: Option<u32>,
    /// Runtime threads per worker (0 = cores / workers).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Source addresses: 127.0.0.2,127.0.0.5..127.0.0.9
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Option<Vec<String>>,
    /// Handshakes in flight per worker during the connect phase.
    #[arg(long)]
    pub connect_concurrency: Option<u32>,
    /// Deadline of one connect + handshake.
    #[arg(long)]
    pub connect_timeout: Option<Dur>,

    /// Ramp and report the most that meets the SLO: `rate` (the default: total
    /// msg/s over the fleet) or `fleet` (connected controllers at --rate each).
    #[arg(long, value_name = "WHAT", num_args = 0..=1, default_missing_value = "rate")]
    pub find_max: Option<RampBy>,
    /// Fleet ramp: first fleet size.
    #[arg(long)]
    pub start_fleet: Option<u32>,
    /// p99 bound of the SLO (e.g. 10ms).
    #[arg(long)]
    pub slo_p99: Option<Dur>,
    /// Loss bound of the SLO (0.001 = 0.1%).
    #[arg(long)]
    pub max_loss: Option<f64>,
    /// First total rate of the ramp.
    #[arg(long)]
    pub start_rate: Option<f64>,
    /// Ramp growth factor.
    #[arg(long)]
    pub ramp_factor: Option<f64>,
    /// Most ramp steps.
    #[arg(long)]
    pub max_steps: Option<u32>,
    /// Bisection steps after the ramp.
    #[arg(long)]
    pub refine_steps: Option<u32>,
    /// Highest total rate to try (0 = none).
    #[arg(long)]
    pub max_rate: Option<f64>,
    /// Length of each ramp step.
    #[arg(long)]
    pub step_duration: Option<Dur>,

    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub no_progress: bool,
    /// Print the effective scenario as TOML and exit.
    #[arg(long)]
    pub print_scenario: bool,

    /// Internal: run as a worker process (commands on stdin, replies on stdout).
    #[arg(long, hide = true)]
    pub worker: bool,

    #[command(subcommand)]
    pub command: Option<Sub>,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Compare two JSON reports: a table on stdout, and overlaid plots with --html.
    Compare {
        /// The first report (A).
        a: PathBuf,
        /// The second report (B); the table's last column is B / A.
        b: PathBuf,
        /// Also write the comparison as an HTML page here.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
}

impl Cli {
    /// Applies every given flag to `s`.
    pub fn apply(&self, s: &mut Scenario) {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        set(&mut s.pattern, &self.pattern);
        if !self.target.is_empty() {
            let t = self.target.join(",");
            if (t.starts_with("mqtt://") || t.starts_with("mqtts://")) && self.browsers.is_empty() {
                s.target.browsers = String::new();
            }
            s.target.controllers = t;
        }
        if !self.browsers.is_empty() {
            s.target.browsers = self.browsers.join(",");
        }
        set(&mut s.target.controller_form, &self.controller_form);
        set(&mut s.target.browser_form, &self.browser_form);
        set(&mut s.target.prefix, &self.prefix);
        set(&mut s.target.server_pid, &self.server_pid);
        for (dst, v) in [
            (&mut s.target.ca_file, &self.ca_file),
            (&mut s.target.client_cert, &self.client_cert),
            (&mut s.target.client_key, &self.client_key),
        ] {
            if v.is_some() {
                dst.clone_from(v);
            }
        }
        if self.tls_server_name.is_some() {
            s.target.tls_server_name.clone_from(&self.tls_server_name);
        }
        if !self.watch.is_empty() {
            s.target.watch = self.watch.clone();
        }
        let l = &mut s.load;
        set(&mut l.controllers, &self.controllers);
        set(
            &mut l.browsers_per_controller,
            &self.browsers_per_controller,
        );
        set(&mut l.groups, &self.groups);
        set(&mut l.members, &self.members);
        set(&mut l.dashboards, &self.dashboards);
        if self.rate.is_some() {
            l.rate = self.rate;
            l.total_rate = None;
        }
        if self.total_rate.is_some() {
            l.total_rate = self.total_rate;
            l.rate = None;
        }
        set(&mut l.connect_rate, &self.connect_rate);
        l.storm_close |= self.storm_close;
        set(&mut l.payload_bytes, &self.payload);
        if self.payload_template.is_some() {
            l.payload_template = self.payload_template.clone();
        }
        set(&mut l.heartbeat, &self.heartbeat);
        set(&mut l.duration, &self.duration);
        set(&mut l.drain, &self.drain);
        set(&mut l.tick, &self.tick);
        let r = &mut s.run;
        set(&mut r.workers, &self.workers);
        set(&mut r.threads, &self.threads);
        set(&mut r.source_addrs, &self.source_addrs);
        set(&mut r.connect_concurrency, &self.connect_concurrency);
        set(&mut r.connect_timeout, &self.connect_timeout);
        let f = &mut s.find_max;
        if let Some(by) = self.find_max {
            f.enabled = true;
            f.by = by;
        }
        if self.start_fleet.is_some() {
            f.start_fleet = self.start_fleet;
        }
        set(&mut f.slo_p99, &self.slo_p99);
        set(&mut f.max_loss, &self.max_loss);
        if self.start_rate.is_some() {
            f.start_rate = self.start_rate;
        }
        set(&mut f.factor, &self.ramp_factor);
        set(&mut f.max_steps, &self.max_steps);
        set(&mut f.refine_steps, &self.refine_steps);
        set(&mut f.max_rate, &self.max_rate);
        set(&mut f.step_duration, &self.step_duration);
        if self.json.is_some() {
            s.report.json = self.json.clone();
        }
        if self.html.is_some() {
            s.report.html = self.html.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_scenario() {
        let mut s = Scenario::from_toml(
            "pattern = \"fanin\"\n[load]\ncontrollers = 10\nrate = 2.0\n",
            "t",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "relay-loadtest",
            "--target",
            "mqtt://127.0.0.1:1883",
            "-n",
            "50",
            "--total-rate",
            "1000",
            "--duration",
            "3s",
            "--source-addrs",
            "127.0.0.2,127.0.0.3..127.0.0.4",
            "--find-max",
            "--slo-p99",
            "5ms",
        ]);
        cli.apply(&mut s);
        assert_eq!(s.pattern, Pattern::Fanin);
        assert_eq!(s.load.controllers, 50);
        assert_eq!((s.load.rate, s.load.total_rate), (None, Some(1000.0)));
        assert_eq!(s.load.duration, Dur::secs(3));
        assert!(s.browser_endpoint().unwrap().is_mqtt());
        assert_eq!(s.source_addrs().unwrap().len(), 3);
        assert!(s.find_max.enabled);
        assert_eq!(s.find_max.slo_p99, Dur::millis(5));
        s.validate("t").unwrap();
    }

    #[test]
    fn several_targets_spread_the_fleet_round_robin() {
        let mut s = Scenario::from_toml("pattern = \"command\"\n", "t").unwrap();
        let cli = Cli::parse_from([
            "relay-loadtest",
            "--target",
            "tcp://127.0.0.1:7001",
            "--target",
            "tcp://127.0.0.1:7002",
            "--browsers",
            "ws://127.0.0.1:8001/ws,ws://127.0.0.1:8002/ws",
            "-n",
            "5",
            "--rate",
            "1",
        ]);
        cli.apply(&mut s);
        s.validate("t").unwrap();
        assert_eq!(s.targets(), 2);
        assert_eq!(s.controller_endpoints().unwrap().len(), 2);
        assert_eq!(
            s.browser_endpoints().unwrap()[1].addr(),
            "127.0.0.1:8002".parse().unwrap()
        );
        let plan = crate::plan::Plan::new(&s, "p");
        let spread = plan.spread();
        assert_eq!(spread.clients, [5, 5]);
        // Each browser and its controller sit side by side: every pair crosses.
        assert_eq!((spread.pairs, spread.cross), (10, 10));
        assert_eq!(plan.client(0).target, 0);
        assert_eq!(plan.client(1).target, 1);
        // One browsers' URL for two nodes is refused, as is a mix of schemes.
        s.target.browsers = "ws://127.0.0.1:8001/ws".into();
        let e = s.validate("t").unwrap_err().to_string();
        assert!(e.contains("as many browsers' URLs"), "{e}");
        s.target.browsers = "ws://127.0.0.1:8001/ws,ws://127.0.0.1:8002/ws".into();
        s.target.controllers = "tcp://127.0.0.1:7001,mqtt://127.0.0.1:1883".into();
        let e = s.validate("t").unwrap_err().to_string();
        assert!(e.contains("one scheme"), "{e}");
    }

    #[test]
    fn bad_flag_values_are_clear_errors() {
        let e = Cli::try_parse_from(["relay-loadtest", "--duration", "soon"]).unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        let e = Cli::try_parse_from(["relay-loadtest", "--pattern", "bounce"]).unwrap_err();
        assert!(e.to_string().contains("unknown pattern"), "{e}");
    }
}
