//! Names the commit the binary was built from, for `blkplane --version` (and "unknown"
//! outside a git checkout).
use std::path::PathBuf;
use std::process::Command;

/// `git rev-parse ARGS`'s answer, if git runs here and has one.
fn rev_parse(args: &[&str]) -> Option<String> {
    Command::new("git")
        .arg("rev-parse")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = rev_parse(&["--short=12", "HEAD"]);
    println!("cargo:rustc-env=BLKPLANE_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
    // A new commit moves the branch's ref; a checkout moves HEAD. In a linked worktree
    // `.git` is a file: HEAD is in the worktree's own git directory and the refs in the
    // common one. A path that does not exist would make cargo run this script (and rebuild
    // the crate) every time, so only existing ones are named.
    let (Some(git_dir), Some(common)) =
        (rev_parse(&["--git-dir"]), rev_parse(&["--git-common-dir"]))
    else {
        return;
    };
    let (git_dir, common) = (PathBuf::from(git_dir), PathBuf::from(common));
    let head = git_dir.join("HEAD");
    let mut watch = vec![head.clone(), common.join("packed-refs")];
    if let Ok(text) = std::fs::read_to_string(&head) {
        if let Some(branch) = text.trim().strip_prefix("ref: ") {
            // A ref only in packed-refs gets its file at the next commit: watch its folder.
            let file = common.join(branch);
            let folder = file.parent().map(PathBuf::from);
            watch.extend(if file.exists() { Some(file) } else { folder });
        }
    }
    for path in watch.into_iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
