//! The `spur` command. A thin layer: argument parsing and printing; the work lives in the
//! library crates (`spur-daemon` for `serve`, `spur-replay` for `replay`/`test`, …).

mod check;
mod client;
mod serve;

// mimalloc instead of the system allocator: under load the daemon allocates per event on
// several threads, and glibc's malloc (with its arena locks and consolidation) was about a
// third of the tokio workers' CPU in the load driver; mimalloc took ~10-20 % off the CPU per
// event (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use spur_core::Severity;
use spur_core::time::parse_timestamp_str;
use spur_replay::{Replay, load_automations, load_scenario, read_events, run_scenario};
use spur_template::TemplateEngine;

/// Spur: an event-driven automation engine that speaks Prefect's events and triggers.
#[derive(Parser, Debug)]
#[command(name = "spur", version, about, long_about = None)]
struct Cli {
    /// API token (or API key) sent as `Authorization: Bearer` on every request to the
    /// daemon. Without it, `SPUR_AUTH_STRING` is sent as HTTP Basic.
    #[arg(long, global = true, env = "SPUR_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate(s) (PEM) trusted, besides the system's roots, for an https daemon URL
    /// (e.g. the self-signed certificate `spur serve --tls-cert` serves).
    #[arg(long, global = true, env = "SPUR_CA_CERT")]
    ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// `serve`'s flags make its variant the largest by far; the one `Command` a run parses is
// never moved around, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: HTTP/websocket (and NATS) ingest, triggers, durable state, hot reload.
    Serve(serve::ServeArgs),
    /// Serve a worker pool: take run requests from NATS (a queue group per pool), run the
    /// deployment's command, report states back. Run any number of them.
    Worker {
        /// The pool to serve (deployments name it in `launcher.worker.pool`).
        #[arg(long, default_value = "default")]
        pool: String,
        /// NATS server URL.
        #[arg(long, env = "SPUR_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// This worker's name in reports [default: host name and process id].
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        nats_connection: serve::NatsConnectArgs,
    },
    /// Send one event to the daemon (or publish it to NATS); prints its id.
    Emit {
        /// Event name, e.g. `backup.completed`.
        name: String,
        /// The resource id, or a JSON object of labels.
        #[arg(long)]
        resource: String,
        /// Related resources: a JSON list of label objects (each with prefect.resource.role).
        #[arg(long)]
        related: Option<String>,
        /// Payload: a JSON object.
        #[arg(long)]
        payload: Option<String>,
        /// Event id (default: a new UUIDv7).
        #[arg(long)]
        id: Option<String>,
        /// When it happened (RFC 3339; default: now).
        #[arg(long)]
        occurred: Option<String>,
        /// Id of the event this one follows.
        #[arg(long)]
        follows: Option<String>,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
        /// Publish to this NATS server instead of the daemon's HTTP API.
        #[arg(long)]
        nats: Option<String>,
        #[command(flatten)]
        nats_connection: serve::NatsConnectArgs,
        /// Subject prefix for --nats (the subject is PREFIX.EVENT_NAME).
        #[arg(long, default_value = "events")]
        subject_prefix: String,
    },
    /// Query the daemon's event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Inspect the daemon's loaded automations.
    Automations {
        #[command(subcommand)]
        command: AutomationsCommand,
    },
    /// Flow runs: list, inspect, start by hand, cancel.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Cluster mode (`spur serve --cluster NAME`): members, who acts on which automations.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Actions that failed for good (the dead-letter list), and retrying them.
    Actions {
        #[command(subcommand)]
        command: ActionsCommand,
    },
    /// Templated webhooks: any HTTP request to /hooks/SLUG becomes an event.
    Webhook {
        #[command(subcommand)]
        command: WebhookCommand,
    },
    /// API tokens: create (the secret is shown once), list, revoke. Needs an admin
    /// credential (--token or SPUR_AUTH_STRING) once auth is on; the first token of a daemon
    /// without credentials must be an admin token.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Why each automation did or did not react to an event, as decided when it arrived.
    Explain {
        /// The event id.
        id: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Recent firings recorded by the daemon, newest first (JSON lines).
    Firings {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Validate automation and deployment files; print a summary line per automation.
    /// Warns (`file:line:col: warning: …`, exit status 0) about what loads but would not
    /// work: a deployment without a launcher, a `run-deployment` to an undeclared
    /// deployment id, a template reading a variable templates do not have.
    Check {
        /// Files or folders of YAML/JSON automations and deployments.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Exit with status 1 on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Run automations over a recorded event stream on a virtual clock; print each firing as
    /// a JSON line.
    Replay {
        /// A YAML/JSON file or a folder of them.
        #[arg(long)]
        automations: PathBuf,
        /// Events as JSON Lines or a JSON array, processed in file order.
        #[arg(
            long,
            required_unless_present = "from_daemon",
            conflicts_with = "from_daemon"
        )]
        events: Option<PathBuf>,
        /// What-if: replay the running daemon's stored events instead of a file (nothing is
        /// launched; the daemon is only read).
        #[arg(long)]
        from_daemon: bool,
        /// With --from-daemon: events from this long ago (24h, 30m) or this RFC 3339 time.
        #[arg(long, default_value = "24h")]
        since: String,
        /// After the last event, advance the clock to this time (RFC 3339); with
        /// --from-daemon also the end of the events fetched.
        #[arg(long)]
        until: Option<String>,
        /// Daemon URL (with --from-daemon).
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Run trigger scenario files (or folders of them); exit 1 if any fails.
    Test {
        /// Scenario files or folders.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print every firing of every scenario, not just failures.
        #[arg(long, short)]
        verbose: bool,
    },
}

/// `spur cluster …`.
#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Members, their share of the partitions and automations, and their lag behind the
    /// stream (`/api/cluster`).
    Status {
        /// Print the JSON as the API returns it.
        #[arg(long)]
        json: bool,
        /// Daemon URL (any member).
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Follow new events live (the last 15 minutes first), until interrupted.
    Tail {
        /// Event name; a trailing `*` matches a prefix. Repeatable.
        #[arg(long)]
        name: Vec<String>,
        /// Resource id; a trailing `*` matches a prefix.
        #[arg(long)]
        resource: Option<String>,
        /// Start with new events only.
        #[arg(long)]
        no_backfill: bool,
        /// Print whole events as JSON lines.
        #[arg(long)]
        json: bool,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Events matching a filter, newest first.
    Query {
        /// Only events from this long ago (1h, 30m, 2d) or since this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only events up to this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        /// Event name; a trailing `*` matches a prefix. Repeatable.
        #[arg(long)]
        name: Vec<String>,
        /// Resource id; a trailing `*` matches a prefix.
        #[arg(long)]
        resource: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print whole events as JSON lines.
        #[arg(long)]
        json: bool,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum RunsCommand {
    /// Runs, newest first (e.g. `spur runs ls --state Crashed --since 1h`).
    Ls {
        /// How many (pages through the API as needed).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Every matching run, however many.
        #[arg(long, conflicts_with = "limit")]
        all: bool,
        #[command(flatten)]
        filter: client::RunFilter,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Start runs again with the same parameters, each linked to the one it reruns: by id,
    /// or every run a filter matches (`spur runs rerun --state Crashed --since 1h`).
    Rerun {
        /// Run ids.
        ids: Vec<String>,
        #[command(flatten)]
        filter: client::RunFilter,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// One run, with its state history, as JSON.
    Get {
        /// Run id.
        id: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Start a run of a deployment (Prefect's `deployment run`).
    Start {
        /// Deployment name or id.
        deployment: String,
        /// A parameter, `key=value` (value parsed as JSON when it can be). Repeatable.
        #[arg(long = "param", short = 'p')]
        params: Vec<String>,
        /// All parameters as one JSON object.
        #[arg(long)]
        params_json: Option<String>,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Cancel a run that has not finished.
    Cancel {
        /// Run id.
        id: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TokensCommand {
    /// Create a token; prints its secret (stored only as a hash).
    Create {
        /// Name (letters, digits, '-', '_', '.').
        name: String,
        /// events:write (send events), events:read (read everything, the UI), or admin.
        #[arg(long, value_parser = ["events:write", "events:read", "admin"])]
        scope: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// All tokens (names, scopes, creation times; never secrets).
    Ls {
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Revoke a token by name.
    Revoke {
        /// Name.
        name: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum WebhookCommand {
    /// Create a webhook; prints its id and URL (and its API key, once).
    Create {
        /// Name.
        name: String,
        /// The event template (Jinja; `<< >>` allowed).
        #[arg(long, conflicts_with = "template_file")]
        template: Option<String>,
        /// Read the template from a file.
        #[arg(long)]
        template_file: Option<PathBuf>,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Request authentication: api-key, github, stripe, standard or generic.
        #[arg(long)]
        auth: Option<String>,
        /// HMAC secret (repeat for two during rotation).
        #[arg(long)]
        secret: Vec<String>,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// One webhook (no secrets).
    Get {
        /// Id or name.
        id: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// All webhooks.
    Ls {
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Disable or enable (disabled webhooks answer 404).
    Toggle {
        /// Id or name.
        id: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// New URL (the old one stops working); an API-key webhook also gets a new key.
    Rotate {
        /// Id or name.
        id: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Delete.
    Delete {
        /// Id or name.
        id: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ActionsCommand {
    /// The dead-letter list: one JSON line per failed action, with its reason.
    Failed {
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Perform a dead-lettered action again; it leaves the list when it succeeds.
    Retry {
        /// The failed action's id (its invocation id).
        id: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AutomationsCommand {
    /// One line per automation with its open buckets; load errors on stderr.
    Ls {
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Stop evaluating an automation (kept across restarts) until resumed.
    Pause {
        /// Name or id.
        automation: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// Evaluate a paused automation again (its trigger state starts fresh).
    Resume {
        /// Name or id.
        automation: String,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
    /// What reloading PATH would add, change or remove, and which open buckets it would reset.
    Diff {
        /// A file or folder of automations.
        path: PathBuf,
        /// Daemon URL.
        #[arg(long, env = "SPUR_API_URL")]
        api: Option<String>,
    },
}

fn main() -> ExitCode {
    // Started as a run's launch helper (`spur __launch …`): become the run's program before
    // anything else is set up (spur_action::launcher's module docs).
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(std::ffi::OsStr::new(spur_action::launcher::HELPER_ARG)) {
        spur_action::launcher::helper_main(args);
    }
    // Runs this process starts go through that helper: posix_spawn, not a fork of the daemon.
    if let Ok(exe) = std::env::current_exe() {
        spur_action::launcher::use_launch_helper(exe);
    }
    // One TLS crypto provider for the whole process (HTTP clients, webhooks over https).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    client::set_credential(cli.token.clone());
    if let Err(e) = client::set_ca(cli.ca.as_deref()) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Tokens { command } => match command {
            TokensCommand::Create { name, scope, api } => {
                client::tokens_create(api.as_deref(), &name, &scope)
            }
            TokensCommand::Ls { api } => client::tokens_ls(api.as_deref()),
            TokensCommand::Revoke { name, api } => client::tokens_revoke(api.as_deref(), &name),
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve::serve(&args).map(|()| ExitCode::SUCCESS),
        Command::Worker {
            pool,
            nats,
            name,
            nats_connection,
        } => serve::worker(&pool, &nats, name, &nats_connection).map(|()| ExitCode::SUCCESS),
        Command::Emit {
            name,
            resource,
            related,
            payload,
            id,
            occurred,
            follows,
            api,
            nats,
            nats_connection,
            subject_prefix,
        } => client::emit(&client::EmitOptions {
            name: &name,
            resource: &resource,
            related: related.as_deref(),
            payload: payload.as_deref(),
            id: id.as_deref(),
            occurred: occurred.as_deref(),
            follows: follows.as_deref(),
            api: api.as_deref(),
            nats: nats.as_deref(),
            nats_connection: &nats_connection,
            subject_prefix: &subject_prefix,
        })
        .map(|()| ExitCode::SUCCESS),
        Command::Events {
            command:
                EventsCommand::Query {
                    since,
                    until,
                    name,
                    resource,
                    limit,
                    json,
                    api,
                },
        } => client::query(
            api.as_deref(),
            since.as_deref(),
            until.as_deref(),
            &name,
            resource.as_deref(),
            limit,
            json,
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Events {
            command:
                EventsCommand::Tail {
                    name,
                    resource,
                    no_backfill,
                    json,
                    api,
                },
        } => client::tail(
            api.as_deref(),
            &name,
            resource.as_deref(),
            !no_backfill,
            json,
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Automations { command } => match command {
            AutomationsCommand::Ls { api } => {
                client::automations(api.as_deref()).map(|()| ExitCode::SUCCESS)
            }
            AutomationsCommand::Pause { automation, api } => {
                client::set_paused(api.as_deref(), &automation, true).map(|()| ExitCode::SUCCESS)
            }
            AutomationsCommand::Resume { automation, api } => {
                client::set_paused(api.as_deref(), &automation, false).map(|()| ExitCode::SUCCESS)
            }
            AutomationsCommand::Diff { path, api } => diff(&path, api.as_deref()),
        },
        Command::Runs { command } => match command {
            RunsCommand::Ls {
                limit,
                all,
                filter,
                api,
            } => client::runs_ls(api.as_deref(), (!all).then_some(limit), &filter),
            RunsCommand::Rerun { ids, filter, api } => {
                client::runs_rerun(api.as_deref(), &ids, &filter)
            }
            RunsCommand::Get { id, api } => client::runs_get(api.as_deref(), &id),
            RunsCommand::Start {
                deployment,
                params,
                params_json,
                api,
            } => client::runs_start(api.as_deref(), &deployment, &params, params_json.as_deref()),
            RunsCommand::Cancel { id, api } => client::runs_cancel(api.as_deref(), &id),
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Cluster { command } => match command {
            ClusterCommand::Status { json, api } => client::cluster_status(api.as_deref(), json),
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Actions { command } => match command {
            ActionsCommand::Failed { api } => client::actions_failed(api.as_deref()),
            ActionsCommand::Retry { id, api } => client::actions_retry(api.as_deref(), &id),
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Webhook { command } => match command {
            WebhookCommand::Create {
                name,
                template,
                template_file,
                description,
                auth,
                secret,
                api,
            } => (|| {
                let template = match (template, template_file) {
                    (Some(t), _) => t,
                    (None, Some(f)) => std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))?,
                    (None, None) => anyhow::bail!("give --template or --template-file"),
                };
                client::webhook_create(
                    api.as_deref(),
                    &name,
                    &template,
                    description.as_deref(),
                    auth.as_deref(),
                    &secret,
                )
            })(),
            WebhookCommand::Get { id, api } => client::webhook_show(api.as_deref(), &id),
            WebhookCommand::Ls { api } => client::webhook_ls(api.as_deref()),
            WebhookCommand::Toggle { id, api } => {
                client::webhook_post(api.as_deref(), &id, "toggle")
            }
            WebhookCommand::Rotate { id, api } => {
                client::webhook_post(api.as_deref(), &id, "rotate")
            }
            WebhookCommand::Delete { id, api } => client::webhook_delete(api.as_deref(), &id),
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Explain { id, json, api } => {
            client::explain(api.as_deref(), &id, json).map(|()| ExitCode::SUCCESS)
        }
        Command::Firings { limit, api } => {
            client::firings(api.as_deref(), limit).map(|()| ExitCode::SUCCESS)
        }
        Command::Check { paths, strict } => check(&paths, strict),
        Command::Replay {
            automations,
            events,
            from_daemon,
            since,
            until,
            api,
        } => {
            let source = if from_daemon {
                EventSource::Daemon {
                    api: api.as_deref(),
                    since: &since,
                }
            } else {
                match events.as_deref() {
                    Some(path) => EventSource::File(path),
                    None => EventSource::Daemon {
                        api: api.as_deref(),
                        since: &since,
                    },
                }
            };
            replay(&automations, source, until.as_deref())
        }
        Command::Test { files, verbose } => test(&files, verbose),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn check(paths: &[PathBuf], strict: bool) -> Result<ExitCode> {
    let templates = TemplateEngine::new();
    let mut errors = 0usize;
    let mut warnings = 0usize;
    let mut automations = 0usize;
    for path in paths {
        let outcome = load_automations(path, &templates);
        let found = check::warnings(path, &outcome);
        for d in outcome.diagnostics.iter().chain(&found) {
            match d.severity {
                Severity::Error => errors += 1,
                Severity::Warning => warnings += 1,
            }
            eprintln!("{d}");
        }
        for loaded in &outcome.automations {
            automations += 1;
            println!("ok  {}", loaded.automation.summary());
        }
    }
    let tail = if warnings > 0 {
        format!(", {warnings} warning(s)")
    } else {
        String::new()
    };
    if errors > 0 {
        eprintln!("{automations} automation(s) valid, {errors} error(s){tail}");
        return Ok(ExitCode::FAILURE);
    }
    println!("{automations} automation(s) valid{tail}");
    if strict && warnings > 0 {
        eprintln!("--strict: warnings count as failures");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `spur replay` reads events from.
enum EventSource<'a> {
    /// A JSONL or JSON-array file.
    File(&'a Path),
    /// The running daemon's event log.
    Daemon {
        api: Option<&'a str>,
        since: &'a str,
    },
}

fn replay(automations: &Path, source: EventSource<'_>, until: Option<&str>) -> Result<ExitCode> {
    let until = until
        .map(parse_timestamp_str)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("--until")?;
    let templates = TemplateEngine::new();
    let outcome = load_automations(automations, &templates);
    let mut failed = false;
    for d in &outcome.diagnostics {
        failed |= d.severity == Severity::Error;
        eprintln!("{d}");
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    let events = match source {
        EventSource::File(path) => match read_events(path) {
            Ok(events) => events,
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        EventSource::Daemon { api, since } => {
            let until_text = until.map(spur_core::time::format_timestamp);
            let fetched = client::fetch_events(api, since, until_text.as_deref())?;
            eprintln!("replaying {} event(s) from the daemon", fetched.len());
            fetched
                .into_iter()
                .enumerate()
                .map(|(i, e)| (i + 1, e))
                .collect()
        }
    };
    let automations = outcome
        .automations
        .into_iter()
        .map(|l| l.automation)
        .collect();
    let mut session = Replay::new(automations);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (line, raw) in &events {
        match session.feed(raw, &format!("line {line}")) {
            Ok(records) => {
                for r in records {
                    writeln!(out, "{}", serde_json::to_string(&r)?)?;
                }
            }
            Err(e) => {
                out.flush()?;
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    for r in session.finish(until) {
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `spur automations diff`: compares the daemon's loaded automations with PATH.
fn diff(path: &Path, api: Option<&str>) -> Result<ExitCode> {
    let templates = TemplateEngine::new();
    let outcome = load_automations(path, &templates);
    let mut failed = false;
    for d in &outcome.diagnostics {
        failed |= d.severity == Severity::Error;
        eprintln!("{d}");
    }
    let live = client::loaded_automations(api)?;
    let proposed: Vec<&spur_core::Automation> =
        outcome.automations.iter().map(|l| &*l.automation).collect();
    let mut changes = 0;
    for a in &proposed {
        let definition = serde_json::to_value(a)?;
        match live.iter().find(|l| l["id"] == definition["id"]) {
            None => {
                changes += 1;
                println!("+ {} (new)", a.name);
            }
            Some(l) => {
                let same = [
                    "trigger",
                    "actions",
                    "actions_on_trigger",
                    "actions_on_resolve",
                ]
                .iter()
                .all(|k| l[*k] == definition[*k]);
                if !same {
                    changes += 1;
                    let buckets = l["state"]["buckets"].as_array().map_or(0, Vec::len);
                    println!(
                        "~ {} (changed; {buckets} open bucket(s) would reset)",
                        a.name
                    );
                }
            }
        }
    }
    for l in &live {
        if !proposed
            .iter()
            .any(|a| serde_json::to_value(a.id).ok().as_ref() == Some(&l["id"]))
        {
            changes += 1;
            println!("- {} (removed)", l["name"].as_str().unwrap_or(""));
        }
    }
    if changes == 0 {
        println!("no changes");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn test(files: &[PathBuf], verbose: bool) -> Result<ExitCode> {
    let templates = TemplateEngine::new();
    let mut scenario_files = Vec::new();
    for f in files {
        if f.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(f)
                .with_context(|| format!("cannot list {}", f.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            found.sort();
            scenario_files.extend(found);
        } else {
            scenario_files.push(f.clone());
        }
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in &scenario_files {
        match load_scenario(file, &templates) {
            Err(errors) => {
                failed += 1;
                println!("FAIL {} (invalid scenario)", file.display());
                for e in errors {
                    println!("     {e}");
                }
            }
            Ok(scenario) => {
                let outcome = run_scenario(&scenario);
                if outcome.passed {
                    passed += 1;
                    println!("ok   {} — {}", file.display(), outcome.name);
                } else {
                    failed += 1;
                    println!("FAIL {} — {}", file.display(), outcome.name);
                    for d in &outcome.details {
                        println!("     {d}");
                    }
                }
                if verbose || !outcome.passed {
                    for f in &outcome.actual {
                        println!("     fired: {}", serde_json::to_string(f)?);
                    }
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
