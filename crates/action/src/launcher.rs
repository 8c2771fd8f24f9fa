//! The command launcher: a deployment's run as a local process.
//!
//! Parameters go to the process as JSON on stdin and in `SPUR_PARAMETERS` (with
//! `SPUR_RUN_ID`, `SPUR_DEPLOYMENT`, `SPUR_FLOW`, and `SPUR_API_URL`/`SPUR_BIN` so the flow can
//! `"$SPUR_BIN" emit` events of its own). Exit 0 completes the run, with the result
//! taken from the last stdout line that parses as JSON (else the last line, as a string). A
//! non-zero exit fails it; a missing program, a crash by signal or a timeout crashes it.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::deployment::Launcher;
use crate::run::{Run, RunState};

/// How a launched run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Completed, Failed or Crashed.
    pub state: RunState,
    /// The result, for Completed runs.
    pub result: Option<Value>,
    /// Why (exit status, stderr tail, timeout…).
    pub message: Option<String>,
}

const OUTPUT_CAP: usize = 1 << 20;

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

fn tail(text: &str, max: usize) -> String {
    let t = text.trim();
    if t.len() <= max {
        return t.to_owned();
    }
    let mut start = t.len() - max;
    while !t.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &t[start..])
}

/// Runs the process to its end (or timeout) and reports the outcome.
pub async fn launch(launcher: &Launcher, run: &Run, api_url: Option<&str>) -> Outcome {
    // A worker runs the same command on its own machine (see `worker`).
    let (Launcher::Http(_) | Launcher::Prefect(_)) = launcher else {
        return run_command(launcher, run, api_url).await;
    };
    Outcome {
        state: RunState::Crashed,
        result: None,
        message: Some("http and prefect launchers run through `remote`, not as a command".into()),
    }
}

async fn run_command(launcher: &Launcher, run: &Run, api_url: Option<&str>) -> Outcome {
    let (Launcher::Command {
        argv,
        env,
        cwd,
        timeout,
    }
    | Launcher::Worker {
        argv,
        env,
        cwd,
        timeout,
        ..
    }) = launcher
    else {
        return Outcome {
            state: RunState::Crashed,
            result: None,
            message: Some("not a command launcher".into()),
        };
    };
    let parameters = serde_json::to_string(&run.parameters).unwrap_or_else(|_| "{}".into());
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .envs(env)
        .env("SPUR_PARAMETERS", &parameters)
        .env("SPUR_RUN_ID", run.id.to_string())
        .env("SPUR_DEPLOYMENT", &run.deployment)
        .env("SPUR_FLOW", &run.flow)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(url) = api_url {
        command.env("SPUR_API_URL", url);
    }
    if let Ok(exe) = std::env::current_exe() {
        command.env("SPUR_BIN", exe);
    }
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                state: RunState::Crashed,
                result: None,
                message: Some(format!("cannot start {:?}: {e}", argv[0])),
            };
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(parameters.as_bytes()).await;
    }
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read_all = async move {
        let mut out = Vec::new();
        let mut err = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(OUTPUT_CAP as u64).read_to_end(&mut out).await;
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(OUTPUT_CAP as u64).read_to_end(&mut err).await;
        }
        (out, err)
    };
    let waited = tokio::time::timeout(*timeout, async {
        let (out, err) = read_all.await;
        (child.wait().await, out, err)
    })
    .await;
    match waited {
        Err(_) => Outcome {
            state: RunState::Crashed,
            result: None,
            message: Some(format!("timed out after {}", describe(*timeout))),
        },
        Ok((Err(e), _, _)) => Outcome {
            state: RunState::Crashed,
            result: None,
            message: Some(format!("lost the process: {e}")),
        },
        Ok((Ok(status), out, err)) => {
            let stdout = String::from_utf8_lossy(&out);
            let stderr = String::from_utf8_lossy(&err);
            if status.success() {
                Outcome {
                    state: RunState::Completed,
                    result: result_from_stdout(&stdout),
                    message: None,
                }
            } else if let Some(code) = status.code() {
                Outcome {
                    state: RunState::Failed,
                    result: None,
                    message: Some(format!("exited with status {code}: {}", tail(&stderr, 500))),
                }
            } else {
                Outcome {
                    state: RunState::Crashed,
                    result: None,
                    message: Some(format!("killed by a signal: {}", tail(&stderr, 500))),
                }
            }
        }
    }
}

fn describe(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
