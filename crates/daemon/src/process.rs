//! Process-wide settings that a program embedding the daemon applies once, at start.
//!
//! They live here, not in the `spur` binary, so that the load drivers measure the same process
//! the binary runs.

/// Turns transparent huge pages off for this process (Linux; elsewhere a no-op).
///
/// Why: mimalloc asks the kernel for huge pages on its arenas (`MADV_HUGEPAGE`) and gives
/// idle memory back a moment later. Under the daemon's steady churn of short-lived per-event
/// allocations, every reuse of a returned region faulted in a fresh 2 MiB page that the
/// kernel zeroes first: `clear_page_erms` was ~5 % of all CPU in the NATS load driver, and
/// turning huge pages off took CPU per event from ~24 µs to ~21 µs (docs/benchmarks.md).
/// The flag is inherited by child processes, so call this after spawning any that should
/// keep the system default.
///
/// Returns the OS error if the kernel refuses (the daemon runs fine either way).
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory of
        // ours; it only sets a flag on this process's memory map.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Hands the memory this thread has freed back to the operating system now (mimalloc's
/// `mi_collect(true)`), instead of when the allocator next gets round to it.
///
/// Why: loading 100 000 automations builds a parse tree of ~370 MB next to the ~230 MB the
/// loaded automations keep, and frees it when the load is done. mimalloc gives freed pages
/// back only after a delay, and only when allocation activity checks that delay: a daemon
/// that is idle after its load kept the whole peak resident (700 MB RSS at 100 000
/// automations, 275 MB after this call). Loads call it on the thread that did the parsing,
/// right after the parse tree is gone. It costs a few milliseconds, once per load.
///
/// In a process whose global allocator is not mimalloc this only tidies mimalloc's own
/// (empty) heaps.
pub fn return_free_memory() {
    // SAFETY: mi_collect takes no pointers; it walks the calling thread's heap and the
    // allocator's arenas under their own locks.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn huge_pages_are_off_for_the_process_afterwards() {
        super::disable_transparent_huge_pages().expect("prctl accepted");
        let status = std::fs::read_to_string("/proc/self/status").expect("readable");
        // Kernels since 6.0 report the flag; older ones accept the call without showing it.
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
        }
    }
}
