//! Datasets: the built-in synthetic one (with its simple augmentation, `augment`), and real images:
//! ImageFolder (`folder`) or packed files (`pack`), decoded by `decode`, opened as one `source`;
//! LEWEL's exact two-view augmentation (`transforms`, on PIL's arithmetic in `pil`); the training
//! `loader`; `show` draws what the model sees.

pub mod augment;
pub mod decode;
pub mod folder;
pub mod loader;
pub mod pack;
pub mod photometric_cuda;
pub mod pil;
pub mod pinned;
pub mod show;
pub mod source;
pub mod synthetic;
pub mod transforms;
pub mod turbo;

/// ImageNet normalization (torchvision's Normalize constants), RGB.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Opens a labeled image set for the loader: an ImageFolder root or a packed file.
pub fn open_samples(path: &std::path::Path) -> crate::Result<std::sync::Arc<dyn loader::Samples>> {
    Ok(std::sync::Arc::new(source::Source::open(path)?))
}

impl loader::Samples for source::Source {
    fn len(&self) -> usize {
        source::Source::len(self)
    }
    fn label(&self, i: usize) -> usize {
        source::Source::label(self, i)
    }
    fn classes(&self) -> usize {
        self.class_names().len()
    }
    fn class_names(&self) -> Option<Vec<String>> {
        Some(source::Source::class_names(self).to_vec())
    }
    fn decode(&self, i: usize) -> std::result::Result<pil::Rgb8, String> {
        source::Source::decode(self, i).map_err(|e| e.to_string())
    }
    fn file_name(&self, i: usize) -> Option<String> {
        match self.id(i) {
            source::SampleId::File(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            source::SampleId::Packed { .. } => None,
        }
    }
}

/// The val/ folder beside a data root's train/ folder, when there is one.
pub fn sibling_val(data: &std::path::Path) -> Option<std::path::PathBuf> {
    let root = if data.file_name().is_some_and(|n| n == "train") {
        data.parent()?.to_path_buf()
    } else {
        data.to_path_buf()
    };
    let val = root.join("val");
    (root.join("train").is_dir() && val.is_dir()).then_some(val)
}
