//! `lewel import`: PyTorch checkpoints -> lewel's safetensors, without running anything.
//!
//! Reads both `torch.save` formats (`torch_file`) through a restricted pickle reader (`pickle`)
//! that refuses any global outside a short allow-list. Two kinds of checkpoint are understood:
//!
//! - the official LEWEL `checkpoint.pth.tar` (LEWEL_SPEC 6): `epoch`, `arch`, `state_dict` with
//!   `module.online_net.*`, `module.target_net.*`, `module.predictor.*`, `module.predictor_obj.*`,
//!   and the LARS `optimizer` state. It becomes a full state as `lewel step --state` reads it
//!   (official names without `module.`, PyTorch layouts) with `momentum.<name>` for each LARS
//!   buffer. The buffers are keyed by parameter index in the file; the index follows the official
//!   `collect_params` (LEWEL_SPEC 4.1): every parameter of the model (target_net's too) in module
//!   order, split into group 0 (names containing 'bn', 'downsample.1', 'bias', and with EMAN
//!   'mlp.1') then group 1 (the rest), numbered group 0 first.
//! - a ResNet-18/50 state_dict in torchvision names (a torchvision model's, or the official
//!   `extract_backbone.py` output in the legacy format): it becomes a backbone file as `lewel
//!   export` writes it (torchvision names, fc dropped, `num_batches_tracked` as i64 scalars).
//!
//! Every expected tensor is checked for presence, dtype and shape before anything is written, and
//! anything else (another architecture, a tensor too many) is one line naming it.

pub mod pickle;
pub mod torch_file;

use crate::checkpoint::{self, Owned, Tensors};
use crate::memory::ParamStore;
use crate::model::lewel::{EncoderObj, LewelConfig, LewelOnline};
use crate::model::resnet::{Arch, ResNet};
use crate::optim::{lars_excluded, ExcludeRule};
use crate::rng::Rng;
use crate::{Error, Result};
use pickle::{Elem, Obj, TensorRef};
use safetensors::Dtype;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use torch_file::TorchFile;

/// What `lewel import` wrote, for its summary line.
#[derive(Debug)]
pub struct Imported {
    /// One line: what was read and what was written.
    pub summary: String,
    /// Tensors written.
    pub tensors: usize,
    /// LARS momentum buffers among them (LEWEL checkpoints).
    pub momentum: usize,
    /// The checkpoint's `epoch` (epochs completed), where it has one.
    pub epoch: Option<i64>,
}

/// `lewel import FILE --out OUT`: reads FILE (a `torch.save` file, either format) and writes OUT,
/// a safetensors file: a full LEWEL state or a backbone, as the file holds.
pub fn import(input: &Path, out: &Path) -> Result<Imported> {
    if out.is_dir() {
        return Err(Error::user(format!(
            "--out {}: a folder; give a .safetensors file. A resumable run folder needs the run's \
             config (data, batch size, schedule), which a PyTorch checkpoint does not hold: import \
             the state, then pass it to `lewel step --state` or `lewel embed --checkpoint`",
            out.display()
        )));
    }
    let what = input.display().to_string();
    let bytes = std::fs::read(input).map_err(|e| Error::io(input, e))?;
    let f = TorchFile::parse(bytes).map_err(|e| Error::user(format!("{what}: {e}")))?;
    let (entries, outer) = state_dict(&f.root).map_err(|e| Error::user(format!("{what}: {e}")))?;
    let mut names: Vec<String> = entries.iter().map(|(n, _)| n.to_string()).collect();
    if !names.is_empty() && names.iter().all(|n| n.starts_with("module.")) {
        names = names
            .iter()
            .map(|n| n["module.".len()..].to_string())
            .collect();
    }
    let tensors: Vec<(String, &TensorRef)> = names
        .into_iter()
        .zip(entries.iter().map(|(_, t)| *t))
        .collect();
    let mut seen = HashSet::new();
    if let Some((n, _)) = tensors.iter().find(|(n, _)| !seen.insert(n.as_str())) {
        return Err(Error::user(format!(
            "{what}: the state_dict names {n} twice"
        )));
    }
    if tensors
        .iter()
        .any(|(n, _)| n == "online_net.backbone.conv1.weight")
    {
        import_lewel(&f, &tensors, outer, &what, out)
    } else if tensors.iter().any(|(n, _)| n == "conv1.weight") {
        import_backbone(&f, &tensors, &what, out)
    } else {
        let first: Vec<&str> = tensors.iter().take(3).map(|(n, _)| n.as_str()).collect();
        Err(Error::user(format!(
            "{what}: neither a LEWEL checkpoint (module.online_net.backbone.conv1.weight) nor a \
             ResNet state_dict (conv1.weight); its first tensors are {}",
            if first.is_empty() {
                "none".to_string()
            } else {
                first.join(", ")
            }
        )))
    }
}

/// A state dict's (name, tensor) entries in file order, and the checkpoint dict around it.
type StateDict<'a> = (Vec<(&'a str, &'a TensorRef)>, Option<&'a Obj>);

/// The state dict's entries, and the dict around it (a checkpoint with `epoch`, `optimizer`...)
/// when there is one.
fn state_dict(root: &Obj) -> std::result::Result<StateDict<'_>, String> {
    let (sd, outer) = match root.get("state_dict") {
        Some(sd) => (sd, Some(root)),
        None => (root, None),
    };
    let items = match sd {
        Obj::Dict(items) => items,
        o => {
            return Err(format!(
                "holds a {}, not a state_dict or a checkpoint dict with 'state_dict'",
                o.kind()
            ))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        match (k, v) {
            (Obj::Str(n), Obj::Tensor(t)) => out.push((n.as_str(), t)),
            (Obj::Str(n), v) if outer.is_some() => {
                return Err(format!(
                    "state_dict entry {n} is a {}, not a tensor",
                    v.kind()
                ))
            }
            (Obj::Str(n), v) => {
                return Err(format!(
                "entry '{n}' is a {}: not a state_dict, nor a checkpoint dict with 'state_dict'",
                v.kind()
            ))
            }
            (k, _) => return Err(format!("a state_dict key is a {}", k.kind())),
        }
    }
    Ok((out, outer))
}

/// A tensor's values in the file layout lewel reads: floating point as f32, integers as i64.
fn to_owned(f: &TorchFile, t: &TensorRef, name: &str, what: &str) -> Result<Owned> {
    let b = f
        .tensor_bytes(t)
        .map_err(|e| Error::user(format!("{what}: {name}: {e}")))?;
    let shape = t.size.clone();
    let e = t.storage.elem;
    let le = |n: usize| b.chunks_exact(n);
    Ok(match e {
        Elem::F32 => Owned {
            dtype: Dtype::F32,
            shape,
            bytes: b,
        },
        Elem::F64 => Owned::f32(
            shape,
            &le(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect::<Vec<_>>(),
        ),
        Elem::F16 => Owned::f32(
            shape,
            &le(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect::<Vec<_>>(),
        ),
        Elem::BF16 => Owned::f32(
            shape,
            &le(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect::<Vec<_>>(),
        ),
        Elem::I64 => Owned {
            dtype: Dtype::I64,
            shape,
            bytes: b,
        },
        Elem::I32 => Owned::i64(
            shape,
            &le(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect::<Vec<_>>(),
        ),
        Elem::I16 => Owned::i64(
            shape,
            &le(2)
                .map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect::<Vec<_>>(),
        ),
        Elem::I8 => Owned::i64(
            shape,
            &b.iter().map(|&x| x as i8 as i64).collect::<Vec<_>>(),
        ),
        Elem::U8 | Elem::Bool => {
            return Err(Error::user(format!(
                "{what}: {name} is a {} tensor, expected floating point or int64",
                e.name()
            )))
        }
    })
}

/// One tensor a model expects: name, dtype and PyTorch shape.
struct Want {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// Everything a store holds, as the files name it: parameters (PyTorch layouts), buffers, counters.
fn wants(s: &ParamStore<f32>) -> Vec<Want> {
    let p = s.table.entries.iter().map(|e| Want {
        name: e.name.clone(),
        dtype: Dtype::F32,
        shape: checkpoint::torch_shape(e.shape),
    });
    let b = s.buffer_table.entries.iter().map(|e| Want {
        name: e.name.clone(),
        dtype: Dtype::F32,
        shape: e.shape.dims().to_vec(),
    });
    let c = s.counters.iter().map(|(n, _)| Want {
        name: n.clone(),
        dtype: Dtype::I64,
        shape: vec![],
    });
    p.chain(b).chain(c).collect()
}

/// Checks `t` holds exactly `want` (a missing `num_batches_tracked` is written as 0, as PyTorch's
/// own loader does for files older than the counter). Returns how many counters were filled.
fn check_exact(t: &mut Tensors, want: &[Want], what: &str, model: &str) -> Result<usize> {
    let (mut missing, mut wrong) = (Vec::new(), Vec::new());
    let mut filled = 0;
    for w in want {
        match t.get(&w.name) {
            None if w.dtype == Dtype::I64 => {
                t.insert(w.name.clone(), Owned::i64_scalar(0));
                filled += 1;
            }
            None => missing.push(w.name.clone()),
            Some(o) if o.dtype != w.dtype || o.shape != w.shape => wrong.push(format!(
                "{} is {:?} {:?}, expected {:?} {:?}",
                w.name, o.dtype, o.shape, w.dtype, w.shape
            )),
            Some(_) => {}
        }
    }
    let known: HashSet<&str> = want.iter().map(|w| w.name.as_str()).collect();
    let extra: Vec<String> = t
        .keys()
        .filter(|n| !known.contains(n.as_str()))
        .cloned()
        .collect();
    let mut parts = Vec::new();
    for (v, what) in [
        (&missing, "missing"),
        (&wrong, "of the wrong shape"),
        (&extra, "unexpected"),
    ] {
        if !v.is_empty() {
            let more = if v.len() > 3 { ", ..." } else { "" };
            let first: Vec<&str> = v.iter().take(3).map(|s| s.as_str()).collect();
            parts.push(format!("{} {what} ({}{more})", v.len(), first.join(", ")));
        }
    }
    if parts.is_empty() {
        return Ok(filled);
    }
    Err(Error::user(format!(
        "{what}: does not match {model} (ResNet-18 and ResNet-50 at any width are read): {}",
        parts.join(", ")
    )))
}

fn materialize(f: &TorchFile, tensors: &[(String, &TensorRef)], what: &str) -> Result<Tensors> {
    let mut t = Tensors::new();
    for (n, r) in tensors {
        t.insert(n.clone(), to_owned(f, r, n, what)?);
    }
    Ok(t)
}

fn write(out: &Path, t: &Tensors, input: &Path, f: &TorchFile, note: &str) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert(
        "imported_from".to_string(),
        input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    meta.insert("imported_format".to_string(), f.format.name().to_string());
    meta.insert("imported".to_string(), note.to_string());
    checkpoint::write_file_atomic(out, t, Some(meta))
}

// ----------------------------------------------------------------------------
// Backbone state_dicts

fn import_backbone(
    f: &TorchFile,
    tensors: &[(String, &TensorRef)],
    what: &str,
    out: &Path,
) -> Result<Imported> {
    let (fc, rest): (Vec<_>, Vec<_>) = tensors
        .iter()
        .cloned()
        .partition(|(n, _)| n.starts_with("fc."));
    let mut t = materialize(f, &rest, what)?;
    let arch = Arch::infer(&t, "", what)?;
    let mut s = ParamStore::new();
    ResNet::build(&mut s, "", arch, &mut Rng::new(0));
    let filled = check_exact(&mut t, &wants(&s), what, &arch.name())?;
    write(
        out,
        &t,
        Path::new(what),
        f,
        &format!("{} backbone", arch.name()),
    )?;
    let mut notes = Vec::new();
    if !fc.is_empty() {
        let names: Vec<&str> = fc.iter().map(|(n, _)| n.as_str()).collect();
        notes.push(format!("{} dropped", names.join(", ")));
    }
    if filled > 0 {
        notes.push(format!("{filled} absent num_batches_tracked written as 0"));
    }
    Ok(Imported {
        summary: format!(
            "imported {what} ({}): {} backbone, {} tensors in torchvision names{} -> {}",
            f.format.name(),
            arch.name(),
            t.len(),
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            },
            out.display()
        ),
        tensors: t.len(),
        momentum: 0,
        epoch: None,
    })
}

// ----------------------------------------------------------------------------
// LEWEL checkpoints

fn import_lewel(
    f: &TorchFile,
    tensors: &[(String, &TensorRef)],
    outer: Option<&Obj>,
    what: &str,
    out: &Path,
) -> Result<Imported> {
    let mut t = materialize(f, tensors, what)?;
    // Heads and scale are not in the file and do not change the names: 1 passes the checks.
    let cfg = LewelConfig::infer(&t, 1, 1.0, 0.5, what)?;
    let mut online = ParamStore::new();
    LewelOnline::build(&mut online, &cfg, &mut Rng::new(0));
    let mut target = ParamStore::new();
    EncoderObj::build(&mut target, "target_net.", &cfg, &mut Rng::new(0));
    let mut want = wants(&online);
    want.extend(wants(&target));
    let model = format!("a {} LEWEL model", cfg.arch.name());
    let filled = check_exact(&mut t, &want, what, &model)?;

    let epoch = match outer.and_then(|o| o.get("epoch")) {
        Some(Obj::Int(e)) => Some(*e),
        _ => None,
    };
    let arch = match outer.and_then(|o| o.get("arch")) {
        Some(Obj::Str(a)) => Some(a.clone()),
        _ => None,
    };
    let mut notes = Vec::new();
    let mut momentum = 0;
    match outer.and_then(|o| o.get("optimizer")) {
        Some(opt @ Obj::Dict(_)) => {
            let params = official_param_order(&online, &target);
            // The file's own parameter order must be the official module order the indices follow.
            let file_order: Vec<&str> = tensors
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| params.iter().any(|(p, _)| p == n))
                .collect();
            if file_order.iter().zip(&params).any(|(a, (b, _))| a != b) {
                let (a, (b, _)) = file_order
                    .iter()
                    .zip(&params)
                    .find(|(a, (b, _))| a != &b)
                    .unwrap();
                return Err(Error::user(format!(
                    "{what}: the state_dict lists {a} where the official module order has {b}: \
                     the optimizer's parameter indices cannot be matched to names"
                )));
            }
            let eman = arch.as_deref().map(|a| a.contains("EMAN"));
            let m = momentum_buffers(opt, &params, eman)
                .map_err(|e| Error::user(format!("{what}: optimizer: {e}")))?;
            if eman == Some(true) && !m.eman {
                notes.push(
                    "its groups leave mlp.1.weight in the LARS group (the released log's rule: \
                     `lewel step --lars-exclude released-log`)"
                        .to_string(),
                );
            }
            for (name, buf) in &m.buffers {
                let o = to_owned(f, buf, &format!("momentum of {name}"), what)?;
                t.insert(format!("momentum.{name}"), o);
            }
            momentum = m.buffers.len();
            let trainable = online.table.entries.len();
            if momentum < trainable {
                notes.push(format!(
                    "{} parameters have no buffer yet (zero)",
                    trainable - momentum
                ));
            }
        }
        Some(Obj::None) | None => {
            notes.push("no optimizer state: the LARS buffers start at zero".into());
        }
        Some(o) => {
            return Err(Error::user(format!(
                "{what}: 'optimizer' is a {}, expected a dict",
                o.kind()
            )))
        }
    }
    if filled > 0 {
        notes.push(format!("{filled} absent num_batches_tracked written as 0"));
    }
    let mut desc = format!("LEWEL {}", cfg.arch.name());
    if let Some(a) = &arch {
        desc = format!("{a} ({})", cfg.arch.name());
    }
    let mut at = match epoch {
        Some(e) => format!(" at epoch {e}"),
        None => " (no epoch in the file)".to_string(),
    };
    match outer.and_then(|o| o.get("best_acc1")) {
        Some(Obj::Float(a)) if *a > 0.0 => at += &format!(" (best kNN {a:.2}%)"),
        Some(Obj::Int(a)) if *a > 0 => at += &format!(" (best kNN {a}%)"),
        _ => {}
    }
    write(out, &t, Path::new(what), f, &format!("{desc}{at}"))?;
    Ok(Imported {
        summary: format!(
            "imported {what} ({}): {desc}{at}, {} state tensors + {momentum} LARS momentum buffers{} -> {}",
            f.format.name(),
            t.len() - momentum,
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            },
            out.display()
        ),
        tensors: t.len(),
        momentum,
        epoch,
    })
}

/// Every parameter of the official LEWEL model in `named_parameters()` order with its PyTorch
/// shape: online_net, target_net, predictor, predictor_obj (the order `LEWELB_EMAN.__init__`
/// registers them, LEWEL_SPEC 3.1), each in torchvision's module order.
fn official_param_order(
    online: &ParamStore<f32>,
    target: &ParamStore<f32>,
) -> Vec<(String, Vec<usize>)> {
    let of = |s: &ParamStore<f32>, keep: &dyn Fn(&str) -> bool| -> Vec<(String, Vec<usize>)> {
        s.table
            .entries
            .iter()
            .filter(|e| keep(&e.name))
            .map(|e| (e.name.clone(), checkpoint::torch_shape(e.shape)))
            .collect()
    };
    let mut p = of(online, &|n| n.starts_with("online_net."));
    p.extend(of(target, &|_| true));
    p.extend(of(online, &|n| !n.starts_with("online_net.")));
    p
}

/// The optimizer's momentum buffers under parameter names.
struct Buffers<'a> {
    buffers: Vec<(String, &'a TensorRef)>,
    /// Which `collect_params` rule the groups follow: with EMAN's 'mlp.1' exclusion or without.
    eman: bool,
}

/// The two parameter groups of the official `collect_params` (LEWEL_SPEC 4.1) over `params` (every
/// parameter in module order): group 0 excluded from LARS and weight decay, group 1 the rest.
fn official_groups(params: &[(String, Vec<usize>)], eman: bool) -> [Vec<usize>; 2] {
    let rule = ExcludeRule::Current { eman };
    let (g0, g1): (Vec<usize>, Vec<usize>) =
        (0..params.len()).partition(|&i| lars_excluded(&params[i].0, rule));
    [g0, g1]
}

/// Maps the optimizer's per-index state to names. `eman`: what the checkpoint's arch says, when it
/// says anything; the group sizes decide between the two rules otherwise.
fn momentum_buffers<'a>(
    opt: &'a Obj,
    params: &[(String, Vec<usize>)],
    eman: Option<bool>,
) -> std::result::Result<Buffers<'a>, String> {
    let groups = match opt.get("param_groups") {
        Some(Obj::List(g)) => g,
        _ => return Err("no 'param_groups' list".into()),
    };
    let mut idx: Vec<Vec<i64>> = Vec::new();
    for g in groups {
        match g.get("params") {
            Some(Obj::List(p)) => idx.push(
                p.iter()
                    .map(|i| match i {
                        Obj::Int(i) => Ok(*i),
                        o => Err(format!("a parameter index that is a {}", o.kind())),
                    })
                    .collect::<std::result::Result<_, _>>()?,
            ),
            _ => return Err("a param group without a 'params' list".into()),
        }
    }
    let sizes: Vec<usize> = idx.iter().map(|g| g.len()).collect();
    let order = match eman {
        Some(e) => [e, !e],
        None => [true, false],
    };
    let chosen = order.iter().find_map(|&e| {
        let g = official_groups(params, e);
        (sizes == [g[0].len(), g[1].len()]).then_some((e, g))
    });
    let (eman, official) = chosen.ok_or_else(|| {
        let a = official_groups(params, true);
        let b = official_groups(params, false);
        format!(
            "param_groups hold {sizes:?} parameters; the official collect_params gives [{}, {}] \
             (EMAN) or [{}, {}] for this model",
            a[0].len(),
            a[1].len(),
            b[0].len(),
            b[1].len()
        )
    })?;
    if let Some(x) = groups[0].get("lars_exclude") {
        if *x != Obj::Bool(true) {
            return Err("group 0 is not the excluded group (lars_exclude is not True)".into());
        }
    }
    let mut name_of: HashMap<i64, usize> = HashMap::new();
    for (g, ids) in idx.iter().enumerate() {
        for (j, &i) in ids.iter().enumerate() {
            if name_of.insert(i, official[g][j]).is_some() {
                return Err(format!("parameter index {i} is in two groups"));
            }
        }
    }
    let state = match opt.get("state") {
        Some(Obj::Dict(s)) => s,
        _ => return Err("no 'state' dict".into()),
    };
    let mut buffers = Vec::new();
    for (k, v) in state {
        let i = match k {
            Obj::Int(i) => *i,
            o => return Err(format!("a state key that is a {}", o.kind())),
        };
        let p = *name_of
            .get(&i)
            .ok_or_else(|| format!("state for parameter index {i}, which no group holds"))?;
        let (name, shape) = &params[p];
        let buf = match v.get("momentum_buffer") {
            Some(Obj::Tensor(t)) => t,
            Some(Obj::None) | None => continue,
            Some(o) => return Err(format!("the momentum_buffer of {name} is a {}", o.kind())),
        };
        if name.starts_with("target_net.") {
            return Err(format!(
                "a momentum buffer for {name}, which has no gradient: the indices do not follow the official groups"
            ));
        }
        if &buf.size != shape {
            return Err(format!(
                "the buffer at index {i} has shape {:?}, but index {i} is {name} of shape {shape:?}: \
                 the indices do not follow the official groups",
                buf.size
            ));
        }
        buffers.push((name.clone(), buf));
    }
    Ok(Buffers { buffers, eman })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lewel_params(arch: Arch) -> Vec<(String, Vec<usize>)> {
        let cfg = LewelConfig::new(arch, 4, 1.0, 0.5);
        let mut online = ParamStore::new();
        LewelOnline::build(&mut online, &cfg, &mut Rng::new(0));
        let mut target = ParamStore::new();
        EncoderObj::build(&mut target, "target_net.", &cfg, &mut Rng::new(0));
        official_param_order(&online, &target)
    }

    /// LEWEL_SPEC 4.1 on the full ResNet-50 model: group 0 holds every BN gamma/beta (and with
    /// EMAN the neck and predictor mlp.1), target_net's too; indices run through group 0 first.
    #[test]
    fn official_groups_of_resnet50_lewel() {
        let p = lewel_params(Arch::RESNET50);
        // Each backbone: 53 convs and 53 BNs (gamma, beta) = 159 tensors; each neck: two MLPs of
        // mlp.0, mlp.1 (gamma, beta), mlp.3 = 8; the two predictors 8 more.
        assert_eq!(p.len(), 2 * (159 + 8) + 8);
        assert_eq!(p[0].0, "online_net.backbone.conv1.weight");
        assert_eq!(p[1].0, "online_net.backbone.bn1.weight");
        assert_eq!(p[167].0, "target_net.backbone.conv1.weight");
        assert_eq!(p[334].0, "predictor.mlp.0.weight");
        assert_eq!(p[341].0, "predictor_obj.mlp.3.weight");
        let [g0, g1] = official_groups(&p, true);
        // EMAN: the BN gamma/beta of both backbones (2 * 106), the necks' mlp.1 (2 * 4) and the
        // predictors' (4); the LARS group: every conv (2 * 53), mlp.0 and mlp.3 (2 * 4 + 4).
        assert_eq!((g0.len(), g1.len()), (2 * 106 + 8 + 4, 2 * 53 + 8 + 4));
        let [h0, h1] = official_groups(&p, false);
        // Without EMAN only the mlp.1 biases are excluded ('bias'); the gammas go to LARS.
        assert_eq!((h0.len(), h1.len()), (2 * 106 + 4 + 2, 2 * 53 + 8 + 4 + 6));
        assert_eq!(p[g0[0]].0, "online_net.backbone.bn1.weight");
        assert_eq!(p[g1[0]].0, "online_net.backbone.conv1.weight");
        assert_eq!(p[*g1.last().unwrap()].0, "predictor_obj.mlp.3.weight");
        assert_eq!(p[g0[106]].0, "online_net.neck.proj.mlp.1.weight");
        assert!(g0
            .iter()
            .any(|&i| p[i].0 == "target_net.neck.proj_obj.mlp.1.weight"));
    }

    fn tensor(shape: &[usize]) -> Obj {
        Obj::Tensor(TensorRef {
            storage: torch_file::storage(Elem::F32, "0", 1),
            offset: 0,
            size: shape.to_vec(),
            stride: vec![0; shape.len()],
        })
    }

    fn ints(v: &[usize]) -> Obj {
        Obj::List(v.iter().map(|&i| Obj::Int(i as i64)).collect())
    }

    fn optimizer(p: &[(String, Vec<usize>)], eman: bool, skip_target: bool) -> Obj {
        let [g0, g1] = official_groups(p, eman);
        let n0 = g0.len();
        let mut state = Vec::new();
        for (g, ids) in [&g0, &g1].iter().enumerate() {
            for (j, &pi) in ids.iter().enumerate() {
                if skip_target && p[pi].0.starts_with("target_net.") {
                    continue;
                }
                let idx = if g == 0 { j } else { n0 + j };
                let st = Obj::Dict(vec![(Obj::Str("momentum_buffer".into()), tensor(&p[pi].1))]);
                state.push((Obj::Int(idx as i64), st));
            }
        }
        let group = |ids: std::ops::Range<usize>, excl: bool| {
            let mut d = vec![(Obj::Str("params".into()), ints(&ids.collect::<Vec<_>>()))];
            if excl {
                d.push((Obj::Str("lars_exclude".into()), Obj::Bool(true)));
            }
            Obj::Dict(d)
        };
        Obj::Dict(vec![
            (Obj::Str("state".into()), Obj::Dict(state)),
            (
                Obj::Str("param_groups".into()),
                Obj::List(vec![group(0..n0, true), group(n0..p.len(), false)]),
            ),
        ])
    }

    #[test]
    fn momentum_buffers_follow_the_groups_and_the_rule_is_read_from_their_sizes() {
        let p = lewel_params(Arch::TINY);
        for (eman, hint) in [(true, Some(true)), (false, None), (false, Some(true))] {
            let opt = optimizer(&p, eman, true);
            let m = momentum_buffers(&opt, &p, hint).unwrap();
            assert_eq!(m.eman, eman);
            assert_eq!(m.buffers.len(), p.len() - (p.len() - 8) / 2);
            // Every buffer's shape is its parameter's, and every trainable parameter has one.
            for (n, b) in &m.buffers {
                let shape = &p.iter().find(|(q, _)| q == n).unwrap().1;
                assert_eq!(&b.size, shape, "{n}");
                assert!(!n.starts_with("target_net."));
            }
        }
        // Buffers for target_net parameters mean the indices are not the official ones.
        let e = momentum_buffers(&optimizer(&p, true, false), &p, Some(true))
            .err()
            .unwrap();
        assert!(e.contains("target_net."), "{e}");
        // One group: not the official layout.
        let one = Obj::Dict(vec![(
            Obj::Str("param_groups".into()),
            Obj::List(vec![Obj::Dict(vec![(
                Obj::Str("params".into()),
                ints(&(0..p.len()).collect::<Vec<_>>()),
            )])]),
        )]);
        let e = momentum_buffers(&one, &p, None).err().unwrap();
        assert!(e.contains("collect_params"), "{e}");
    }
}
