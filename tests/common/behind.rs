//! Running a test written for image files with the same images behind a network backend:
//! each `image=PATH` of [`Daemon::start`](super::Daemon::start) becomes an NBD export of the
//! file (qemu-nbd or nbdkit) or an RBD image made from it, which is written back over the file
//! when the daemon stops, so that the test's checks of the file itself still hold.

use std::path::{Path, PathBuf};

use super::ceph::TestImage;
use super::nbd::{NbdServer, Server};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behind {
    Nbd(Server),
    Rbd,
}

/// What serves one export's image in the test's stead.
pub enum Backend {
    Nbd(NbdServer),
    /// The image and the file it stands for.
    Rbd(TestImage, PathBuf),
}

impl Backend {
    /// The daemon stopped: what it wrote goes back to the file.
    pub fn daemon_stopped(&self) {
        if let Backend::Rbd(image, file) = self {
            image.export_to(file);
        }
    }
}

thread_local! {
    static BEHIND: std::cell::Cell<Option<Behind>> = const { std::cell::Cell::new(None) };
}

/// Runs `test` with the image files its daemons serve behind `behind`.
pub fn on(behind: Behind, test: fn()) {
    BEHIND.with(|b| b.set(Some(behind)));
    test();
}

/// The export spec `spec` as the test's arrangement wants it, and what serves its image.
pub fn serve_behind(spec: &str, dir: &Path) -> (String, Option<Backend>) {
    match BEHIND.with(|b| b.get()) {
        Some(behind) => spec_behind(behind, spec, dir),
        None => (spec.to_string(), None),
    }
}

/// `spec` with its image file behind `behind`, and what serves it (none if the spec names no
/// image file).
pub fn spec_behind(behind: Behind, spec: &str, dir: &Path) -> (String, Option<Backend>) {
    let Some(image) = spec.split(',').find_map(|kv| kv.strip_prefix("image=")) else {
        return (spec.to_string(), None);
    };
    if !Path::new(image).is_file() {
        return (spec.to_string(), None);
    }
    let (keys, backend) = match behind {
        Behind::Nbd(server) => {
            let socket = dir.join(format!("nbd-{}.sock", super::rand_u16()));
            let nbd = NbdServer::start(server, Path::new(image), &socket);
            (format!("image={}", nbd.uri()), Backend::Nbd(nbd))
        }
        Behind::Rbd => {
            let rbd = TestImage::import(Path::new(image));
            (rbd.keys(), Backend::Rbd(rbd, PathBuf::from(image)))
        }
    };
    let spec: Vec<String> = spec
        .split(',')
        .filter(|kv| !kv.starts_with("aio="))
        .map(|kv| if kv.starts_with("image=") { keys.clone() } else { kv.to_string() })
        .collect();
    (spec.join(","), Some(backend))
}
