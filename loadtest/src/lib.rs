//! relay-loadtest: an open-loop load generator for the relay and, for comparison, any
//! MQTT 3.1.1 broker. It simulates fleets of controllers (TCP, binary or JSON form) and
//! browsers (WebSocket), drives traffic patterns on a fixed schedule, measures latency
//! from each message's intended send time into HdrHistograms, and writes human, JSON
//! and HTML reports.
//!
//! # Layout
//! - [`scenario`]: the TOML scenario file and command-line overrides, with validation.
//! - [`plan`]: turns a scenario into a deterministic list of clients (addresses, who
//!   sends to whom, which groups each joins) and splits it across worker processes.
//! - [`clock`]: the CLOCK_MONOTONIC nanosecond clock shared by every process on the host.
//! - [`schedule`]: the open-loop send schedule (intended send times, batching per tick).
//! - [`payload`]: the timestamp stamped into every message (binary and JSON forms).
//! - [`stats`]: HdrHistogram recording, per-second throughput, errors by kind, merging.
//! - [`wire`]: client-side codecs: relay binary/JSON over TCP, WebSocket framing, MQTT.
//! - [`net`]: TCP connects from chosen 127.0.0.x source addresses, error classification.
//! - [`client`]: one simulated connection: handshake, then a link the sender thread
//!   writes to, a reader (latency recording, command echo) and a flusher.
//! - [`sender`]: the sender thread of a worker: every timer of its connections, each
//!   message written at its intended time (sleep, then spin on the clock).
//! - [`worker`]: the engine that runs one share of the fleet, in process or as a child
//!   process talking JSON lines over pipes.
//! - [`coordinator`]: runs a whole scenario over its workers: connect, steps, find-max,
//!   server sampling, and assembles the [`report::Report`].
//! - [`findmax`]: the rate ramp that searches for the highest rate meeting an SLO.
//! - [`limits`]: open-file limit, ephemeral port range, worker and source-address plan.
//! - [`procstat`]: CPU time and RSS of the server process read from /proc.
//! - [`report`]: the report structure, the human summary and the JSON form.
//! - [`html`]: the HTML report with SVG plots.
//! - [`compare`]: two JSON reports side by side (`relay-loadtest compare`).
//! - [`progress`]: the live progress line.
//! - [`cli`]: the command-line flags.

pub mod cli;
pub mod client;
pub mod clock;
pub mod compare;
pub mod coordinator;
pub mod findmax;
pub mod html;
pub mod limits;
pub mod net;
pub mod payload;
pub mod plan;
pub mod procstat;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod schedule;
pub mod sender;
pub mod stats;
pub mod tls;
pub mod wire;
pub mod worker;
