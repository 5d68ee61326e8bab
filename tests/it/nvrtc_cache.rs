//! The NVRTC disk cache, each case in a directory of its own (the process cache and the
//! environment are shared by every test thread, so neither is used here).

use std::path::{Path, PathBuf};

use losskern::cuda::{compile_cached_in, CacheOutcome, CachedImage, KernelSource};

const SOURCE: KernelSource = KernelSource::Xent;

/// Whether libnvrtc loads; a failure under LOSSKERN_REQUIRE_NVRTC=1.
fn nvrtc_present() -> bool {
    match losskern::cuda::nvrtc_version() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                !std::env::var("LOSSKERN_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
                "LOSSKERN_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded: {e}"
            );
            eprintln!("skipping the NVRTC cache test: {e}");
            false
        }
    }
}

/// An empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(case: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "losskern-nvrtc-cache-{}-{case}",
            std::process::id()
        ));
        // Left over only by a killed run of this same pid; stale either way.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn compile_in(dir: &Path, arch: &str) -> CachedImage {
    compile_cached_in(Some(dir), SOURCE, arch).unwrap_or_else(|e| panic!("{e}"))
}

/// The files in `dir`, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap_or_else(|e| panic!("{e}")).path())
        .collect();
    files.sort();
    files
}

/// The one entry in `dir` (no temp file left beside it).
fn only_entry(dir: &Path) -> PathBuf {
    let files = files(dir);
    assert_eq!(
        files.len(),
        1,
        "expected one entry in {}: {files:?}",
        dir.display()
    );
    let name = files[0].file_name().unwrap_or_default().to_string_lossy();
    assert!(
        name.starts_with("nvrtc-") && name.ends_with(".bin"),
        "unexpected entry {name}"
    );
    files[0].clone()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
fn nvrtc_cache_misses_into_an_empty_dir_then_hits_with_the_same_image() {
    if !nvrtc_present() {
        return;
    }
    for arch in ["sm_90", "compute_90"] {
        let dir = TempDir::new(&format!("hit-{arch}"));
        let miss = compile_in(&dir.0, arch);
        assert_eq!(miss.cache, CacheOutcome::Miss, "{arch}");
        assert!(!miss.image.is_empty(), "{arch}: empty image");
        let entry = read(&only_entry(&dir.0));
        let hit = compile_in(&dir.0, arch);
        assert_eq!(hit.cache, CacheOutcome::Hit, "{arch}");
        assert!(hit.image == miss.image, "{arch}: the hit's image differs");
        assert_eq!(
            read(&only_entry(&dir.0)),
            entry,
            "{arch}: a hit rewrote the entry"
        );
        eprintln!(
            "{} {arch}: miss {:.1} ms, hit {:.1} ms ({} bytes)",
            SOURCE.name(),
            miss.millis,
            hit.millis,
            hit.image.len()
        );
    }
}

/// Compiles into a fresh dir, spoils its entry with `spoil` (given the entry and its
/// path), and checks that the next compile rejects it: recompiled to the same image and
/// the entry rewritten to what it was, so the compile after that hits. Returns the image.
fn check_spoiled_entry_is_recompiled(case: &str, spoil: impl FnOnce(&Path, &[u8])) -> Vec<u8> {
    let dir = TempDir::new(case);
    let first = compile_in(&dir.0, "sm_90");
    assert_eq!(first.cache, CacheOutcome::Miss, "{case}");
    let path = only_entry(&dir.0);
    let entry = read(&path);
    spoil(&path, &entry);
    assert_ne!(read(&path), entry, "{case}: the entry was not spoiled");

    let again = compile_in(&dir.0, "sm_90");
    assert_eq!(
        again.cache,
        CacheOutcome::Miss,
        "{case}: a spoiled entry was used"
    );
    assert!(
        again.image == first.image,
        "{case}: the recompiled image differs"
    );
    assert_eq!(only_entry(&dir.0), path, "{case}");
    assert_eq!(read(&path), entry, "{case}: the entry was not rewritten");
    let hit = compile_in(&dir.0, "sm_90");
    assert_eq!(hit.cache, CacheOutcome::Hit, "{case}");
    assert!(hit.image == first.image, "{case}: the hit's image differs");
    first.image
}

#[test]
fn nvrtc_cache_recompiles_an_entry_with_a_flipped_payload_byte() {
    if !nvrtc_present() {
        return;
    }
    check_spoiled_entry_is_recompiled("flipped", |path, entry| {
        let mut flipped = entry.to_vec();
        // The last byte is the image's (the header comes first).
        if let Some(last) = flipped.last_mut() {
            *last ^= 0x01;
        }
        write(path, &flipped);
    });
}

#[test]
fn nvrtc_cache_recompiles_a_truncated_entry() {
    if !nvrtc_present() {
        return;
    }
    check_spoiled_entry_is_recompiled("truncated", |path, entry| {
        write(path, &entry[..entry.len() / 2]);
    });
}

#[test]
fn nvrtc_cache_recompiles_an_entry_holding_another_key() {
    if !nvrtc_present() {
        return;
    }
    // A whole, checksummed entry for sm_80 put where the sm_90 entry belongs.
    let other_dir = TempDir::new("other-key-sm_80");
    let other = compile_in(&other_dir.0, "sm_80");
    assert_eq!(other.cache, CacheOutcome::Miss);
    let other_entry = read(&only_entry(&other_dir.0));
    let image = check_spoiled_entry_is_recompiled("other-key", |path, _| write(path, &other_entry));
    // Else taking the sm_80 entry would have gone unnoticed.
    assert!(
        image != other.image,
        "sm_80 and sm_90 compile to the same image"
    );
}

#[test]
fn nvrtc_cache_that_cannot_be_created_compiles_without_it() {
    if !nvrtc_present() {
        return;
    }
    let dir = TempDir::new("uncreatable");
    // A directory under a regular file cannot be created, even by root.
    let file = dir.0.join("file");
    write(&file, b"not a directory");
    let cache = file.join("cache");
    for dir in [Some(cache.as_path()), None] {
        let compiled = compile_cached_in(dir, SOURCE, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compiled.cache, CacheOutcome::Disabled, "{dir:?}");
        assert!(!compiled.image.is_empty(), "{dir:?}: empty image");
    }
    assert_eq!(files(&dir.0), vec![file]);
}
