//! Where an RBD image is, as QEMU writes it (`rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]`,
//! further `:KEY=VALUE` pairs being Ceph options) or as export keys (`pool=`, `rbd-image=`,
//! `ceph-conf=`, `ceph-user=`).

use std::path::PathBuf;

use crate::spec::{err, Key, Kind, Options, Value};

/// Longest a pool, image or snapshot name may be here (Ceph's own limits are lower in
/// practice; this only keeps a spec's size bounded).
const MAX_NAME_BYTES: usize = 256;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// An RBD export's keys: where the image is (`pool=`, `rbd-image=`, `ceph-conf=`,
/// `ceph-user=`, or all of them from `image=rbd:...`) and `ceph-op-timeout=`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RbdOptions {
    pub spec: RbdSpec,
    /// Requests fail after this many seconds without an answer from the cluster (0: they
    /// wait).
    pub op_timeout_s: u32,
}

impl RbdOptions {
    /// Whether `pool=` or `rbd-image=` named the image.
    pub fn located(&self) -> bool {
        !self.spec.pool.is_empty() || !self.spec.image.is_empty()
    }

    /// The image an `image=rbd:...` string names, with the connection keys given beside it
    /// (`ceph-conf=`, `ceph-user=`) over what the string says.
    pub fn with_uri(&self, uri: &str) -> Result<RbdOptions, String> {
        if self.located() {
            return Err("image= and pool=/rbd-image= exclude each other".into());
        }
        let mut spec = RbdSpec::parse(uri)?;
        spec.conf = self.spec.conf.clone().or(spec.conf);
        spec.user = self.spec.user.clone().or(spec.user);
        Ok(RbdOptions { spec, op_timeout_s: self.op_timeout_s })
    }

    /// Checks an image named by `pool=` and `rbd-image=`.
    pub fn check_located(&self) -> Result<(), String> {
        match (self.spec.pool.is_empty(), self.spec.image.is_empty()) {
            (false, true) => Err("pool= needs rbd-image=IMAGE".into()),
            (true, false) => Err("rbd-image= needs pool=POOL".into()),
            _ => self.spec.check().map_err(|e| format!("rbd:{}: {e}", self.spec.name())),
        }
    }
}

impl Options for RbdOptions {
    const KEYS: &'static [Key<RbdOptions>] = &[
        Key {
            name: "pool",
            aliases: &[],
            kind: Kind::Text,
            usage: "pool=POOL, rbd-image=IMAGE[@SNAP], ceph-conf=PATH, ceph-user=USER",
            help: "(RBD) a Ceph RBD image by keys, as image=rbd:POOL/IMAGE[@SNAP][:conf=PATH]\n\
                   [:id=USER] names it (a snapshot is served read-only).",
            set: |o, v| {
                o.spec.pool = v.text("pool")?;
                Ok(())
            },
            get: |o| Some(Value::Str(o.spec.pool.clone())),
        },
        Key {
            name: "rbd-image",
            aliases: &[],
            kind: Kind::Text,
            usage: "rbd-image=IMAGE[@SNAP]",
            help: "",
            set: |o, v| {
                let text = v.text("rbd-image")?;
                let (image, snapshot) = match text.split_once('@') {
                    Some((i, s)) => (i.to_string(), Some(s.to_string())),
                    None => (text, None),
                };
                (o.spec.image, o.spec.snapshot) = (image, snapshot);
                Ok(())
            },
            get: |o| {
                Some(Value::Str(match &o.spec.snapshot {
                    Some(snap) => format!("{}@{snap}", o.spec.image),
                    None => o.spec.image.clone(),
                }))
            },
        },
        Key {
            name: "ceph-conf",
            aliases: &[],
            kind: Kind::Path,
            usage: "ceph-conf=PATH",
            help: "",
            set: |o, v| {
                o.spec.conf = Some(v.path("ceph-conf")?);
                Ok(())
            },
            get: |o| o.spec.conf.as_ref().map(|p| Value::Str(p.display().to_string())),
        },
        Key {
            name: "ceph-user",
            aliases: &[],
            kind: Kind::Text,
            usage: "ceph-user=USER",
            help: "",
            set: |o, v| {
                o.spec.user = Some(v.text("ceph-user")?);
                Ok(())
            },
            get: |o| o.spec.user.clone().map(Value::Str),
        },
        Key {
            name: "ceph-op-timeout",
            aliases: &[],
            kind: Kind::Number,
            usage: "ceph-op-timeout=SECONDS",
            help: "(RBD) fail requests the cluster does not answer within it (default 0: wait).",
            set: |o, v| {
                let timeout: u32 = v.number("ceph-op-timeout")?;
                if timeout > super::MAX_OP_TIMEOUT_S {
                    return err(format!(
                        "ceph-op-timeout={v}: at most {} seconds",
                        super::MAX_OP_TIMEOUT_S
                    ));
                }
                o.op_timeout_s = timeout;
                Ok(())
            },
            get: |o| Some(Value::Int(o.op_timeout_s.into())),
        },
    ];
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
