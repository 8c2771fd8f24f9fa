//! Helpers shared by Spur's fuzz targets.
//!
//! libFuzzer runs every input on the process's main thread, whose stack (8 MiB) is four times
//! a tokio worker's (2 MiB). A deep recursion that fits the former and overflows the latter
//! is exactly the hot-reload crash of issue #20, so the targets that recurse (YAML loading,
//! template rendering) run each input on a thread with a worker-sized stack: an overflow
//! there aborts the process, which libFuzzer reports as a crash with the input saved.

/// A tokio worker thread's default stack size.
pub const WORKER_STACK: usize = 2 * 1024 * 1024;

/// Runs `f` on a fresh thread with a [`WORKER_STACK`]-sized stack and waits for it. A panic
/// in `f` is re-raised here, so libFuzzer sees it as the crash it is.
pub fn on_worker_stack<F: FnOnce() + Send + 'static>(f: F) {
    let handle = std::thread::Builder::new()
        .stack_size(WORKER_STACK)
        .spawn(f)
        .expect("spawning a fuzz worker thread");
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Splits `data` at the first NUL into up to `N` text parts (lossy UTF-8), the rest empty.
/// Targets with several inputs (template + context, template + body) read them this way, so
/// seed files stay plain text with `\0` separators.
pub fn split_parts<const N: usize>(data: &[u8]) -> [String; N] {
    let mut parts: [String; N] = std::array::from_fn(|_| String::new());
    let mut rest = data;
    for (i, part) in parts.iter_mut().enumerate() {
        let cut = if i + 1 == N {
            rest.len()
        } else {
            rest.iter().position(|&b| b == 0).unwrap_or(rest.len())
        };
        *part = String::from_utf8_lossy(&rest[..cut]).into_owned();
        rest = rest.get(cut + 1..).unwrap_or(&[]);
    }
    parts
}
