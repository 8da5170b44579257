//! `blkplane stat`: a live view of a running daemon through its control socket — per export
//! IOPS, MB/s, latency, and the per-layer breakdown of where a request's time goes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control::ControlClient;

fn sum_map(v: &Value) -> u64 {
    v.as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

/// (requests, bytes) of every export, summed over its queues and request kinds.
fn totals(stats: &Value) -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    for e in stats.as_array().into_iter().flatten() {
        let id = e["id"].as_str().unwrap_or("?").to_string();
        let (mut reqs, mut bytes) = (0, 0);
        for q in e["queues"].as_array().into_iter().flatten() {
            reqs += sum_map(&q["requests"]);
            bytes += sum_map(&q["bytes"]);
        }
        out.insert(id, (reqs, bytes));
    }
    out
}

fn query(client: &mut ControlClient) -> Result<Value, String> {
    let reply = client.call("query-stats", json!({})).map_err(|e| e.to_string())?;
    match (reply.get("result"), reply.get("error")) {
        (Some(r), _) => Ok(r.clone()),
        (_, Some(e)) => Err(format!("query-stats: {}", e["message"].as_str().unwrap_or("error"))),
        _ => Err("query-stats: an empty reply".into()),
    }
}

/// One view: rates over the last interval, latency since the daemon started.
pub fn render(stats: &Value, before: &HashMap<String, (u64, u64)>, seconds: f64) -> String {
    let now = totals(stats);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "export", "IOPS", "MB/s", "p50 µs", "p99 µs", "in-flight"
    );
    for e in stats.as_array().into_iter().flatten() {
        let id = e["id"].as_str().unwrap_or("?");
        let (r1, b1) = now.get(id).copied().unwrap_or_default();
        let (r0, b0) = before.get(id).copied().unwrap_or((r1, b1));
        let queues: Vec<&Value> = e["queues"].as_array().into_iter().flatten().collect();
        // The queue with the most samples speaks for the export's latency.
        let busiest = queues.iter().max_by_key(|q| {
            q["stages"]
                .as_array()
                .and_then(|s| s.last())
                .and_then(|t| t["samples"].as_u64())
                .unwrap_or(0)
        });
        let total = busiest.and_then(|q| q["stages"].as_array()).and_then(|s| s.last());
        let in_flight: u64 = queues.iter().filter_map(|q| q["in_flight"].as_u64()).sum();
        let _ = writeln!(
            out,
            "{:<16} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9}",
            id,
            r1.saturating_sub(r0) as f64 / seconds,
            b1.saturating_sub(b0) as f64 / seconds / 1e6,
            total.and_then(|t| t["p50_us"].as_f64()).unwrap_or(0.0),
            total.and_then(|t| t["p99_us"].as_f64()).unwrap_or(0.0),
            in_flight
        );
        if let Some(q) = busiest {
            let _ = writeln!(
                out,
                "  {:<10} {:>9} {:>9} {:>7}   (queue {}, sampled requests since start)",
                "layer", "mean µs", "p99 µs", "share", q["queue"]
            );
            for s in q["stages"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  {:<10} {:>9.2} {:>9.2} {:>6.1}%",
                    s["stage"].as_str().unwrap_or("?"),
                    s["mean_us"].as_f64().unwrap_or(0.0),
                    s["p99_us"].as_f64().unwrap_or(0.0),
                    100.0 * s["share"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    out
}

/// Prints a view every `interval`, `count` times (or until interrupted).
pub fn run(control: &Path, interval: Duration, count: Option<u64>) -> Result<(), String> {
    let connect = || {
        ControlClient::connect(control)
            .map_err(|e| format!("cannot connect to {}: {e}", control.display()))
    };
    let mut client = connect()?;
    let mut before = totals(&query(&mut client)?);
    let mut at = Instant::now();
    let mut shown = 0;
    while count.is_none_or(|c| shown < c) {
        std::thread::sleep(interval);
        if interval >= crate::control::IDLE_TIMEOUT {
            // The daemon closes control connections idle that long: ask on a fresh one.
            client = connect()?;
        }
        let stats = query(&mut client)?;
        let seconds = at.elapsed().as_secs_f64();
        at = Instant::now();
        println!("{}", render(&stats, &before, seconds));
        before = totals(&stats);
        shown += 1;
    }
    Ok(())
}
