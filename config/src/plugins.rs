//! Configuration of the script workers, sinks (Redis, MySQL) and notifiers.
//! Owned by the plugins work; the root `Config` embeds these sections.
use serde::{Deserialize, Serialize};

/// `[plugins]`: the Rhai script workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Load scripts at all.
    pub enabled: bool,
    /// Folder whose `*.rhai` files are loaded.
    pub dir: String,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self { enabled: true, dir: "config/rules".into() }
    }
}

/// `[redis]`: device shadow, counters, alarm state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub enabled: bool,
    pub url: String,
}

/// `[mysql]`: history tables and alarm transitions.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MysqlConfig {
    pub enabled: bool,
    pub url: String,
}

/// `[notify]`: HTTP notifiers and severity routes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {}
