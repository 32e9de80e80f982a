//! What several test files share.

use std::path::{Path, PathBuf};

/// Noise JPEGs, 40x32: `dir/<class>/img<i>.jpg`, or flat in `dir` when `classes` is empty.
pub fn images(dir: &Path, classes: &[&str], per_class: usize) {
    let mut seed = 1u32;
    let mut noise = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed >> 24) as u8
    };
    let groups: Vec<PathBuf> = if classes.is_empty() {
        vec![dir.to_path_buf()]
    } else {
        classes.iter().map(|c| dir.join(c)).collect()
    };
    for g in groups {
        std::fs::create_dir_all(&g).unwrap();
        for i in 0..per_class {
            let (w, h) = (40u16, 32u16);
            let px: Vec<u8> = (0..w as usize * h as usize * 3).map(|_| noise()).collect();
            let mut jpg = Vec::new();
            jpeg_encoder::Encoder::new(&mut jpg, 90)
                .encode(&px, w, h, jpeg_encoder::ColorType::Rgb)
                .unwrap();
            std::fs::write(g.join(format!("img{i:03}.jpg")), jpg).unwrap();
        }
    }
}
