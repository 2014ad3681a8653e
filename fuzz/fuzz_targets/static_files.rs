//! Hostile request targets and Range / If-Modified-Since / If-Range values
//! through the static-file core: never a panic, a resolved file is always
//! inside the root, and every planned body lies inside the file with a
//! head that parses back to the same length.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use ktern::proxy::http::files::{self, Resolved};
use ktern::proxy::http::head::{parse_response, Persist};
use libfuzzer_sys::fuzz_target;

fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ktern-fuzz-static-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("www/sub")).unwrap();
        std::fs::write(dir.join("www/a.txt"), b"hello").unwrap();
        std::fs::write(dir.join("www/sub/index.html"), b"<p>").unwrap();
        std::fs::write(dir.join("outside"), b"secret").unwrap();
        let _ = std::os::unix::fs::symlink(dir.join("outside"), dir.join("www/link"));
        std::fs::canonicalize(dir.join("www")).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xff);
    let target = String::from_utf8_lossy(parts.next().unwrap_or_default());
    if let Ok(Resolved::File { path, .. }) = files::resolve(root(), &target) {
        assert!(path.starts_with(root()), "{target:?} escaped to {path:?}");
    }
    let range = parts.next();
    let ims = parts.next();
    let if_range = parts.next();
    let len = parts
        .next()
        .map_or(1000, |b| b.iter().fold(0u64, |a, &x| a.wrapping_mul(31) ^ u64::from(x)) % 100_000);
    let modified = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for method in ["GET", "HEAD"] {
        let plan = files::plan(method, ims, range, if_range, len, modified);
        if let Some((off, count)) = files::body_range(&plan, len) {
            assert!(off.checked_add(count).is_some_and(|end| end <= len));
        }
        let head = files::response_head(&plan, len, modified, "text/plain", Persist::Keep, &[]);
        let resp = parse_response(&head, method, 64 << 10)
            .expect("our own head parses")
            .expect("complete");
        assert_eq!(resp.len, head.len());
    }
});
