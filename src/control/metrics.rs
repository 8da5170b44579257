//! `--metrics ADDR:PORT`: the figures of `query-stats` in the Prometheus text format at
//! `/metrics`, over a minimal HTTP/1.0 server (one thread, one request per connection).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::daemon::Daemon;

/// Binds the metrics listener.
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))
}

/// Serves `/metrics` until the process ends.
pub fn run(listener: TcpListener, daemon: Arc<Daemon>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics listening");
    }
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                if let Err(e) = answer(s, &daemon) {
                    warn!("metrics request: {e}");
                }
            }
            Err(e) => warn!("metrics accept: {e}"),
        }
    }
}

fn answer(stream: TcpStream, daemon: &Daemon) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Read (and ignore) the headers.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", render(daemon)),
        ("GET", _) => ("404 Not Found", "text/plain", "only /metrics is here\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
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
    let scalars: [(&str, &str, &str, Field); 6] = [
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
            "Time the I/O thread spent polling for work.",
            |q| q.poll_ns as f64 / 1e9,
        ),
        ("blkplane_poll_hits_total", "counter", "Polling periods that found work.", |q| {
            q.poll_hits as f64
        }),
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
