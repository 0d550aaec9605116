//! relay-plugins: placeholder
