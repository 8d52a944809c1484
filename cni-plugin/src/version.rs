//! CNI spec versions.
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpecVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Default for SpecVersion {
    fn default() -> Self {
        Self::new(0, 1, 0)
    }
}

/// The versions this plugin speaks, as Istio's (`version.All` of containernetworking/cni v1.3.0).
pub const SUPPORTED_VERSIONS: [SpecVersion; 7] = [
    SpecVersion::new(0, 1, 0),
    SpecVersion::new(0, 2, 0),
    SpecVersion::new(0, 3, 0),
    SpecVersion::new(0, 3, 1),
    SpecVersion::new(0, 4, 0),
    SpecVersion::new(1, 0, 0),
    SpecVersion::new(1, 1, 0),
];

pub const CURRENT: SpecVersion = SpecVersion::new(1, 1, 0);

/// The result layouts of the spec: which one a version uses decides conversions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultFormat {
    /// 0.1.0, 0.2.0: `ip4`/`ip6` objects.
    V02,
    /// 0.3.0, 0.3.1, 0.4.0: `interfaces`, `ips` with a `version` field.
    V04,
    /// 1.0.0, 1.1.0: `ips` without `version`.
    V1,
}

/// A `cniVersion` that is not `X.Y.Z`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VersionParseError {
    #[error("{0:?} is not a version of the form X.Y.Z")]
    NotXyz(String),
    #[error("{0:?}: number too large")]
    TooLarge(String),
}

impl SpecVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `X.Y.Z` (each a decimal number).
    pub fn parse(s: &str) -> Result<Self, VersionParseError> {
        let parts: Vec<&str> = s.split('.').collect();
        let num = |p: &str| -> Result<u32, VersionParseError> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(VersionParseError::NotXyz(s.to_string()));
            }
            p.parse()
                .map_err(|_| VersionParseError::TooLarge(s.to_string()))
        };
        match parts.as_slice() {
            [a, b, c] => Ok(Self::new(num(a)?, num(b)?, num(c)?)),
            _ => Err(VersionParseError::NotXyz(s.to_string())),
        }
    }

    pub fn result_format(&self) -> ResultFormat {
        if *self >= Self::new(1, 0, 0) {
            ResultFormat::V1
        } else if *self >= Self::new(0, 3, 0) {
            ResultFormat::V04
        } else {
            ResultFormat::V02
        }
    }
}

impl fmt::Display for SpecVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        assert_eq!(
            SpecVersion::parse("0.3.1").unwrap(),
            SpecVersion::new(0, 3, 1)
        );
        assert!(SpecVersion::parse("1.0").is_err());
        assert!(SpecVersion::parse("1.0.x").is_err());
        assert!(SpecVersion::parse("1.-1.0").is_err());
        assert!(SpecVersion::new(0, 4, 0) < SpecVersion::new(1, 0, 0));
        assert_eq!(SpecVersion::new(0, 2, 0).result_format(), ResultFormat::V02);
        assert_eq!(SpecVersion::new(0, 4, 0).result_format(), ResultFormat::V04);
        assert_eq!(SpecVersion::new(1, 1, 0).result_format(), ResultFormat::V1);
    }
}
