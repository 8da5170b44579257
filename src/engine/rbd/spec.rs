//! Where an RBD image is, as QEMU writes it (`rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]`,
//! further `:KEY=VALUE` pairs being Ceph options) or as export keys (`pool=`, `rbd-image=`,
//! `ceph-conf=`, `ceph-user=`).

use std::path::PathBuf;

/// Longest a pool, image or snapshot name may be here (Ceph's own limits are lower in
/// practice; this only keeps a spec's size bounded).
const MAX_NAME_BYTES: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub image: String,
    /// A snapshot: served read-only.
    pub snapshot: Option<String>,
    /// The cluster's configuration file; default: Ceph's own search (/etc/ceph/ceph.conf).
    pub conf: Option<PathBuf>,
    /// The client's name without `client.` (default: admin).
    pub user: Option<String>,
    /// Further Ceph options from the QEMU syntax, set on the cluster connection.
    pub options: Vec<(String, String)>,
}

impl RbdSpec {
    pub fn is_uri(image: &str) -> bool {
        image.starts_with("rbd:")
    }

    /// Parses QEMU's `rbd:` syntax (a `\` escapes the next character).
    pub fn parse(uri: &str) -> Result<RbdSpec, String> {
        Self::parse_parts(uri).map_err(|why| format!("{uri}: {why}"))
    }

    fn parse_parts(uri: &str) -> Result<RbdSpec, String> {
        let rest = uri.strip_prefix("rbd:").ok_or("not an rbd: image")?;
        let mut fields = split_unescaped(rest, ':').into_iter();
        let location = fields.next().unwrap_or_default();
        let (pool, image) = location
            .split_once('/')
            .ok_or("expected rbd:POOL/IMAGE[@SNAPSHOT][:conf=PATH][:id=USER]")?;
        let (image, snapshot) = match image.split_once('@') {
            Some((i, s)) => (i, Some(s.to_string())),
            None => (image, None),
        };
        let mut spec = RbdSpec {
            pool: pool.to_string(),
            image: image.to_string(),
            snapshot,
            conf: None,
            user: None,
            options: Vec::new(),
        };
        for field in fields {
            let (key, value) =
                field.split_once('=').ok_or(format!("'{field}' is not KEY=VALUE"))?;
            match key {
                "conf" => spec.conf = Some(PathBuf::from(value)),
                "id" => spec.user = Some(value.to_string()),
                _ => spec.options.push((key.to_string(), value.to_string())),
            }
        }
        spec.check()?;
        Ok(spec)
    }

    /// Names present, not empty, not too long.
    pub fn check(&self) -> Result<(), String> {
        for (what, name) in [
            ("pool", Some(&self.pool)),
            ("image", Some(&self.image)),
            ("snapshot", self.snapshot.as_ref()),
        ] {
            let Some(name) = name else { continue };
            if name.is_empty() {
                return Err(format!("empty {what} name"));
            }
            if name.len() > MAX_NAME_BYTES || name.contains('\0') {
                return Err(format!("{what} name of {} bytes", name.len()));
            }
        }
        if self.user.as_ref().is_some_and(|u| u.is_empty()) {
            return Err("empty user".into());
        }
        Ok(())
    }

    /// `POOL/IMAGE[@SNAPSHOT]`, for messages.
    pub fn name(&self) -> String {
        match &self.snapshot {
            Some(s) => format!("{}/{}@{s}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

/// Splits at `sep` where it is not escaped by a backslash; removes the escapes.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    out.last_mut().unwrap().push(next);
                }
            }
            c if c == sep => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_syntax() {
        let s = RbdSpec::parse("rbd:rbd/disk1").unwrap();
        assert_eq!((s.pool.as_str(), s.image.as_str(), s.snapshot), ("rbd", "disk1", None));
        let s =
            RbdSpec::parse("rbd:vms/disk@snap1:conf=/etc/ceph/c.conf:id=cinder:rbd_cache=false")
                .unwrap();
        assert_eq!(s.snapshot.as_deref(), Some("snap1"));
        assert_eq!(s.conf, Some(PathBuf::from("/etc/ceph/c.conf")));
        assert_eq!(s.user.as_deref(), Some("cinder"));
        assert_eq!(s.options, vec![("rbd_cache".into(), "false".into())]);
        let s = RbdSpec::parse(r"rbd:p/i:conf=/odd\:path.conf").unwrap();
        assert_eq!(s.conf, Some(PathBuf::from("/odd:path.conf")));
        assert_eq!(s.name(), "p/i");
    }

    #[test]
    fn bad_specs_say_why() {
        let err = |u: &str| RbdSpec::parse(u).unwrap_err();
        assert_eq!(
            err("rbd:disk"),
            "rbd:disk: expected rbd:POOL/IMAGE[@SNAPSHOT][:conf=PATH][:id=USER]"
        );
        assert_eq!(err("rbd:/disk"), "rbd:/disk: empty pool name");
        assert_eq!(err("rbd:p/"), "rbd:p/: empty image name");
        assert_eq!(err("rbd:p/i@"), "rbd:p/i@: empty snapshot name");
        assert_eq!(err("rbd:p/i:conf"), "rbd:p/i:conf: 'conf' is not KEY=VALUE");
        assert_eq!(err("rbd:p/i:id="), "rbd:p/i:id=: empty user");
    }
}
