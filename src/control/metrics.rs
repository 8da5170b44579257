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
use crate::listener::ConnectionLimit;
use crate::ratelimit::RateLimiter;
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
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))
}

/// Serves `/metrics` until the process ends.
pub fn run(listener: TcpListener, daemon: Arc<Daemon>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics listening");
    }
    let scrapes = ConnectionLimit::new(MAX_SCRAPES);
    let mut log = RateLimiter::default();
    for stream in listener.incoming() {
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

/// The exposition text for every export and queue.
pub fn render(daemon: &Daemon) -> String {
    let stats = daemon.stats(None).unwrap_or_default();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &mut dyn FnMut(&mut String)| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        samples(&mut out);
    };
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
    let per_kind: [(&str, &str, bool); 2] = [
        (
            "blkplane_requests_total",
            "Requests completed, by kind (failed ones count as other).",
            false,
        ),
        ("blkplane_bytes_total", "Bytes moved by successful requests, by kind.", true),
    ];
    for (name, help, bytes) in per_kind {
        family(name, "counter", help, &mut |o| {
            for e in &stats {
                for q in &e.queues {
                    let map = if bytes { &q.bytes } else { &q.requests };
                    for (kind, v) in map {
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
        "Requests that failed, by the status the guest got.",
        &mut |o| {
            for e in &stats {
                for q in &e.queues {
                    for (status, v) in [("ioerr", q.errors_ioerr), ("unsupp", q.errors_unsupp)] {
                        let _ = writeln!(o, "blkplane_errors_total{{export=\"{}\",queue=\"{}\",status=\"{status}\"}} {v}", escape(&e.id), q.queue);
                    }
                }
            }
        },
    );
    type Field = fn(&crate::trace::QueueReport) -> f64;
    let scalars: [(&str, &str, &str, Field); 7] = [
        (
            "blkplane_flush_errors_total",
            "counter",
            "Flushes the host failed; later flushes fail until the export is reopened.",
            |q| q.flush_errors as f64,
        ),
        ("blkplane_in_flight", "gauge", "Requests being served now.", |q| q.in_flight as f64),
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
        "blkplane_stage_latency_seconds",
        "summary",
        "Time of a sampled request in each layer of the request path (parse, submit, backend, publish, notify) and in all (total).",
        &mut |o| {
            for e in &stats {
                for q in &e.queues {
                    for s in &q.stages {
                        let labels = format!("export=\"{}\",queue=\"{}\",stage=\"{}\"", escape(&e.id), q.queue, s.stage);
                        let _ = writeln!(o, "blkplane_stage_latency_seconds{{{labels},quantile=\"0.5\"}} {}", s.p50_us / 1e6);
                        let _ = writeln!(o, "blkplane_stage_latency_seconds{{{labels},quantile=\"0.99\"}} {}", s.p99_us / 1e6);
                        let _ = writeln!(o, "blkplane_stage_latency_seconds_sum{{{labels}}} {}", s.mean_us * s.samples as f64 / 1e6);
                        let _ = writeln!(o, "blkplane_stage_latency_seconds_count{{{labels}}} {}", s.samples);
                    }
                }
            }
        },
    );
    out
}
