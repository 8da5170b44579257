//! A daemon killed with SIGKILL in the middle of a write-heavy run loses nothing that was
//! acknowledged before the last acknowledged FLUSH: after a restart, every such write reads
//! back intact.

mod common;

use blkio::ReqFlags;
use common::{make_image, pattern, tmpdir, Client, Daemon};

const BLOCK: usize = 64 << 10;
const BATCH: usize = 8;

fn sigkill_mid_run(cache: &str) {
    let dir = tmpdir();
    let image = dir.path().join("disk.raw");
    let sock = dir.path().join("blk.sock");
    make_image(&image, 64 << 20, 3);
    let spec = format!("socket={},image={},cache={cache}", sock.display(), image.display());
    let mut daemon = Daemon::start(dir.path(), std::slice::from_ref(&spec));
    let mut c = Client::connect(&sock, 1);
    let mut durable: Vec<u64> = Vec::new();
    let mut since_flush: Vec<u64> = Vec::new();
    let mut next_block = 0u64;
    let submit_batch = |c: &mut Client, next_block: &mut u64| -> Vec<u64> {
        let mut blocks = Vec::with_capacity(BATCH);
        for slot in 0..BATCH {
            let block = *next_block;
            *next_block += 1;
            let data = pattern(1000 + block, block * BLOCK as u64, BLOCK);
            c.buf_slice(slot * BLOCK, BLOCK).copy_from_slice(&data);
            let ptr = c.buf_ptr(slot * BLOCK);
            c.queues[0].write(block * BLOCK as u64, ptr, BLOCK, slot, ReqFlags::empty());
            blocks.push(block);
        }
        blocks
    };
    for round in 0..24 {
        let blocks = submit_batch(&mut c, &mut next_block);
        for _ in 0..BATCH {
            assert_eq!(c.wait_one(0), 0, "write in round {round}");
        }
        since_flush.extend(blocks);
        if round % 4 == 3 {
            assert_eq!(c.flush(0), 0, "flush in round {round}");
            durable.append(&mut since_flush);
        }
    }
    // A batch is in flight when the daemon dies.
    submit_batch(&mut c, &mut next_block);
    c.queues[0].do_io(&mut [], 0, None, None).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGKILL) };
    let status = daemon.stop_after_signal();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    drop(c);

    let _again = Daemon::start(dir.path(), std::slice::from_ref(&spec));
    let mut c = Client::connect(&sock, 1);
    assert!(durable.len() >= 5 * BATCH, "too few flushed writes to prove anything");
    for block in &durable {
        let back = c.read_at(0, block * BLOCK as u64, BLOCK, 0).unwrap();
        assert!(
            back == pattern(1000 + block, block * BLOCK as u64, BLOCK),
            "block {block} lost (cache={cache})"
        );
    }
}

#[test]
fn sigkill_loses_no_flushed_write_cache_none() {
    sigkill_mid_run("none");
}

#[test]
fn sigkill_loses_no_flushed_write_cache_writeback() {
    sigkill_mid_run("writeback");
}
