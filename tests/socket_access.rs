//! Who may connect to an export's socket (issue 30, 6): `socket-owner=` and `socket-group=`
//! names are looked up through the system's name service, so users and groups that are not
//! in /etc/passwd or /etc/group (LDAP, sssd, systemd-userdb) are found; an unknown name is
//! refused; a mode open to other users is served with a warning.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;

use common::{assert_usage_error, make_image, rand_u16, serve_refused, tmpdir, Daemon};

/// A user and a group of one name known only to systemd-userdb (JSON records in
/// /run/userdb, which nss-systemd reads): not in /etc/passwd or /etc/group. Removed on drop.
struct UserdbAccount {
    name: String,
    id: u32,
    files: Vec<PathBuf>,
}

impl UserdbAccount {
    fn create() -> UserdbAccount {
        let id = 60_000 + u32::from(rand_u16() % 5000);
        let name = format!("blkplane-t{id}");
        let dir = PathBuf::from("/run/userdb");
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = Vec::new();
        for (kind, record) in [
            ("user", format!(r#"{{"userName":"{name}","uid":{id},"gid":{id}}}"#)),
            ("group", format!(r#"{{"groupName":"{name}","gid":{id}}}"#)),
        ] {
            let file = dir.join(format!("{name}.{kind}"));
            std::fs::write(&file, record).unwrap();
            let by_id = dir.join(format!("{id}.{kind}"));
            let _ = std::fs::remove_file(&by_id);
            std::os::unix::fs::symlink(&file, &by_id).unwrap();
            files.extend([file, by_id]);
        }
        let account = UserdbAccount { name, id, files };
        for db in ["passwd", "group"] {
            let out = Command::new("getent").args([db, &account.name]).output().unwrap();
            assert!(
                out.status.success(),
                "getent {db} {}: the test needs nss-systemd (\"{db}: files systemd\" in \
                 /etc/nsswitch.conf, Debian's libnss-systemd)",
                account.name
            );
        }
        let local = std::fs::read_to_string("/etc/passwd").unwrap()
            + &std::fs::read_to_string("/etc/group").unwrap();
        assert!(!local.contains(&account.name), "{} is in the local files", account.name);
        account
    }
}

impl Drop for UserdbAccount {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[test]
fn owner_and_group_names_come_from_the_name_service() {
    let account = UserdbAccount::create();
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    make_image(&image, 1 << 20, 3);
    let sock = dir.path().join("blk.sock");
    let keys = format!(
        "socket={},image={},socket-owner={n},socket-group={n},socket-mode=0660",
        sock.display(),
        image.display(),
        n = account.name
    );
    let daemon = Daemon::start(dir.path(), &[keys]);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (account.id, account.id), "{}", daemon.log());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert!(!daemon.log().contains("socket-mode"), "no warning for 0660:\n{}", daemon.log());
}

#[test]
fn unknown_names_are_refused() {
    let dir = tmpdir();
    let sock = dir.path().join("blk.sock");
    let export = |key: &str| format!("socket={},engine=null,size=1M,{key}", sock.display());
    let out = serve_refused(&[export("socket-owner=blkplane-nosuchuser")]);
    assert_usage_error(&out, "socket-owner=blkplane-nosuchuser: no such user");
    let out = serve_refused(&[export("socket-group=blkplane-nosuchgroup")]);
    assert_usage_error(&out, "socket-group=blkplane-nosuchgroup: no such group");
    assert!(!sock.exists(), "a refused export left its socket");
}

#[test]
fn a_mode_open_to_other_users_is_served_with_a_warning() {
    let dir = tmpdir();
    let (open, closed) = (dir.path().join("open.sock"), dir.path().join("closed.sock"));
    let daemon = Daemon::start(
        dir.path(),
        &[
            format!("id=vm1,socket={},engine=null,size=1M,socket-mode=0777", open.display()),
            format!("id=vm2,socket={},engine=null,size=1M,socket-mode=0660", closed.display()),
        ],
    );
    assert_eq!(std::fs::metadata(&open).unwrap().permissions().mode() & 0o777, 0o777);
    let log = daemon.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("socket-mode=")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    let want = format!(
        "socket-mode=0777 opens {} to users outside its owner and group: whoever connects \
         controls the disk export=vm1",
        open.display()
    );
    assert!(warnings[0].contains(" WARN ") && warnings[0].contains(&want), "{log}");
}
