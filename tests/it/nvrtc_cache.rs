//! The NVRTC disk cache, each case in a directory of its own (the process cache and the
//! environment are shared by every test thread, so neither is used here).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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

/// The first compile, into an empty dir: NVRTC takes tens of seconds for xent.cu on a
/// small machine, so the tests share it and each starts from a copy of its entry.
struct Seed {
    image: Vec<u8>,
    entry: Vec<u8>,
    file_name: std::ffi::OsString,
}

fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let dir = TempDir::new("seed");
        let miss = compile_in(&dir.0, "sm_90");
        assert_eq!(
            miss.cache,
            CacheOutcome::Miss,
            "first compile into an empty dir"
        );
        assert!(!miss.image.is_empty(), "empty image");
        let path = only_entry(&dir.0);
        eprintln!(
            "{} sm_90 miss: {:.1} ms ({} bytes)",
            SOURCE.name(),
            miss.millis,
            miss.image.len()
        );
        Seed {
            image: miss.image,
            entry: read(&path),
            file_name: path.file_name().unwrap_or_default().to_owned(),
        }
    })
}

#[test]
fn nvrtc_cache_misses_into_an_empty_dir_then_hits_with_the_same_image() {
    if !nvrtc_present() {
        return;
    }
    let seed = seed();
    let dir = TempDir::new("hit");
    let path = dir.0.join(&seed.file_name);
    write(&path, &seed.entry);
    let hit = compile_in(&dir.0, "sm_90");
    assert_eq!(hit.cache, CacheOutcome::Hit);
    assert!(hit.image == seed.image, "the hit's image differs");
    assert_eq!(only_entry(&dir.0), path);
    assert_eq!(read(&path), seed.entry, "a hit rewrote the entry");
    eprintln!("{} sm_90 hit: {:.1} ms", SOURCE.name(), hit.millis);
}

/// Puts the seed's entry, spoiled by `spoil`, in a fresh dir and checks that the next
/// compile rejects it: recompiled to the seed's image (NVRTC is deterministic) and the
/// entry rewritten to the seed's, so the compile after that hits.
fn check_spoiled_entry_is_recompiled(case: &str, spoil: impl FnOnce(&mut Vec<u8>)) {
    let seed = seed();
    let dir = TempDir::new(case);
    let path = dir.0.join(&seed.file_name);
    let mut spoiled = seed.entry.clone();
    spoil(&mut spoiled);
    assert_ne!(spoiled, seed.entry, "{case}: the entry was not spoiled");
    write(&path, &spoiled);

    let again = compile_in(&dir.0, "sm_90");
    assert_eq!(
        again.cache,
        CacheOutcome::Miss,
        "{case}: a spoiled entry was used"
    );
    assert!(
        again.image == seed.image,
        "{case}: the recompiled image differs"
    );
    assert_eq!(only_entry(&dir.0), path, "{case}");
    assert_eq!(
        read(&path),
        seed.entry,
        "{case}: the entry was not rewritten"
    );
    let hit = compile_in(&dir.0, "sm_90");
    assert_eq!(hit.cache, CacheOutcome::Hit, "{case}");
    assert!(hit.image == seed.image, "{case}: the hit's image differs");
}

#[test]
fn nvrtc_cache_recompiles_an_entry_with_a_flipped_payload_byte() {
    if !nvrtc_present() {
        return;
    }
    check_spoiled_entry_is_recompiled("flipped", |entry| {
        // The last byte is the image's (the header comes first).
        if let Some(last) = entry.last_mut() {
            *last ^= 0x01;
        }
    });
}

#[test]
fn nvrtc_cache_recompiles_a_truncated_entry() {
    if !nvrtc_present() {
        return;
    }
    check_spoiled_entry_is_recompiled("truncated", |entry| entry.truncate(entry.len() / 2));
}

#[test]
fn nvrtc_cache_recompiles_an_entry_holding_another_key() {
    if !nvrtc_present() {
        return;
    }
    // The header starts with the magic (8 bytes) and the format (4), then the 16-byte
    // key; the checksum covers only the payload, so this entry is whole but another's.
    const KEY_AT: usize = 12;
    check_spoiled_entry_is_recompiled("other-key", |entry| entry[KEY_AT] ^= 0x01);
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
    let compiled = compile_in(&file.join("cache"), "sm_90");
    assert_eq!(compiled.cache, CacheOutcome::Disabled);
    assert!(compiled.image == seed().image, "the uncached image differs");
    assert_eq!(files(&dir.0), vec![file]);
}
