//! TensorBoard scalars beside metrics.jsonl: `events.out.tfevents.lewel` in the run folder holds
//! one event per metrics record, written (and flushed) with it, so `tensorboard --logdir runs`
//! shows a run while it trains.
//!
//! The file is a TFRecord file: each record is its length (u64, little-endian), the masked CRC32C
//! of those 8 bytes (u32), the data, the masked CRC32C of the data (u32); the mask is
//! `((crc >> 15) | (crc << 17)) + 0xa282ead8`. A record's data is an `Event` protobuf, encoded here
//! by hand: wall_time (double, field 1), step (int64, 2), file_version (string, 3: "brain.Event:2",
//! the first record alone), summary (5): `Summary { repeated Value value = 1 }`,
//! `Value { string tag = 1; float simple_value = 2 }`.
//!
//! Tags: a step record's `loss`, `lr`, `ema_m` are train/loss, train/lr, train/ema_momentum at its
//! step (1-based, as in metrics.jsonl); its times `ms`, `data_ms`, `img_per_s` are time/step_ms,
//! time/data_ms, time/img_per_s; `device_mib` and `skipped` memory/device_mib and data/skipped. An
//! epoch record's `mean_loss` and `knn_acc` (%) are epoch/mean_loss and knn/acc with the epoch as
//! the step (knn/acc at 0: the monitor at init).

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The event file's name in a run folder (TensorBoard reads files whose name holds "tfevents").
pub const EVENTS_FILE: &str = "events.out.tfevents.lewel";

/// A step record's scalars: (metrics.jsonl key, tag).
const STEP_TAGS: &[(&str, &str)] = &[
    ("loss", "train/loss"),
    ("lr", "train/lr"),
    ("ema_m", "train/ema_momentum"),
    ("ms", "time/step_ms"),
    ("data_ms", "time/data_ms"),
    ("img_per_s", "time/img_per_s"),
    ("device_mib", "memory/device_mib"),
    ("skipped", "data/skipped"),
];

/// An epoch record's scalars (the step is the epoch).
const EPOCH_TAGS: &[(&str, &str)] = &[("mean_loss", "epoch/mean_loss"), ("knn_acc", "knn/acc")];

/// The step and the tagged scalars of a metrics record; `None` for a record with none (a null
/// kNN accuracy alone, a record of another kind).
pub fn scalars(v: &serde_json::Value) -> Option<(i64, Vec<(&'static str, f32)>)> {
    let o = v.as_object()?;
    let (step, tags) = match (o.get("step"), o.get("epoch")) {
        (Some(s), _) => (s.as_i64()?, STEP_TAGS),
        (None, Some(e)) => (e.as_i64()?, EPOCH_TAGS),
        (None, None) => return None,
    };
    let values: Vec<(&'static str, f32)> = tags
        .iter()
        .filter_map(|&(k, tag)| Some((tag, o.get(k)?.as_f64()? as f32)))
        .collect();
    (!values.is_empty()).then_some((step, values))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` with its wall time and step, then `rest` (its file_version or summary field).
fn event(wall_time: f64, step: i64, rest: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(20 + rest.len());
    put_varint(&mut e, 1 << 3 | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_varint(&mut e, 2 << 3);
        put_varint(&mut e, step as u64);
    }
    e.extend_from_slice(rest);
    e
}

/// The first event of a file: its format version.
pub fn header_event(wall_time: f64) -> Vec<u8> {
    let mut rest = Vec::new();
    put_bytes(&mut rest, 3, b"brain.Event:2");
    event(wall_time, 0, &rest)
}

/// An event holding one summary of scalars at `step`.
pub fn scalar_event(wall_time: f64, step: i64, values: &[(&str, f32)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, v) in values {
        let mut value = Vec::with_capacity(tag.len() + 7);
        put_bytes(&mut value, 1, tag.as_bytes());
        put_varint(&mut value, 2 << 3 | 5);
        value.extend_from_slice(&v.to_le_bytes());
        put_bytes(&mut summary, 1, &value);
    }
    let mut rest = Vec::new();
    put_bytes(&mut rest, 5, &summary);
    event(wall_time, step, &rest)
}

/// TFRecord's masked CRC32C.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends a run's events, one record per metrics record, each written whole and at once.
pub struct Writer {
    file: std::fs::File,
    path: PathBuf,
}

impl Writer {
    /// Opens `run_dir`'s event file to append to. While metrics.jsonl is empty (a new run) the
    /// file starts afresh with its header; a run whose metrics have no events yet (one from before
    /// event files) gets them from metrics.jsonl first (`rewrite_from_metrics`).
    pub fn open(run_dir: &Path) -> Result<Writer> {
        let path = run_dir.join(EVENTS_FILE);
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        if len(&run_dir.join("metrics.jsonl")) == 0 {
            std::fs::write(&path, record(&header_event(now()))).map_err(|e| Error::io(&path, e))?;
        } else if len(&path) == 0 {
            rewrite_from_metrics(run_dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Writer { file, path })
    }

    /// Writes the scalars of one metrics record (nothing for a record without any).
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        let Some((step, values)) = scalars(v) else {
            return Ok(());
        };
        let r = record(&scalar_event(now(), step, &values));
        self.file
            .write_all(&r)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Rewrites `run_dir`'s event file from its metrics.jsonl, atomically (a temporary file renamed
/// over it), so that it mirrors metrics.jsonl again (after a resume cut metrics.jsonl back to its
/// checkpoint). Events the old file holds keep their wall times; lines of metrics.jsonl that are
/// not JSON are left out, and a missing metrics.jsonl leaves the header alone.
pub fn rewrite_from_metrics(run_dir: &Path) -> Result<()> {
    let path = run_dir.join(EVENTS_FILE);
    let metrics = run_dir.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&metrics) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(&metrics, e)),
    };
    let old = std::fs::read(&path).map_or_else(|_| OldTimes::default(), |b| OldTimes::read(&b));
    let t = now();
    let mut out = record(&header_event(old.header.unwrap_or(t)));
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some((step, values)) = scalars(&v) {
            let key = (step, values[0].0.to_string());
            let wall = old.events.get(&key).copied().unwrap_or(t);
            out.extend(record(&scalar_event(wall, step, &values)));
        }
    }
    // Not checkpoint::write_bytes_atomic: its temporary file's name would hold "tfevents", and
    // TensorBoard reads every such file in the folder. This one's is removed as a killed run's
    // temporary files are (a dot, ".tmp-").
    let dir = Some(run_dir)
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".events.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&path, e));
    }
    Ok(())
}

/// The wall times of an event file's events, by (step, first tag), as far as its records are whole.
#[derive(Default)]
struct OldTimes {
    header: Option<f64>,
    events: std::collections::HashMap<(i64, String), f64>,
}

impl OldTimes {
    fn read(bytes: &[u8]) -> OldTimes {
        let mut t = OldTimes::default();
        let mut rest = bytes;
        while rest.len() >= 12 {
            let n = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default()) as usize;
            let Some(data) = rest.get(12..12usize.saturating_add(n)) else {
                break;
            };
            let Some(crc) = rest.get(12 + n..16 + n) else {
                break;
            };
            if crc != masked_crc(data).to_le_bytes() {
                break;
            }
            if let Some((wall, step, tag)) = first_scalar(data) {
                match tag {
                    None => t.header = Some(wall),
                    Some(tag) => {
                        t.events.insert((step, tag), wall);
                    }
                }
            }
            rest = &rest[16 + n..];
        }
        t
    }
}

/// A protobuf field: (field number, varint value or fixed bits, length-delimited bytes).
fn fields(mut b: &[u8]) -> impl Iterator<Item = (u64, u64, &[u8])> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&x, r) = b.split_first()?;
            *b = r;
            v |= u64::from(x & 0x7f) << (7 * i);
            if x < 0x80 {
                return Some(v);
            }
        }
        None
    }
    std::iter::from_fn(move || {
        let key = varint(&mut b)?;
        let fixed = |b: &mut &[u8], n: usize| {
            let (x, r) = b.split_at_checked(n)?;
            *b = r;
            let mut w = [0u8; 8];
            w[..n].copy_from_slice(x);
            Some(u64::from_le_bytes(w))
        };
        let (v, bytes): (u64, &[u8]) = match key & 7 {
            0 => (varint(&mut b)?, &[]),
            1 => (fixed(&mut b, 8)?, &[]),
            5 => (fixed(&mut b, 4)?, &[]),
            2 => {
                let n = varint(&mut b)? as usize;
                let (x, r) = b.split_at_checked(n)?;
                b = r;
                (0, x)
            }
            _ => return None,
        };
        Some((key >> 3, v, bytes))
    })
}

/// An event's wall time, step and first scalar's tag (`None`: no summary, the header).
fn first_scalar(event: &[u8]) -> Option<(f64, i64, Option<String>)> {
    let (mut wall, mut step, mut tag) = (None, 0i64, None);
    for (f, v, bytes) in fields(event) {
        match f {
            1 => wall = Some(f64::from_bits(v)),
            2 => step = v as i64,
            5 => {
                let value = fields(bytes).find(|x| x.0 == 1)?.2;
                let t = fields(value).find(|x| x.0 == 1)?.2;
                tag = Some(String::from_utf8_lossy(t).into_owned());
            }
            _ => {}
        }
    }
    Some((wall?, step, tag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An independent reader: its own bitwise CRC32C and protobuf decoding.
    mod reader {
        pub fn crc32c(data: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0x82f6_3b78
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }

        // TFRecord's mask as its format states it.
        #[allow(clippy::manual_rotate)]
        fn masked(data: &[u8]) -> u32 {
            let c = crc32c(data);
            ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
        }

        #[derive(Debug, Default, PartialEq)]
        pub struct Event {
            pub wall_time: f64,
            pub step: i64,
            pub file_version: Option<String>,
            pub values: Vec<(String, f32)>,
        }

        struct Buf<'a>(&'a [u8]);
        impl<'a> Buf<'a> {
            fn take(&mut self, n: usize) -> &'a [u8] {
                assert!(self.0.len() >= n, "truncated protobuf");
                let (a, b) = self.0.split_at(n);
                self.0 = b;
                a
            }
            fn varint(&mut self) -> u64 {
                let mut v = 0;
                let mut shift = 0;
                loop {
                    let b = self.take(1)[0];
                    v |= u64::from(b & 0x7f) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        return v;
                    }
                }
            }
            fn fields(mut self) -> Vec<(u64, Vec<u8>)> {
                let mut out = Vec::new();
                while !self.0.is_empty() {
                    let key = self.varint();
                    let payload = match key & 7 {
                        0 => self.varint().to_le_bytes().to_vec(),
                        1 => self.take(8).to_vec(),
                        5 => self.take(4).to_vec(),
                        2 => {
                            let n = self.varint() as usize;
                            self.take(n).to_vec()
                        }
                        w => panic!("wire type {w}"),
                    };
                    out.push((key >> 3, payload));
                }
                out
            }
        }

        fn decode(data: &[u8]) -> Event {
            let mut e = Event::default();
            for (f, p) in Buf(data).fields() {
                match f {
                    1 => e.wall_time = f64::from_le_bytes(p.try_into().unwrap()),
                    2 => e.step = i64::from_le_bytes(p.try_into().unwrap()),
                    3 => e.file_version = Some(String::from_utf8(p).unwrap()),
                    5 => {
                        for (vf, value) in Buf(&p).fields() {
                            assert_eq!(vf, 1, "Summary has only `value`");
                            let (mut tag, mut x) = (String::new(), f32::NAN);
                            for (g, q) in Buf(&value).fields() {
                                match g {
                                    1 => tag = String::from_utf8(q).unwrap(),
                                    2 => x = f32::from_le_bytes(q.try_into().unwrap()),
                                    g => panic!("Value field {g}"),
                                }
                            }
                            e.values.push((tag, x));
                        }
                    }
                    f => panic!("Event field {f}"),
                }
            }
            e
        }

        /// Every event of a file; an error names the first bad record.
        pub fn read(bytes: &[u8]) -> Result<Vec<Event>, String> {
            let mut out = Vec::new();
            let mut b = bytes;
            while !b.is_empty() {
                let i = out.len();
                if b.len() < 12 {
                    return Err(format!("record {i}: truncated length"));
                }
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                if u32::from_le_bytes(b[8..12].try_into().unwrap()) != masked(&b[..8]) {
                    return Err(format!("record {i}: bad length CRC"));
                }
                if b.len() < 16 + n {
                    return Err(format!("record {i}: truncated data"));
                }
                let data = &b[12..12 + n];
                if u32::from_le_bytes(b[12 + n..16 + n].try_into().unwrap()) != masked(data) {
                    return Err(format!("record {i}: bad data CRC"));
                }
                out.push(decode(data));
                b = &b[16 + n..];
            }
            Ok(out)
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lewel-tb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn events(dir: &Path) -> Vec<reader::Event> {
        reader::read(&std::fs::read(dir.join(EVENTS_FILE)).unwrap()).unwrap()
    }

    fn records() -> Vec<serde_json::Value> {
        vec![
            json!({"epoch": 0, "knn_acc": 12.5}),
            json!({"step": 1, "epoch": 1, "loss": 3.25, "lr": 0.1, "ema_m": 0.9, "ms": 120.5, "img_per_s": 531.0, "data_ms": 4.0, "skipped": 0, "device_mib": null}),
            json!({"step": 2, "epoch": 1, "loss": 3.0625, "lr": 0.2, "ema_m": 0.95}),
            json!({"epoch": 1, "knn_acc": null, "mean_loss": 3.15625}),
            json!({"note": "a record of another kind"}),
            json!({"step": 300, "epoch": 2, "loss": 2.5, "lr": 0.05, "ema_m": 0.999}),
            json!({"epoch": 2, "knn_acc": 40.0, "mean_loss": 2.5}),
        ]
    }

    /// Writes `records` as a run does: each line to metrics.jsonl, then its event.
    fn write_run(dir: &Path, records: &[serde_json::Value]) {
        let mut m = std::fs::File::create(dir.join("metrics.jsonl")).unwrap();
        let mut w = Writer::open(dir).unwrap();
        for v in records {
            writeln!(m, "{v}").unwrap();
            w.write(v).unwrap();
        }
    }

    #[test]
    #[allow(clippy::manual_rotate)]
    fn crc32c_and_its_mask() {
        // The standard check value of CRC-32C, from the crate and from the test's own.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(reader::crc32c(b"123456789"), 0xe306_9283);
        let c = crc32c::crc32c(b"abc");
        assert_eq!(
            masked_crc(b"abc"),
            ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn tensorboard_events_read_back_with_both_crcs() {
        let d = tmp("readback");
        let t0 = now();
        write_run(&d, &records());
        let ev = events(&d);
        assert_eq!(ev.len(), 7, "header + 6 records with scalars: {ev:?}");
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(ev[0].values.is_empty());
        for e in &ev {
            assert!(
                e.wall_time >= t0 - 1.0 && e.wall_time <= now() + 1.0,
                "{e:?}"
            );
        }
        let tagged = |i: usize| -> (i64, Vec<(&str, f32)>) {
            (
                ev[i].step,
                ev[i].values.iter().map(|(t, v)| (t.as_str(), *v)).collect(),
            )
        };
        assert_eq!(tagged(1), (0, vec![("knn/acc", 12.5)]));
        assert_eq!(
            tagged(2),
            (
                1,
                vec![
                    ("train/loss", 3.25),
                    ("train/lr", 0.1),
                    ("train/ema_momentum", 0.9),
                    ("time/step_ms", 120.5),
                    ("time/data_ms", 4.0),
                    ("time/img_per_s", 531.0),
                    ("data/skipped", 0.0)
                ]
            )
        );
        assert_eq!(
            tagged(3),
            (
                2,
                vec![
                    ("train/loss", 3.0625),
                    ("train/lr", 0.2),
                    ("train/ema_momentum", 0.95)
                ]
            )
        );
        assert_eq!(tagged(4), (1, vec![("epoch/mean_loss", 3.15625)]));
        assert_eq!(tagged(5).0, 300);
        assert_eq!(
            tagged(6),
            (2, vec![("epoch/mean_loss", 2.5), ("knn/acc", 40.0)])
        );

        // The reader catches damage in either CRC.
        let bytes = std::fs::read(d.join(EVENTS_FILE)).unwrap();
        let mut bad = bytes.clone();
        bad[3] ^= 1;
        assert!(reader::read(&bad).unwrap_err().contains("bad length CRC"));
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 0x40;
        assert_eq!(reader::read(&bad).unwrap_err(), "record 6: bad data CRC");
    }

    /// A new run (empty metrics.jsonl) starts its events afresh; reopening a running one appends.
    #[test]
    fn tensorboard_open_starts_afresh_or_appends() {
        let d = tmp("open");
        write_run(&d, &records()[..3]);
        assert_eq!(events(&d).len(), 4);
        // Reopened with metrics.jsonl present (a resume): appends after what is there.
        let mut w = Writer::open(&d).unwrap();
        w.write(&records()[3]).unwrap();
        let ev = events(&d);
        assert_eq!(ev.len(), 5);
        assert_eq!(ev.iter().filter(|e| e.file_version.is_some()).count(), 1);
        // A new run in the folder: metrics.jsonl emptied, so are the events.
        std::fs::write(d.join("metrics.jsonl"), "").unwrap();
        Writer::open(&d).unwrap();
        assert_eq!(events(&d).len(), 1);
        // A run from before event files: its events come from metrics.jsonl at the first open.
        let text: String = records().iter().map(|v| format!("{v}\n")).collect();
        std::fs::write(d.join("metrics.jsonl"), text).unwrap();
        std::fs::remove_file(d.join(EVENTS_FILE)).unwrap();
        Writer::open(&d).unwrap();
        assert_eq!(events(&d).len(), 7);
    }

    /// Cutting metrics.jsonl back (as a resume does) and rewriting leaves exactly the events of the
    /// lines kept, wall times and all; unparseable lines are left out.
    #[test]
    fn tensorboard_rewrite_mirrors_a_cut_metrics_file() {
        let d = tmp("rewrite");
        let recs = records();
        write_run(&d, &recs);
        let full = std::fs::read(d.join(EVENTS_FILE)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        rewrite_from_metrics(&d).unwrap();
        assert_eq!(std::fs::read(d.join(EVENTS_FILE)).unwrap(), full);

        let kept: String = recs[..4].iter().map(|v| format!("{v}\n")).collect();
        std::fs::write(d.join("metrics.jsonl"), format!("{kept}not json\n")).unwrap();
        rewrite_from_metrics(&d).unwrap();
        let cut = std::fs::read(d.join(EVENTS_FILE)).unwrap();
        assert_eq!(reader::read(&cut).unwrap().len(), 5);
        assert_eq!(
            &full[..cut.len()],
            &cut[..],
            "a byte prefix of the old file"
        );
        assert!(
            !std::fs::read_dir(&d).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp")),
            "no temporary file left"
        );
    }

    /// A short built-in run leaves an event file whose scalars are metrics.jsonl's.
    #[test]
    fn tensorboard_a_run_leaves_the_events_of_its_metrics() {
        use crate::run::{pretrain, PretrainConfig, RunOptions};
        let d = std::env::temp_dir().join(format!("lewel-tb-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let cfg = PretrainConfig {
            epochs: 2,
            warmup_epochs: Some(1),
            batch_size: 16,
            train_len: 64,
            val_len: 40,
            image_size: Some(32),
            log_every: 1000,
            device: "cpu".into(),
            out: d.clone(),
            ..Default::default()
        };
        pretrain(&cfg, &RunOptions::default()).unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ev = events(&d);
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        let scalar = |e: &reader::Event, tag: &str| {
            e.values
                .iter()
                .find(|(t, _)| t == tag)
                .map(|(_, v)| *v as f64)
        };
        let f32_of = |v: &serde_json::Value| v.as_f64().map(|x| x as f32 as f64);
        let steps: Vec<&serde_json::Value> = lines.iter().filter(|v| v["step"].is_i64()).collect();
        let step_events: Vec<&reader::Event> = ev
            .iter()
            .filter(|e| scalar(e, "train/loss").is_some())
            .collect();
        assert_eq!(steps.len(), 8, "2 epochs x 4 iterations");
        assert_eq!(step_events.len(), steps.len());
        for (v, e) in steps.iter().zip(&step_events) {
            assert_eq!(e.step, v["step"].as_i64().unwrap());
            assert_eq!(scalar(e, "train/loss"), f32_of(&v["loss"]));
            assert_eq!(scalar(e, "train/lr"), f32_of(&v["lr"]));
            assert_eq!(scalar(e, "train/ema_momentum"), f32_of(&v["ema_m"]));
            assert_eq!(scalar(e, "time/step_ms"), f32_of(&v["ms"]));
        }
        let knn: Vec<(i64, Option<f64>)> = lines
            .iter()
            .filter(|v| !v["step"].is_i64())
            .map(|v| (v["epoch"].as_i64().unwrap(), f32_of(&v["knn_acc"])))
            .collect();
        let knn_events: Vec<(i64, Option<f64>)> = ev
            .iter()
            .filter(|e| scalar(e, "knn/acc").is_some())
            .map(|e| (e.step, scalar(e, "knn/acc")))
            .collect();
        assert_eq!(knn.len(), 3, "epochs 0, 1, 2");
        assert_eq!(knn_events, knn);
        let means: Vec<Option<f64>> = lines
            .iter()
            .filter_map(|v| v.get("mean_loss").map(f32_of))
            .collect();
        let mean_events: Vec<Option<f64>> = ev
            .iter()
            .filter_map(|e| scalar(e, "epoch/mean_loss").map(Some))
            .collect();
        assert_eq!((means.len(), &mean_events), (2, &means));
        assert_eq!(ev.len(), 1 + lines.len(), "one event per metrics line");
    }
}
