//! Memory by hand. Parameters live in one flat buffer carved by a size table; gradients, the LARS
//! momentum and the EMA target are flat buffers with the same table, so an optimizer step or an
//! all-reduce is one pass over one buffer. BN running statistics have a table of their own, and
//! `num_batches_tracked` counters a list of their own. Activations of a step come from an arena that
//! is reset every step and reuses its slots, so the steady state allocates nothing (on the GPU,
//! `autograd::cuda` keeps its own slot arena the same way).

use crate::ops::Real;
use crate::tensor::Shape;
use std::ops::Range;

// ----------------------------------------------------------------------------
// Size table

/// One named tensor inside a flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub shape: Shape,
    pub offset: usize,
}

impl Entry {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.shape.numel()
    }
}

/// Names, shapes and offsets of the tensors in a flat buffer, in insertion order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SizeTable {
    pub entries: Vec<Entry>,
    pub total: usize,
}

impl SizeTable {
    /// Appends a tensor and returns its index. Names are unique.
    pub fn push(&mut self, name: &str, shape: Shape) -> usize {
        assert!(
            self.find(name).is_none(),
            "SizeTable: duplicate name {name}"
        );
        self.entries.push(Entry {
            name: name.to_string(),
            shape,
            offset: self.total,
        });
        self.total += shape.numel();
        self.entries.len() - 1
    }
    pub fn find(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }
    pub fn range(&self, i: usize) -> Range<usize> {
        self.entries[i].range()
    }
}

// ----------------------------------------------------------------------------
// Parameter store

/// A trainable tensor in [`ParamStore::params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId(pub usize);
/// A non-trainable tensor (BN running statistics) in [`ParamStore::buffers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferId(pub usize);
/// An integer counter (BN `num_batches_tracked`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterId(pub usize);

/// The flat buffers of a model.
#[derive(Clone, Debug, Default)]
pub struct ParamStore<T> {
    pub table: SizeTable,
    pub params: Vec<T>,
    pub grads: Vec<T>,
    pub buffer_table: SizeTable,
    pub buffers: Vec<T>,
    pub counters: Vec<(String, i64)>,
}

impl<T: Real> ParamStore<T> {
    pub fn new() -> Self {
        ParamStore {
            table: SizeTable::default(),
            params: Vec::new(),
            grads: Vec::new(),
            buffer_table: SizeTable::default(),
            buffers: Vec::new(),
            counters: Vec::new(),
        }
    }
    /// Adds a trainable tensor filled by `init(i)` for element i.
    pub fn add_param(
        &mut self,
        name: &str,
        shape: Shape,
        mut init: impl FnMut(usize) -> T,
    ) -> ParamId {
        let i = self.table.push(name, shape);
        self.params.extend((0..shape.numel()).map(&mut init));
        self.grads.resize(self.table.total, T::zero());
        ParamId(i)
    }
    /// Adds a non-trainable tensor filled with `value`.
    pub fn add_buffer(&mut self, name: &str, shape: Shape, value: T) -> BufferId {
        let i = self.buffer_table.push(name, shape);
        self.buffers.resize(self.buffer_table.total, value);
        BufferId(i)
    }
    pub fn add_counter(&mut self, name: &str) -> CounterId {
        assert!(
            self.counters.iter().all(|(n, _)| n != name),
            "ParamStore: duplicate counter {name}"
        );
        self.counters.push((name.to_string(), 0));
        CounterId(self.counters.len() - 1)
    }
    pub fn shape(&self, p: ParamId) -> Shape {
        self.table.entries[p.0].shape
    }
    pub fn param(&self, p: ParamId) -> &[T] {
        &self.params[self.table.range(p.0)]
    }
    pub fn param_mut(&mut self, p: ParamId) -> &mut [T] {
        let r = self.table.range(p.0);
        &mut self.params[r]
    }
    pub fn grad(&self, p: ParamId) -> &[T] {
        &self.grads[self.table.range(p.0)]
    }
    pub fn buffer(&self, b: BufferId) -> &[T] {
        &self.buffers[self.buffer_table.range(b.0)]
    }
    pub fn zero_grads(&mut self) {
        self.grads.fill(T::zero());
    }
    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.table.total
    }
}

/// Two disjoint ranges of one buffer, both writable.
pub fn pair_mut<T>(buf: &mut [T], a: Range<usize>, b: Range<usize>) -> (&mut [T], &mut [T]) {
    assert!(
        a.end <= b.start || b.end <= a.start,
        "pair_mut: ranges {a:?} and {b:?} overlap"
    );
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        let n = a.end - a.start;
        (&mut hi[..n], &mut lo[b])
    }
}

// ----------------------------------------------------------------------------
// Activation arena

/// Slots of activation values and their gradients, handed out in order and reused every step.
#[derive(Debug, Default)]
pub struct Arena<T> {
    vals: Vec<Vec<T>>,
    grads: Vec<Vec<T>>,
    live: usize,
    live_elems: usize,
    peak_elems: usize,
}

impl<T: Real> Arena<T> {
    pub fn new() -> Self {
        Arena {
            vals: Vec::new(),
            grads: Vec::new(),
            live: 0,
            live_elems: 0,
            peak_elems: 0,
        }
    }
    /// A slot of `len` elements (contents unspecified until written).
    pub fn alloc(&mut self, len: usize) -> u32 {
        if self.live == self.vals.len() {
            self.vals.push(Vec::new());
            self.grads.push(Vec::new());
        }
        let v = &mut self.vals[self.live];
        v.resize(len, T::zero());
        v.truncate(len);
        self.live += 1;
        self.live_elems += len;
        self.peak_elems = self.peak_elems.max(self.live_elems);
        (self.live - 1) as u32
    }
    /// Forgets every slot; their memory is kept for the next step.
    pub fn reset(&mut self) {
        self.live = 0;
        self.live_elems = 0;
    }
    pub fn live(&self) -> usize {
        self.live
    }
    /// Most value elements held at once since creation.
    pub fn peak_elems(&self) -> usize {
        self.peak_elems
    }
    pub fn val(&self, slot: u32) -> &[T] {
        &self.vals[slot as usize]
    }
    pub fn val_mut(&mut self, slot: u32) -> &mut [T] {
        &mut self.vals[slot as usize]
    }
    pub fn grad(&self, slot: u32) -> &[T] {
        &self.grads[slot as usize]
    }
    /// Moves a value out so it can be written while other slots are read; give it back with `put`.
    pub fn take(&mut self, slot: u32) -> Vec<T> {
        std::mem::take(&mut self.vals[slot as usize])
    }
    pub fn put(&mut self, slot: u32, v: Vec<T>) {
        self.vals[slot as usize] = v;
    }
    pub fn take_grad(&mut self, slot: u32) -> Vec<T> {
        std::mem::take(&mut self.grads[slot as usize])
    }
    pub fn put_grad(&mut self, slot: u32, g: Vec<T>) {
        self.grads[slot as usize] = g;
    }
    /// Seeds the gradient of a scalar output with 1.
    pub fn seed_grad(&mut self, slot: u32) {
        self.grads[slot as usize].fill(T::one());
    }
    /// Sizes every live gradient to its value and zeroes it.
    pub fn zero_grads(&mut self) {
        for i in 0..self.live {
            let n = self.vals[i].len();
            let g = &mut self.grads[i];
            g.clear();
            g.resize(n, T::zero());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_offsets_and_store() {
        let mut s = ParamStore::<f32>::new();
        let a = s.add_param("a", Shape::new(&[2, 3]), |i| i as f32);
        let b = s.add_param("b", Shape::new(&[4]), |_| 1.0);
        let m = s.add_buffer("a.running_mean", Shape::new(&[3]), 0.0);
        assert_eq!(s.table.range(b.0), 6..10);
        assert_eq!(s.param(a), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(s.grads.len(), 10);
        assert_eq!(s.buffer(m).len(), 3);
        assert_eq!(s.table.find("b"), Some(1));
    }

    #[test]
    fn arena_reuses_slots() {
        let mut a = Arena::<f32>::new();
        let s0 = a.alloc(10);
        let s1 = a.alloc(5);
        assert_eq!((s0, s1), (0, 1));
        let p = a.val(0).as_ptr();
        a.reset();
        assert_eq!(a.alloc(8), 0);
        assert_eq!(a.val(0).as_ptr(), p, "slot memory is reused");
        assert_eq!(a.peak_elems(), 15);
    }
}
