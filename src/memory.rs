//! Memory by hand. Parameters live in one flat buffer carved by a size table; gradients, the LARS
//! momentum and the EMA target are flat buffers with the same table, so an optimizer step or an
//! all-reduce is one pass over one buffer. BN running statistics have a table of their own, and
//! `num_batches_tracked` counters a list of their own. Activations of a step come from the graph's
//! slot arena (`crate::graph`), reused every step, so the steady state allocates nothing.

use crate::tensor::Shape;
use num_traits::Zero;
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

impl<T: Copy + Zero> ParamStore<T> {
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
}
