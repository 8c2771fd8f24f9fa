//! Deployments: what a `run-deployment` action launches.
//!
//! Declared in YAML beside automations, in `prefect.yaml` shape plus Spur's `launcher`:
//!
//! ```yaml
//! deployments:
//!   - name: downstream
//!     flow: downstream                 # flow name (default: the deployment name)
//!     parameters: {retries: 1}         # defaults, merged under rendered parameters
//!     parameter_schema: {…}            # optional JSON Schema, checked before launch
//!     launcher:
//!       command: ["python3", "flows/downstream.py"]   # or one string, run with `sh -c`
//!       env: {MODE: fast}
//!       cwd: .
//!       timeout: 600                   # seconds (default 3600)
//!     on_crash: rerun                  # optional: rerun a run a daemon crash cut short
//! ```
//!
//! `on_crash: rerun` is for jobs that are safe to run twice: a run that was already running
//! when the daemon died (so it is Crashed at the next start) gets a new run with the same
//! parameters, linked to it by `rerun_of`. Off by default: runs that had not started are
//! launched after a restart anyway, and a run that had started may have done its work.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};
use spur_core::load::DeploymentRef;
use uuid::Uuid;

use crate::launcher::CommandSpec;
use crate::run::RunTarget;
use crate::schema;

/// How a deployment's runs are started.
#[derive(Clone, Debug, PartialEq)]
pub enum Launcher {
    /// A local process.
    Command(CommandSpec),
    /// A templated HTTP request.
    Http(crate::remote::HttpLauncher),
    /// A flow run on a Prefect server.
    Prefect(crate::remote::PrefectLauncher),
    /// A process on a `spur worker --pool <pool>` machine, reached over NATS.
    Worker {
        /// The pool (NATS queue group) to hand runs to.
        pool: String,
        /// The program the worker runs (its `cwd` is on the worker's machine).
        command: CommandSpec,
    },
}

/// What happens to a run a daemon crash cut short while it was running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnCrash {
    /// It stays Crashed; `spur runs rerun` starts it again by hand (the default).
    #[default]
    Leave,
    /// A new run with the same parameters starts at once, linked by `rerun_of`.
    Rerun,
}

/// A deployment Spur can run.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    /// Name.
    pub name: String,
    /// Id (given, or a UUIDv5 of the name).
    pub id: Uuid,
    /// Flow name.
    pub flow: String,
    /// Default parameters.
    pub parameters: Map<String, Value>,
    /// JSON Schema for parameters.
    pub schema: Option<Value>,
    /// How runs start; `None` for a declaration without a launcher (its runs fail at once).
    pub launcher: Option<Launcher>,
    /// What a daemon crash during a run leads to.
    pub on_crash: OnCrash,
}

impl Deployment {
    /// What its runs are runs of.
    pub fn target(&self) -> RunTarget {
        RunTarget {
            deployment_id: self.id,
            deployment: self.name.clone(),
            flow_id: self.flow_id(),
            flow: self.flow.clone(),
        }
    }

    /// The flow's id: a UUIDv5 of its name.
    pub fn flow_id(&self) -> Uuid {
        Uuid::new_v5(
            &spur_core::SPUR_NAMESPACE,
            format!("flow:{}", self.flow).as_bytes(),
        )
    }

    /// Reads a declaration; the error names the field.
    pub fn from_ref(declared: &DeploymentRef) -> Result<Deployment, String> {
        let spec = &declared.spec;
        let flow = spec
            .get("flow")
            .or_else(|| spec.get("flow_name"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| declared.name.clone());
        let parameters = match spec.get("parameters") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err("parameters: must be a mapping".into()),
        };
        let schema = spec
            .get("parameter_schema")
            .or_else(|| spec.get("parameter_openapi_schema"))
            .filter(|v| !v.is_null())
            .cloned();
        if let Some(s) = &schema {
            schema::check_schema(s).map_err(|e| format!("parameter_schema: {e}"))?;
        }
        let launcher = match spec.get("launcher") {
            None | Some(Value::Null) => None,
            Some(Value::Object(l)) => Some(parse_launcher(l)?),
            Some(_) => return Err("launcher: must be a mapping".into()),
        };
        let on_crash = match spec.get("on_crash") {
            None | Some(Value::Null) => OnCrash::Leave,
            Some(Value::String(s)) if s == "leave" => OnCrash::Leave,
            Some(Value::String(s)) if s == "rerun" => OnCrash::Rerun,
            Some(_) => return Err("on_crash: `rerun` or `leave`".into()),
        };
        Ok(Deployment {
            name: declared.name.clone(),
            id: declared.id,
            flow,
            parameters,
            schema,
            launcher,
            on_crash,
        })
    }

    /// Defaults merged under `rendered`, then checked against the schema. The error names the
    /// parameter.
    pub fn prepare_parameters(&self, rendered: &Value) -> Result<Value, String> {
        let mut merged = self.parameters.clone();
        if let Value::Object(r) = rendered {
            for (k, v) in r {
                merged.insert(k.clone(), v.clone());
            }
        }
        let merged = Value::Object(merged);
        if let Some(schema) = &self.schema {
            schema::validate(schema, &merged)?;
        }
        Ok(merged)
    }
}

fn parse_launcher(l: &Map<String, Value>) -> Result<Launcher, String> {
    if let Some(worker) = l.get("worker") {
        let Value::Object(w) = worker else {
            return Err("launcher.worker: a mapping with `pool` and `command`".into());
        };
        let pool = w
            .get("pool")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty() && !p.contains(['.', '*', '>', ' ']))
            .ok_or("launcher.worker.pool: a name without dots, spaces, `*` or `>`")?
            .to_owned();
        return Ok(Launcher::Worker {
            pool,
            command: parse_command(w)?,
        });
    }
    if let Some(http) = l.get("http") {
        let Value::Object(h) = http else {
            return Err("launcher.http: a mapping with `url`".into());
        };
        let url = h
            .get("url")
            .and_then(Value::as_str)
            .ok_or("launcher.http.url: is required")?
            .to_owned();
        let headers = match h.get("headers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect(),
            Some(_) => return Err("launcher.http.headers: must be a mapping".into()),
        };
        return Ok(Launcher::Http(crate::remote::HttpLauncher {
            url,
            method: h
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("POST")
                .to_owned(),
            headers,
            body: h.get("body").map(|b| {
                b.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| b.to_string())
            }),
            timeout: timeout_of(h)?,
        }));
    }
    if let Some(prefect) = l.get("prefect") {
        let Value::Object(p) = prefect else {
            return Err(
                "launcher.prefect: a mapping with `api_url` and `deployment_id` or `deployment`"
                    .into(),
            );
        };
        let api_url = p
            .get("api_url")
            .and_then(Value::as_str)
            .ok_or("launcher.prefect.api_url: is required (e.g. http://127.0.0.1:4200/api)")?
            .to_owned();
        let deployment_id = p
            .get("deployment_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let deployment_name = p
            .get("deployment")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if deployment_id.is_none() && deployment_name.is_none() {
            return Err(
                "launcher.prefect: deployment_id or deployment (\"flow/deployment\") is required"
                    .into(),
            );
        }
        return Ok(Launcher::Prefect(crate::remote::PrefectLauncher {
            api_url,
            deployment_id,
            deployment_name,
            auth_string: p
                .get("auth_string")
                .and_then(Value::as_str)
                .map(str::to_owned),
            timeout: timeout_of(p)?,
            follow: match p.get("follow") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(follow)) => *follow,
                Some(_) => return Err("launcher.prefect.follow: must be true or false".into()),
            },
            poll_interval: match p.get("poll_interval") {
                None | Some(Value::Null) => Duration::from_secs(2),
                Some(v) => v
                    .as_f64()
                    .filter(|s| *s > 0.0 && *s <= 3600.0)
                    .map(Duration::from_secs_f64)
                    .ok_or("launcher.prefect.poll_interval: must be seconds, more than 0 and at most 3600")?,
            },
        }));
    }
    if l.get("command").is_none() {
        let kind = l.keys().next().cloned().unwrap_or_default();
        return Err(format!(
            "launcher: one of `command`, `worker`, `http`, `prefect` (got {kind:?})"
        ));
    }
    parse_command(l).map(Launcher::Command)
}

fn parse_command(l: &Map<String, Value>) -> Result<CommandSpec, String> {
    let Some(command) = l.get("command") else {
        return Err("launcher.command: is required".into());
    };
    let argv = match command {
        Value::String(s) => vec!["sh".to_owned(), "-c".to_owned(), s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or("launcher.command: must be strings")
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err("launcher.command: a list of strings (argv) or one shell string".into()),
    };
    if argv.is_empty() {
        return Err("launcher.command: must not be empty".into());
    }
    let env = match l.get("env") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Some(_) => return Err("launcher.env: must be a mapping".into()),
    };
    let cwd = l.get("cwd").and_then(Value::as_str).map(PathBuf::from);
    let timeout = timeout_of(l)?;
    Ok(CommandSpec {
        argv,
        env,
        cwd,
        timeout,
    })
}

fn timeout_of(l: &Map<String, Value>) -> Result<Duration, String> {
    match l.get("timeout") {
        None | Some(Value::Null) => Ok(Duration::from_secs(3600)),
        Some(v) => spur_core::time::parse_duration(v)
            .ok()
            .and_then(|d| d.to_std().ok())
            .ok_or_else(|| "launcher timeout: seconds or an ISO-8601 duration".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn declared(launcher: Value) -> DeploymentRef {
        DeploymentRef {
            name: "d".into(),
            id: Uuid::nil(),
            spec: json!({"name": "d", "launcher": launcher}),
        }
    }

    #[test]
    fn prefect_launchers_follow_by_default_and_refuse_bad_settings_by_name() {
        let prefect = |extra: Value| {
            let mut p = json!({"api_url": "http://127.0.0.1:4200/api", "deployment_id": "x"});
            p.as_object_mut()
                .expect("object")
                .extend(extra.as_object().cloned().unwrap_or_default());
            Deployment::from_ref(&declared(json!({"prefect": p})))
        };
        match prefect(json!({})).expect("valid").launcher {
            Some(Launcher::Prefect(p)) => {
                assert!(p.follow);
                assert_eq!(p.poll_interval, Duration::from_secs(2));
            }
            other => panic!("a prefect launcher, not {other:?}"),
        }
        match prefect(json!({"follow": false, "poll_interval": 0.5}))
            .expect("valid")
            .launcher
        {
            Some(Launcher::Prefect(p)) => {
                assert!(!p.follow);
                assert_eq!(p.poll_interval, Duration::from_millis(500));
            }
            other => panic!("a prefect launcher, not {other:?}"),
        }
        let refused = prefect(json!({"follow": "yes"})).expect_err("refused");
        assert!(refused.contains("follow"), "{refused}");
        let refused = prefect(json!({"poll_interval": 0})).expect_err("refused");
        assert!(refused.contains("poll_interval"), "{refused}");
    }
}
