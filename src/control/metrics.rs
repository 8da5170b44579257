//! `--metrics ADDR:PORT`: the figures of `query-stats` in the Prometheus text format at
//! `/metrics` (any query string ignored; gzip when the scraper accepts it), over a small
//! HTTP/1.0 server: one request per connection. A connection first only reads its request
//! head, within a short deadline, on one of [`MAX_READERS`] reading slots; only a whole head
//! then takes one of the [`MAX_SCRAPES`] rendering slots, so clients that connect and send
//! nothing cannot keep a scrape out. Every connection is bounded in the bytes it may send,
//! the time it may take to send them and the time it may take to read the answer.
//!
//! What a scrape says is the daemon setting `metrics-detail`: `export` (the default) sums
//! each export's queues into one set of series, with read, write and flush latency in
//! coarse buckets; `queue` adds the `queue` label, every bucket and the per-stage
//! histograms. It is daemon-wide rather than an export key because it is the monitoring
//! system's size that it guards, not a tenant's choice.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::daemon::{Daemon, ExportInfo, ExportStats};
use crate::listener::{ConnectionLimit, StoppableListener};
use crate::ratelimit::RateLimiter;
use crate::trace::{LatencyReport, QueueReport, BUCKET_BOUNDS_NS};
use crate::warn_limited;

/// Connections reading their request head at once; more get 503 at once.
pub const MAX_READERS: usize = 64;
/// Scrapes rendered at once (each holds a copy of every figure); more get 503 at once.
pub const MAX_SCRAPES: usize = 4;
/// The longest request head (request line and headers) read.
pub const MAX_REQUEST_BYTES: usize = 8 << 10;
/// Time a client has to send its whole request head: a scraper sends it at once.
pub const READ_DEADLINE: Duration = Duration::from_secs(1);
/// Time a client has to read the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The latency bucket bounds of the default (per export) series: a subset of
/// [`BUCKET_BOUNDS_NS`] coarse enough that read, write and flush latency fit the budget of
/// series per export, fine enough for `histogram_quantile` from a null backend to a stall.
pub const EXPORT_BUCKET_BOUNDS_NS: [u64; 10] = [
    2_500,
    10_000,
    25_000,
    100_000,
    250_000,
    1_000_000,
    2_500_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
];
/// The latency kinds a default scrape shows (the rare rest only with `queue` detail).
const EXPORT_LATENCY_KINDS: [&str; 3] = ["read", "write", "flush"];

/// `metrics-detail`: what a scrape shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// One set of series per export, queues summed.
    Export,
    /// Per queue, every bucket, and the per-stage histograms.
    Queue,
}

pub use crate::config_file::METRICS_DETAILS as DETAILS;

impl Detail {
    fn of(daemon: &Daemon) -> Detail {
        match daemon.settings().metrics_detail.as_deref() {
            Some("queue") => Detail::Queue,
            _ => Detail::Export,
        }
    }
}

/// Binds the metrics listener.
pub fn bind(addr: &str) -> Result<Arc<StoppableListener<TcpListener>>, String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    StoppableListener::new(listener).map(Arc::new).map_err(|e| format!("eventfd: {e}"))
}

/// Serves `/metrics` until the listener is stopped (the process ends, or a reload moves it).
pub fn run(listener: Arc<StoppableListener<TcpListener>>, daemon: Arc<Daemon>) {
    if let Ok(addr) = listener.local().local_addr() {
        info!(%addr, "metrics listening");
    }
    let readers = ConnectionLimit::new(MAX_READERS);
    let scrapes = Arc::new(ConnectionLimit::new(MAX_SCRAPES));
    let mut log = RateLimiter::default();
    while let Some(stream) = listener.accept() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn_limited!(log, "metrics accept: {e}");
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let Some(reading) = readers.try_take() else {
            let _ = respond(&stream, "503 Service Unavailable", "text/plain", b"busy\n", false);
            continue;
        };
        let (d, s) = (Arc::clone(&daemon), Arc::clone(&scrapes));
        let spawned = std::thread::Builder::new().name("blkplane-scrape".into()).spawn(move || {
            let _reading = reading;
            answer(stream, &d, &s)
        });
        if let Err(e) = spawned {
            warn_limited!(log, "metrics: cannot start a scrape thread: {e}");
        }
    }
}

/// Reads the request head: up to the blank line, at most [`MAX_REQUEST_BYTES`], within
/// [`READ_DEADLINE`]. `None` if the client did not manage that.
fn read_head(stream: &TcpStream) -> Option<Vec<u8>> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        stream.set_read_timeout(Some(left)).ok()?;
        let n = (&*stream).read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Some(head);
        }
        if head.len() > MAX_REQUEST_BYTES {
            return None;
        }
    }
}

fn respond(
    mut out: &TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    gzipped: bool,
) -> std::io::Result<()> {
    let encoding = if gzipped { "Content-Encoding: gzip\r\n" } else { "" };
    write!(
        out,
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n{encoding}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)
}

/// Whether the head has an `Accept-Encoding` header that names gzip.
fn accepts_gzip(head: &str) -> bool {
    head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept-encoding")
                && value.split(',').any(|c| c.trim().starts_with("gzip"))
        })
    })
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::fast(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

fn answer(stream: TcpStream, daemon: &Daemon, scrapes: &ConnectionLimit) {
    let Some(head) = read_head(&stream) else {
        let _ = respond(&stream, "400 Bad Request", "text/plain", b"bad or slow request\n", false);
        return;
    };
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    // A query string (`/metrics?x`) is ignored, as Prometheus' own exporters do.
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let _ = match (method, path) {
        ("GET", "/metrics") => {
            let Some(_scrape) = scrapes.try_take() else {
                let _ = respond(&stream, "503 Service Unavailable", "text/plain", b"busy\n", false);
                return;
            };
            let body = render(daemon);
            match accepts_gzip(&head).then(|| gzip(body.as_bytes())) {
                Some(Ok(zipped)) => respond(&stream, "200 OK", TEXT_FORMAT, &zipped, true),
                _ => respond(&stream, "200 OK", TEXT_FORMAT, body.as_bytes(), false),
            }
        }
        ("GET", _) => {
            respond(&stream, "404 Not Found", "text/plain", b"only /metrics is here\n", false)
        }
        _ => respond(&stream, "405 Method Not Allowed", "text/plain", b"GET only\n", false),
    };
}

const TEXT_FORMAT: &str = "text/plain; version=0.0.4";

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A Prometheus histogram's series (`_bucket` for each bound and `+Inf`, `_sum`, `_count`)
/// for one set of labels: every bound of [`BUCKET_BOUNDS_NS`], or with `coarse` those of
/// [`EXPORT_BUCKET_BOUNDS_NS`].
fn write_histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    latency: &LatencyReport,
    coarse: bool,
) {
    for (bound_ns, count) in BUCKET_BOUNDS_NS.iter().zip(&latency.buckets) {
        if coarse && !EXPORT_BUCKET_BOUNDS_NS.contains(bound_ns) {
            continue;
        }
        let le = *bound_ns as f64 / 1e9;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", latency.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", latency.sum_ns as f64 / 1e9);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", latency.count);
}

/// A family's HELP and TYPE lines; its samples follow.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The figures of the daemon's own process, from /proc/self.
#[derive(Default)]
struct ProcessFigures {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    open_fds: u64,
    max_fds: u64,
    start_time_seconds: f64,
}

fn process_figures() -> ProcessFigures {
    let mut p = ProcessFigures {
        open_fds: std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0),
        max_fds: crate::sys::fd_limit().unwrap_or(0),
        ..Default::default()
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let ticks = crate::sys::clock_ticks_per_second() as f64;
    p.cpu_seconds = crate::sys::process_cpu_seconds();
    p.threads = field(20);
    p.virtual_bytes = field(23);
    p.resident_bytes = field(24) * crate::sys::page_size();
    let boot_seconds = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    p.start_time_seconds = boot_seconds as f64 + field(22) as f64 / ticks;
    p
}

/// The exposition text for every export (or queue, with `metrics-detail = "queue"`), the
/// I/O threads and the process.
pub fn render(daemon: &Daemon) -> String {
    let detail = Detail::of(daemon);
    let stats = daemon.stats(None).unwrap_or_default();
    let mut out = String::new();
    write_process(&mut out);
    write_exports(&mut out, &stats, &daemon.list());
    let rows = rows(&stats, detail);
    write_counters(&mut out, &rows);
    write_scalars(&mut out, &rows);
    write_iothreads(&mut out, &daemon.list_iothreads());
    write_jobs(&mut out, &daemon.query_jobs());
    write_latency(&mut out, &rows, detail);
    if detail == Detail::Queue {
        write_stages(&mut out, &rows);
    }
    out
}

fn write_process(out: &mut String) {
    family(out, "blkplane_build_info", "gauge", "Always 1; the labels say which build runs.");
    let _ = writeln!(
        out,
        "blkplane_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        env!("BLKPLANE_COMMIT")
    );
    let process = process_figures();
    let per_process: [(&str, &str, &str, f64); 7] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of the daemon.",
            process.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory (mapped guest memory the daemon touched counts too).",
            process.resident_bytes as f64,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory, with every mapped guest memory region.",
            process.virtual_bytes as f64,
        ),
        ("process_threads", "gauge", "Threads of the daemon.", process.threads as f64),
        ("process_open_fds", "gauge", "Open file descriptors.", process.open_fds as f64),
        ("process_max_fds", "gauge", "The limit on open file descriptors.", process.max_fds as f64),
        (
            "process_start_time_seconds",
            "gauge",
            "When the daemon started, in seconds since the Unix epoch.",
            process.start_time_seconds,
        ),
    ];
    for (name, kind, help, value) in per_process {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
}

/// The export's limits as `key=value` pairs (its throttle group first), or `none`.
fn limits_text(e: &ExportStats) -> String {
    let group = e.throttle.group.iter().map(|g| format!("group={g}"));
    let limits = e.throttle.limits.iter().map(|(k, v)| match v {
        serde_json::Value::String(s) => format!("{k}={s}"),
        v => format!("{k}={v}"),
    });
    let all: Vec<String> = group.chain(limits).collect();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(",")
    }
}

/// The per-export series that have no queue: what it is (info), its size, its frontend.
fn write_exports(out: &mut String, stats: &[ExportStats], infos: &[ExportInfo]) {
    family(
        out,
        "blkplane_export_info",
        "gauge",
        "Always 1; the labels say what the export serves and how.",
    );
    for e in stats {
        let Some(i) = infos.iter().find(|i| i.id == e.id) else { continue };
        let aio = i.spec.get("aio").and_then(|v| v.as_str()).unwrap_or("");
        let _ = writeln!(
            out,
            "blkplane_export_info{{export=\"{}\",image=\"{}\",cache=\"{}\",aio=\"{}\",iothread=\"{}\",limits=\"{}\"}} 1",
            escape(&e.id),
            escape(&i.backend),
            escape(&i.cache),
            escape(aio),
            escape(&i.iothread),
            escape(&limits_text(e))
        );
    }
    family(out, "blkplane_capacity_bytes", "gauge", "Size of the export as the guest sees it.");
    for e in stats {
        let _ = writeln!(
            out,
            "blkplane_capacity_bytes{{export=\"{}\"}} {}",
            escape(&e.id),
            e.size_bytes
        );
    }
    family(
        out,
        "blkplane_client_connected",
        "gauge",
        "1 while a vhost-user frontend is connected.",
    );
    for e in stats {
        let connected = u8::from(e.client_connected);
        let _ =
            writeln!(out, "blkplane_client_connected{{export=\"{}\"}} {connected}", escape(&e.id));
    }
}

/// The figures of one export (its queues summed) or one queue, and the labels that say which.
struct Row {
    labels: String,
    q: QueueReport,
}

fn add_counts(
    into: &mut serde_json::Map<String, serde_json::Value>,
    from: &serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in from {
        let sum = into.get(k).and_then(|x| x.as_u64()).unwrap_or(0) + v.as_u64().unwrap_or(0);
        into.insert(k.clone(), sum.into());
    }
}

/// Adds `from`'s counts, sum and buckets to `into` (its mean and percentiles stay `into`'s:
/// the exposition has no use for them).
fn add_latency(into: &mut LatencyReport, from: &LatencyReport) {
    into.count += from.count;
    into.sum_ns = into.sum_ns.wrapping_add(from.sum_ns);
    for (a, b) in into.buckets.iter_mut().zip(&from.buckets) {
        *a += b;
    }
}

/// `into` plus `q`: counters and every-request latency; the stages are not summed.
fn add_queue(into: &mut QueueReport, q: &QueueReport) {
    for (a, b) in [
        (&mut into.requests, &q.requests),
        (&mut into.bytes, &q.bytes),
        (&mut into.errors_ioerr, &q.errors_ioerr),
        (&mut into.errors_unsupp, &q.errors_unsupp),
    ] {
        add_counts(a, b);
    }
    let scalars = [
        (&mut into.in_flight, q.in_flight),
        (&mut into.bounce_buffers, q.bounce_buffers),
        (&mut into.flush_errors, q.flush_errors),
        (&mut into.notifications_sent, q.notifications_sent),
        (&mut into.notifications_suppressed, q.notifications_suppressed),
        (&mut into.poll_ns, q.poll_ns),
        (&mut into.poll_hits, q.poll_hits),
        (&mut into.sleeps, q.sleeps),
        (&mut into.throttled_requests, q.throttled_requests),
        (&mut into.throttled_ns, q.throttled_ns),
        (&mut into.throttle_queued, q.throttle_queued),
    ];
    for (a, b) in scalars {
        *a += b;
    }
    add_latency(&mut into.latency, &q.latency);
    for (a, b) in into.latency_by_kind.iter_mut().zip(&q.latency_by_kind) {
        add_latency(&mut a.latency, &b.latency);
    }
}

fn rows(stats: &[ExportStats], detail: Detail) -> Vec<Row> {
    let mut rows = Vec::new();
    for e in stats {
        let export = escape(&e.id);
        match detail {
            Detail::Queue => rows.extend(e.queues.iter().map(|q| Row {
                labels: format!("export=\"{export}\",queue=\"{}\"", q.queue),
                q: q.clone(),
            })),
            Detail::Export => {
                let Some((first, others)) = e.queues.split_first() else { continue };
                let mut q = first.clone();
                others.iter().for_each(|o| add_queue(&mut q, o));
                rows.push(Row { labels: format!("export=\"{export}\""), q });
            }
        }
    }
    rows
}

fn write_counters(out: &mut String, rows: &[Row]) {
    type KindField = fn(&QueueReport) -> &serde_json::Map<String, serde_json::Value>;
    let per_kind: [(&str, &str, KindField); 2] = [
        ("blkplane_requests_total", "Requests answered, by kind, failed ones included.", |q| {
            &q.requests
        }),
        ("blkplane_bytes_total", "Bytes moved by successful requests, by kind.", |q| &q.bytes),
    ];
    for (name, help, field) in per_kind {
        family(out, name, "counter", help);
        for r in rows {
            for (kind, v) in field(&r.q) {
                let _ = writeln!(out, "{name}{{{},kind=\"{kind}\"}} {v}", r.labels);
            }
        }
    }
    family(
        out,
        "blkplane_errors_total",
        "counter",
        "Requests that failed, by kind and by the status the guest got (ioerr, unsupp).",
    );
    for r in rows {
        for (status, map) in [("ioerr", &r.q.errors_ioerr), ("unsupp", &r.q.errors_unsupp)] {
            for (kind, v) in map {
                let _ = writeln!(
                    out,
                    "blkplane_errors_total{{{},kind=\"{kind}\",status=\"{status}\"}} {v}",
                    r.labels
                );
            }
        }
    }
}

fn write_scalars(out: &mut String, rows: &[Row]) {
    type Field = fn(&QueueReport) -> f64;
    let scalars: [(&str, &str, &str, Field); 10] = [
        (
            "blkplane_flush_errors_total",
            "counter",
            "Flushes the host failed; later flushes fail until the export is reopened.",
            |q| q.flush_errors as f64,
        ),
        ("blkplane_requests_in_flight", "gauge", "Requests being served now.", |q| {
            q.in_flight as f64
        }),
        (
            "blkplane_bounce_buffers_total",
            "counter",
            "Requests that needed an aligned bounce buffer.",
            |q| q.bounce_buffers as f64,
        ),
        ("blkplane_notifications_sent_total", "counter", "Interrupts sent to the guest.", |q| {
            q.notifications_sent as f64
        }),
        (
            "blkplane_notifications_suppressed_total",
            "counter",
            "Completions published without an interrupt (the guest did not want one).",
            |q| q.notifications_suppressed as f64,
        ),
        (
            "blkplane_poll_seconds_total",
            "counter",
            "Time the queue's I/O thread polled before it found work of this queue.",
            |q| q.poll_ns as f64 / 1e9,
        ),
        (
            "blkplane_poll_hits_total",
            "counter",
            "Polling periods of the queue's I/O thread that found work of this queue.",
            |q| q.poll_hits as f64,
        ),
        (
            "blkplane_throttled_requests_total",
            "counter",
            "Requests that waited for the export's rate limits (or its throttle group's).",
            |q| q.throttled_requests as f64,
        ),
        (
            "blkplane_throttled_seconds_total",
            "counter",
            "Time requests of the queue waited for the rate limits (the queue took nothing meanwhile).",
            |q| q.throttled_ns as f64 / 1e9,
        ),
        (
            "blkplane_throttle_queued_requests",
            "gauge",
            "Requests waiting for the rate limits now: the one held and those behind it in the ring.",
            |q| q.throttle_queued as f64,
        ),
    ];
    for (name, kind, help, field) in scalars {
        family(out, name, kind, help);
        for r in rows {
            let _ = writeln!(out, "{name}{{{}}} {}", r.labels, field(&r.q));
        }
    }
}

fn write_iothreads(out: &mut String, threads: &[crate::iothread::registry::IoThreadInfo]) {
    type ThreadField = fn(&crate::iothread::registry::IoThreadInfo) -> f64;
    let per_thread: [(&str, &str, &str, ThreadField); 6] = [
        ("blkplane_iothread_queues", "gauge", "Queues the I/O thread serves now.", |t| {
            t.queues as f64
        }),
        (
            "blkplane_iothread_cpu_seconds_total",
            "counter",
            "CPU time the I/O thread used (the scheduler's statistics).",
            |t| t.cpu_ns as f64 / 1e9,
        ),
        (
            "blkplane_iothread_runqueue_wait_seconds_total",
            "counter",
            "Time the I/O thread was ready to run but waited for a CPU: the host is short of CPU for it.",
            |t| t.runqueue_wait_ns as f64 / 1e9,
        ),
        (
            "blkplane_iothread_poll_seconds_total",
            "counter",
            "Time the I/O thread spent polling instead of sleeping.",
            |t| t.poll_ns as f64 / 1e9,
        ),
        (
            "blkplane_iothread_poll_hits_total",
            "counter",
            "Polling periods of the I/O thread that found work.",
            |t| t.poll_hits as f64,
        ),
        ("blkplane_iothread_sleeps_total", "counter", "Times the I/O thread slept.", |t| {
            t.sleeps as f64
        }),
    ];
    for (name, kind, help, field) in per_thread {
        family(out, name, kind, help);
        for t in threads {
            let _ = writeln!(out, "{name}{{iothread=\"{}\"}} {}", escape(&t.id), field(t));
        }
    }
    let name = "blkplane_iothread_poll_choices_total";
    family(
        out,
        name,
        "counter",
        "Adaptive polling's decisions after its trials, by the way chosen: poll (for requests and completions), poll-requests (for the next request only) or sleep.",
    );
    for t in threads {
        let id = escape(&t.id);
        for (way, n) in &t.choices {
            let _ = writeln!(out, "{name}{{iothread=\"{id}\",way=\"{way}\"}} {n}");
        }
    }
}

/// The block jobs query-jobs lists (a job that ended stays until its export's next one):
/// bytes done and total, and the state as one series per state, 1 for the job's.
fn write_jobs(out: &mut String, jobs: &[crate::mirror::JobInfo]) {
    use crate::mirror::JobState;
    const STATES: [JobState; 5] = [
        JobState::Running,
        JobState::Ready,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
    ];
    let labels = |j: &crate::mirror::JobInfo| {
        format!("export=\"{}\",type=\"{}\",target=\"{}\"", escape(&j.id), j.kind, escape(&j.target))
    };
    type JobField = fn(&crate::mirror::JobInfo) -> u64;
    let per_job: [(&str, &str, JobField); 3] = [
        ("blkplane_job_done_bytes", "Bytes the job has copied for good.", |j| j.done_bytes),
        ("blkplane_job_total_bytes", "Bytes the job copies in all (the export's size).", |j| {
            j.total_bytes
        }),
        ("blkplane_job_recopied_bytes", "Bytes the job copied again for guest writes.", |j| {
            j.recopied_bytes
        }),
    ];
    for (name, help, field) in per_job {
        family(out, name, "gauge", help);
        for j in jobs {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(j), field(j));
        }
    }
    family(out, "blkplane_job_state", "gauge", "1 for the state the job is in, 0 for the others.");
    for j in jobs {
        for state in STATES {
            let on = u8::from(j.state == state.name());
            let _ = writeln!(
                out,
                "blkplane_job_state{{{},state=\"{}\"}} {on}",
                labels(j),
                state.name()
            );
        }
    }
}

/// Every request's latency by kind: read, write and flush in coarse buckets per export, or
/// every kind and bucket per queue.
fn write_latency(out: &mut String, rows: &[Row], detail: Detail) {
    let name = "blkplane_request_latency_seconds";
    family(
        out,
        name,
        "histogram",
        "Every request's time at the daemon, by kind: seen in the avail ring (the fetch round that took it) until the guest was notified.",
    );
    let coarse = detail == Detail::Export;
    for r in rows {
        for k in &r.q.latency_by_kind {
            if coarse && !EXPORT_LATENCY_KINDS.contains(&k.kind) {
                continue;
            }
            let labels = format!("{},kind=\"{}\"", r.labels, k.kind);
            write_histogram(out, name, &labels, &k.latency, coarse);
        }
    }
}

fn write_stages(out: &mut String, rows: &[Row]) {
    let name = "blkplane_stage_latency_seconds";
    family(
        out,
        name,
        "histogram",
        "Time of a sampled request (one in 64) in each layer of the request path (parse, submit, backend, publish, notify) and in all (total).",
    );
    for r in rows {
        for s in &r.q.stages {
            let labels = format!("{},stage=\"{}\"", r.labels, s.stage);
            write_histogram(out, name, &labels, &s.latency, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_coarse_bound_is_an_exported_bound() {
        // write_histogram picks the coarse buckets out of the fine ones by value.
        for b in EXPORT_BUCKET_BOUNDS_NS {
            assert!(BUCKET_BOUNDS_NS.contains(&b), "{b}");
        }
    }

    #[test]
    fn gzip_only_when_the_scraper_names_it() {
        let head = |h: &str| format!("GET /metrics HTTP/1.1\r\n{h}\r\n\r\n");
        assert!(accepts_gzip(&head("Accept-Encoding: gzip")));
        assert!(accepts_gzip(&head("accept-encoding: identity, gzip;q=0.5")));
        assert!(!accepts_gzip(&head("Accept-Encoding: identity")));
        assert!(!accepts_gzip(&head("X-Gzip: gzip")));
        assert!(!accepts_gzip("GET /gzip HTTP/1.1\r\n\r\n"));
    }
}
