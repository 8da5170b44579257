//! The daemon against a real virtio-blk driver written outside this project: libblkio's
//! `virtio-blk-vhost-user` driver, talking to `blkplane serve` over its socket.

mod common;

use std::fs;
use std::path::Path;

use blkio::ReqFlags;
use common::{io_uring_workers, make_image, pattern, tmpdir, Client, Daemon, Mount};

const IMAGE_BYTES: u64 = 64 << 20;
const EIO: i32 = -libc::EIO;

fn export(sock: &Path, image: &Path, extra: &str) -> String {
    format!("socket={},image={}{extra}", sock.display(), image.display())
}

/// On tmpfs, reads and writes of up to 64 KiB are done on the I/O thread itself (tmpfs cannot
/// try one without waiting, so io_uring would hand each to a kernel worker); larger ones still
/// go through the ring to those workers. Both move the exact bytes, and the image holds
/// exactly what was written.
#[test]
fn small_io_on_tmpfs_is_done_on_the_io_thread_and_large_io_by_io_urings_workers() {
    let dir = tmpdir();
    let shm = Mount::new("tmpfs", Some("size=80m"), &dir.path().join("shm"))
        .expect("mounting a tmpfs needs root");
    let image = shm.0.join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 3);
    let mut expected = fs::read(&image).unwrap();
    let mut daemon = Daemon::start(dir.path(), &[export(&sock, &image, "")]);
    let mut c = Client::connect(&sock, 1);
    let mut write_and_read = |c: &mut Client, seed: u64, offset: u64, len: usize| {
        let data = pattern(seed, offset, len);
        assert_eq!(c.write_at(0, offset, &data, 0), 0, "write of {len} at {offset}");
        assert!(c.read_at(0, offset, len, 1 << 20).unwrap() == data, "read of {len} at {offset}");
        expected[offset as usize..offset as usize + len].copy_from_slice(&data);
    };
    for i in 0..200u64 {
        // 512 bytes to 64 KiB, spread over the image.
        let len = 512usize << (i % 8);
        let offset = (i * 7919 * 4096) % (IMAGE_BYTES - (64 << 10)) + (i % 3) * 512;
        write_and_read(&mut c, 100 + i, offset, len);
    }
    assert_eq!(
        io_uring_workers(daemon.pid()),
        0,
        "an I/O of 64 KiB or less went to io_uring's workers"
    );
    write_and_read(&mut c, 1, 5 << 20, (64 << 10) + 4096);
    assert!(
        io_uring_workers(daemon.pid()) > 0,
        "a 68 KiB I/O on tmpfs did not go to io_uring's workers"
    );
    drop(c);
    assert!(daemon.stop().success());
    assert!(fs::read(&image).unwrap() == expected, "the image differs from what was written");
}

/// Writes at many offsets and sizes, reads them back through the client, and after the daemon
/// stops checks the image file byte for byte, including that nothing else changed.
fn patterns_round_trip(cache: &str, aio: &str) {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 1);
    let mut daemon =
        Daemon::start(dir.path(), &[export(&sock, &image, &format!(",cache={cache},aio={aio}"))]);
    let mut expected = fs::read(&image).unwrap();
    {
        let mut c = Client::connect(&sock, 1);
        assert_eq!(c.capacity(), IMAGE_BYTES);
        let cases: &[(u64, usize)] = &[
            (0, 512),
            (512, 4096),
            (3 * 4096, 8192),
            (1 << 20, 65536),
            (5 << 20, 1 << 20),
            (9 << 20, 3 << 20),
            ((17 << 20) + 4096, 128 << 10),
            (IMAGE_BYTES - 4096, 4096),
            (IMAGE_BYTES - (1 << 20), 1 << 20),
        ];
        for (i, &(offset, len)) in cases.iter().enumerate() {
            let data = pattern(100 + i as u64, offset, len);
            assert_eq!(c.write_at(0, offset, &data, 0), 0, "write {len} at {offset}");
            expected[offset as usize..offset as usize + len].copy_from_slice(&data);
            let back = c.read_at(0, offset, len, 4 << 20).expect("read back");
            assert!(back == data, "read back {len} at {offset} differs (cache={cache})");
        }
        // Vectored: one request made of three buffers of different sizes.
        let offset = 33 << 20;
        let parts = [4096usize, 512, 12288];
        let total: usize = parts.iter().sum();
        let data = pattern(7, offset, total);
        let mut iovs = Vec::new();
        let mut at = 0;
        for (k, &p) in parts.iter().enumerate() {
            let buf_at = k * (1 << 20);
            c.buf_slice(buf_at, p).copy_from_slice(&data[at..at + p]);
            iovs.push(libc::iovec { iov_base: c.buf_ptr(buf_at).cast(), iov_len: p });
            at += p;
        }
        c.queues[0].writev(offset, iovs.as_ptr(), 3, 0, ReqFlags::empty());
        assert_eq!(c.wait_one(0), 0, "writev");
        expected[offset as usize..offset as usize + total].copy_from_slice(&data);
        for (k, &p) in parts.iter().enumerate() {
            c.buf_slice(k * (1 << 20), p).fill(0);
        }
        c.queues[0].readv(offset, iovs.as_ptr(), 3, 0, ReqFlags::empty());
        assert_eq!(c.wait_one(0), 0, "readv");
        let mut at = 0;
        for (k, &p) in parts.iter().enumerate() {
            assert!(c.buf_slice(k * (1 << 20), p) == &data[at..at + p], "readv part {k}");
            at += p;
        }
        assert_eq!(c.flush(0), 0, "flush");
    }
    assert!(daemon.stop().success(), "daemon exit:\n{}", daemon.log());
    let on_disk = fs::read(&image).unwrap();
    assert_eq!(on_disk.len(), expected.len());
    let first_diff = on_disk.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "image differs from what was written (cache={cache})");
}

fn patterns_round_trip_cache_none() {
    patterns_round_trip("none", "io_uring");
}

fn patterns_round_trip_cache_directsync() {
    patterns_round_trip("directsync", "io_uring");
}

fn patterns_round_trip_cache_writeback() {
    patterns_round_trip("writeback", "io_uring");
}

fn patterns_round_trip_cache_writethrough() {
    patterns_round_trip("writethrough", "io_uring");
}

fn patterns_round_trip_cache_unsafe() {
    patterns_round_trip("unsafe", "io_uring");
}

fn patterns_round_trip_threads_engine_cache_none() {
    patterns_round_trip("none", "threads");
}

fn patterns_round_trip_threads_engine_cache_writeback() {
    patterns_round_trip("writeback", "threads");
}

fn patterns_round_trip_native_engine_cache_none() {
    patterns_round_trip("none", "native");
}

fn patterns_round_trip_native_engine_cache_directsync() {
    patterns_round_trip("directsync", "native");
}

fn several_queues_from_several_threads() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 2);
    let _daemon = Daemon::start(dir.path(), &[export(&sock, &image, ",queues=4")]);
    let mut c = Client::connect(&sock, 4);
    assert_eq!(c.queues.len(), 4);
    let base = c.buf.addr;
    let queues: Vec<_> = c.queues.drain(..).collect();
    // Each thread owns one queue and one 2 MiB part of the buffer and of the disk.
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                let buf = (base + qi * (2 << 20)) as *mut u8;
                let region_off = (qi as u64) * (8 << 20);
                for round in 0..32u64 {
                    let offset = region_off + round * 65536;
                    let data = pattern(1000 + qi as u64, offset, 65536);
                    // SAFETY: this thread's own 2 MiB of the mapped region.
                    let slice = unsafe { std::slice::from_raw_parts_mut(buf, 65536) };
                    slice.copy_from_slice(&data);
                    q.write(offset, buf, 65536, round as usize, ReqFlags::empty());
                    assert_eq!(wait(&mut q), 0);
                    slice.fill(0);
                    q.read(offset, buf, 65536, round as usize, ReqFlags::empty());
                    assert_eq!(wait(&mut q), 0);
                    assert!(slice == &data[..], "queue {qi} round {round}");
                }
                q
            })
        })
        .collect();
    for h in handles {
        c.queues.push(h.join().expect("queue thread"));
    }
    // Every queue's writes are visible through queue 0.
    for qi in 0..4u64 {
        let offset = qi * (8 << 20) + 31 * 65536;
        let back = c.read_at(0, offset, 65536, 0).unwrap();
        assert!(back == pattern(1000 + qi, offset, 65536), "queue {qi} data via queue 0");
    }
}

fn wait(q: &mut blkio::Blkioq) -> i32 {
    let mut c = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
    let mut timeout = std::time::Duration::from_secs(20);
    assert_eq!(q.do_io(&mut c, 1, Some(&mut timeout), None).unwrap(), 1);
    // SAFETY: do_io initialised one entry.
    unsafe { c[0].assume_init_read() }.ret
}

fn many_requests_in_flight_at_once() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 3);
    let _daemon = Daemon::start(dir.path(), &[export(&sock, &image, "")]);
    let mut c = Client::connect(&sock, 1);
    // 64 writes of 4 KiB in one batch, then 64 reads in one batch.
    for i in 0..64usize {
        let data = pattern(55, i as u64 * 8192, 4096);
        c.buf_slice(i * 4096, 4096).copy_from_slice(&data);
        let p = c.buf_ptr(i * 4096);
        c.queues[0].write(i as u64 * 8192, p, 4096, i, ReqFlags::empty());
    }
    let mut done: Vec<_> =
        (0..64).map(|_| std::mem::MaybeUninit::<blkio::Completion>::uninit()).collect();
    let mut got = 0;
    while got < 64 {
        let mut timeout = std::time::Duration::from_secs(20);
        let n = c.queues[0].do_io(&mut done[got..], 1, Some(&mut timeout), None).unwrap();
        for d in &done[got..got + n] {
            // SAFETY: initialised by do_io.
            assert_eq!(unsafe { d.assume_init_read() }.ret, 0);
        }
        got += n;
        assert!(n > 0, "stalled at {got} of 64");
    }
    for i in 0..64usize {
        let back = c.read_at(0, i as u64 * 8192, 4096, 1 << 20).unwrap();
        assert!(back == pattern(55, i as u64 * 8192, 4096), "request {i}");
        // The 4 KiB after each write was not touched.
        let after = c.read_at(0, i as u64 * 8192 + 4096, 4096, 1 << 20).unwrap();
        assert!(after == pattern(3, i as u64 * 8192 + 4096, 4096), "gap after request {i}");
    }
}

fn discard_and_write_zeroes_read_back_zeroes_io_uring() {
    discard_and_write_zeroes_read_back_zeroes("io_uring");
}

fn discard_and_write_zeroes_read_back_zeroes_threads() {
    discard_and_write_zeroes_read_back_zeroes("threads");
}

fn discard_and_write_zeroes_read_back_zeroes_native() {
    discard_and_write_zeroes_read_back_zeroes("native");
}

fn discard_and_write_zeroes_read_back_zeroes(aio: &str) {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 4);
    let mut daemon = Daemon::start(dir.path(), &[export(&sock, &image, &format!(",aio={aio}"))]);
    {
        let mut c = Client::connect(&sock, 1);
        let zeroes = vec![0u8; 1 << 20];
        // Discard 1 MiB at 4 MiB (hole punch): zeroes; the bytes around it keep the pattern.
        assert_eq!(c.discard(0, 4 << 20, 1 << 20), 0, "discard");
        assert!(c.read_at(0, 4 << 20, 1 << 20, 0).unwrap() == zeroes, "after discard");
        assert!(
            c.read_at(0, (4 << 20) - 4096, 4096, 0).unwrap() == pattern(4, (4 << 20) - 4096, 4096)
        );
        assert!(c.read_at(0, 5 << 20, 4096, 0).unwrap() == pattern(4, 5 << 20, 4096));
        // Write zeroes without unmap (libblkio's NO_UNMAP), then with unmap allowed.
        assert_eq!(c.write_zeroes(0, 8 << 20, 1 << 20, ReqFlags::NO_UNMAP), 0, "write-zeroes");
        assert!(c.read_at(0, 8 << 20, 1 << 20, 0).unwrap() == zeroes, "after write-zeroes");
        assert_eq!(
            c.write_zeroes(0, 12 << 20, 64 << 10, ReqFlags::empty()),
            0,
            "write-zeroes unmap"
        );
        assert!(c.read_at(0, 12 << 20, 64 << 10, 0).unwrap() == zeroes[..64 << 10]);
        assert!(
            c.read_at(0, (12 << 20) + (64 << 10), 4096, 0).unwrap()
                == pattern(4, (12 << 20) + (64 << 10), 4096)
        );
        // Past the end: refused, nothing changes.
        assert_eq!(c.discard(0, IMAGE_BYTES - 4096, 8192), EIO, "discard past the end");
        assert!(
            c.read_at(0, IMAGE_BYTES - 4096, 4096, 0).unwrap()
                == pattern(4, IMAGE_BYTES - 4096, 4096)
        );
    }
    assert!(daemon.stop().success());
    let img = fs::read(&image).unwrap();
    assert!(img[4 << 20..5 << 20].iter().all(|&b| b == 0));
    assert!(img[8 << 20..9 << 20].iter().all(|&b| b == 0));
    assert_eq!(img[(5 << 20)..(5 << 20) + 4096], pattern(4, 5 << 20, 4096)[..]);
}

/// `discard=ignore`: discards succeed and change nothing, write-zeroes that allow unmapping
/// still allocate, and the image keeps every block; the default (`unmap`) frees them.
fn discard_ignore_keeps_the_image_allocated() {
    use std::os::unix::fs::MetadataExt;
    for (keys, frees) in [("", true), (",discard=ignore", false)] {
        // ext4: ZERO_RANGE allocates (tmpfs would punch a hole for the zeroes).
        let dir = common::disk_dir();
        let image = dir.path().join("disk.raw");
        let sock = dir.path().join("blk.sock");
        make_image(&image, IMAGE_BYTES, 6);
        let blocks_before = fs::metadata(&image).unwrap().blocks();
        let mut daemon = Daemon::start(dir.path(), &[export(&sock, &image, keys)]);
        {
            let mut c = Client::connect(&sock, 1);
            assert_eq!(c.discard(0, 4 << 20, 1 << 20), 0, "discard{keys}");
            let back = c.read_at(0, 4 << 20, 1 << 20, 0).unwrap();
            if frees {
                assert!(back.iter().all(|&b| b == 0), "discard{keys} read back");
            } else {
                assert!(back == pattern(6, 4 << 20, 1 << 20), "discard{keys} changed data");
            }
            assert_eq!(c.write_zeroes(0, 8 << 20, 1 << 20, ReqFlags::empty()), 0, "zeroes{keys}");
            assert!(c.read_at(0, 8 << 20, 1 << 20, 0).unwrap().iter().all(|&b| b == 0));
        }
        assert!(daemon.stop().success());
        let blocks_after = fs::metadata(&image).unwrap().blocks();
        if frees {
            // Two MiB freed: 4096 blocks of 512 bytes.
            assert_eq!(blocks_after, blocks_before - 4096, "default discard");
        } else {
            assert_eq!(blocks_after, blocks_before, "discard=ignore freed blocks");
        }
    }
}

fn out_of_range_io_fails_and_changes_nothing() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 5);
    let mut daemon = Daemon::start(dir.path(), &[export(&sock, &image, "")]);
    {
        let mut c = Client::connect(&sock, 1);
        assert_eq!(c.read_at(0, IMAGE_BYTES, 4096, 0), Err(EIO), "read at the end");
        assert_eq!(c.read_at(0, IMAGE_BYTES - 512, 1024, 0), Err(EIO), "read across the end");
        assert_eq!(c.read_at(0, u64::MAX - 511, 512, 0), Err(EIO), "read at 2^64 - 512");
        let data = pattern(9, 0, 8192);
        assert_eq!(c.write_at(0, IMAGE_BYTES - 4096, &data, 0), EIO, "write across the end");
        // The queue still works after the errors.
        assert!(
            c.read_at(0, IMAGE_BYTES - 4096, 4096, 0).unwrap()
                == pattern(5, IMAGE_BYTES - 4096, 4096)
        );
    }
    assert!(daemon.stop().success());
    let img = fs::read(&image).unwrap();
    assert_eq!(img.len() as u64, IMAGE_BYTES, "the image did not grow");
    assert_eq!(img[(IMAGE_BYTES - 4096) as usize..], pattern(5, IMAGE_BYTES - 4096, 4096)[..]);
}

fn readonly_export_is_read_only_to_the_client() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 6);
    let _daemon = Daemon::start(dir.path(), &[export(&sock, &image, ",readonly=on")]);
    // libblkio refuses to start a read-write client on a device that offers VIRTIO_BLK_F_RO.
    let err = Client::try_connect(&sock, 1, false).err().expect("read-write start refused");
    assert_eq!(err.errno().raw_os_error(), libc::EROFS, "{err}");
    let mut c = Client::try_connect(&sock, 1, true).expect("read-only client");
    assert!(c.read_at(0, 4096, 4096, 0).unwrap() == pattern(6, 4096, 4096));
    // Writes reaching the daemon are refused there too: see tests/hostile.rs.
}

fn disconnect_and_reconnect_keeps_data() {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, IMAGE_BYTES, 7);
    let mut daemon = Daemon::start(dir.path(), &[export(&sock, &image, ",queues=2")]);
    for round in 0..3u64 {
        let mut c = Client::connect(&sock, 2);
        if round > 0 {
            let prev = c.read_at(1, (round - 1) * (1 << 20), 65536, 0).unwrap();
            assert!(
                prev == pattern(200 + round - 1, (round - 1) * (1 << 20), 65536),
                "round {round}"
            );
        }
        let data = pattern(200 + round, round * (1 << 20), 65536);
        assert_eq!(c.write_at(0, round * (1 << 20), &data, 0), 0);
        // Dropping the client closes the socket mid-session, as a crashed VM would.
    }
    assert!(daemon.alive(), "daemon died across reconnects:\n{}", daemon.log());
    assert!(daemon.stop().success());
    let img = fs::read(&image).unwrap();
    for round in 0..3u64 {
        let at = (round * (1 << 20)) as usize;
        assert_eq!(img[at..at + 65536], pattern(200 + round, round * (1 << 20), 65536)[..]);
    }
}

fn null_engine_reads_zeroes_and_drops_writes() {
    let dir = tmpdir();
    let sock = dir.path().join("null.sock");
    let _daemon =
        Daemon::start(dir.path(), &[format!("socket={},engine=null,size=1G", sock.display())]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity(), 1 << 30);
    let data = pattern(1, 0, 65536);
    assert_eq!(c.write_at(0, 1 << 20, &data, 0), 0);
    assert!(c.read_at(0, 1 << 20, 65536, 65536).unwrap() == vec![0u8; 65536]);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read_at(0, 1 << 30, 512, 0), Err(EIO), "null export still has an end");
}

fn one_daemon_serves_several_exports() {
    let dir = tmpdir();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    make_image(&a, 16 << 20, 10);
    make_image(&b, 32 << 20, 11);
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _daemon =
        Daemon::start(dir.path(), &[export(&sa, &a, ""), export(&sb, &b, ",cache=writeback")]);
    let mut ca = Client::connect(&sa, 1);
    let mut cb = Client::connect(&sb, 1);
    assert_eq!(ca.capacity(), 16 << 20);
    assert_eq!(cb.capacity(), 32 << 20);
    assert!(ca.read_at(0, 0, 4096, 0).unwrap() == pattern(10, 0, 4096));
    assert!(cb.read_at(0, 0, 4096, 0).unwrap() == pattern(11, 0, 4096));
}

/// Every test above runs twice: with all queues of all exports on one shared I/O thread
/// (the shared loop at its most crowded), and with a thread of its own per queue.
macro_rules! on_both_thread_models {
    ($($name:ident),* $(,)?) => {
        mod one_shared_thread {
            $(#[test]
            fn $name() {
                super::common::on_threads(super::common::Threads::OneShared, super::$name)
            })*
        }
        mod dedicated_threads {
            $(#[test]
            fn $name() {
                super::common::on_threads(super::common::Threads::Dedicated, super::$name)
            })*
        }
    };
}

on_both_thread_models!(
    patterns_round_trip_cache_none,
    patterns_round_trip_cache_directsync,
    patterns_round_trip_cache_writeback,
    patterns_round_trip_cache_writethrough,
    patterns_round_trip_cache_unsafe,
    patterns_round_trip_threads_engine_cache_none,
    patterns_round_trip_threads_engine_cache_writeback,
    patterns_round_trip_native_engine_cache_none,
    patterns_round_trip_native_engine_cache_directsync,
    several_queues_from_several_threads,
    many_requests_in_flight_at_once,
    discard_and_write_zeroes_read_back_zeroes_io_uring,
    discard_and_write_zeroes_read_back_zeroes_threads,
    discard_and_write_zeroes_read_back_zeroes_native,
    discard_ignore_keeps_the_image_allocated,
    out_of_range_io_fails_and_changes_nothing,
    readonly_export_is_read_only_to_the_client,
    disconnect_and_reconnect_keeps_data,
    null_engine_reads_zeroes_and_drops_writes,
    one_daemon_serves_several_exports,
);

/// The tests that do not name a file engine, again with the image behind network backends:
/// the same checks of the same file, through blkplane's NBD engine and a real server (qemu-nbd,
/// nbdkit), and through its RBD engine and the test command's Ceph cluster.
macro_rules! behind_network_backends {
    ($($name:ident),* $(,)?) => {
        mod behind_qemu_nbd {
            use super::common::{behind, nbd::Server};
            $(#[test]
            fn $name() {
                behind::on(behind::Behind::Nbd(Server::QemuNbd), super::$name)
            })*
        }
        mod behind_nbdkit {
            use super::common::{behind, nbd::Server};
            $(#[test]
            fn $name() {
                behind::on(behind::Behind::Nbd(Server::Nbdkit), super::$name)
            })*
        }
        mod behind_rbd {
            use super::common::behind;
            $(#[test]
            fn $name() {
                behind::on(behind::Behind::Rbd, super::$name)
            })*
        }
    };
}

behind_network_backends!(
    patterns_round_trip_cache_none,
    patterns_round_trip_cache_directsync,
    patterns_round_trip_cache_writeback,
    patterns_round_trip_cache_writethrough,
    patterns_round_trip_cache_unsafe,
    several_queues_from_several_threads,
    many_requests_in_flight_at_once,
    discard_and_write_zeroes_read_back_zeroes_io_uring,
    out_of_range_io_fails_and_changes_nothing,
    readonly_export_is_read_only_to_the_client,
    disconnect_and_reconnect_keeps_data,
    one_daemon_serves_several_exports,
);
