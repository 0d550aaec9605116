//! Notifiers: HTTP requests built from `[[notify.notifier]]` templates (a voice or
//! SMS provider, a webhook), with retries and backoff, a per-target rate limit, and a
//! record of every attempt (log always, MySQL when configured).
//!
//! Requests run on the blocking pool of the sink thread's runtime (ureq is a small,
//! blocking client), so a slow provider never holds up the sinks or the alarm clock.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_config::plugins::{NotifierConfig, NotifyConfig};
use serde_json::json;

use crate::effect::NotifyJob;
use crate::shared::Shared;

/// Outcome of one attempt, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptStatus {
    /// The provider answered 2xx (or the log channel wrote the line).
    Sent,
    /// Error or non-2xx answer; retried while retries are left.
    Failed,
    /// Refused by the per-target rate limit; not retried.
    RateLimited,
    /// The alarm was acknowledged or cleared before this retry; not sent.
    Cancelled,
}

impl AttemptStatus {
    fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Sent => "sent",
            AttemptStatus::Failed => "failed",
            AttemptStatus::RateLimited => "rate_limited",
            AttemptStatus::Cancelled => "cancelled",
        }
    }
}

/// One attempt, for the log and the attempts table.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub job: NotifyJob,
    pub attempt: u32,
    pub status: AttemptStatus,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub at_ms: u64,
    /// The start of the provider's answer (body), when it gave one.
    pub response: Option<String>,
}

impl Attempt {
    /// The row of the attempts table.
    pub fn row(&self) -> serde_json::Map<String, serde_json::Value> {
        let v = json!({
            "at_ms": self.at_ms,
            "channel": self.job.channel,
            "target": self.job.target,
            "route": self.job.route,
            "event": self.job.event,
            "alarm_key": self.job.key,
            "attempt": self.attempt,
            "status": self.status.as_str(),
            "http_status": self.http_status,
            "error": self.error,
            "response": self.response,
        });
        match v {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        }
    }
}

/// Fills `{{field}}`, `{{field|json}}`, `{{field|url}}` and `{{env.NAME}}` placeholders.
/// Unknown fields become empty.
pub fn render(template: &str, fields: &BTreeMap<&'static str, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let spec = after[..end].trim();
        let (name, filter) = match spec.split_once('|') {
            Some((n, f)) => (n.trim(), f.trim()),
            None => (spec, ""),
        };
        let value = match name.strip_prefix("env.") {
            Some(var) => std::env::var(var).unwrap_or_default(),
            None => fields.get(name).cloned().unwrap_or_default(),
        };
        match filter {
            "json" => out.push_str(&serde_json::Value::String(value).to_string()),
            "url" => out.push_str(&percent_encode(&value)),
            _ => out.push_str(&value),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The body sent when a notifier has none: every field as one JSON object
/// (`{"event":"cleared","state":"CLEARED","severity":"major","message":...}`).
pub fn default_body(fields: &BTreeMap<&'static str, String>) -> String {
    let m: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(m).to_string()
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sliding one-minute windows of sends per (channel, target).
#[derive(Debug, Default)]
pub struct RateLimiter {
    /// Send times (ms) within the last minute, per (channel, target).
    sent: HashMap<(String, String), VecDeque<u64>>,
}

impl RateLimiter {
    /// Takes one slot for `(channel, target)` at `now`, unless `per_min` are used.
    pub fn allow(&mut self, channel: &str, target: &str, per_min: u32, now: u64) -> bool {
        if self.sent.len() > 100_000 {
            self.sent
                .retain(|_, q| q.back().is_some_and(|t| now.saturating_sub(*t) < 60_000));
        }
        let q = self
            .sent
            .entry((channel.to_string(), target.to_string()))
            .or_default();
        while q.front().is_some_and(|t| now.saturating_sub(*t) >= 60_000) {
            q.pop_front();
        }
        if q.len() >= per_min as usize {
            return false;
        }
        q.push_back(now);
        true
    }
}

/// Sends notifications.
#[derive(Debug)]
pub struct Notifier {
    /// Notifiers by name.
    by_name: HashMap<String, (NotifierConfig, ureq::Agent)>,
    /// Per-target rate limits.
    rate: Mutex<RateLimiter>,
    /// Alarm book (retries stop once an alarm is acknowledged or cleared) and counters.
    shared: Arc<Shared>,
}

fn now_ms() -> u64 {
    crate::clock::now_ms()
}

impl Notifier {
    /// Notifiers of `cfg`.
    pub fn new(cfg: &NotifyConfig, shared: Arc<Shared>) -> Notifier {
        let by_name = cfg
            .notifier
            .iter()
            .map(|n| {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_millis(n.timeout_ms)))
                    .http_status_as_error(false)
                    .build()
                    .into();
                (n.name.clone(), (n.clone(), agent))
            })
            .collect();
        Notifier {
            by_name,
            rate: Mutex::new(RateLimiter::default()),
            shared,
        }
    }

    /// Delivers `job` with retries; `record` receives every attempt.
    pub async fn deliver(self: Arc<Self>, job: NotifyJob, record: impl Fn(Attempt)) {
        let stats = &self.shared.stats;
        let attempt_of = |n: u32, status, http_status, error| Attempt {
            job: job.clone(),
            attempt: n,
            status,
            http_status,
            error,
            at_ms: now_ms(),
            response: None,
        };
        if job.channel == "log" {
            self.shared.count(&stats.notify_attempts);
            tracing::warn!(target: "relay::notify", channel = "log", target_ = %job.target, event = %job.event,
                key = ?job.key, severity = ?job.severity, "{}", job.text);
            record(attempt_of(1, AttemptStatus::Sent, None, None));
            return;
        }
        let Some((cfg, agent)) = self.by_name.get(&job.channel) else {
            self.shared.count(&stats.notify_failures);
            record(attempt_of(
                1,
                AttemptStatus::Failed,
                None,
                Some(format!("no notifier `{}`", job.channel)),
            ));
            return;
        };
        // Incidents have a budget of their own: a storm of single alarms must never
        // use up the slot of the digest that sums it up.
        let bucket = if job
            .key
            .as_deref()
            .is_some_and(|k| k.starts_with(crate::alarm::INCIDENT_PREFIX))
        {
            format!("{}\u{0}incident", job.target)
        } else {
            job.target.clone()
        };
        let allowed = self.rate.lock().unwrap_or_else(|p| p.into_inner()).allow(
            &job.channel,
            &bucket,
            cfg.rate_per_min,
            now_ms(),
        );
        if !allowed {
            self.shared.count(&stats.notify_rate_limited);
            record(attempt_of(
                1,
                AttemptStatus::RateLimited,
                None,
                Some(format!("over {} per minute", cfg.rate_per_min)),
            ));
            return;
        }
        let fields = job.fields();
        let url = render(&cfg.url, &fields);
        let body = if cfg.body.is_empty() && cfg.method != "GET" {
            default_body(&fields)
        } else {
            render(&cfg.body, &fields)
        };
        let mut headers: Vec<(String, String)> = cfg
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), render(v, &fields)))
            .collect();
        if cfg.body.is_empty()
            && cfg.method != "GET"
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        let mut backoff = cfg.backoff_ms;
        for n in 1..=cfg.retries + 1 {
            if n > 1 && !self.shared.book().still_wanted(&job) {
                record(attempt_of(n, AttemptStatus::Cancelled, None, None));
                return;
            }
            self.shared.count(&stats.notify_attempts);
            let (agent, method, url, body, headers) = (
                agent.clone(),
                cfg.method.clone(),
                url.clone(),
                body.clone(),
                headers.clone(),
            );
            let result = tokio::task::spawn_blocking(move || {
                http_call(&agent, &method, &url, &headers, body)
            })
            .await
            .unwrap_or_else(|e| Err(format!("request task failed: {e}")));
            match result {
                Ok((status, answer)) if (200..300).contains(&status) => {
                    let mut a = attempt_of(n, AttemptStatus::Sent, Some(status), None);
                    a.response = answer;
                    record(a);
                    return;
                }
                Ok((status, answer)) => {
                    self.shared.count(&stats.notify_failures);
                    let mut a = attempt_of(
                        n,
                        AttemptStatus::Failed,
                        Some(status),
                        Some(format!("HTTP {status}")),
                    );
                    a.response = answer;
                    record(a);
                }
                Err(e) => {
                    self.shared.count(&stats.notify_failures);
                    record(attempt_of(n, AttemptStatus::Failed, None, Some(e)));
                }
            }
            if n <= cfg.retries {
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                backoff = (backoff.saturating_mul(2)).min(cfg.backoff_max_ms);
            }
        }
    }
}

/// Most characters of a provider's answer kept in the attempt record.
const ANSWER_CHARS: usize = 500;

/// One blocking HTTP request; the status code and the start of the answer's body
/// (none when empty), or a transport error.
fn http_call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: String,
) -> Result<(u16, Option<String>), String> {
    let resp = if method == "GET" {
        let mut req = agent.get(url);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req.call()
    } else {
        let mut req = match method {
            "PUT" => agent.put(url),
            "PATCH" => agent.patch(url),
            _ => agent.post(url),
        };
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req.send(body)
    };
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            // Read (a bounded part of) the answer so the connection can be reused.
            let body = r
                .body_mut()
                .with_config()
                .limit(64 * 1024)
                .read_to_vec()
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            let answer = (!text.is_empty()).then(|| text.chars().take(ANSWER_CHARS).collect());
            Ok((status, answer))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Logs one attempt (always).
pub fn log_attempt(a: &Attempt) {
    match a.status {
        AttemptStatus::Sent => {
            tracing::info!(target: "relay::notify", channel = %a.job.channel, to = %a.job.target,
            event = %a.job.event, key = ?a.job.key, attempt = a.attempt, http = ?a.http_status, "notification sent")
        }
        s => tracing::warn!(target: "relay::notify", channel = %a.job.channel, to = %a.job.target,
            event = %a.job.event, key = ?a.job.key, attempt = a.attempt, http = ?a.http_status, error = ?a.error,
            "notification {}", s.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_and_escape() {
        let mut f = BTreeMap::new();
        f.insert("text", "hot \"42\" °C".to_string());
        f.insert("target", "+33 6".to_string());
        let s = render(
            r#"{"to":{{target|json}},"msg":{{text|json}},"raw":"{{target}}","x":"{{nope}}"}"#,
            &f,
        );
        assert_eq!(
            s,
            r#"{"to":"+33 6","msg":"hot \"42\" °C","raw":"+33 6","x":""}"#
        );
        assert_eq!(
            render("to={{target|url}}&a={{ text | url }}", &f),
            "to=%2B33%206&a=hot%20%2242%22%20%C2%B0C"
        );
        assert_eq!(render("unclosed {{text", &f), "unclosed {{text");
        assert_eq!(render("{{env.RELAY_TEST_SURELY_UNSET_VAR}}", &f), "");
    }

    #[test]
    fn rate_limit_is_per_target_and_slides() {
        let mut r = RateLimiter::default();
        assert!(r.allow("sms", "a", 2, 0));
        assert!(r.allow("sms", "a", 2, 10));
        assert!(!r.allow("sms", "a", 2, 20));
        assert!(
            r.allow("sms", "b", 2, 20),
            "other targets have their own budget"
        );
        assert!(r.allow("sms", "a", 2, 60_000));
    }
}
