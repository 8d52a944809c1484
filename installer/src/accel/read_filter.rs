//! The recvmsg tracepoint's read filter: which reads it looks up, and when it must look up
//! every read (sockets paired by a build without the filter).
use super::*;

/// Whether the recvmsg tracepoint trusts its read filter ([`config_index::READ_FILTER_BYPASS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFilter {
    /// Reads of sockets whose filter slot is empty are skipped without a lookup.
    InUse,
    /// Every read is looked up: `uncounted` paired sockets are missing from the filter.
    Bypassed { uncounted: usize },
}

/// Paired sockets missing from the read filter: listed in FP_SK_COOKIES, not in FP_SK_COUNTED.
/// Only a build without the filter pairs such sockets.
pub(super) fn uncounted_paired_sockets(pin_dir: &Path) -> Result<usize> {
    let pins = Pins::new(pin_dir);
    let (cookies, counted) = (pins.sk_cookies()?, pins.sk_counted()?);
    Ok(cookies
        .keys()?
        .iter()
        .filter(|sk| !matches!(counted.get(sk), Ok(Some(_))))
        .count())
}

pub(super) fn set_read_filter_bypass(pin_dir: &Path, on: bool) -> Result<()> {
    let cfg = Pins::new(pin_dir).config()?;
    cfg.set(&config_index::READ_FILTER_BYPASS, &(on as u32))?;
    Ok(())
}

/// Whether the recvmsg tracepoint looks every read up ([`config_index::READ_FILTER_BYPASS`]).
pub fn read_filter_bypassed(pin_dir: &Path) -> Result<bool> {
    let cfg = Pins::new(pin_dir).config()?;
    let bypass = cfg
        .get(&config_index::READ_FILTER_BYPASS)?
        .ok_or_else(|| anyhow!("{} has no read filter switch", cfg.map().path().display()))?;
    Ok(bypass != 0)
}

/// Puts the read filter in use when no paired socket is missing from it, bypasses it
/// otherwise, and returns its state. Sockets go missing only while a build without the filter
/// pairs them (or while an old program is still finishing as its link is swapped), so after
/// an upgrade their number only falls. Walks every paired socket: the agent calls it every few
/// seconds only while the filter is bypassed.
pub fn refresh_read_filter(pin_dir: &Path) -> Result<ReadFilter> {
    let was_bypassed = read_filter_bypassed(pin_dir)?;
    let state = match uncounted_paired_sockets(pin_dir)? {
        0 => ReadFilter::InUse,
        uncounted => ReadFilter::Bypassed { uncounted },
    };
    let bypass = state != ReadFilter::InUse;
    if bypass != was_bypassed {
        set_read_filter_bypass(pin_dir, bypass)?;
        match state {
            ReadFilter::InUse => log::info!("recvmsg tracepoint: read filter in use"),
            ReadFilter::Bypassed { uncounted } => log::info!(
                "recvmsg tracepoint: {uncounted} paired sockets are not in its read filter \
                 (paired by a previous build); every read is looked up until they close"
            ),
        }
    }
    Ok(state)
}

/// Unmarks every socket counted in the read filter (see [`load_or_reuse`]).
pub(super) fn forget_counted_sockets(pin_dir: &Path) -> Result<()> {
    let counted = Pins::new(pin_dir).sk_counted()?;
    for sk in counted.keys()? {
        let _ = counted.remove(&sk);
    }
    Ok(())
}
