//! Transparent huge pages turned off for the processes that allocate under floods.

/// The coordinator's memory in 4 KiB pages only. The allocator asks the kernel for
/// transparent huge pages; each first touch of one zeroes 2 MiB on the thread that touched it,
/// and under a message flood these came in bursts of 35-40 ms on a runtime thread (`perf`:
/// `clear_page_erms` half the coordinator's samples during each stall of every probe); without
/// them its peak resident memory under the flood was 74-76 MB instead of 99-121
/// (docs/PERFORMANCE.md, thirty-first round). A fault proxy, which makes thousands of links
/// at once in a thundering herd, runs without them too: their zeroing took 5.8 % of its CPU
/// there, and without them the proxies used 16-25 % less (thirty-second round).
///
/// Says so at debug (at info, it came before every refusal of a bad configuration), as read
/// back from the kernel: kernels before 6.0 do not show the flag in `/proc/<pid>/status`, and
/// the tests read this line there instead (asking for `tether=debug`).
pub(crate) fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    match nix::sys::prctl::set_thp_disable(true).and_then(|()| nix::sys::prctl::get_thp_disable()) {
        Ok(true) => tracing::debug!("transparent huge pages off for this process"),
        Ok(false) => {
            tracing::debug!("transparent huge pages stay allowed: the kernel kept them on")
        }
        Err(error) => tracing::debug!(%error, "transparent huge pages stay allowed"),
    }
}
