//! A host without the Ceph libraries, as far as one process sees: a mount namespace in which
//! the directory holding librbd and librados shows every other file of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory the dynamic loader finds `soname` in (from `ldconfig -p`), if any.
pub fn library_dir(soname: &str) -> Option<PathBuf> {
    let out = Command::new("ldconfig").arg("-p").output().expect("run ldconfig -p");
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .lines()
        .filter(|l| l.trim_start().starts_with(&format!("{soname} ")))
        .find_map(|l| l.split(" => ").nth(1))?;
    std::fs::canonicalize(Path::new(path.trim()).parent()?).ok()
}

/// Binds the library directory aside, lays a directory of links to each of its files except
/// librbd's and librados' over it, and runs the program (the shell `exec`s it, so the
/// daemon's process id is the command's).
const HIDE: &str = r#"
lib=$1 view=$2; shift 2
mkdir -p "$view/all" "$view/shown"
mount --bind "$lib" "$view/all"
for f in "$view/all"/*; do
    n=${f##*/}
    case $n in librbd.so*|librados.so*) ;; *) ln -s "$f" "$view/shown/$n" ;; esac
done
mount --bind "$view/shown" "$lib"
exec "$@"
"#;

/// A command that runs `program` (arguments follow) with librbd and librados hidden, using
/// `scratch` for the links. Without them installed it runs `program` as it is.
pub fn hiding_ceph(program: &str, scratch: &Path) -> Command {
    let Some(lib) = library_dir("librbd.so.1") else {
        return Command::new(program);
    };
    assert_eq!(library_dir("librados.so.2").as_ref(), Some(&lib), "librados beside librbd");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-euc", HIDE, "sh"]);
    let view = scratch.join(format!("ceph-hidden-{}", super::rand_u16()));
    cmd.arg(&lib).arg(view).arg(program);
    cmd
}
