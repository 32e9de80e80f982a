//! ImageFolder with torchvision's rules (`torchvision.datasets.ImageFolder`, `make_dataset`):
//! - classes: the sub-folders of the root (symlinks to folders count), sorted; label = index in that order;
//! - samples: per class in label order, `sorted(os.walk(class_dir, followlinks=True))` (every folder
//!   below the class, ordered by its whole path string, so `a/sub-2` comes before `a/sub/deeper`),
//!   then the file names of each folder sorted;
//! - a file counts when its name ends, case-insensitively, with one of IMG_EXTENSIONS; others are
//!   ignored. A class without any image is an error, as in torchvision.
//!
//! Sorting is by the bytes of the names, which is Python's order on str for UTF-8 names. Unlike
//! Python, a folder reached twice through a symlink cycle is walked once instead of until the
//! recursion limit. Unreadable sub-folders are skipped silently, as os.walk does.

use crate::{Error, Result};
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// torchvision's IMG_EXTENSIONS.
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

const LAYOUT: &str = "expected an ImageFolder root (<root>/<class>/<image>.JPEG) or a folder whose train/ holds the class folders";

/// An ImageFolder: class names (label = index) and every sample with its label, in torchvision's order.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// The folder the classes were found in: the given root or its train/.
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub samples: Vec<(PathBuf, usize)>,
}

/// Whether the name ends with one of IMG_EXTENSIONS, case-insensitively (`str.lower().endswith`).
pub fn has_image_extension(name: &std::ffi::OsStr) -> bool {
    let b = name.as_encoded_bytes();
    IMG_EXTENSIONS
        .iter()
        .any(|e| b.len() >= e.len() && b[b.len() - e.len()..].eq_ignore_ascii_case(e.as_bytes()))
}

/// Python's `DirEntry.is_dir()`: follows symlinks, false when the target is missing.
fn is_dir_follow(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_dir())
}

/// Sorted names of the entries of `dir`, split into (folders, other entries).
fn list_sorted(dir: &Path) -> std::io::Result<(Vec<OsString>, Vec<OsString>)> {
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        // as DirEntry.is_dir(): the entry's type from the listing, a stat only for symlinks
        let ft = e.file_type()?;
        let is_dir = if ft.is_symlink() {
            is_dir_follow(&dir.join(&name))
        } else {
            ft.is_dir()
        };
        if is_dir {
            dirs.push(name);
        } else {
            files.push(name);
        }
    }
    dirs.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    files.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    Ok((dirs, files))
}

/// `sorted(os.walk(top, followlinks=True))`: (folder, its sorted file names), by folder path.
fn walk_sorted(top: &Path) -> Vec<(PathBuf, Vec<OsString>)> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        // os.walk ignores folders it cannot list; we also stop at a folder already walked (cycles)
        if let Ok(c) = std::fs::canonicalize(&d) {
            if !seen.insert(c) {
                continue;
            }
        }
        let Ok((dirs, files)) = list_sorted(&d) else {
            continue;
        };
        stack.extend(dirs.iter().map(|n| d.join(n)));
        out.push((d, files));
    }
    out.sort_by(|a, b| {
        a.0.as_os_str()
            .as_encoded_bytes()
            .cmp(b.0.as_os_str().as_encoded_bytes())
    });
    out
}

impl ImageFolder {
    /// Opens a dataset folder: its train/ sub-folder when that exists and holds class folders, else
    /// the folder itself when it holds class folders. Every failure is one line naming the folder.
    pub fn open(path: &Path) -> Result<ImageFolder> {
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::user(format!("{}: no such folder; {LAYOUT}", path.display()))
            } else {
                Error::io(path, e)
            }
        })?;
        if !meta.is_dir() {
            return Err(Error::user(format!(
                "{}: not a folder; {LAYOUT}",
                path.display()
            )));
        }
        let train = path.join("train");
        if is_dir_follow(&train) {
            let (dirs, _) = list_sorted(&train).map_err(|e| Error::io(&train, e))?;
            if dirs.is_empty() {
                return Err(Error::user(format!(
                    "{}: holds no class folders; {LAYOUT}",
                    train.display()
                )));
            }
            return ImageFolder::scan(&train);
        }
        ImageFolder::scan(path)
    }

    /// torchvision's `ImageFolder(root)` exactly: the class folders are the sub-folders of `root`.
    pub fn scan(root: &Path) -> Result<ImageFolder> {
        let (dirs, files) = list_sorted(root).map_err(|e| Error::io(root, e))?;
        if dirs.is_empty() {
            let what = if files.is_empty() {
                "empty folder".to_string()
            } else {
                format!("no class folders ({} files, no sub-folders)", files.len())
            };
            return Err(Error::user(format!("{}: {what}; {LAYOUT}", root.display())));
        }
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (label, class) in dirs.iter().enumerate() {
            let before = samples.len();
            for (folder, names) in walk_sorted(&root.join(class)) {
                samples.extend(
                    names
                        .iter()
                        .filter(|n| has_image_extension(n))
                        .map(|n| (folder.join(n), label)),
                );
            }
            if samples.len() == before {
                empty.push(class.to_string_lossy().into_owned());
            }
        }
        if !empty.is_empty() {
            let n = empty.len();
            let list = if n > 10 {
                format!("{} and {} more", empty[..10].join(", "), n - 10)
            } else {
                empty.join(", ")
            };
            return Err(Error::user(format!(
                "{}: found no image in the class folder{} {list} (image files end with one of {})",
                root.display(),
                if n > 1 { "s" } else { "" },
                IMG_EXTENSIONS.join(" ")
            )));
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes: dirs
                .iter()
                .map(|d| d.to_string_lossy().into_owned())
                .collect(),
            samples,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn label(&self, i: usize) -> usize {
        self.samples[i].1
    }

    pub fn path(&self, i: usize) -> &Path {
        &self.samples[i].0
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh folder under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("lewel-test-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        /// Writes `bytes` at `rel`, creating folders.
        pub(crate) fn file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rel(f: &ImageFolder) -> Vec<(String, usize)> {
        f.samples
            .iter()
            .map(|(p, l)| {
                let r = p.strip_prefix(&f.root).unwrap();
                (r.to_string_lossy().replace('\\', "/"), *l)
            })
            .collect()
    }

    /// Order and labels as torchvision 0.2x gives them for this tree (checked once with
    /// `torchvision.datasets.ImageFolder(root).samples`): classes by byte order (B < a < a_b < b),
    /// folders by their whole path (sub < sub-2 < sub/deeper: '-' sorts before '/'), a symlinked folder
    /// walked, unknown extensions ignored, extensions matched case-insensitively.
    #[test]
    fn torchvision_order_and_labels() {
        let t = TempDir::new("folder");
        for f in [
            "train/b/img1.jpg",
            "train/a/2.png",
            "train/a/10.jpg",
            "train/a/x.txt",
            "train/a/Z.TIFF",
            "train/a/sub/3.jpeg",
            "train/a/sub-2/4.JPEG",
            "train/a/sub/deeper/5.bmp",
            "train/a/sub/deeper/noext",
            "train/B/q.webp",
            "train/a_b/c.pgm",
            "train/a_b/d.Ppm",
            "val/zzz/1.jpg",
            "readme.txt",
        ] {
            t.file(f, b"x");
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink("../b", t.0.join("train/a/link")).unwrap();
        let f = ImageFolder::open(&t.0).unwrap();
        assert_eq!(f.root, t.0.join("train"));
        assert_eq!(f.classes, ["B", "a", "a_b", "b"]);
        let mut want = vec![
            ("B/q.webp", 0),
            ("a/10.jpg", 1),
            ("a/2.png", 1),
            ("a/Z.TIFF", 1),
        ];
        if cfg!(unix) {
            want.push(("a/link/img1.jpg", 1));
        }
        want.extend([
            ("a/sub/3.jpeg", 1),
            ("a/sub-2/4.JPEG", 1),
            ("a/sub/deeper/5.bmp", 1),
            ("a_b/c.pgm", 2),
            ("a_b/d.Ppm", 2),
            ("b/img1.jpg", 3),
        ]);
        let want: Vec<(String, usize)> = want.into_iter().map(|(p, l)| (p.into(), l)).collect();
        assert_eq!(rel(&f), want);
        assert_eq!(
            (f.len(), f.label(9), f.path(0)),
            (want.len(), 2, &*t.0.join("train/B/q.webp"))
        );

        // without train/: the root's own sub-folders are the classes
        let g = ImageFolder::open(&t.0.join("train")).unwrap();
        assert_eq!(rel(&g), want);
        // train/ present but holding no class folder: an error naming train/, not classes "train", "val"
        let u = TempDir::new("folder-train-empty");
        u.file("train/readme.txt", b"x");
        u.file("val/c/1.jpg", b"x");
        let e = ImageFolder::open(&u.0).unwrap_err();
        assert!(
            e.to_string().contains("train: holds no class folders"),
            "{e}"
        );
    }

    #[test]
    fn bad_folders_are_one_line_user_errors() {
        let t = TempDir::new("folder-bad");
        let msg = |p: &Path| {
            let e = ImageFolder::open(p).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
            assert!(e.to_string().contains(&*p.display().to_string()), "{e}");
            e.to_string()
        };
        assert!(msg(&t.0.join("missing")).contains("no such folder"));
        assert!(msg(&t.0).contains("empty folder"));
        let file = t.file("loose/1.jpg", b"x");
        assert!(msg(&t.0.join("loose")).contains("no class folders (1 files"));
        assert!(msg(&file).contains("not a folder"));
        t.file("classes/a/1.jpg", b"x");
        t.file("classes/b/notes.txt", b"x");
        t.file("classes/c/x.csv", b"x");
        let m = msg(&t.0.join("classes"));
        assert!(m.contains("no image in the class folders b, c"), "{m}");
    }

    #[test]
    fn extensions() {
        for (n, ok) in [
            ("a.JPEG", true),
            ("a.jpg", true),
            ("a.JpG", true),
            ("a.webp", true),
            ("a.tiff", true),
            ("jpeg", false),
            ("a.jpeg.txt", false),
            ("a.gif", false),
            ("a.", false),
        ] {
            assert_eq!(has_image_extension(std::ffi::OsStr::new(n)), ok, "{n}");
        }
    }
}
