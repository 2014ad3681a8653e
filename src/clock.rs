//! The wall clock, in the one unit ktern compares certificate dates,
//! OCSP freshness and ticket epochs in: seconds since the Unix epoch.

/// Now, in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
