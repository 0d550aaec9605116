//! The four configuration sections the plugins use, taken from the relay's
//! configuration once and handed to the host, the sink and the CLI.

use relay_config::plugins::{MysqlConfig, NotifyConfig, PluginsConfig, RedisConfig};

/// The four sections the plugins use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostConfig {
    pub plugins: PluginsConfig,
    pub redis: RedisConfig,
    pub mysql: MysqlConfig,
    pub notify: NotifyConfig,
    /// The state in Redis belongs to a fleet that keeps running (a cluster
    /// node taking over the rules lease): the presence hash, which the
    /// devices still connected keep true, is kept at start instead of
    /// being cleared as an earlier run's.
    pub keep_presence: bool,
}

impl HostConfig {
    /// The plugin sections of the relay's configuration.
    pub fn from_config(cfg: &relay_config::Config) -> HostConfig {
        HostConfig {
            plugins: cfg.plugins.clone(),
            redis: cfg.redis.clone(),
            mysql: cfg.mysql.clone(),
            notify: cfg.notify.clone(),
            keep_presence: false,
        }
    }

    /// Every problem of the four sections, as `key: reason` lines.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.plugins.check();
        p.extend(self.redis.check());
        p.extend(self.mysql.check());
        p.extend(self.notify.check());
        p.into_iter().map(|(k, r)| format!("{k}: {r}")).collect()
    }
}
