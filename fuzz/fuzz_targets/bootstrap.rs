//! A bootstrap as the daemon receives it: `Bootstrap::parse` (superblock,
//! index section, device table against blob table), the full validator,
//! then a walk reading every inode, xattr, inline or plain data block and
//! chunk index. Nothing panics, and nothing the validator accepts makes
//! the reader fail. Checksums are recomputed over the input first.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = seal(data);
    let Ok(boot) = kite_format::Bootstrap::parse(&data) else {
        return;
    };
    let valid = boot.validate().is_ok();
    let img = &boot.erofs;
    let walked = img.walk(&mut |_path, inode| {
        img.xattrs(inode)?;
        if inode.chunk_bits().is_some() {
            img.chunk_indexes(inode)?;
        } else if inode.is_reg() || inode.is_symlink() || inode.is_dir() {
            img.flat_data(inode)?;
        }
        Ok(())
    });
    if valid {
        walked.expect("a bootstrap the validator accepts walks without error");
    }
});

/// The input with its checksums made right (the superblock's crc32c and
/// the index section's size and sha256), so mutations reach the structures
/// behind them; the checksums themselves are covered by unit tests.
fn seal(data: &[u8]) -> Vec<u8> {
    use kite_erofs::ondisk::{superblock_checksum, BLOCK_SIZE, SUPER_OFFSET};
    let mut d = data.to_vec();
    if d.len() < BLOCK_SIZE {
        return d;
    }
    let sum = superblock_checksum(&d[SUPER_OFFSET..BLOCK_SIZE]);
    d[SUPER_OFFSET + 4..SUPER_OFFSET + 8].copy_from_slice(&sum.to_le_bytes());
    let blocks = u32::from_le_bytes([d[1060], d[1061], d[1062], d[1063]]) as usize;
    if let Some(index) = blocks
        .checked_mul(BLOCK_SIZE)
        .and_then(|at| d.get_mut(at..))
    {
        if index.len() >= kite_format::index::HEADER_SIZE {
            let len = index.len() as u64;
            index[48..56].copy_from_slice(&len.to_le_bytes());
            kite_format::index::seal_index(index);
        }
    }
    d
}
