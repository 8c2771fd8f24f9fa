//! The command launcher: a deployment's run as a local process.
//!
//! Parameters go to the process as JSON on stdin and in `SPUR_PARAMETERS` (with
//! `SPUR_RUN_ID`, `SPUR_DEPLOYMENT`, `SPUR_FLOW`, and `SPUR_API_URL`/`SPUR_BIN` so the flow can
//! `"$SPUR_BIN" emit` events of its own); the run's `job_variables` add their `env` mapping
//! and `SPUR_JOB_VARIABLES` ([`Run::job_environment`]). Exit 0 completes the run, with the result
//! taken from the last stdout line that parses as JSON (else the last line, as a string). A
//! non-zero exit fails it; a missing program, a crash by signal or a timeout crashes it.
//!
//! Launching is two steps, so the daemon can record the process between them:
//! [`spawn`] starts it and returns a [`RunningProcess`] (its pid and start time), and
//! [`RunningProcess::wait`] feeds it its parameters, gathers its output and reports the
//! [`Outcome`].
//!
//! **A run's process never outlives the daemon that started it** (on Linux). Each process
//! gets a process group of its own (so a cancel, a timeout or a restart can stop everything
//! it started), and `PR_SET_PDEATHSIG` kills it when the daemon dies. Before it executes the
//! program, the child creates a *start marker* (`<marker dir>/<run id>`, holding its pid):
//! a restarted daemon that finds no marker for an unfinished run knows, for certain, that
//! the program never started, and may launch it without repeating any work.
//!
//! **How the process starts.** That child-side work (group, death signal, marker) needs
//! code between `fork` and `exec`, and such a `pre_exec` hook makes the standard library
//! `fork` the daemon instead of using `posix_spawn` (a `vfork`-style clone that shares the
//! parent's memory until `exec`). A fork copies the page tables of the whole daemon: with a
//! few hundred megabytes resident and hundreds of runs a second, the machine spent most of
//! its time in the kernel's `copy_page_range` and `unmap_page_range` (measured in the
//! cluster chaos test). So the `spur` binary registers itself ([`use_launch_helper`]) and
//! runs are started as `spur __launch <daemon pid> <marker> <program> <args…>` through
//! `posix_spawn` (the process group is a spawn attribute): the helper, a fresh and tiny
//! process with the run's pid, arms the death signal, writes the marker and `exec`s the
//! program, which keeps the pid, the group, the pipes and the environment. The program is
//! looked up on the run's `PATH` before the spawn, so a missing one is still a launch
//! error; an `exec` that fails later (not executable, a bad interpreter line) removes the
//! marker and exits [`HELPER_EXEC_FAILED`], which [`RunningProcess::wait`] reports as a
//! launch failure. Without a registered helper (a library user, the crate's tests) the
//! daemon forks with the same steps in a `pre_exec` hook.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::run::{OUTPUT_TAIL, Outcome, Run, RunProcess, RunState, tail};

/// A local program and how to run it (`launcher: {command, env, cwd, timeout}`).
#[derive(Clone, Debug, PartialEq)]
pub struct CommandSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Killed (and the run Crashed) after this long.
    pub timeout: Duration,
}

/// Where a launch happens: what the daemon (or a worker) adds to every process.
#[derive(Clone, Debug, Default)]
pub struct LaunchContext {
    /// The daemon's API URL, passed as `SPUR_API_URL`.
    pub api_url: Option<String>,
    /// A credential for that API (scope `events:write`), passed as `SPUR_API_TOKEN`, so a
    /// run's `"$SPUR_BIN" emit` is accepted when the daemon requires auth.
    pub api_token: Option<String>,
    /// Where start markers go (see the module docs); `None` writes none.
    pub marker_dir: Option<PathBuf>,
}

/// How much of stdout is searched for the result (the last JSON line): the last 1 MiB.
const STDOUT_TAIL: usize = 1 << 20;

/// The result rule: the last stdout line that parses as JSON, else the last non-empty line.
pub fn result_from_stdout(stdout: &str) -> Option<Value> {
    let lines: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .or_else(|| lines.last().map(|l| Value::String((*l).to_owned())))
}

/// The start marker of a run, in `dir`.
pub fn marker_path(dir: &Path, run: uuid::Uuid) -> PathBuf {
    dir.join(run.to_string())
}

/// The pid a start marker holds, if it exists (`Some(None)`: it exists but is unreadable).
pub fn read_marker(dir: &Path, run: uuid::Uuid) -> Option<Option<u32>> {
    read_marker_file(&marker_path(dir, run))
}

/// The pid the start marker at `path` holds (see [`read_marker`]).
fn read_marker_file(path: &Path) -> Option<Option<u32>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim().parse().ok())
}

/// A process started for a run, not yet waited for. Dropping it (a cancelled run, a daemon
/// shutting down) kills its whole process group.
#[derive(Debug)]
pub struct RunningProcess {
    child: Child,
    /// The pid and start time, to record on the run.
    pub process: RunProcess,
    parameters: String,
    timeout: Duration,
    reaped: bool,
    /// Started through the helper, with this start marker: an exit with
    /// [`HELPER_EXEC_FAILED`] and no marker means the program never ran.
    helper_marker: Option<PathBuf>,
}

/// The first argument that makes the `spur` binary act as the launch helper (see the module
/// docs): `spur __launch <daemon pid> <marker path, or empty> <program> <args…>`.
pub const HELPER_ARG: &str = "__launch";

/// The helper's exit status when the program could not be executed (the marker is removed
/// first, so the run is known never to have started).
pub const HELPER_EXEC_FAILED: i32 = 127;

/// The binary that starts run processes through `posix_spawn` (set once per process).
static HELPER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Starts every run of this process through `binary` acting as the launch helper (the
/// `spur` binary registers itself at start; its `main` hands [`HELPER_ARG`] to
/// [`helper_main`]). Later calls change nothing.
pub fn use_launch_helper(binary: PathBuf) {
    let _ = HELPER.set(binary);
}

/// The launch helper itself: `args` are what follows [`HELPER_ARG`]. Arms the death signal
/// (the parent is the daemon that spawned it), checks the daemon is still there, writes the
/// start marker with its own pid, and becomes the program. Returns only by exiting.
pub fn helper_main(mut args: impl Iterator<Item = std::ffi::OsString>) -> ! {
    use std::os::unix::process::CommandExt;
    let fail = |message: String| -> ! {
        eprintln!("spur: {message}");
        std::process::exit(HELPER_EXEC_FAILED)
    };
    let daemon: Option<u32> = args.next().and_then(|a| a.to_str()?.parse().ok());
    let marker = args.next().filter(|m| !m.is_empty()).map(PathBuf::from);
    let Some(program) = args.next() else {
        fail("the launch helper was given no program".into())
    };
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl and getppid only read and set this process's own attributes.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                fail(format!(
                    "cannot arm the death signal: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // The daemon died before the signal was armed: do not start at all.
            if daemon != Some(libc::getppid() as u32) {
                std::process::exit(125);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = daemon;
    if let Some(path) = &marker
        && let Err(e) = std::fs::write(path, std::process::id().to_string())
    {
        fail(format!(
            "cannot write the start marker {}: {e}",
            path.display()
        ));
    }
    let error = std::process::Command::new(&program).args(args).exec();
    if let Some(path) = &marker {
        let _ = std::fs::remove_file(path);
    }
    fail(format!("cannot start {program:?}: {error}"))
}

/// Finds `program` as `execvp` would in the child: a name with a `/` is used as it is
/// (relative to the child's working directory), any other is looked up on `path` (the
/// child's `PATH`). The answer always holds a `/`, so the helper runs it without a search.
fn resolve_program(
    program: &str,
    path: Option<&std::ffi::OsStr>,
    cwd: Option<&Path>,
) -> Result<PathBuf, SpawnError> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let search = path.unwrap_or(std::ffi::OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(search) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        let on_disk = match cwd {
            Some(cwd) if candidate.is_relative() => cwd.join(&candidate),
            _ => candidate.clone(),
        };
        if let Ok(meta) = std::fs::metadata(&on_disk)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(if candidate.is_relative() && !candidate.starts_with(".") {
                Path::new(".").join(candidate)
            } else {
                candidate
            });
        }
    }
    Err(SpawnError(format!(
        "cannot start {program:?}: not found on PATH ({})",
        search.to_string_lossy()
    )))
}

/// Why a run's program could not start (its run is Crashed with this reason).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpawnError(String);

impl From<SpawnError> for Outcome {
    fn from(e: SpawnError) -> Outcome {
        Outcome::crashed(e.0)
    }
}

/// Starts the run's program.
pub fn spawn(
    spec: &CommandSpec,
    run: &Run,
    context: &LaunchContext,
) -> Result<RunningProcess, SpawnError> {
    let Some(program) = spec.argv.first() else {
        return Err(SpawnError("the launcher has an empty command".into()));
    };
    let parameters = serde_json::to_string(&run.parameters).unwrap_or_else(|_| "{}".into());
    let job_environment = run.job_environment();
    let helper = HELPER.get();
    let marker_file = context
        .marker_dir
        .as_ref()
        .map(|dir| marker_path(dir, run.id));
    if let Some(path) = &marker_file {
        refuse_a_second_start(path)?;
    }
    let mut command = match helper {
        Some(helper) => {
            // The program's PATH is the one its environment will have (the job's variables
            // are set last, so they win).
            let path = job_environment
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v)
                .or_else(|| spec.env.get("PATH"))
                .map(std::ffi::OsString::from)
                .or_else(|| std::env::var_os("PATH"));
            let resolved = resolve_program(program, path.as_deref(), spec.cwd.as_deref())?;
            let mut command = Command::new(helper);
            command
                .arg(HELPER_ARG)
                .arg(std::process::id().to_string())
                .arg(
                    marker_file
                        .as_deref()
                        .map_or(std::ffi::OsStr::new(""), Path::as_os_str),
                )
                .arg(resolved);
            command
        }
        None => Command::new(program),
    };
    command
        .args(&spec.argv[1..])
        .envs(&spec.env)
        .envs(job_environment)
        .env("SPUR_PARAMETERS", &parameters)
        .env("SPUR_RUN_ID", run.id.to_string())
        .env("SPUR_DEPLOYMENT", &run.deployment)
        .env("SPUR_FLOW", &run.flow)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(url) = &context.api_url {
        command.env("SPUR_API_URL", url);
    }
    if let Some(token) = &context.api_token {
        command.env("SPUR_API_TOKEN", token);
    }
    // The registered helper is this process's own binary: no need to look it up per run.
    if let Some(exe) = helper.cloned().or_else(|| std::env::current_exe().ok()) {
        command.env("SPUR_BIN", exe);
    }
    if let Some(dir) = &spec.cwd {
        command.current_dir(dir);
    }
    if helper.is_some() {
        // The helper does the rest; with no `pre_exec` hook this is a `posix_spawn`.
        command.process_group(0);
    } else {
        let marker = match &marker_file {
            Some(path) => Some(
                CString::new(path.as_os_str().as_encoded_bytes())
                    .map_err(|_| SpawnError("the start marker path holds a NUL byte".into()))?,
            ),
            None => None,
        };
        child_setup(&mut command, marker);
    }
    let child = command
        .spawn()
        .map_err(|e| SpawnError(format!("cannot start {program:?}: {e}")))?;
    let pid = child.id().unwrap_or(0);
    Ok(RunningProcess {
        child,
        process: RunProcess {
            pid,
            start_ticks: process_start_ticks(pid),
        },
        parameters,
        timeout: spec.timeout,
        reaped: false,
        helper_marker: helper.and(marker_file),
    })
}

/// A run's program starts at most once: a start marker that already exists means an
/// earlier launch of this run got as far as the program. That happens when a daemon is
/// killed right after the launch, before its record of the run reached the disk (run
/// records are written without an fsync): the restarted daemon no longer knows the run and
/// creates it afresh from its firing. The earlier process died with that daemon, so the run
/// is Crashed, with the time the marker was written, instead of being started a second time.
fn refuse_a_second_start(marker: &Path) -> Result<(), SpawnError> {
    // Its existence is what counts: an unreadable marker still refuses the start.
    let Ok(meta) = std::fs::metadata(marker) else {
        return Ok(());
    };
    let pid = read_marker_file(marker).flatten();
    let modified = meta.modified().ok();
    let written = modified
        .map(|at| {
            chrono::DateTime::<chrono::Utc>::from(at)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        })
        .unwrap_or_else(|| "an unknown time".into());
    let stopped = match (pid, modified) {
        (Some(pid), Some(at)) if started_after(pid, at) => {
            format!("its process {pid} is gone (the pid now names a newer process)")
        }
        (Some(pid), _) => stop_leftover_group(&RunProcess {
            pid,
            start_ticks: None,
        }),
        (None, _) => "its pid is unknown".into(),
    };
    Err(SpawnError(format!(
        "the run's program was started once already (its start marker, pid {}, was written at {written}) by a daemon that stopped before it recorded the start; a run's program never starts twice; {stopped}",
        pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    )))
}

/// What the child does between `fork` and `exec`: its own process group, death with the
/// daemon, and the start marker. Only async-signal-safe calls are allowed here.
#[cfg(unix)]
fn child_setup(command: &mut Command, marker: Option<CString>) {
    let daemon = std::process::id() as libc::pid_t;
    // SAFETY: the closure only calls async-signal-safe libc functions (setpgid, prctl,
    // getppid, getpid, open, write, close, _exit) on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            #[cfg(target_os = "linux")]
            {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The daemon died before the signal was armed: do not start at all.
                if libc::getppid() != daemon {
                    libc::_exit(125);
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = daemon;
            if let Some(path) = &marker {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC,
                    0o600,
                );
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut digits = [0u8; 12];
                let text = format_pid(libc::getpid() as u32, &mut digits);
                libc::write(fd, text.as_ptr().cast(), text.len());
                libc::close(fd);
            }
            Ok(())
        });
    }
}

#[cfg(not(unix))]
fn child_setup(_command: &mut Command, _marker: Option<CString>) {}

/// Writes `pid` in decimal into `buf` without allocating (the child may not allocate).
fn format_pid(mut pid: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    &buf[at..]
}

/// A process's start time in clock ticks after boot, from `/proc/<pid>/stat` (Linux).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields count from the
    // last ')'. Field 22 (starttime) is the 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid` exists and started more than a second after `at` (so it is not
/// the process that wrote a marker at `at`: its pid was reused). Linux only; elsewhere
/// `false`.
fn started_after(pid: u32, at: std::time::SystemTime) -> bool {
    let Some(ticks) = process_start_ticks(pid) else {
        return false;
    };
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
        stat.lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|s| s.trim().parse::<u64>().ok())
    });
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let (Some(boot), true) = (boot, per_second > 0) else {
        return false;
    };
    let started = std::time::UNIX_EPOCH
        + Duration::from_secs(boot)
        + Duration::from_millis(ticks * 1000 / per_second as u64);
    started > at + Duration::from_secs(1)
}

/// Stops whatever is left of a run's process group after the daemon that started it died:
/// kills the group unless its leader's pid now names another process. Returns a sentence
/// for the run's history.
pub fn stop_leftover_group(process: &RunProcess) -> String {
    let pid = process.pid;
    if pid == 0 {
        return "no process was recorded".into();
    }
    let leader_now = process_start_ticks(pid);
    if let (Some(now), Some(then)) = (leader_now, process.start_ticks)
        && now != then
    {
        return format!("its process {pid} is gone (the pid now names another process)");
    }
    #[cfg(unix)]
    {
        // SAFETY: killpg only sends a signal. A process group id cannot be handed to a new
        // process while any member of the group lives, so this group is the run's.
        let killed = unsafe { libc::killpg(pid as libc::pid_t, libc::SIGKILL) } == 0;
        if killed {
            return format!("what was left of its process group {pid} was killed");
        }
    }
    format!("its process {pid} was gone (it dies with the daemon)")
}

/// Keeps the last `cap` bytes pushed into it.
struct Tail {
    bytes: Vec<u8>,
    cap: usize,
}

impl Tail {
    fn new(cap: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            cap,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > self.cap * 2 {
            let cut = self.bytes.len() - self.cap;
            self.bytes.drain(..cut);
        }
    }

    fn text(&self, max: usize) -> String {
        tail(&String::from_utf8_lossy(&self.bytes), max)
    }
}

/// Reads both pipes to their ends, in arrival order: stdout's tail (for the result) and the
/// interleaved tail of both (the run's output). Reading never stops early, so a chatty
/// program is never blocked on a full pipe.
async fn gather(
    mut stdout: Option<impl AsyncRead + Unpin>,
    mut stderr: Option<impl AsyncRead + Unpin>,
) -> (Tail, Tail) {
    let mut out = Tail::new(STDOUT_TAIL);
    let mut both = Tail::new(OUTPUT_TAIL);
    let (mut out_buf, mut err_buf) = ([0u8; 8192], [0u8; 8192]);
    loop {
        let (out_open, err_open) = (stdout.is_some(), stderr.is_some());
        if !out_open && !err_open {
            break;
        }
        tokio::select! {
            read = async { stdout.as_mut().map(|s| s.read(&mut out_buf)).expect("open").await }, if out_open => match read {
                Ok(n) if n > 0 => {
                    out.push(&out_buf[..n]);
                    both.push(&out_buf[..n]);
                }
                _ => stdout = None,
            },
            read = async { stderr.as_mut().map(|s| s.read(&mut err_buf)).expect("open").await }, if err_open => match read {
                Ok(n) if n > 0 => both.push(&err_buf[..n]),
                _ => stderr = None,
            },
        }
    }
    (out, both)
}

impl RunningProcess {
    /// Feeds the parameters on stdin, gathers the output and waits for the end (or the
    /// timeout, which kills the process group).
    pub async fn wait(mut self) -> Outcome {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(self.parameters.as_bytes()).await;
        }
        let stdout = self.child.stdout.take();
        let stderr = self.child.stderr.take();
        let timeout = self.timeout;
        let waited = tokio::time::timeout(timeout, async {
            let (out, both) = gather(stdout, stderr).await;
            (self.child.wait().await, out, both)
        })
        .await;
        let (status, out, both) = match waited {
            Err(_) => {
                return Outcome::crashed(format!("timed out after {}s", timeout.as_secs_f64()));
            }
            Ok((Err(e), _, _)) => return Outcome::crashed(format!("lost the process: {e}")),
            Ok((Ok(status), out, both)) => (status, out, both),
        };
        self.reaped = true;
        let output = Some(both.text(OUTPUT_TAIL)).filter(|o| !o.is_empty());
        let last_words = both.text(500);
        if status.success() {
            Outcome {
                state: RunState::Completed,
                result: result_from_stdout(&String::from_utf8_lossy(&out.bytes)),
                message: None,
                exit_code: Some(0),
                output,
            }
        } else if let Some(code) = status.code() {
            if code == HELPER_EXEC_FAILED
                && self.helper_marker.as_ref().is_some_and(|m| !m.exists())
            {
                return Outcome::crashed(last_words.trim().trim_start_matches("spur: ").to_owned());
            }
            Outcome {
                state: RunState::Failed,
                result: None,
                message: Some(format!("exited with status {code}: {last_words}")),
                exit_code: Some(code),
                output,
            }
        } else {
            #[cfg(unix)]
            let signal = std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0);
            #[cfg(not(unix))]
            let signal = 0;
            Outcome {
                state: RunState::Crashed,
                result: None,
                message: Some(format!("killed by signal {signal}: {last_words}")),
                exit_code: None,
                output,
            }
        }
    }
}

impl Drop for RunningProcess {
    fn drop(&mut self) {
        if self.reaped || self.process.pid == 0 {
            return;
        }
        // Cancelled, timed out or shutting down: stop the program and everything it started.
        #[cfg(unix)]
        // SAFETY: the child was not reaped, so its pid (the group's id) is still ours.
        unsafe {
            libc::killpg(self.process.pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Runs the process to its end (or timeout) and reports the outcome, in one step (a worker,
/// or a test, that has nothing to record in between).
pub async fn run_to_end(spec: &CommandSpec, run: &Run, context: &LaunchContext) -> Outcome {
    match spawn(spec, run, context) {
        Ok(process) => process.wait().await,
        Err(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunTarget;
    use serde_json::json;

    #[test]
    fn programs_are_found_on_the_run_s_path_as_execvp_would() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        let tool = bin.join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").expect("tool");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("mode");
        std::fs::write(bin.join("plain"), "not executable").expect("plain");
        let path =
            std::env::join_paths(["/nonexistent", bin.to_str().expect("utf-8")]).expect("PATH");
        assert_eq!(
            resolve_program("tool", Some(&path), None).expect("found"),
            tool
        );
        // A relative PATH entry is the child's working directory's.
        assert_eq!(
            resolve_program("tool", Some(std::ffi::OsStr::new("bin")), Some(dir.path()))
                .expect("found"),
            Path::new("./bin/tool")
        );
        // A name with a slash is taken as it is; the child's exec reports what is wrong.
        assert_eq!(
            resolve_program("./anything", Some(&path), None).expect("a path"),
            Path::new("./anything")
        );
        for missing in ["plain", "no-such-tool"] {
            let error = resolve_program(missing, Some(&path), None).expect_err(missing);
            assert!(error.to_string().contains("not found on PATH"), "{error}");
        }
    }

    #[test]
    fn result_rule() {
        assert_eq!(
            result_from_stdout("log\n\"foobar\"\nbye\n"),
            Some(json!("foobar"))
        );
        assert_eq!(result_from_stdout("{\"a\": 1}\n"), Some(json!({"a": 1})));
        assert_eq!(result_from_stdout("just text\n"), Some(json!("just text")));
        assert_eq!(result_from_stdout(""), None);
    }

    #[test]
    fn pids_are_written_in_decimal() {
        let mut buf = [0u8; 12];
        assert_eq!(format_pid(0, &mut buf), b"0");
        assert_eq!(format_pid(4_194_304, &mut buf), b"4194304");
        assert_eq!(format_pid(u32::MAX, &mut buf), b"4294967295");
    }

    fn a_run() -> Run {
        let target = RunTarget {
            deployment_id: uuid::Uuid::nil(),
            deployment: "d".into(),
            flow_id: uuid::Uuid::nil(),
            flow: "f".into(),
        };
        Run::new(&target, json!({"x": 1}), None, None, chrono::Utc::now())
    }

    fn sh(script: &str) -> CommandSpec {
        CommandSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout: Duration::from_secs(20),
        }
    }

    /// A launch context that writes start markers into `dir`.
    fn marking_into(dir: &Path) -> LaunchContext {
        LaunchContext {
            marker_dir: Some(dir.to_owned()),
            ..LaunchContext::default()
        }
    }

    #[tokio::test]
    async fn output_keeps_both_streams_and_the_exit_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let context = marking_into(dir.path());
        let run = a_run();
        let process = spawn(&sh("cat; echo oops >&2; exit 3"), &run, &context).expect("spawned");
        let pid = process.process.pid;
        let outcome = process.wait().await;
        assert_eq!(outcome.state, RunState::Failed);
        assert_eq!(outcome.exit_code, Some(3));
        let output = outcome.output.expect("output");
        assert!(
            output.contains(r#"{"x":1}"#) && output.contains("oops"),
            "{output}"
        );
        // The child wrote its start marker, with its pid, before it ran the program.
        assert_eq!(read_marker(dir.path(), run.id), Some(Some(pid)));
    }

    #[tokio::test]
    async fn a_run_whose_start_marker_exists_is_never_started_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let context = marking_into(dir.path());
        let run = a_run();
        let count = dir.path().join("starts");
        let program = sh(&format!("echo started >> {}", count.display()));
        let first = spawn(&program, &run, &context).expect("the first launch starts");
        assert_eq!(first.wait().await.state, RunState::Completed);
        // The marker stays until the daemon settles the run. A daemon that lost its record
        // of the run and launches it again from its firing is refused.
        let error = spawn(&program, &run, &context).expect_err("a second start is refused");
        let message = error.to_string();
        assert!(
            message.contains("started once already") && message.contains("written at 20"),
            "{message}"
        );
        let outcome = Outcome::from(error);
        assert_eq!(outcome.state, RunState::Crashed);
        let starts = std::fs::read_to_string(&count).expect("the program ran");
        assert_eq!(
            starts.lines().count(),
            1,
            "the program ran once: {starts:?}"
        );
    }

    #[tokio::test]
    async fn a_chatty_program_is_never_blocked_and_only_its_tail_is_kept() {
        let run = a_run();
        // 4 MiB on stdout, then the result line.
        let script = "head -c 4194304 /dev/zero | tr '\\0' 'a'; echo; echo '{\"done\": true}'";
        let outcome = run_to_end(&sh(script), &run, &LaunchContext::default()).await;
        assert_eq!(outcome.state, RunState::Completed);
        assert_eq!(outcome.result, Some(json!({"done": true})));
        assert!(outcome.output.expect("output").len() <= OUTPUT_TAIL + 4);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flag = dir.path().join("survived");
        let run = a_run();
        let mut spec = sh(&format!("(sleep 2; touch {}) & sleep 30", flag.display()));
        spec.timeout = Duration::from_millis(300);
        let outcome = run_to_end(&spec, &run, &LaunchContext::default()).await;
        assert_eq!(outcome.state, RunState::Crashed);
        assert!(outcome.message.expect("message").contains("timed out"));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !flag.exists(),
            "a background child of the run outlived its timeout"
        );
    }

    #[test]
    fn start_ticks_name_this_process() {
        let me = std::process::id();
        let first = process_start_ticks(me);
        assert!(first.is_some());
        assert_eq!(first, process_start_ticks(me));
        // This process started before now, and long after 1970: what tells a reused pid.
        assert!(!started_after(me, std::time::SystemTime::now()));
        assert!(started_after(
            me,
            std::time::UNIX_EPOCH + Duration::from_secs(1000)
        ));
    }
}
