//! The control socket: JSON, one request and one reply per line, over a Unix socket that only
//! the daemon's user may open (mode 0600).
//!
//! ```text
//! {"id": 1, "command": "list-exports", "args": {}}
//! {"id": 1, "result": [...]}            or   {"id": 1, "error": {"code": "...", "message": "..."}}
//! ```
//!
//! Commands: list-exports, add-export (the keys of --export), remove-export (id, force),
//! resize (id, size, shrink), query-stats (id), set-polling (id or iothread, mode, max-us),
//! set-throttle (id or group, and the limit keys of --export: those not given are lifted),
//! list-iothreads, add-iothread (the keys of --iothread), remove-iothread (id), dump-config
//! (the running configuration as a TOML config file, in a string), reload, nbd-export (id,
//! name, writable), nbd-unexport (id), nbd-list. A bad request gets an
//! error reply naming the problem; the connection stays open and nothing changes.

pub mod metrics;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tracing::info;

use crate::daemon::{ControlError, Daemon};
use crate::export::ExportConfig;
use crate::iothread::poll::PollPolicy;
use crate::iothread::registry::IoThreadConfig;
use crate::listener::{ConnectionLimit, StoppableListener};
use crate::qos::ThrottleConfig;
use crate::ratelimit::RateLimiter;
use crate::spec::Value as SpecValue;
use crate::vhost_user::bind_socket;
use crate::warn_limited;

/// Longest request line accepted; a longer one gets an error reply and the connection is
/// closed (the rest of it is never read).
const MAX_LINE_BYTES: u64 = 1 << 20;
/// Clients served at once; one more gets an error reply and is closed.
pub const MAX_CLIENTS: usize = 16;
/// A client that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// A client that does not read its replies for this long is closed.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Every command, for errors, help and completions (docs/control.md describes each).
pub const COMMAND_NAMES: &[&str] = &[
    "list-exports",
    "add-export",
    "remove-export",
    "resize",
    "query-stats",
    "set-polling",
    "set-throttle",
    "list-iothreads",
    "add-iothread",
    "remove-iothread",
    "dump-config",
    "reload",
    "nbd-export",
    "nbd-unexport",
    "nbd-list",
    "mirror",
    "query-jobs",
    "job-cancel",
    "job-complete",
];

/// The fields a request may have.
const REQUEST_FIELDS: &[&str] = &["id", "command", "args"];

/// The control socket's listener.
pub struct ControlServer {
    path: PathBuf,
    listener: StoppableListener,
    clients: ConnectionLimit,
}

impl ControlServer {
    /// Binds `path` with mode 0600.
    pub fn bind(path: &Path) -> Result<ControlServer, String> {
        // bind_socket creates it owner-only (0600) from the start.
        let listener = bind_socket(path)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener: StoppableListener::new(listener).map_err(|e| format!("eventfd: {e}"))?,
            clients: ConnectionLimit::new(MAX_CLIENTS),
        })
    }

    /// Accepts clients until `shutdown`, one thread per client, at most [`MAX_CLIENTS`].
    pub fn run(&self, daemon: Arc<Daemon>) {
        info!(path = %self.path.display(), "control socket listening");
        let mut log = RateLimiter::default();
        while let Some(accepted) = self.listener.accept() {
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    warn_limited!(log, "control socket accept: {e}");
                    continue;
                }
            };
            let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let Some(permit) = self.clients.try_take() else {
                warn_limited!(
                    log,
                    "control socket: {MAX_CLIENTS} clients connected already; refused one"
                );
                let reply = error_reply(
                    Value::Null,
                    ControlError::new(
                        "busy",
                        format!("{MAX_CLIENTS} clients are connected already"),
                    ),
                );
                let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
                continue;
            };
            let d = Arc::clone(&daemon);
            let spawned =
                std::thread::Builder::new().name("blkplane-control".into()).spawn(move || {
                    let _permit = permit;
                    serve_client(stream, &d)
                });
            if let Err(e) = spawned {
                warn_limited!(log, "control socket: cannot start a client thread: {e}");
            }
        }
    }

    pub fn shutdown(&self) {
        self.listener.stop();
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_client(stream: UnixStream, daemon: &Daemon) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut reader).take(MAX_LINE_BYTES + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.len() as u64 > MAX_LINE_BYTES {
            // Reading the rest would cost what the client likes: answer and hang up.
            let reply = error_reply(
                Value::Null,
                ControlError::new("too-long", "request longer than 1 MiB"),
            );
            let _ = out.write_all(format!("{reply}\n").as_bytes());
            return;
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            handle_line(&line, daemon)
        };
        let mut text = reply.to_string();
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn error_reply(id: Value, e: ControlError) -> Value {
    json!({"id": id, "error": {"code": e.code, "message": e.message}})
}

/// Parses and runs one request line; returns the reply.
pub fn handle_line(line: &[u8], daemon: &Daemon) -> Value {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return error_reply(
                Value::Null,
                ControlError::new("invalid-json", format!("malformed JSON: {e}")),
            )
        }
    };
    let Some(obj) = request.as_object() else {
        return error_reply(
            Value::Null,
            ControlError::new("invalid-request", "a request is a JSON object"),
        );
    };
    let id = obj.get("id").cloned().unwrap_or(Value::Null);
    if let Some(field) = obj.keys().find(|k| !REQUEST_FIELDS.contains(&k.as_str())) {
        return error_reply(
            id,
            ControlError::new(
                "invalid-request",
                format!(
                    "unknown field \"{field}\" (a request has {}; arguments go in \"args\")",
                    REQUEST_FIELDS.join(", ")
                ),
            ),
        );
    }
    let Some(command) = obj.get("command").and_then(Value::as_str) else {
        return error_reply(
            id,
            ControlError::new("invalid-request", "missing \"command\" (a string)"),
        );
    };
    let empty = Map::new();
    let args = match obj.get("args") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => {
            return error_reply(
                id,
                ControlError::new("invalid-request", "\"args\" must be an object"),
            )
        }
    };
    match run_command(command, args, daemon) {
        Ok(result) => json!({"id": id, "result": result}),
        Err(e) => error_reply(id, e),
    }
}

fn bad_arg(message: String) -> ControlError {
    ControlError::new("invalid-argument", message)
}

/// Checks that `args` has only `allowed` keys.
fn only_keys(
    command: &str,
    args: &Map<String, Value>,
    allowed: &[&str],
) -> Result<(), ControlError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad_arg(format!(
            "{command} takes no argument '{k}' (it takes: {})",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

/// An argument's value, typed as the request gave it.
fn arg(args: &Map<String, Value>, key: &str) -> Result<Option<SpecValue>, ControlError> {
    args.get(key).map(|v| SpecValue::from_json(key, v).map_err(|e| bad_arg(e.0))).transpose()
}

/// A text argument: a string, or a number whose digits are the text.
fn opt_str(args: &Map<String, Value>, key: &str) -> Result<Option<String>, ControlError> {
    arg(args, key)?.map(|v| v.text(key).map_err(|e| bad_arg(e.0))).transpose()
}

fn req_str(args: &Map<String, Value>, key: &str) -> Result<String, ControlError> {
    opt_str(args, key)?.ok_or_else(|| bad_arg(format!("missing '{key}'")))
}

/// true/false, or the words the export keys take (on/off ...).
fn opt_bool(args: &Map<String, Value>, key: &str) -> Result<Option<bool>, ControlError> {
    arg(args, key)?.map(|v| v.bool(key).map_err(|e| bad_arg(e.0))).transpose()
}

/// A size as a number of bytes, or a string with a suffix ("10G").
fn req_size(args: &Map<String, Value>, key: &str) -> Result<u64, ControlError> {
    let v = arg(args, key)?.ok_or_else(|| bad_arg(format!("missing '{key}'")))?;
    v.size(key).map_err(|e| bad_arg(e.0))
}

fn to_json<T: serde::Serialize>(v: T) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| ControlError::new("failed", e.to_string()))
}

fn run_command(
    command: &str,
    args: &Map<String, Value>,
    daemon: &Daemon,
) -> Result<Value, ControlError> {
    match command {
        "list-exports" => {
            only_keys(command, args, &[])?;
            to_json(daemon.list())
        }
        "add-export" => {
            let pairs = pairs_from_args(args)?;
            // The daemon's working directory is not its client's: a relative path would
            // name another file than the one meant.
            if let Some((k, v)) = pairs.iter().find(|(k, v)| {
                let text = v.to_string();
                ExportConfig::is_path_key(k)
                    && !text.starts_with('/')
                    && !crate::disk::is_network_image(&text)
            }) {
                return Err(bad_arg(format!(
                    "'{k}' must be an absolute path, not {v} (blkplane ctl makes its paths absolute)"
                )));
            }
            let config = ExportConfig::from_pairs(pairs).map_err(|e| bad_arg(e.0))?;
            let mut infos = daemon.add_exports(vec![config])?;
            to_json(infos.pop())
        }
        "remove-export" => {
            only_keys(command, args, &["id", "force"])?;
            let id = req_str(args, "id")?;
            daemon.remove(&id, opt_bool(args, "force")?.unwrap_or(false))?;
            Ok(json!({"removed": id}))
        }
        "resize" => {
            only_keys(command, args, &["id", "size", "shrink"])?;
            let id = req_str(args, "id")?;
            let size = req_size(args, "size")?;
            let shrink = opt_bool(args, "shrink")?.unwrap_or(false);
            to_json(daemon.resize(&id, size, shrink)?)
        }
        "query-stats" => {
            only_keys(command, args, &["id"])?;
            to_json(daemon.stats(opt_str(args, "id")?.as_deref())?)
        }
        "set-polling" => {
            only_keys(command, args, &["id", "iothread", "mode", "max-us"])?;
            // The same checks as the poll and poll-max-us keys.
            let mut policy = PollPolicy::default();
            let mode = match arg(args, "mode")? {
                Some(m) => policy.set_mode(&m).map(|()| Some(policy.mode)),
                None => Ok(None),
            };
            let max_us = match arg(args, "max-us")? {
                Some(m) => policy.set_max_us(&m).map(|()| Some(policy.max_us)),
                None => Ok(None),
            };
            let (mode, max_us) =
                (mode.map_err(|e| bad_arg(e.0))?, max_us.map_err(|e| bad_arg(e.0))?);
            if mode.is_none() && max_us.is_none() {
                return Err(bad_arg("set-polling needs 'mode' or 'max-us'".into()));
            }
            let (id, iothread) = (opt_str(args, "id")?, opt_str(args, "iothread")?);
            if id.is_some() && iothread.is_some() {
                return Err(bad_arg(
                    "set-polling takes 'id' (an export) or 'iothread', not both".into(),
                ));
            }
            daemon.set_polling(id.as_deref(), iothread.as_deref(), mode, max_us)
        }
        "set-throttle" => {
            let (mut id, mut group) = (None, None);
            let mut limits = Vec::new();
            for (k, v) in pairs_from_args(args)? {
                match k.as_str() {
                    "id" | "group" => {
                        let text = v.text(&k).map_err(|e| bad_arg(e.0))?;
                        *(if k == "id" { &mut id } else { &mut group }) = Some(text);
                    }
                    _ => limits.push((k, v)),
                }
            }
            let config = ThrottleConfig::from_pairs(limits.iter().map(|(k, v)| (k.as_str(), v)))
                .map_err(|e| bad_arg(e.0))?;
            daemon.set_throttle(id.as_deref(), group.as_deref(), &config)
        }
        "dump-config" => {
            only_keys(command, args, &[])?;
            Ok(Value::String(daemon.dump_config()))
        }
        "list-iothreads" => {
            only_keys(command, args, &[])?;
            to_json(daemon.list_iothreads())
        }
        "add-iothread" => {
            let pairs = pairs_from_args(args)?;
            let config = IoThreadConfig::from_pairs(&pairs).map_err(|e| bad_arg(e.0))?;
            to_json(daemon.add_iothread(&config)?)
        }
        "remove-iothread" => {
            only_keys(command, args, &["id"])?;
            let id = req_str(args, "id")?;
            daemon.remove_iothread(&id)?;
            Ok(json!({"removed": id}))
        }
        "reload" => {
            only_keys(command, args, &[])?;
            daemon.reload()
        }
        "nbd-export" => {
            only_keys(command, args, &["id", "name", "writable"])?;
            let id = req_str(args, "id")?;
            let name = opt_str(args, "name")?;
            let writable = opt_bool(args, "writable")?.unwrap_or(false);
            to_json(daemon.nbd_export(&id, name.as_deref(), writable)?)
        }
        "nbd-unexport" => {
            only_keys(command, args, &["id"])?;
            let id = req_str(args, "id")?;
            daemon.nbd_unexport(&id)?;
            Ok(json!({"unexported": id}))
        }
        "nbd-list" => {
            only_keys(command, args, &[])?;
            match daemon.nbd_server() {
                Some(nbd) => Ok(json!({"address": nbd.address, "exports": to_json(nbd.list())?})),
                None => Ok(json!({"address": null, "exports": []})),
            }
        }
        "mirror" => {
            only_keys(command, args, &["id", "target", "speed", "tls-creds"])?;
            let id = req_str(args, "id")?;
            let target = req_str(args, "target")?;
            if !target.starts_with('/') && !crate::disk::is_network_image(&target) {
                return Err(bad_arg(format!(
                    "'target' must be an absolute path or an NBD or RBD URI, not {target}"
                )));
            }
            let speed = match arg(args, "speed")? {
                Some(v) => v.size("speed").map_err(|e| bad_arg(e.0))?,
                None => 0,
            };
            let tls_creds = opt_str(args, "tls-creds")?.map(PathBuf::from);
            if tls_creds.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(bad_arg("'tls-creds' must be an absolute path (a directory)".into()));
            }
            to_json(daemon.mirror(&id, &target, speed, tls_creds.as_deref())?)
        }
        "query-jobs" => {
            only_keys(command, args, &[])?;
            to_json(daemon.query_jobs())
        }
        "job-cancel" => {
            only_keys(command, args, &["id"])?;
            to_json(daemon.job_cancel(&req_str(args, "id")?)?)
        }
        "job-complete" => {
            only_keys(command, args, &["id"])?;
            to_json(daemon.job_complete(&req_str(args, "id")?)?)
        }
        other => Err(ControlError::new(
            "unknown-command",
            format!("unknown command '{other}' (commands: {})", COMMAND_NAMES.join(", ")),
        )),
    }
}

/// A command's arguments as typed key/value pairs, for the key tables.
fn pairs_from_args(args: &Map<String, Value>) -> Result<Vec<(String, SpecValue)>, ControlError> {
    args.iter()
        .map(|(k, v)| Ok((k.clone(), SpecValue::from_json(k, v).map_err(|e| bad_arg(e.0))?)))
        .collect()
}

/// A client of the control socket (for `blkplane ctl` and `blkplane stat`).
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

/// Why `ctl` or `stat` failed, which decides their exit status (documented in `--help`).
#[derive(Debug)]
pub enum ClientFailure {
    /// No daemon answers at the control socket's path (missing, refused, no permission).
    Unreachable(String),
    /// The daemon refused the request, or the connection broke.
    Failed(String),
    /// Whoever read our output stopped (`stat | head`): a normal end, said nothing of.
    OutputClosed,
}

impl ClientFailure {
    /// 3 when the daemon cannot be reached, 1 when it refused or failed; 2 is left to bad
    /// command lines, 0 to success.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientFailure::Unreachable(_) => 3,
            ClientFailure::Failed(_) => 1,
            ClientFailure::OutputClosed => 0,
        }
    }
}

impl std::fmt::Display for ClientFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientFailure::Unreachable(m) | ClientFailure::Failed(m) => f.write_str(m),
            ClientFailure::OutputClosed => f.write_str("stdout closed"),
        }
    }
}

/// Prints to stdout for `ctl` and `stat`; a closed stdout (`| head`) is an error to end
/// with, not a panic.
pub fn print_out(text: &str) -> Result<(), ClientFailure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| match e.kind() {
        io::ErrorKind::BrokenPipe => ClientFailure::OutputClosed,
        _ => ClientFailure::Failed(format!("writing to stdout: {e}")),
    })
}

impl ControlClient {
    /// Connects, with an error that names the path.
    pub fn connect_named(path: &Path) -> Result<ControlClient, ClientFailure> {
        ControlClient::connect(path).map_err(|e| {
            ClientFailure::Unreachable(format!("cannot connect to {}: {e}", path.display()))
        })
    }

    /// Sends `command` without arguments and returns its result; an error reply, a broken
    /// connection or an empty reply is a failure naming the command.
    pub fn result(&mut self, command: &str) -> Result<Value, ClientFailure> {
        let reply = self
            .call(command, json!({}))
            .map_err(|e| ClientFailure::Failed(format!("{command}: {e}")))?;
        match (reply.get("result"), reply.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (_, Some(e)) => Err(ClientFailure::Failed(format!(
                "{command}: {}",
                e["message"].as_str().unwrap_or("error")
            ))),
            _ => Err(ClientFailure::Failed(format!("{command}: an empty reply"))),
        }
    }

    /// The exports (`list-exports`) and I/O threads (`list-iothreads`) of the daemon at
    /// `path`, for the advice commands.
    pub fn exports_and_threads(path: &Path) -> Result<(Value, Value), ClientFailure> {
        let mut client = ControlClient::connect_named(path)?;
        Ok((client.result("list-exports")?, client.result("list-iothreads")?))
    }

    pub fn connect(path: &Path) -> io::Result<ControlClient> {
        let stream = UnixStream::connect(path)?;
        let writer = stream.try_clone()?;
        Ok(ControlClient { reader: BufReader::new(stream), writer, next_id: 1 })
    }

    /// Sends one request and returns the whole reply object.
    pub fn call(&mut self, command: &str, args: Value) -> io::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = json!({"id": id, "command": command, "args": args}).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the control connection",
            ));
        }
        serde_json::from_str(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}
