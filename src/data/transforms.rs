//! LEWEL's two-view augmentation (LEWEL_SPEC 5.1) and the eval transform, with torchvision's
//! sampling and PIL's arithmetic (the ops are in `pil`). A view's parameters are drawn first, as
//! plain data ([`ViewParams`]), from a generator keyed by (seed, epoch, sample index, view): the
//! same sample gives the same views on any thread count and after a resume. The geometric part
//! (crop, resize, flip) and the photometric part (jitter, grayscale, blur, solarize) are applied
//! separately, so the photometric part can run elsewhere (the GPU) from the same parameters.
//!
//! Per view, in order (view 1 | view 2):
//! RandomResizedCrop(size, scale (0.2, 1), ratio (3/4, 4/3), bilinear); flip p 0.5;
//! ColorJitter(0.4, 0.4, 0.2, 0.1) in a random order, p 0.8; grayscale p 0.2;
//! GaussianBlur sigma ~ U(0.1, 2) p 1.0 | 0.1; solarize at 128 p 0.0 | 0.2.

use super::pil::{self, round_half_even, Rgb8};
use crate::rng::Rng;

/// RandomResizedCrop's area range (LEWEL's 0.2, not BYOL's 0.08) and aspect range.
pub const SCALE: (f64, f64) = (0.2, 1.0);
pub const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// A crop window in the source image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: ten attempts at an area fraction in `scale` and a
/// log-uniform aspect in `ratio` (sizes rounded half to even, as Python's round), then the
/// centre-crop fallback.
pub fn sample_crop(r: &mut Rng, w: usize, h: usize, scale: (f64, f64), ratio: (f64, f64)) -> Crop {
    let area = (w * h) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * r.range(scale.0, scale.1);
        let aspect = r.range(lr0, lr1).exp();
        let cw = round_half_even((target * aspect).sqrt()) as usize;
        let ch = round_half_even((target / aspect).sqrt()) as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = r.below((h - ch + 1) as u64) as usize;
            let left = r.below((w - cw + 1) as u64) as usize;
            return Crop {
                top,
                left,
                h: ch,
                w: cw,
            };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, round_half_even(w as f64 / ratio.0) as usize)
    } else if in_ratio > ratio.1 {
        (round_half_even(h as f64 * ratio.1) as usize, h)
    } else {
        (w, h)
    };
    Crop {
        top: (h - ch) / 2,
        left: (w - cw) / 2,
        h: ch,
        w: cw,
    }
}

/// ColorJitter's draw: the order of the four ops (0 brightness, 1 contrast, 2 saturation, 3 hue)
/// and their factors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter {
    pub order: [u8; 4],
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

/// Everything random about one view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ViewParams {
    pub crop: Crop,
    pub flip: bool,
    pub jitter: Option<Jitter>,
    pub gray: bool,
    /// The blur's standard deviation in output pixels, when blurred.
    pub blur: Option<f32>,
    pub solarize: bool,
}

/// The view-specific probabilities (LEWEL_SPEC 5.1): view 1 always blurs and never solarizes,
/// view 2 blurs with p 0.1 and solarizes with p 0.2.
pub fn view_probs(view: u8) -> (f64, f64) {
    match view {
        1 => (1.0, 0.0),
        _ => (0.1, 0.2),
    }
}

/// Draws one view's parameters for a `w` x `h` source image.
pub fn sample_view(r: &mut Rng, w: usize, h: usize, view: u8) -> ViewParams {
    let crop = sample_crop(r, w, h, SCALE, RATIO);
    let flip = r.uniform() < 0.5;
    // RandomApply(p): applied unless p < u; a draw is made either way.
    let jitter = if r.uniform() <= 0.8 {
        // A uniformly random permutation (Fisher-Yates), then each factor in that order.
        let mut order = [0u8, 1, 2, 3];
        for i in (1..4).rev() {
            order.swap(i, r.below(i as u64 + 1) as usize);
        }
        let mut j = Jitter {
            order,
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            hue: 0.0,
        };
        for op in order {
            match op {
                0 => j.brightness = r.range(0.6, 1.4) as f32,
                1 => j.contrast = r.range(0.6, 1.4) as f32,
                2 => j.saturation = r.range(0.8, 1.2) as f32,
                _ => j.hue = r.range(-0.1, 0.1) as f32,
            }
        }
        Some(j)
    } else {
        None
    };
    let gray = r.uniform() < 0.2;
    let (p_blur, p_sol) = view_probs(view);
    let blur_u = r.uniform();
    let sigma = r.range(0.1, 2.0) as f32;
    let blur = (blur_u <= p_blur && p_blur > 0.0).then_some(sigma);
    let solarize = r.uniform() < p_sol;
    ViewParams {
        crop,
        flip,
        jitter,
        gray,
        blur,
        solarize,
    }
}

/// The parameters of `view` (1 or 2) of sample `index` in `epoch`: a pure function of its key.
pub fn view_params(seed: u64, epoch: u64, index: u64, view: u8, w: usize, h: usize) -> ViewParams {
    let mut r = Rng::keyed(&[seed, epoch, index, view as u64]);
    sample_view(&mut r, w, h, view)
}

/// Crop, bilinear resize to `size` x `size`, flip.
pub fn geometric(img: &Rgb8, p: &ViewParams, size: usize) -> Rgb8 {
    let c = p.crop;
    pil::resized_crop(img, (c.top, c.left, c.h, c.w), (size, size), p.flip)
}

/// `geometric` into `out` ((size, size, 3) u8), e.g. a slot of a batch's crop buffer.
pub fn geometric_into(img: &Rgb8, p: &ViewParams, size: usize, out: &mut [u8]) {
    let c = p.crop;
    pil::resized_crop_into(img, (c.top, c.left, c.h, c.w), (size, size), p.flip, out)
}

/// Jitter (in its drawn order), grayscale, blur, solarize; in place, on u8.
pub fn photometric(img: &mut Rgb8, p: &ViewParams) {
    if let Some(j) = &p.jitter {
        for op in j.order {
            match op {
                0 => pil::brightness(img, j.brightness),
                1 => pil::contrast(img, j.contrast),
                2 => pil::saturation(img, j.saturation),
                _ => pil::hue(img, j.hue as f64),
            }
        }
    }
    if p.gray {
        pil::grayscale(img);
    }
    if let Some(s) = p.blur {
        pil::gaussian_blur(img, s);
    }
    if p.solarize {
        pil::solarize(img);
    }
}

/// One whole view, u8.
pub fn view(img: &Rgb8, p: &ViewParams, size: usize) -> Rgb8 {
    let mut out = geometric(img, p, size);
    photometric(&mut out, p);
    out
}

/// The eval transform: the shorter side resized to `resize` (the longer one truncated, as
/// torchvision), then the centre `crop` x `crop` (offsets rounded half to even).
pub fn eval_view(img: &Rgb8, resize: usize, crop: usize) -> Rgb8 {
    let (w, h) = if img.w <= img.h {
        (resize, resize * img.h / img.w)
    } else {
        (resize * img.w / img.h, resize)
    };
    let r = if (w, h) == (img.w, img.h) {
        img.clone()
    } else {
        pil::resize(img, w, h)
    };
    let top = round_half_even((h - crop) as f64 / 2.0) as usize;
    let left = round_half_even((w - crop) as f64 / 2.0) as usize;
    pil::crop(&r, top, left, crop, crop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::pil::tests::Fx;

    #[test]
    fn whole_views_from_fixed_parameters_match_torchvision() {
        let fx = Fx::load();
        let big = fx.img("big");
        for k in 0..3 {
            let p = fx.i64s(&format!("view.{k}.p"));
            let f = fx.f32(&format!("view.{k}.f"));
            let jitter = (p[7] != 9).then(|| Jitter {
                order: [p[7] as u8, p[8] as u8, p[9] as u8, p[10] as u8],
                brightness: f[0],
                contrast: f[1],
                saturation: f[2],
                hue: f[3],
            });
            let vp = ViewParams {
                crop: Crop {
                    top: p[0],
                    left: p[1],
                    h: p[2],
                    w: p[3],
                },
                flip: p[4] == 1,
                jitter,
                gray: p[5] == 1,
                blur: (f[4] > 0.0).then_some(f[4]),
                solarize: p[6] == 1,
            };
            let want = fx.img(&format!("view.{k}"));
            let got = view(&big, &vp, want.w);
            let bad = got
                .data
                .iter()
                .zip(&want.data)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                bad, 0,
                "view {k} ({vp:?}): {bad} values differ from torchvision"
            );
        }
    }

    /// Draws crops and compares the histograms of the area fraction and the log aspect with
    /// torchvision's (200,000 draws in the fixture); each bin within 5 standard errors.
    #[test]
    fn random_resized_crop_distributions_match_torchvision() {
        let fx = Fx::load();
        let n = 20_000;
        for name in ["typical", "wide"] {
            let size = fx.i64s(&format!("rrc.{name}.size"));
            let (w, h) = (size[0], size[1]);
            let mut area = [0usize; 10];
            let mut logr = [0usize; 10];
            let (lo, hi) = (RATIO.0.ln() - 1e-9, RATIO.1.ln() + 1e-9);
            for i in 0..n {
                let mut r = Rng::keyed(&[7, i as u64]);
                let c = sample_crop(&mut r, w, h, SCALE, RATIO);
                assert!(
                    c.top + c.h <= h && c.left + c.w <= w,
                    "{c:?} outside {w}x{h}"
                );
                let a = (c.h * c.w) as f64 / (w * h) as f64;
                area[((a * 10.0) as usize).min(9)] += 1;
                let l = (c.w as f64 / c.h as f64).ln().clamp(lo, hi);
                logr[(((l - lo) / (hi - lo) * 10.0) as usize).min(9)] += 1;
            }
            for (what, hist) in [("area", area), ("logr", logr)] {
                let want = fx.f64s(&format!("rrc.{name}.{what}"));
                for b in 0..10 {
                    let p = want[b];
                    let got = hist[b] as f64 / n as f64;
                    let se = (p * (1.0 - p) / n as f64).sqrt() + (p / 200_000.0).sqrt() + 1e-4;
                    assert!(
                        (got - p).abs() <= 5.0 * se,
                        "{name} {what} bin {b}: {got:.4} here, {p:.4} in torchvision"
                    );
                }
            }
        }
    }

    /// How often each random op fires, per view, over 20,000 draws: within 5 standard errors of
    /// the spec's probability; and every jitter op lands in every position about equally often.
    #[test]
    fn photometric_op_frequencies_per_view() {
        let n = 20_000usize;
        for view in [1u8, 2] {
            let (p_blur, p_sol) = view_probs(view);
            let mut counts = [0usize; 5];
            let mut position = [[0usize; 4]; 4];
            let mut sigma_sum = 0.0;
            for i in 0..n {
                let p = view_params(3, 1, i as u64, view, 500, 375);
                counts[0] += p.flip as usize;
                counts[1] += p.jitter.is_some() as usize;
                counts[2] += p.gray as usize;
                counts[3] += p.blur.is_some() as usize;
                counts[4] += p.solarize as usize;
                if let Some(j) = p.jitter {
                    for (pos, &op) in j.order.iter().enumerate() {
                        position[op as usize][pos] += 1;
                    }
                    assert!((0.6..1.4).contains(&j.brightness) && (0.6..1.4).contains(&j.contrast));
                    assert!((0.8..1.2).contains(&j.saturation) && (-0.1..0.1).contains(&j.hue));
                }
                if let Some(s) = p.blur {
                    assert!((0.1..2.0).contains(&s));
                    sigma_sum += s as f64;
                }
            }
            let want = [0.5, 0.8, 0.2, p_blur, p_sol];
            for (k, name) in ["flip", "jitter", "gray", "blur", "solarize"]
                .iter()
                .enumerate()
            {
                let got = counts[k] as f64 / n as f64;
                let se = (want[k] * (1.0 - want[k]) / n as f64).sqrt() + 1e-9;
                assert!(
                    (got - want[k]).abs() <= 5.0 * se,
                    "view {view} {name}: {got:.4}, expected {}",
                    want[k]
                );
            }
            let jittered = counts[1] as f64;
            for (op, row) in position.iter().enumerate() {
                for (pos, &c) in row.iter().enumerate() {
                    let got = c as f64 / jittered;
                    assert!(
                        (got - 0.25).abs() <= 5.0 * (0.25 * 0.75 / jittered).sqrt(),
                        "view {view}: jitter op {op} at position {pos} in {got:.4} of draws"
                    );
                }
            }
            let mean_sigma = sigma_sum / counts[3] as f64;
            assert!((mean_sigma - 1.05).abs() < 0.05, "mean sigma {mean_sigma}");
        }
    }

    #[test]
    fn view_parameters_are_a_pure_function_of_their_key() {
        let a = view_params(1, 2, 3, 1, 500, 375);
        assert_eq!(a, view_params(1, 2, 3, 1, 500, 375));
        assert_ne!(a, view_params(1, 2, 3, 2, 500, 375));
        assert_ne!(a, view_params(1, 3, 3, 1, 500, 375));
        assert_ne!(a, view_params(1, 2, 4, 1, 500, 375));
    }
}
