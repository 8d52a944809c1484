//! Fight detection: another agent (Cilium with `cni.exclusive=true`, a CNI daemon that
//! regenerates its file on a loop) keeps dropping our entry from the primary config. Repairing
//! at full speed would loop forever (Istio does, and never becomes ready). Instead: after
//! `threshold` removals (default [`THRESHOLD`]) within `window` (default [`WINDOW`]), back off
//! exponentially, stay not ready, and say so once; when our entry has survived [`CALM`] since
//! the last removal, the fight is over. A threshold of 0 turns detection off.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(10);
pub const THRESHOLD: usize = 5;
pub const CALM: Duration = Duration::from_secs(5);
pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct FightTracker {
    threshold: usize,
    window: Duration,
    removals: VecDeque<Instant>,
    fighting: Option<Fight>,
}

impl Default for FightTracker {
    fn default() -> Self {
        FightTracker::new(THRESHOLD, WINDOW)
    }
}

#[derive(Debug)]
struct Fight {
    next_attempt: Instant,
    backoff: Duration,
    last_removal: Instant,
}

/// What a removal meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// An isolated rewrite: repair now.
    Drift,
    /// This removal started a fight (log it, count it).
    FightStarted { removals: usize },
    /// Still fighting.
    Fighting,
}

impl FightTracker {
    pub fn new(threshold: usize, window: Duration) -> Self {
        FightTracker {
            threshold,
            window,
            removals: VecDeque::new(),
            fighting: None,
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Our entry was found removed from a file we had written.
    pub fn record_removal(&mut self, now: Instant) -> Removal {
        if let Some(f) = &mut self.fighting {
            f.last_removal = now;
            return Removal::Fighting;
        }
        if self.threshold == 0 {
            return Removal::Drift;
        }
        self.removals.push_back(now);
        while self
            .removals
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.removals.pop_front();
        }
        if self.removals.len() >= self.threshold {
            let removals = self.removals.len();
            self.removals.clear();
            self.fighting = Some(Fight {
                next_attempt: now + BACKOFF_START,
                backoff: BACKOFF_START,
                last_removal: now,
            });
            return Removal::FightStarted { removals };
        }
        Removal::Drift
    }

    pub fn is_fighting(&self) -> bool {
        self.fighting.is_some()
    }

    /// Whether a repair may be written now.
    pub fn may_write(&self, now: Instant) -> bool {
        self.fighting.as_ref().is_none_or(|f| now >= f.next_attempt)
    }

    /// A repair was written: while fighting, the next one waits twice as long.
    pub fn wrote(&mut self, now: Instant) {
        if let Some(f) = &mut self.fighting {
            f.backoff = (f.backoff * 2).min(BACKOFF_MAX);
            f.next_attempt = now + f.backoff;
        }
    }

    /// Our entry is in place: ends the fight once it has held for [`CALM`]. Returns true when
    /// the fight just ended.
    pub fn entry_present(&mut self, now: Instant) -> bool {
        if self
            .fighting
            .as_ref()
            .is_some_and(|f| now.duration_since(f.last_removal) >= CALM)
        {
            self.fighting = None;
            return true;
        }
        false
    }

    /// When the loop should look again without a file event: the next repair attempt or the
    /// end of the calm period, whichever comes first after `now`.
    pub fn wake_at(&self, now: Instant) -> Option<Instant> {
        let f = self.fighting.as_ref()?;
        [f.next_attempt, f.last_removal + CALM]
            .into_iter()
            .filter(|t| *t > now)
            .min()
    }
}

/// The likely cause, from the name of the file being rewritten.
pub fn likely_cause(file_name: &str) -> &'static str {
    let n = file_name.to_ascii_lowercase();
    if n.contains("cilium") {
        "Cilium with cni.exclusive=true rewrites its config and removes other plugins; set cni.exclusive=false \
         (Helm: --set cni.exclusive=false) in the Cilium configuration"
    } else if n.contains("calico") || n.contains("k8s-pod-network") {
        "calico-node regenerating its CNI config on a loop; check its CNI_NETWORK_CONFIG and install-cni settings"
    } else if n.contains("multus") {
        "Multus regenerating its config (multus auto-config); chain istio-cni through the Multus delegate instead"
    } else {
        "another CNI agent owns this directory exclusively and rewrites the file; configure it to keep chained plugins"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_removals_are_drift() {
        let mut f = FightTracker::default();
        let t0 = Instant::now();
        for i in 0..10 {
            assert_eq!(
                f.record_removal(t0 + WINDOW * i + Duration::from_millis(1) * i),
                Removal::Drift
            );
        }
        assert!(!f.is_fighting());
    }

    #[test]
    fn rapid_removals_start_a_fight_with_backoff_then_calm() {
        let mut f = FightTracker::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        for i in 0..THRESHOLD as u32 - 1 {
            assert_eq!(f.record_removal(t0 + ms(100) * i), Removal::Drift);
        }
        let t = t0 + ms(500);
        assert_eq!(
            f.record_removal(t),
            Removal::FightStarted {
                removals: THRESHOLD
            }
        );
        assert!(f.is_fighting());
        assert!(!f.may_write(t));
        assert!(f.may_write(t + BACKOFF_START));
        f.wrote(t + BACKOFF_START);
        assert!(!f.may_write(t + BACKOFF_START * 2));
        assert!(f.may_write(t + BACKOFF_START * 3));
        assert_eq!(f.record_removal(t + ms(1100)), Removal::Fighting);
        assert!(!f.entry_present(t + ms(1200)));
        // Next attempt (t + 3 s) comes before the end of the calm period (t + 1.1 s + CALM);
        // once it has passed, the calm check is next; never a time in the past.
        assert_eq!(f.wake_at(t + ms(1200)), Some(t + BACKOFF_START * 3));
        assert_eq!(f.wake_at(t + ms(3500)), Some(t + ms(1100) + CALM));
        assert!(f.entry_present(t + ms(1100) + CALM));
        assert_eq!(f.wake_at(t + ms(1100) + CALM), None);
        assert!(!f.is_fighting());
        assert!(f.may_write(t + ms(1100) + CALM));
    }

    #[test]
    fn threshold_zero_disables() {
        let mut f = FightTracker::new(0, WINDOW);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(f.record_removal(t0), Removal::Drift);
        }
    }

    #[test]
    fn cause_names_cilium() {
        assert!(likely_cause("05-cilium.conflist").contains("cni.exclusive=false"));
        assert!(likely_cause("10-other.conflist").contains("another CNI agent"));
    }
}
