//! The daemon's I/O threads by name: the shared pool it starts with, and the threads made
//! with `--iothread`, the config file's `[[iothread]]` tables or the control socket's
//! `add-iothread`. Exports name them in their placement; a named thread can be removed only
//! while nothing refers to it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::poll::{PollMode, PollPolicy, PollSettings, Way};
use super::{IoThread, Placement};
use crate::spec::{self, Key, Kind, Options, SpecError, Value, MAX_NAME_BYTES};

/// Submission entries of a shared thread's ring: room for several busy queues at once (more
/// wait in the ring buffer of the kernel, never lost).
const SHARED_RING_ENTRIES: u32 = 1024;
/// Largest shared pool (`--pool-threads`).
pub const MAX_POOL_THREADS: usize = 1024;
/// Named threads one daemon may have (each is an OS thread and a ring).
pub const MAX_NAMED_THREADS: usize = 256;

/// A named I/O thread as `--iothread id=NAME[,cpus=LIST][,poll=MODE][,poll-max-us=N]` gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoThreadConfig {
    pub id: String,
    /// CPUs the thread may run on (its affinity); empty: wherever the process may.
    pub cpus: Vec<usize>,
    pub poll: PollPolicy,
}

/// `cpus=`: a CPU list of CPUs this process may run on (its affinity mask, which a cpuset
/// narrows), not merely CPUs that exist.
pub fn cpu_list(value: &Value) -> Result<Vec<usize>, SpecError> {
    let text = value.text("cpus")?;
    let bad = |e: SpecError| SpecError(format!("cpus={text}: {e}"));
    let cpus = spec::parse_cpu_list(&text).map_err(bad)?;
    let allowed = crate::sys::allowed_cpus();
    if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
        return Err(bad(SpecError(format!(
            "CPU {c} is not one this process may use (allowed: {})",
            spec::format_cpu_list(&allowed)
        ))));
    }
    Ok(cpus)
}

fn cpus_value(cpus: &[usize]) -> Option<Value> {
    (!cpus.is_empty()).then(|| Value::Str(spec::format_cpu_list(cpus)))
}

const CPUS_HELP: &str = "pin the threads: queue i on the i-th CPU of LIST (e.g. 1 or 2-3).";

impl Options for IoThreadConfig {
    const KEYS: &'static [Key<IoThreadConfig>] = &[
        Key {
            name: "id",
            aliases: &[],
            kind: Kind::Text,
            usage: "id=NAME",
            help: "the thread's name, for iothread=NAME.",
            set: |t, v| {
                let id = v.text("id")?;
                check_name(&id).map_err(SpecError)?;
                t.id = id;
                Ok(())
            },
            get: |t| Some(Value::Str(t.id.clone())),
        },
        Key {
            name: "cpus",
            aliases: &[],
            kind: Kind::Text,
            usage: "cpus=LIST",
            help: "the thread's affinity (`,,` between CPUs: cpus=0,,2).",
            set: |t, v| {
                t.cpus = cpu_list(v)?;
                Ok(())
            },
            get: |t| cpus_value(&t.cpus),
        },
        PollPolicy::KEYS[0].lifted(
            |t: &mut IoThreadConfig, v| t.poll.set_mode(v),
            |t| (PollPolicy::KEYS[0].get)(&t.poll),
        ),
        PollPolicy::KEYS[1].lifted(
            |t: &mut IoThreadConfig, v| t.poll.set_max_us(v),
            |t| (PollPolicy::KEYS[1].get)(&t.poll),
        ),
    ];
}

/// Whether `name` can name an I/O thread (or an export's list of them): letters, digits,
/// `-`, `_` and `.`, and not the words the `iothread=` key gives a meaning.
pub fn check_name(name: &str) -> Result<(), String> {
    if !spec::is_name(name) {
        return Err(format!(
            "'{name}' is not an I/O thread name (1 to {MAX_NAME_BYTES} letters, digits, '-', '_', '.')"
        ));
    }
    if name == "dedicated" || name == "pool" || name.starts_with("pool.") {
        return Err(format!("'{name}' is reserved (dedicated, pool, pool.N)"));
    }
    Ok(())
}

impl IoThreadConfig {
    /// Parses `id=NAME[,cpus=LIST][,poll=MODE][,poll-max-us=N]` (`,,` for a comma inside a
    /// value, as in `cpus=0,,2`).
    pub fn parse(spec: &str) -> Result<IoThreadConfig, SpecError> {
        Self::from_pairs(&spec::split_pairs(spec, &Self::key_list())?)
    }

    fn key_list() -> String {
        Self::infos().map(|k| k.name).collect::<Vec<_>>().join(", ")
    }

    /// From key/value pairs (a parsed spec, a config-file table, a control request).
    pub fn from_pairs(pairs: &[(String, Value)]) -> Result<IoThreadConfig, SpecError> {
        let mut config = IoThreadConfig::default();
        let mut seen = Vec::new();
        for (key, value) in pairs {
            match config.set_key(key, value) {
                Some((name, _)) if seen.contains(&name) => {
                    return spec::err(format!("key '{name}' given twice"))
                }
                Some((name, result)) => {
                    result?;
                    seen.push(name);
                }
                None => {
                    return spec::err(format!("unknown key '{key}' (keys: {})", Self::key_list()))
                }
            }
        }
        if !seen.contains(&"id") {
            return spec::err("an I/O thread needs id=NAME");
        }
        Ok(config)
    }
}

/// Which threads serve an export's queues, and the polling and pinning of threads of its
/// own: the export keys `iothread`, `poll`, `poll-max-us` and `cpus`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadOptions {
    pub iothread: ThreadChoice,
    /// Polling of the export's dedicated threads.
    pub poll: PollPolicy,
    /// CPUs the dedicated threads are pinned to, queue i on cpus[i % len]; empty: not pinned.
    pub cpus: Vec<usize>,
    /// While the keys are read: `iothread=` as given, and the first key that describes
    /// threads of the export's own (which implies them). Both `None` once checked.
    given: Option<ThreadChoice>,
    own_thread_key: Option<&'static str>,
}

impl ThreadOptions {
    fn own(&mut self, key: &'static str) {
        self.own_thread_key.get_or_insert(key);
    }

    /// poll, poll-max-us and cpus describe threads of the export's own: they ask for them
    /// when no iothread= is given, and make no sense on threads shared with others (those
    /// have their own settings, on --iothread).
    pub fn check(&mut self) -> Result<(), SpecError> {
        self.iothread = match (self.given.take(), self.own_thread_key.take()) {
            (None, Some(_)) | (Some(ThreadChoice::Dedicated), _) => ThreadChoice::Dedicated,
            (choice, None) => choice.unwrap_or_default(),
            (Some(shared), Some(key)) => {
                return spec::err(format!(
                    "{key}= is a setting of the export's own I/O threads (iothread=dedicated); \
                     iothread={shared} shares threads, whose polling and CPUs are set on --iothread"
                ))
            }
        };
        Ok(())
    }

    fn dedicated(&self) -> bool {
        self.iothread == ThreadChoice::Dedicated
    }
}

impl Options for ThreadOptions {
    const KEYS: &'static [Key<ThreadOptions>] = &[
        Key {
            name: "iothread",
            aliases: &[],
            kind: Kind::Text,
            usage: "iothread=WHERE",
            help: "which I/O threads serve the queues. Default: the shared pool (each queue\n\
                   on its least busy thread). NAME or NAME:NAME...: threads made with\n\
                   --iothread, queue i on the i-th name, round-robin. dedicated: a thread of\n\
                   the export's own per queue, with the polling and pinning keys below.",
            set: |t, v| {
                t.given = Some(ThreadChoice::parse(&v.text("iothread")?).map_err(SpecError)?);
                Ok(())
            },
            get: |t| Some(Value::Str(t.iothread.to_string())),
        },
        PollPolicy::KEYS[0]
            .lifted(
                |t: &mut ThreadOptions, v| {
                    t.own("poll");
                    t.poll.set_mode(v)
                },
                |t| t.dedicated().then(|| Value::Str(t.poll.mode.to_string())),
            )
            .with_help(
                "(dedicated threads; giving it implies iothread=dedicated)\n\
                 adaptive (default): after work, poll the rings for a self-tuning window\n\
                 (up to poll-max-us) before sleeping, for requests and completions or for\n\
                 requests only, where short trials show polling buys twice the time it\n\
                 costs CPU; an idle export costs no CPU.\n\
                 always: never sleep (for dedicated cores). never: sleep at once.",
            ),
        PollPolicy::KEYS[1].lifted(
            |t: &mut ThreadOptions, v| {
                t.own("poll-max-us");
                t.poll.set_max_us(v)
            },
            |t| t.dedicated().then(|| Value::Int(t.poll.max_us.into())),
        ),
        Key {
            name: "cpus",
            aliases: &[],
            kind: Kind::Text,
            usage: "cpus=LIST",
            help: CPUS_HELP,
            set: |t, v| {
                t.own("cpus");
                t.cpus = cpu_list(v)?;
                Ok(())
            },
            get: |t| if t.dedicated() { cpus_value(&t.cpus) } else { None },
        },
    ];
}

/// One I/O thread as `list-iothreads` shows it.
#[derive(Serialize, Debug, Clone)]
pub struct IoThreadInfo {
    pub id: String,
    /// "pool", "named", or "dedicated": a thread of export EXPORT's queue N alone
    /// (`iothread=dedicated`), listed as `EXPORT/qN` while the queue runs.
    pub kind: &'static str,
    pub cpus: String,
    pub poll: String,
    pub poll_max_us: u32,
    pub queues: usize,
    pub poll_ns: u64,
    pub poll_hits: u64,
    pub sleeps: u64,
    /// The kernel's id of the thread.
    pub tid: u32,
    /// CPU time the thread has used, and time it waited on a run queue for a CPU (the
    /// congestion figure), from the scheduler's statistics.
    pub cpu_ns: u64,
    pub runqueue_wait_ns: u64,
    /// Adaptive polling's choice at its last trials: `poll`, `poll-requests`, `sleep`, or
    /// null (no decision yet, or not adaptive); how often it chose each way; and per way, per
    /// request in µs, the wall time and CPU of its trials (null: its last trial saw no work).
    pub chosen: Option<&'static str>,
    pub choices: BTreeMap<&'static str, u64>,
    pub trials_us: BTreeMap<&'static str, Option<WallAndCpu>>,
}

/// Per request: wall time and the thread's CPU, in µs.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct WallAndCpu {
    pub wall: f64,
    pub cpu: f64,
}

impl WallAndCpu {
    fn from_ns((wall, cpu): (u64, u64)) -> WallAndCpu {
        WallAndCpu { wall: wall as f64 / 1e3, cpu: cpu as f64 / 1e3 }
    }
}

/// What `list-iothreads` says of the thread of export `export`'s queue alone.
pub fn dedicated_info(export: &str, thread: &IoThread) -> IoThreadInfo {
    IoThreadInfo { id: format!("{export}/{}", thread.id), ..info_of(thread, "dedicated") }
}

fn info_of(thread: &IoThread, kind: &'static str) -> IoThreadInfo {
    let policy = thread.poll.get();
    let (cpu_ns, runqueue_wait_ns) = crate::sys::thread_schedstat(thread.tid).unwrap_or_default();
    let s = &thread.stats;
    let choice = s.choice.snapshot();
    let adaptive = policy.mode == PollMode::Adaptive;
    IoThreadInfo {
        id: thread.id.clone(),
        kind,
        cpus: spec::format_cpu_list(&thread.cpus),
        poll: policy.mode.to_string(),
        poll_max_us: policy.max_us,
        queues: s.queues.load(Ordering::Relaxed),
        poll_ns: s.poll_ns.load(Ordering::Relaxed),
        poll_hits: s.poll_hits.load(Ordering::Relaxed),
        sleeps: s.sleeps.load(Ordering::Relaxed),
        tid: thread.tid,
        cpu_ns,
        runqueue_wait_ns,
        chosen: choice.way.filter(|_| adaptive).map(Way::name),
        choices: Way::ALL.iter().map(|w| w.name()).zip(choice.chosen).collect(),
        trials_us: Way::ALL
            .iter()
            .map(|w| w.name())
            .zip(choice.figures_ns.map(|f| f.map(WallAndCpu::from_ns)))
            .collect(),
    }
}

/// What an export asks for in its `iothread=` key.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ThreadChoice {
    /// The shared pool (no `iothread=` key).
    #[default]
    Pool,
    /// `iothread=dedicated`, or polling/pinning keys on the export itself.
    Dedicated,
    /// `iothread=NAME[:NAME...]`: queue i on the i-th name, round-robin.
    Named(Vec<String>),
}

impl ThreadChoice {
    /// Parses the value of `iothread=`: `dedicated`, `pool`, or names separated by `:`.
    pub fn parse(value: &str) -> Result<ThreadChoice, String> {
        match value {
            "dedicated" => return Ok(ThreadChoice::Dedicated),
            "pool" => return Ok(ThreadChoice::Pool),
            _ => {}
        }
        let names: Vec<String> = value.split(':').map(str::to_string).collect();
        for n in &names {
            check_name(n).map_err(|e| format!("iothread={value}: {e}"))?;
        }
        Ok(ThreadChoice::Named(names))
    }
}

impl std::fmt::Display for ThreadChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThreadChoice::Pool => f.write_str("pool"),
            ThreadChoice::Dedicated => f.write_str("dedicated"),
            ThreadChoice::Named(names) => f.write_str(&names.join(":")),
        }
    }
}

/// The daemon's I/O threads.
pub struct IoThreads {
    pool: Arc<[Arc<IoThread>]>,
    named: Mutex<BTreeMap<String, Arc<IoThread>>>,
}

impl IoThreads {
    /// Starts a shared pool of `pool_size` threads, polling adaptively by default. The pool's
    /// threads are not pinned: the scheduler places them, and the loop gives its CPU up to
    /// another I/O thread with work there (see worker.rs).
    pub fn start(pool_size: usize) -> std::io::Result<IoThreads> {
        let pool = (0..pool_size.max(1))
            .map(|i| {
                let poll = Arc::new(PollSettings::new(PollPolicy::default()));
                IoThread::spawn(&format!("pool.{i}"), Vec::new(), poll, SHARED_RING_ENTRIES)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(IoThreads { pool: pool.into(), named: Mutex::new(BTreeMap::new()) })
    }

    /// The pool's size when none is given: one thread per CPU the process may use.
    pub fn default_pool_size() -> usize {
        crate::sys::allowed_cpus().len().max(1)
    }

    fn named(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<IoThread>>> {
        self.named.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a named thread. Errors: `exists`, `limit`, or the thread could not start.
    pub fn add(&self, config: &IoThreadConfig) -> Result<IoThreadInfo, (&'static str, String)> {
        let mut named = self.named();
        if named.contains_key(&config.id) {
            return Err(("exists", format!("I/O thread '{}' exists", config.id)));
        }
        if named.len() >= MAX_NAMED_THREADS {
            return Err(("limit", format!("at most {MAX_NAMED_THREADS} named I/O threads")));
        }
        let poll = Arc::new(PollSettings::new(config.poll));
        let thread = IoThread::spawn(&config.id, config.cpus.clone(), poll, SHARED_RING_ENTRIES)
            .map_err(|e| ("start-failed", format!("I/O thread '{}': {e}", config.id)))?;
        let info = info_of(&thread, "named");
        named.insert(config.id.clone(), thread);
        Ok(info)
    }

    /// Ends a named thread no export refers to. Errors: `not-found`, `busy`.
    pub fn remove(&self, id: &str) -> Result<(), (&'static str, String)> {
        let mut named = self.named();
        let Some(thread) = named.get(id) else {
            return Err(("not-found", format!("no I/O thread '{id}'")));
        };
        // The table holds one reference; each export placed on it (and each queue it runs)
        // holds another.
        if Arc::strong_count(thread) > 1 {
            return Err(("busy", format!("I/O thread '{id}' is used by an export")));
        }
        if let Some(thread) = named.remove(id) {
            thread.shut_down();
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<IoThreadInfo> {
        let mut all: Vec<_> = self.pool.iter().map(|t| info_of(t, "pool")).collect();
        all.extend(self.named().values().map(|t| info_of(t, "named")));
        all
    }

    /// The named threads as `--iothread` would make them now (settings changed at run time
    /// included): for `dump-config`.
    pub fn named_configs(&self) -> Vec<IoThreadConfig> {
        let named = self.named();
        named
            .values()
            .map(|t| IoThreadConfig { id: t.id.clone(), cpus: t.cpus.clone(), poll: t.poll.get() })
            .collect()
    }

    /// Where an export's queues run: on the threads `options` name, or (dedicated) on
    /// threads of their own, polling and pinned as `options` say.
    pub fn placement(&self, options: &ThreadOptions) -> Result<Placement, String> {
        match &options.iothread {
            ThreadChoice::Pool => Ok(Placement::Pool(Arc::clone(&self.pool))),
            ThreadChoice::Dedicated => Ok(Placement::Dedicated {
                poll: Arc::new(PollSettings::new(options.poll)),
                cpus: options.cpus.clone(),
                started: Arc::default(),
            }),
            ThreadChoice::Named(names) => {
                let named = self.named();
                let threads = names
                    .iter()
                    .map(|n| named.get(n).cloned().ok_or_else(|| format!("no I/O thread '{n}'")))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Placement::Threads(threads))
            }
        }
    }

    /// Changes the polling of one thread (by id, pool threads included) or of all.
    pub fn set_polling(
        &self,
        id: Option<&str>,
        mode: Option<PollMode>,
        max_us: Option<u32>,
    ) -> Result<Vec<IoThreadInfo>, (&'static str, String)> {
        let named = self.named();
        let all = self.pool.iter().map(|t| (t, "pool")).chain(named.values().map(|t| (t, "named")));
        let chosen: Vec<_> = all.filter(|(t, _)| id.is_none_or(|id| t.id == id)).collect();
        if chosen.is_empty() {
            return Err(("not-found", format!("no I/O thread '{}'", id.unwrap_or_default())));
        }
        Ok(chosen
            .into_iter()
            .map(|(t, kind)| {
                let mut policy = t.poll.get();
                if let Some(m) = mode {
                    policy.mode = m;
                }
                if let Some(us) = max_us {
                    policy.max_us = us;
                }
                t.poll.set(policy);
                info_of(t, kind)
            })
            .collect())
    }

    /// Ends every thread (their queues were stopped with their exports).
    pub fn shut_down(&self) {
        for t in self.pool.iter() {
            t.shut_down();
        }
        for t in self.named().values() {
            t.shut_down();
        }
    }
}
