//! The control socket: JSON, one request and one reply per line, over a Unix socket that only
//! the daemon's user may open (mode 0600).
//!
//! ```text
//! {"id": 1, "command": "list-exports", "args": {}}
//! {"id": 1, "result": [...]}            or   {"id": 1, "error": {"code": "...", "message": "..."}}
//! ```
//!
//! Commands: list-exports, add-export (the keys of --export), remove-export (id, force),
//! resize (id, size), query-stats (id), set-polling (id or iothread, mode, max-us),
//! set-throttle (id or group, and the limit keys of --export: those not given are lifted),
//! list-iothreads, add-iothread (the keys of --iothread), remove-iothread (id), dump-config
//! (the running configuration as a TOML config file, in a string). A bad request gets an
//! error reply naming the problem; the connection stays open and nothing changes.

pub mod metrics;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tracing::info;

use crate::daemon::{ControlError, Daemon};
use crate::export::{parse_size, spec_from_pairs, ExportConfig};
use crate::iothread::registry::IoThreadConfig;
use crate::listener::{ConnectionLimit, StoppableListener};
use crate::qos::ThrottleConfig;
use crate::ratelimit::RateLimiter;
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

pub const COMMANDS: &str = "list-exports, add-export, remove-export, resize, query-stats, \
set-polling, set-throttle, list-iothreads, add-iothread, remove-iothread, dump-config";

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

fn opt_str<'a>(args: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ControlError> {
    match args.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(bad_arg(format!("'{key}' must be a string, not {v}"))),
    }
}

fn req_str<'a>(args: &'a Map<String, Value>, key: &str) -> Result<&'a str, ControlError> {
    opt_str(args, key)?.ok_or_else(|| bad_arg(format!("missing '{key}'")))
}

fn opt_bool(args: &Map<String, Value>, key: &str) -> Result<Option<bool>, ControlError> {
    match args.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(bad_arg(format!("'{key}' must be true or false, not {v}"))),
    }
}

/// A size as a number of bytes, or a string with a suffix ("10G").
fn req_size(args: &Map<String, Value>, key: &str) -> Result<u64, ControlError> {
    match args.get(key) {
        None => Err(bad_arg(format!("missing '{key}'"))),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad_arg(format!("'{key}' must be a whole number of bytes, not {n}"))),
        Some(Value::String(s)) => parse_size(s).map_err(|e| bad_arg(format!("'{key}': {e}"))),
        Some(v) => Err(bad_arg(format!("'{key}' must be a number of bytes, not {v}"))),
    }
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
            let spec = spec_from_args(args)?;
            let config = ExportConfig::parse(&spec).map_err(|e| bad_arg(e.0))?;
            let mut infos = daemon.add_exports(vec![config])?;
            to_json(infos.pop())
        }
        "remove-export" => {
            only_keys(command, args, &["id", "force"])?;
            let id = req_str(args, "id")?;
            daemon.remove(id, opt_bool(args, "force")?.unwrap_or(false))?;
            Ok(json!({"removed": id}))
        }
        "resize" => {
            only_keys(command, args, &["id", "size"])?;
            let id = req_str(args, "id")?;
            let size = req_size(args, "size")?;
            to_json(daemon.resize(id, size)?)
        }
        "query-stats" => {
            only_keys(command, args, &["id"])?;
            to_json(daemon.stats(opt_str(args, "id")?)?)
        }
        "set-polling" => {
            only_keys(command, args, &["id", "iothread", "mode", "max-us"])?;
            let mode = match opt_str(args, "mode")? {
                Some(m) => Some(m.parse().map_err(bad_arg)?),
                None => None,
            };
            let max_us = match args.get("max-us") {
                None => None,
                Some(v) => {
                    Some(v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                        bad_arg(format!("'max-us' must be a number of microseconds, not {v}"))
                    })?)
                }
            };
            if mode.is_none() && max_us.is_none() {
                return Err(bad_arg("set-polling needs 'mode' or 'max-us'".into()));
            }
            let (id, iothread) = (opt_str(args, "id")?, opt_str(args, "iothread")?);
            if id.is_some() && iothread.is_some() {
                return Err(bad_arg(
                    "set-polling takes 'id' (an export) or 'iothread', not both".into(),
                ));
            }
            daemon.set_polling(id, iothread, mode, max_us)
        }
        "set-throttle" => {
            let (mut id, mut group) = (None, None);
            let mut limits = Vec::new();
            for (k, v) in pairs_from_args(args)? {
                match k.as_str() {
                    "id" => id = Some(v),
                    "group" => group = Some(v),
                    _ => limits.push((k, v)),
                }
            }
            let config =
                ThrottleConfig::from_pairs(limits.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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
            let config = IoThreadConfig::from_pairs(&pairs).map_err(bad_arg)?;
            to_json(daemon.add_iothread(&config)?)
        }
        "remove-iothread" => {
            only_keys(command, args, &["id"])?;
            let id = req_str(args, "id")?;
            daemon.remove_iothread(id)?;
            Ok(json!({"removed": id}))
        }
        other => Err(ControlError::new(
            "unknown-command",
            format!("unknown command '{other}' (commands: {COMMANDS})"),
        )),
    }
}

/// Turns add-export's arguments into an --export spec, so both are parsed by the same code.
fn spec_from_args(args: &Map<String, Value>) -> Result<String, ControlError> {
    let pairs = pairs_from_args(args)?;
    spec_from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.clone()))).map_err(|e| bad_arg(e.0))
}

/// A command's arguments as the key/value pairs of a command-line spec. Values may be
/// strings, numbers or booleans (true/false become on/off).
fn pairs_from_args(args: &Map<String, Value>) -> Result<Vec<(String, String)>, ControlError> {
    let mut pairs = Vec::with_capacity(args.len());
    for (k, v) in args {
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            other => {
                return Err(bad_arg(format!(
                    "'{k}' must be a string, number or boolean, not {other}"
                )))
            }
        };
        pairs.push((k.clone(), value));
    }
    Ok(pairs)
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
