//! The man pages (`blkplane manpages`) and the command tree the shell completions are made
//! from. Both start from the clap definitions; the key tables (`--export`, the configuration
//! file) come from the key rows themselves, as roff paragraphs: the `--help` text lays them
//! out in columns with spaces, which roff would fill into one ragged paragraph.

use std::path::{Path, PathBuf};

use clap::builder::PossibleValuesParser;
use clap::Command;

use crate::config_file::DaemonSettings;
use crate::iothread::registry::IoThreadConfig;
use crate::nbd_server::NbdServerOptions;
use crate::spec::{KeyInfo, Options};

const SIGNALS: &str = ".TP\n\\fBSIGTERM\\fR, \\fBSIGINT\\fR\nStop taking requests, finish \
those in flight, exit 0. Guests whose VMM reconnects wait for the next start.\n.TP\n\
\\fBSIGHUP\\fR\nRe\\-read the \\fB\\-\\-config\\fR file and apply it, as \\fBblkplane ctl \
reload\\fR does; a file with a problem changes nothing.\n";

const FILES: &str = ".TP\n\\fI/etc/blkplane/blkplane.toml\\fR\nThe configuration file the \
systemd unit gives \\fB\\-\\-config\\fR; see \\fBblkplane.toml\\fR(5).\n.TP\n\
\\fI/run/blkplane/control.sock\\fR\nThe control socket of the example configuration, and where \
\\fBctl\\fR, \\fBstat\\fR and \\fBdoctor\\fR look when neither \\fB\\-\\-control\\fR nor \
\\fB$BLKPLANE_CONTROL\\fR says otherwise.\n.TP\n\\fI/run/blkplane/\\fR\nThe exports' \
vhost\\-user sockets (0750 root:kvm, from the tmpfiles entry).\n.TP\n\\fI/var/lib/blkplane/\\fR\n\
Images; the unit may write here and in \\fI/run/blkplane\\fR only.\n";

const EXIT_STATUS: &str = ".TP\n0\nSuccess (serve: stopped by SIGTERM or SIGINT after its \
drain).\n.TP\n1\nA failure at run time (serve: the daemon could not go on; ctl, stat: the \
daemon refused the request, or the connection broke).\n.TP\n2\nA bad command line or \
configuration.\n.TP\n3\n(ctl, stat) No daemon answers at the control socket.\n";

/// `text` as roff text: a backslash is printed, not an escape; a hyphen is a hyphen (not a
/// place to break); a line that starts with a dot or a quote is not a request.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    let lines = text.lines().map(|l| {
        if l.starts_with(['.', '\'']) {
            format!("\\&{l}")
        } else {
            l.trim_start().to_string()
        }
    });
    lines.collect::<Vec<_>>().join("\n")
}

/// One `.TP` paragraph per key: its usage in bold, its help, its other names.
fn key_paragraphs(keys: impl IntoIterator<Item = KeyInfo>) -> String {
    let mut out = String::new();
    for k in keys.into_iter().filter(|k| !k.help.is_empty()) {
        out += &format!(".TP\n\\fB{}\\fR\n{}\n", escape(k.usage), escape(k.help));
        if !k.aliases.is_empty() {
            out += &format!("Also spelled: {}.\n", escape(&k.aliases.join(", ")));
        }
    }
    out
}

fn section(title: &str, body: &str) -> String {
    format!(".SH \"{title}\"\n{body}")
}

/// A page of section 1 from its command, with `extra` sections after clap's.
fn page(cmd: Command, source: &str, extra: &[(&str, String)]) -> std::io::Result<Vec<u8>> {
    let has_args = cmd.get_arguments().any(|a| !a.is_hide_set());
    let has_subcommands = cmd.get_subcommands().any(|s| !s.is_hide_set());
    let has_after_help = cmd.get_after_help().is_some();
    let man = clap_mangen::Man::new(cmd).source(source.to_string());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if has_args {
        man.render_options_section(&mut out)?;
    }
    if has_subcommands {
        man.render_subcommands_section(&mut out)?;
    }
    if has_after_help {
        man.render_extra_section(&mut out)?;
    }
    for (title, body) in extra {
        out.extend_from_slice(section(title, body).as_bytes());
    }
    Ok(out)
}

/// blkplane.toml(5), from the daemon's, the I/O threads' and the exports' key rows.
fn config_page(source: &str) -> String {
    let example = escape(include_str!("../contrib/blkplane.toml"));
    let mut out = format!(".TH BLKPLANE.TOML 5 \"\" \"{source}\" \"File Formats\"\n");
    out += &section("NAME", "blkplane.toml \\- the configuration file of blkplane serve\n");
    out += &section("SYNOPSIS", "\\fBblkplane serve \\-\\-config\\fR \\fIFILE\\fR\n");
    out += &section(
        "DESCRIPTION",
        "A TOML file. Its top\\-level keys set the daemon, as the options of \\fBblkplane \
serve\\fR of the same names do (which win over the file); each \\fB[[iothread]]\\fR table is \
a named I/O thread (the keys of \\fB\\-\\-iothread\\fR), each \\fB[[export]]\\fR table an \
export (the keys of \\fB\\-\\-export\\fR). Values are TOML strings, integers or booleans. \
\\fBblkplane serve \\-\\-check\\-config \\-\\-config\\fR \\fIFILE\\fR checks a file; SIGHUP or \
\\fBblkplane ctl reload\\fR applies a changed one to a running daemon; \\fBblkplane ctl \
dump\\-config\\fR prints the running configuration in this form.\n",
    );
    out += &section("DAEMON KEYS", &key_paragraphs(DaemonSettings::infos()));
    out += &section("IOTHREAD TABLES", &key_paragraphs(IoThreadConfig::infos()));
    out += &section("EXPORT TABLES", &key_paragraphs(crate::export::key_infos()));
    out += &section(
        "NBD-SERVER TABLE",
        &format!(
            "The \\fB[nbd\\-server]\\fR table starts the NBD server, with the keys of \\fB\\-\\-nbd\\-server\\fR \
(which wins over it); a reload names a changed table and leaves the server as it is.\n{}",
            key_paragraphs(NbdServerOptions::infos())
        ),
    );
    out += &section("EXAMPLE", &format!(".nf\n{example}\n.fi\n"));
    out += &section("FILES", FILES);
    out += &section("SEE ALSO", "\\fBblkplane\\fR(1), \\fBblkplane\\-serve\\fR(1)\n");
    out
}

/// The pages of section 1 (blkplane.1, and blkplane-serve.1 and so on for each visible
/// subcommand) and blkplane.toml.5, rendered into `dir`/man1 and `dir`/man5. Returns the
/// files written.
pub fn write(cmd: Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let source = format!("blkplane {}", cmd.get_version().unwrap_or_default());
    let signals = ("SIGNALS", SIGNALS.to_string());
    let files = ("FILES", FILES.to_string());
    let exit = ("EXIT STATUS", EXIT_STATUS.to_string());
    // `blkplane help` is clap's; a page of its own would only repeat --help.
    let root = cmd.clone().disable_help_subcommand(true).after_help(None::<&str>);
    let mut pages = vec![(
        "man1/blkplane.1".to_string(),
        page(root, &source, &[signals.clone(), files.clone(), exit.clone()])?,
    )];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("blkplane-{}", sub.get_name());
        let mut sub = sub.clone().name(&name).disable_help_subcommand(true);
        let mut extra = vec![exit.clone()];
        if name == "blkplane-serve" {
            let keys = key_paragraphs(crate::export::key_infos());
            sub = sub.mut_arg("exports", |a| {
                a.long_help(
                    "One export (repeat the option for more): comma-separated \
                             key=value pairs (write ,, for a comma inside a value), the keys \
                             of EXPORT KEYS below.",
                )
            });
            sub = sub.mut_arg("nbd_server", |a| {
                a.long_help(
                    "Serve exports over NBD (ctl nbd-export chooses which): comma-separated \
                     key=value pairs, the keys of NBD SERVER KEYS below.",
                )
            });
            let nbd = key_paragraphs(NbdServerOptions::infos());
            extra = vec![
                ("EXPORT KEYS", keys),
                ("NBD SERVER KEYS", nbd),
                signals.clone(),
                files.clone(),
                exit.clone(),
            ];
        }
        pages.push((format!("man1/{name}.1"), page(sub, &source, &extra)?));
    }
    pages.push(("man5/blkplane.toml.5".into(), config_page(&source).into_bytes()));
    let mut written = Vec::new();
    for (name, text) in pages {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap_or(dir))?;
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// The command tree the completion scripts are made from: no hidden subcommand (clap's
/// scripts offer them), and values to offer where the parser takes free text: the export
/// keys after `--export`, the control commands after `ctl`. Parsing never sees this tree.
pub fn for_completion(cmd: Command) -> Command {
    let export_keys: Vec<String> =
        crate::export::key_infos().iter().map(|k| format!("{}=", k.name)).collect();
    let nbd_keys: Vec<String> = NbdServerOptions::infos().map(|k| format!("{}=", k.name)).collect();
    let visible: Vec<Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .map(|s| match s.get_name() {
            // --log-level lists LOG_LEVELS already.
            "serve" => s
                .mut_arg("exports", |a| {
                    a.value_parser(PossibleValuesParser::new(export_keys.clone()))
                })
                .mut_arg("nbd_server", |a| {
                    a.value_parser(PossibleValuesParser::new(nbd_keys.clone()))
                }),
            "ctl" => s.mut_arg("command", |a| {
                a.value_parser(PossibleValuesParser::new(crate::control::COMMAND_NAMES))
            }),
            _ => s,
        })
        .collect();
    let mut root = Command::new(cmd.get_name().to_string())
        .version(cmd.get_version().unwrap_or_default().to_string())
        .subcommands(visible);
    if let Some(about) = cmd.get_about() {
        root = root.about(about.clone());
    }
    root
}

/// What clap's fish script leaves out: fish completes no positional argument's values, so
/// the control commands after `ctl` are added by hand.
pub fn fish_extra() -> String {
    format!(
        "complete -c blkplane -n \"__fish_blkplane_using_subcommand ctl\" -f -a \"{}\"\n",
        crate::control::COMMAND_NAMES.join(" ")
    )
}
