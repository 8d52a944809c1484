//! Timestamps of the plugin's log lines (sent over `log.sock`) and of the agent's own lines (the
//! installer uses this module, so both sides print one format):
//! RFC 3339 UTC with microseconds, as Istio's logs print them (`2026-11-26T07:40:00.123456Z`).

/// A UTC instant, formatted by `Display` as RFC 3339 with microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rfc3339 {
    /// Seconds since the Unix epoch.
    pub secs: i64,
    pub micros: u32,
}

impl Rfc3339 {
    /// The current time.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            secs: d.as_secs() as i64,
            micros: d.subsec_micros(),
        }
    }
}

impl core::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let days = self.secs.div_euclid(86_400);
        let tod = self.secs.rem_euclid(86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil inverse).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            tod / 3600,
            (tod % 3600) / 60,
            tod % 60,
            self.micros
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Rfc3339;

    fn fmt(secs: i64, micros: u32) -> String {
        Rfc3339 { secs, micros }.to_string()
    }

    #[test]
    fn formats() {
        assert_eq!(fmt(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(fmt(1_795_680_000, 42), "2026-11-26T08:00:00.000042Z");
        assert_eq!(fmt(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
        assert_eq!(fmt(1_709_251_199, 5), "2024-02-29T23:59:59.000005Z");
    }
}
