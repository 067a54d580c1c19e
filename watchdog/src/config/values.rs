//! Values with a syntax of their own (durations, signals, port ranges, globs), parsed while
//! deserializing so that a bad one is reported by the TOML parser with its line and column.

use std::{fmt, str::FromStr, time::Duration};

use nix::sys::signal::Signal;
use serde::{de, Deserialize, Deserializer};

/// A duration written as `250ms`, `2s`, `1m`, ... (humantime syntax).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. 250ms, 2s, 1m"))
    }
}

/// A signal by name (`SIGKILL`, `KILL`) or number (`9`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sig(pub Signal);

impl FromStr for Sig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let parsed = if let Ok(n) = t.parse::<i32>() {
            Signal::try_from(n).ok()
        } else {
            let upper = t.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            Signal::from_str(&name).ok()
        };
        parsed.map(Sig).ok_or_else(|| {
            format!("unknown signal {s:?}; use a name such as SIGTERM, SIGKILL, SIGINT, SIGUSR1 or a number")
        })
    }
}

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// An inclusive port range; a single port is `a..=a`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u32>() {
                Ok(n @ 1..=65535) => Ok(n as u16),
                _ => Err(format!("invalid port {p:?}: ports are 1-65535")),
            }
        };
        let r = match s.split_once('-') {
            Some((a, b)) => PortRange {
                first: port(a)?,
                last: port(b)?,
            },
            None => {
                let p = port(s)?;
                PortRange { first: p, last: p }
            }
        };
        if r.first > r.last {
            return Err(format!(
                "invalid port range {s:?}: first port is above the last"
            ));
        }
        Ok(r)
    }
}

/// A shell-style glob (`/usr/bin/python3*`).
#[derive(Clone, Debug)]
pub struct Glob(pub glob::Pattern);

impl FromStr for Glob {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        glob::Pattern::new(s)
            .map(Glob)
            .map_err(|e| format!("invalid pattern {s:?}: {e}"))
    }
}

impl PartialEq for Glob {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    )*};
}
deserialize_from_str!(Dur, Glob);

/// A value written as a number (`9`, `8080`) or a string (`"SIGKILL"`, `"9000-9010"`), as text.
fn number_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(i64),
        S(String),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::N(n) => n.to_string(),
        Raw::S(s) => s,
    })
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_string(d)?.parse().map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_string(d)?.parse().map_err(de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PortOrAny {
    Any,
    Range(PortRange),
}

impl<'de> Deserialize<'de> for PortOrAny {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = number_or_string(d)?;
        if s.trim() == "*" {
            return Ok(PortOrAny::Any);
        }
        s.parse().map(PortOrAny::Range).map_err(de::Error::custom)
    }
}
