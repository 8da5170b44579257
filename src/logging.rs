//! The daemon's log: text or JSON lines on stderr, and, when stderr is systemd's journal
//! stream, each line prefixed with its syslog priority (`<3>` error, `<4>` warning, `<6>`
//! info, `<7>` debug), which journald takes off and keeps as the entry's priority
//! (`journalctl -p warning` then works). Lines an export causes carry its span,
//! `export{export=ID socket=PATH}` (see `Disk::span`).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU8, Ordering};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event: timestamp, level, fields, target, and the export's span.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log-format '{s}': text or json")),
        }
    }
}

/// Whether stderr is the journal stream systemd gave this process: `JOURNAL_STREAM` names
/// the stream's device and inode, and stderr must still be that stream (a shell under the
/// service may have redirected it).
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.split_once(':') else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The syslog priority of a level, as sd-daemon(3) prefixes want it.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// A format that writes the event's priority prefix before what `F` writes.
struct JournalPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the daemon's logger: `format` on stderr at `level` and above; with `journal`,
/// priority prefixes and no timestamps or colours (the journal keeps its own time).
/// The most verbose level logged now: `init` sets it, a reload may change it (0: off, then
/// error, warn, info, debug, trace).
static LEVEL: AtomicU8 = AtomicU8::new(3);

fn rank(level: LevelFilter) -> u8 {
    match level.into_level() {
        None => 0,
        Some(Level::ERROR) => 1,
        Some(Level::WARN) => 2,
        Some(Level::INFO) => 3,
        Some(Level::DEBUG) => 4,
        Some(Level::TRACE) => 5,
    }
}

/// Changes the level logged from now on (a reload of `log-level`).
pub fn set_level(level: LevelFilter) {
    LEVEL.store(rank(level), Ordering::Relaxed);
}

pub fn init(level: LevelFilter, format: LogFormat, journal: bool) {
    set_level(level);
    let ansi = !journal && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let text = tracing_subscriber::fmt::format().with_ansi(ansi);
    let json =
        tracing_subscriber::fmt::format().json().with_current_span(true).with_span_list(false);
    // Asked at each event (no callsite caches it), so that a change of level applies at
    // once; the data path logs nothing, so this costs nothing there.
    let by_level = tracing_subscriber::filter::filter_fn(|meta| {
        rank(LevelFilter::from_level(*meta.level())) <= LEVEL.load(Ordering::Relaxed)
    });
    // A second logger (tests that start several daemons in one process) is no error.
    let _ = match (format, journal) {
        (LogFormat::Text, false) => builder.event_format(text).finish().with(by_level).try_init(),
        (LogFormat::Text, true) => builder
            .event_format(JournalPriority(text.without_time()))
            .finish()
            .with(by_level)
            .try_init(),
        (LogFormat::Json, false) => builder
            .event_format(json)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .finish()
            .with(by_level)
            .try_init(),
        (LogFormat::Json, true) => builder
            .event_format(JournalPriority(json))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .finish()
            .with(by_level)
            .try_init(),
    };
}
