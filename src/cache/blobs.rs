//! Content-addressed files: `<cache-dir>/blobs/<algo>/<first 2 hex>/<hex>`.
//!
//! Invariant: a file exists under `blobs/` only after its bytes were verified against its digest
//! and fsynced; it is written under `tmp/` first and renamed into place. `tmp/` is cleared at
//! start-up, so a crash mid-fill leaves nothing behind that could be served.
//! Every function here does blocking I/O: call it from `spawn_blocking`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::route::Digest;

pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// Creates the directories and removes whatever a previous run left in `tmp/`.
    pub fn open(cache_dir: &Path) -> io::Result<BlobStore> {
        let store = BlobStore {
            blobs: cache_dir.join("blobs"),
            tmp: cache_dir.join("tmp"),
        };
        fs::create_dir_all(&store.blobs)?;
        fs::create_dir_all(&store.tmp)?;
        let mut cleared = 0;
        for entry in fs::read_dir(&store.tmp)? {
            let path = entry?.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => cleared += 1,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover temp file")
                }
            }
        }
        if cleared > 0 {
            tracing::info!(files = cleared, "removed unfinished downloads from tmp/");
        }
        Ok(store)
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(digest.algorithm())
            .join(&hex[..2])
            .join(hex)
    }

    /// A fresh, unique temp file path.
    pub fn temp_path(&self, digest: &Digest) -> PathBuf {
        let nonce: u64 = rand::random();
        self.tmp.join(format!(
            "{}-{}-{nonce:016x}",
            digest.algorithm(),
            digest.hex()
        ))
    }

    /// Makes a verified temp file durable and visible under its digest.
    pub fn commit(&self, tmp: &Path, file: &fs::File, digest: &Digest) -> io::Result<()> {
        file.sync_all()?;
        let dest = self.path(digest);
        let dir = dest
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        fs::create_dir_all(dir)?;
        fs::rename(tmp, &dest)?;
        // The rename is durable only once the directory entry is.
        fs::File::open(dir)?.sync_all()
    }

    pub fn remove(&self, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every stored blob: digest and size. Files whose names are not valid digests (or sit in
    /// the wrong fan-out directory) are ignored and reported.
    pub fn scan(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut found = Vec::new();
        for algo in read_dir_names(&self.blobs)? {
            for fan in read_dir_names(&self.blobs.join(&algo))? {
                let dir = self.blobs.join(&algo).join(&fan);
                for name in read_dir_names(&dir)? {
                    let digest = Digest::parse(&format!("{algo}:{name}"));
                    match digest {
                        Some(d) if d.hex().starts_with(&fan) => {
                            let len = fs::metadata(dir.join(&name))?.len();
                            found.push((d, len));
                        }
                        _ => {
                            tracing::warn!(file = %dir.join(&name).display(), "ignoring a stray file in blobs/")
                        }
                    }
                }
            }
        }
        Ok(found)
    }
}

fn read_dir_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_commit_and_scan() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        assert!(store
            .path(&d)
            .ends_with(format!("blobs/sha256/ab/{}", "ab".repeat(32))));
        let tmp = store.temp_path(&d);
        fs::write(&tmp, b"hello").unwrap();
        let f = fs::File::open(&tmp).unwrap();
        store.commit(&tmp, &f, &d).unwrap();
        assert!(!tmp.exists());
        assert_eq!(store.scan().unwrap(), vec![(d.clone(), 5)]);
        store.remove(&d).unwrap();
        assert!(store.scan().unwrap().is_empty());
    }

    #[test]
    fn open_clears_tmp() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp/leftover"), b"partial").unwrap();
        BlobStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
