//! A bootstrap as the daemon receives it: `Bootstrap::parse` (superblock,
//! index section, device table against blob table), the full validator,
//! then a walk reading every inode, xattr, inline or plain data block and
//! chunk index. Nothing panics, and nothing the validator accepts makes
//! the reader fail.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(boot) = kite_format::Bootstrap::parse(data) else {
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
