//! relay-config: the TOML schema of the relay, its defaults, validation and
//! environment overrides. (Being filled in.)
pub mod plugins;
