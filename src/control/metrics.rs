//! `--metrics ADDR:PORT`: the figures of `query-stats` in the Prometheus text format at
//! `/metrics`, over a small HTTP/1.0 server: one request per connection, a few scrapes served
//! at once (one thread each), and every connection bounded in the bytes it may send, the time
//! it may take to send them and the time it may take to read the answer.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::daemon::Daemon;
use crate::listener::{ConnectionLimit, StoppableListener};
use crate::ratelimit::RateLimiter;
use crate::trace::{LatencyReport, QueueReport, BUCKET_BOUNDS_NS};
use crate::warn_limited;

/// Scrapes served at once; more get 503 at once.
pub const MAX_SCRAPES: usize = 4;
/// The longest request head (request line and headers) read.
pub const MAX_REQUEST_BYTES: usize = 8 << 10;
/// Time a client has to send its whole request head.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// Time a client has to read the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
    let scrapes = ConnectionLimit::new(MAX_SCRAPES);
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
        let Some(permit) = scrapes.try_take() else {
            let _ = respond(&stream, "503 Service Unavailable", "text/plain", "busy\n");
            continue;
        };
        let d = Arc::clone(&daemon);
        let spawned = std::thread::Builder::new().name("blkplane-scrape".into()).spawn(move || {
            let _permit = permit;
            answer(stream, &d)
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
    body: &str,
) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn answer(stream: TcpStream, daemon: &Daemon) {
    let Some(head) = read_head(&stream) else {
        let _ = respond(&stream, "400 Bad Request", "text/plain", "bad or slow request\n");
        return;
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let _ = match (method, path) {
        ("GET", "/metrics") => {
            respond(&stream, "200 OK", "text/plain; version=0.0.4", &render(daemon))
        }
        ("GET", _) => respond(&stream, "404 Not Found", "text/plain", "only /metrics is here\n"),
        _ => respond(&stream, "405 Method Not Allowed", "text/plain", "GET only\n"),
    };
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A Prometheus histogram's series (`_bucket` for each bound and `+Inf`, `_sum`, `_count`)
/// for one set of labels.
fn write_histogram(out: &mut String, name: &str, labels: &str, latency: &LatencyReport) {
    for (bound_ns, count) in BUCKET_BOUNDS_NS.iter().zip(&latency.buckets) {
        let le = *bound_ns as f64 / 1e9;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", latency.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", latency.sum_ns as f64 / 1e9);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", latency.count);
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

/// The exposition text for every export and queue, the I/O threads and the process.
pub fn render(daemon: &Daemon) -> String {
    let stats = daemon.stats(None).unwrap_or_default();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &mut dyn FnMut(&mut String)| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        samples(&mut out);
    };
    family(
        "blkplane_build_info",
        "gauge",
        "Always 1; the labels say which build runs.",
        &mut |o| {
            let _ = writeln!(
                o,
                "blkplane_build_info{{version=\"{}\",commit=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION"),
                env!("BLKPLANE_COMMIT")
            );
        },
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
        family(name, kind, help, &mut |o| {
            let _ = writeln!(o, "{name} {value}");
        });
    }
    family(
        "blkplane_capacity_bytes",
        "gauge",
        "Size of the export as the guest sees it.",
        &mut |o| {
            for e in &stats {
                let _ = writeln!(
                    o,
                    "blkplane_capacity_bytes{{export=\"{}\"}} {}",
                    escape(&e.id),
                    e.size_bytes
                );
            }
        },
    );
    family(
        "blkplane_client_connected",
        "gauge",
        "1 while a vhost-user frontend is connected.",
        &mut |o| {
            for e in &stats {
                let _ = writeln!(
                    o,
                    "blkplane_client_connected{{export=\"{}\"}} {}",
                    escape(&e.id),
                    u8::from(e.client_connected)
                );
            }
        },
    );
    type KindField = fn(&QueueReport) -> &serde_json::Map<String, serde_json::Value>;
    let per_kind: [(&str, &str, KindField); 2] = [
        ("blkplane_requests_total", "Requests answered, by kind, failed ones included.", |q| {
            &q.requests
        }),
        ("blkplane_bytes_total", "Bytes moved by successful requests, by kind.", |q| &q.bytes),
    ];
    for (name, help, field) in per_kind {
        family(name, "counter", help, &mut |o| {
            for e in &stats {
                for q in &e.queues {
                    for (kind, v) in field(q) {
                        let _ = writeln!(
                            o,
                            "{name}{{export=\"{}\",queue=\"{}\",kind=\"{kind}\"}} {v}",
                            escape(&e.id),
                            q.queue
                        );
                    }
                }
            }
        });
    }
    family(
        "blkplane_errors_total",
        "counter",
        "Requests that failed, by kind and by the status the guest got (ioerr, unsupp).",
        &mut |o| {
            for e in &stats {
                for q in &e.queues {
                    for (status, map) in [("ioerr", &q.errors_ioerr), ("unsupp", &q.errors_unsupp)]
                    {
                        for (kind, v) in map {
                            let _ = writeln!(
                                o,
                                "blkplane_errors_total{{export=\"{}\",queue=\"{}\",kind=\"{kind}\",status=\"{status}\"}} {v}",
                                escape(&e.id),
                                q.queue
                            );
                        }
                    }
                }
            }
        },
    );
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
        family(name, kind, help, &mut |o| {
            for e in &stats {
                for q in &e.queues {
                    let _ = writeln!(
                        o,
                        "{name}{{export=\"{}\",queue=\"{}\"}} {}",
                        escape(&e.id),
                        q.queue,
                        field(q)
                    );
                }
            }
        });
    }
    let threads = daemon.list_iothreads();
    type ThreadField = fn(&crate::iothread::registry::IoThreadInfo) -> f64;
    let per_thread: [(&str, &str, &str, ThreadField); 4] = [
        ("blkplane_iothread_queues", "gauge", "Queues the I/O thread serves now.", |t| {
            t.queues as f64
        }),
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
        family(name, kind, help, &mut |o| {
            for t in &threads {
                let _ = writeln!(o, "{name}{{iothread=\"{}\"}} {}", escape(&t.id), field(t));
            }
        });
    }
    family(
        "blkplane_request_latency_seconds",
        "histogram",
        "Every request's time at the daemon: seen in the avail ring (the fetch round that took it) until the guest was notified.",
        &mut |o| {
            for e in &stats {
                for q in &e.queues {
                    let labels = format!("export=\"{}\",queue=\"{}\"", escape(&e.id), q.queue);
                    write_histogram(o, "blkplane_request_latency_seconds", &labels, &q.latency);
                }
            }
        },
    );
    family(
        "blkplane_stage_latency_seconds",
        "histogram",
        "Time of a sampled request (one in 64) in each layer of the request path (parse, submit, backend, publish, notify) and in all (total).",
        &mut |o| {
            for e in &stats {
                for q in &e.queues {
                    for s in &q.stages {
                        let labels = format!(
                            "export=\"{}\",queue=\"{}\",stage=\"{}\"",
                            escape(&e.id),
                            q.queue,
                            s.stage
                        );
                        write_histogram(o, "blkplane_stage_latency_seconds", &labels, &s.latency);
                    }
                }
            }
        },
    );
    out
}
