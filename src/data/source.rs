//! A labeled image dataset on disk, as the loader sees it: an ImageFolder or a packed file.
//! `read(i)` gives the encoded bytes (a slice of the map for a packed file, checked against its CRC),
//! `decode(i)` the RGB image. A sample that cannot be read or decoded is a `SampleError` naming the
//! file or the pack index and the reason, so that a caller can skip it and report it once.

use crate::data::decode::{self, RgbImage};
use crate::data::folder::ImageFolder;
use crate::data::pack::{self, Packed};
use crate::{Error, Result};
use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a sample lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SampleId {
    File(PathBuf),
    Packed { file: PathBuf, index: usize },
}

/// A sample that could not be read or decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampleError {
    pub sample: SampleId,
    pub reason: String,
}

impl fmt::Display for SampleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sample {
            SampleId::File(p) => write!(f, "{}: {}", p.display(), self.reason),
            SampleId::Packed { file, index } => {
                write!(f, "{} sample {index}: {}", file.display(), self.reason)
            }
        }
    }
}

impl std::error::Error for SampleError {}

#[derive(Debug)]
pub enum Source {
    Folder(ImageFolder),
    Packed(Packed),
}

impl Source {
    /// Opens a folder as an ImageFolder (its train/ when that holds the classes) or a file as a
    /// packed file (told by its magic bytes).
    pub fn open(path: &Path) -> Result<Source> {
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::user(format!(
                    "{}: no such file or folder; expected an ImageFolder root (<root>/<class>/<image>.JPEG) or a file made by `lewel pack`",
                    path.display()
                ))
            } else {
                Error::io(path, e)
            }
        })?;
        if meta.is_dir() {
            return Ok(Source::Folder(ImageFolder::open(path)?));
        }
        if !pack::has_magic(path) {
            return Err(Error::user(format!(
                "{}: neither a folder nor a lewel packed file (no \"LEWELPAK\" magic); expected an ImageFolder root or a file made by `lewel pack`",
                path.display()
            )));
        }
        Ok(Source::Packed(Packed::open(path)?))
    }

    pub fn len(&self) -> usize {
        match self {
            Source::Folder(f) => f.len(),
            Source::Packed(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn label(&self, i: usize) -> usize {
        match self {
            Source::Folder(f) => f.label(i),
            Source::Packed(p) => p.label(i),
        }
    }

    pub fn class_names(&self) -> &[String] {
        match self {
            Source::Folder(f) => &f.classes,
            Source::Packed(p) => p.classes(),
        }
    }

    /// One line for logs: kind, path, classes, images.
    pub fn describe(&self) -> String {
        let (kind, path) = match self {
            Source::Folder(f) => ("ImageFolder", f.root.as_path()),
            Source::Packed(p) => ("packed", p.path()),
        };
        format!(
            "{kind} {} | {} classes, {} images",
            path.display(),
            self.class_names().len(),
            self.len()
        )
    }

    pub fn id(&self, i: usize) -> SampleId {
        match self {
            Source::Folder(f) => SampleId::File(f.path(i).to_path_buf()),
            Source::Packed(p) => SampleId::Packed {
                file: p.path().to_path_buf(),
                index: i,
            },
        }
    }

    /// The encoded bytes of sample i: borrowed from the map for a packed file (after its CRC check),
    /// read from disk for a folder.
    pub fn read(&self, i: usize) -> std::result::Result<Cow<'_, [u8]>, SampleError> {
        let fail = |reason: String| SampleError {
            sample: self.id(i),
            reason,
        };
        match self {
            Source::Folder(f) => std::fs::read(f.path(i))
                .map(Cow::Owned)
                .map_err(|e| fail(format!("cannot read: {e}"))),
            Source::Packed(p) => p.checked_bytes(i).map(Cow::Borrowed).map_err(fail),
        }
    }

    /// Sample i decoded to RGB.
    pub fn decode(&self, i: usize) -> std::result::Result<RgbImage, SampleError> {
        let b = self.read(i)?;
        decode::decode(&b).map_err(|e| SampleError {
            sample: self.id(i),
            reason: e.0,
        })
    }
}
