//! A restricted pickle reader for PyTorch checkpoints: it builds data, never runs code.
//!
//! Only the opcodes that `pickle` writes for protocols 2-5 (and a few of protocol 0/1) for plain
//! containers are read. A GLOBAL is looked up in an allow-list of the names a checkpoint holds
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`, ...); each is
//! interpreted here as data (an OrderedDict becomes a dict, `_rebuild_tensor_v2` a tensor reference),
//! nothing is imported or called. Any other global is refused, naming it. A persistent id must be
//! PyTorch's storage reference `('storage', torch.XStorage, key, location, numel[, view])`.
//!
//! Every read is bounds-checked: a truncated or corrupt pickle is an `Err` with one line (the
//! opcode and its byte offset), never a panic. Containers are shared through the memo as Python
//! shares them (`Rc<RefCell>`), and nesting is limited to `MAX_DEPTH` levels.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Nesting depth allowed in a pickled value (a state dict is 3-5 levels deep).
pub const MAX_DEPTH: usize = 64;

/// Element type of a PyTorch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 | Elem::I16 => 2,
            Elem::I8 | Elem::U8 | Elem::Bool => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, Elem::F64 | Elem::F32 | Elem::F16 | Elem::BF16)
    }
    pub fn name(self) -> &'static str {
        match self {
            Elem::F64 => "float64",
            Elem::F32 => "float32",
            Elem::F16 => "float16",
            Elem::BF16 => "bfloat16",
            Elem::I64 => "int64",
            Elem::I32 => "int32",
            Elem::I16 => "int16",
            Elem::I8 => "int8",
            Elem::U8 => "uint8",
            Elem::Bool => "bool",
        }
    }
    /// The element type of a storage class name (`FloatStorage`); `UntypedStorage` holds bytes.
    fn of_storage(name: &str) -> Option<Elem> {
        Some(match name {
            "DoubleStorage" => Elem::F64,
            "FloatStorage" => Elem::F32,
            "HalfStorage" => Elem::F16,
            "BFloat16Storage" => Elem::BF16,
            "LongStorage" => Elem::I64,
            "IntStorage" => Elem::I32,
            "ShortStorage" => Elem::I16,
            "CharStorage" => Elem::I8,
            "ByteStorage" | "UntypedStorage" => Elem::U8,
            "BoolStorage" => Elem::Bool,
            _ => return None,
        })
    }
}

/// A reference to (part of) a storage record of the file: `numel` elements of type `elem` starting
/// `offset` elements into the record `key` (offset is non-zero only for legacy storage views).
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub elem: Elem,
    pub key: String,
    pub location: String,
    pub offset: usize,
    pub numel: usize,
}

/// A tensor: a strided view of a storage, in elements.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A value read from a pickle.
#[derive(Clone, Debug, PartialEq)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64: little-endian two's complement bytes, as LONG1/LONG4 store them.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Obj>),
    Tuple(Vec<Obj>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Vec<(Obj, Obj)>),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// A value of an allowed kind that nothing here reads (a numpy dtype, an unusual numpy scalar).
    Opaque(String),
}

impl Obj {
    /// The value under a string key of a dict.
    pub fn get(&self, key: &str) -> Option<&Obj> {
        match self {
            Obj::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Obj::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
    /// What kind of value this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) | Obj::BigInt(_) => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Bytes(_) => "bytes",
            Obj::List(_) => "list",
            Obj::Tuple(_) => "tuple",
            Obj::Dict(_) => "dict",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
            Obj::Opaque(_) => "object",
        }
    }
}

// ----------------------------------------------------------------------------
// The machine

/// The globals a checkpoint may name, each read as data.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    TorchSize,
    Storage(Elem),
    NumpyScalar,
    NumpyDtype,
    /// `_codecs.encode(str, 'latin1')`: how protocol 2 writes Python 3 bytes.
    CodecsEncode,
}

fn allowed(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Global::RebuildParameter
        }
        ("torch", "Size") => Global::TorchSize,
        ("torch" | "torch.storage", s) => Global::Storage(Elem::of_storage(s)?),
        ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Global::NumpyScalar,
        ("numpy", "dtype") => Global::NumpyDtype,
        ("_codecs", "encode") => Global::CodecsEncode,
        _ => return None,
    })
}

/// A value on the machine's stack: containers shared as Python shares them.
#[derive(Clone, Debug)]
enum V {
    Leaf(Obj),
    List(Rc<RefCell<Vec<V>>>),
    Dict(Rc<RefCell<Vec<(V, V)>>>),
    Tuple(Rc<Vec<V>>),
    Global(Global),
    /// A numpy dtype: its descr ("f8") and whether it is big-endian.
    NpDtype(String, bool),
    Mark,
}

impl V {
    fn kind(&self) -> &'static str {
        match self {
            V::Leaf(o) => o.kind(),
            V::List(_) => "list",
            V::Dict(_) => "dict",
            V::Tuple(_) => "tuple",
            V::Global(_) => "global",
            V::NpDtype(..) => "numpy dtype",
            V::Mark => "mark",
        }
    }
    fn to_obj(&self, depth: usize) -> Result<Obj, String> {
        if depth > MAX_DEPTH {
            return Err(format!("values nested deeper than {MAX_DEPTH} levels"));
        }
        Ok(match self {
            V::Leaf(o) => o.clone(),
            V::List(l) => Obj::List(
                l.borrow()
                    .iter()
                    .map(|v| v.to_obj(depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
            V::Tuple(t) => Obj::Tuple(
                t.iter()
                    .map(|v| v.to_obj(depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
            V::Dict(d) => Obj::Dict(
                d.borrow()
                    .iter()
                    .map(|(k, v)| Ok((k.to_obj(depth + 1)?, v.to_obj(depth + 1)?)))
                    .collect::<Result<_, String>>()?,
            ),
            V::NpDtype(d, _) => Obj::Opaque(format!("numpy.dtype({d})")),
            V::Global(g) => Obj::Opaque(format!("{g:?}")),
            V::Mark => return Err("a MARK left inside a value".into()),
        })
    }
    fn int(&self) -> Option<i64> {
        match self {
            V::Leaf(Obj::Int(i)) => Some(*i),
            V::Leaf(Obj::Bool(b)) => Some(*b as i64),
            _ => None,
        }
    }
    fn usize(&self) -> Option<usize> {
        self.int().and_then(|i| usize::try_from(i).ok())
    }
    fn str(&self) -> Option<&str> {
        match self {
            V::Leaf(Obj::Str(s)) => Some(s),
            _ => None,
        }
    }
    fn items(&self) -> Option<Vec<V>> {
        match self {
            V::Tuple(t) => Some(t.to_vec()),
            V::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
}

/// What one pickle held: its value, where it ended (the byte after STOP), and every storage its
/// persistent ids named, in order of appearance.
#[derive(Debug)]
pub struct Loaded {
    pub obj: Obj,
    pub end: usize,
    pub storages: Vec<StorageRef>,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    memo: HashMap<u64, V>,
    storages: Vec<StorageRef>,
}

/// Reads the pickle starting at `data[0]`. Errors are one line without the file's name; a refused
/// global reads "refuses to load: the pickle names the global ...".
pub fn load(data: &[u8]) -> Result<Loaded, String> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        storages: Vec::new(),
    };
    let v = m.run()?;
    Ok(Loaded {
        obj: v.to_obj(0)?,
        end: m.pos,
        storages: m.storages,
    })
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "the pickle ends early (needed {n} bytes at byte {} of {})",
                    self.pos,
                    self.data.len()
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    /// A length read from the pickle, checked against what is left (no huge allocations).
    fn len(&mut self, n: u64) -> Result<usize, String> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "the pickle ends early (a {n}-byte item at byte {} of {})",
                self.pos,
                self.data.len()
            ));
        }
        Ok(n as usize)
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("the pickle ends inside a text argument")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a text argument is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: u64) -> Result<V, String> {
        let n = self.len(n)?;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "a string is not valid UTF-8".to_string())?;
        Ok(V::Leaf(Obj::Str(s.to_string())))
    }
    fn bytes(&mut self, n: u64) -> Result<V, String> {
        let n = self.len(n)?;
        Ok(V::Leaf(Obj::Bytes(self.take(n)?.to_vec())))
    }
    fn pop(&mut self) -> Result<V, String> {
        match self.stack.pop() {
            Some(V::Mark) | None => Err("the pickle pops from an empty stack".into()),
            Some(v) => Ok(v),
        }
    }
    fn top(&mut self) -> Result<&mut V, String> {
        match self.stack.last_mut() {
            Some(V::Mark) | None => Err("the pickle reads an empty stack".into()),
            Some(v) => Ok(v),
        }
    }
    /// Everything above the topmost MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<V>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, V::Mark))
            .ok_or("the pickle has no MARK where one is needed")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn memo_get(&self, i: u64) -> Result<V, String> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("the pickle reads memo entry {i}, which was never stored"))
    }
    fn memo_put(&mut self, i: u64) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }
    fn global(&mut self, module: &str, name: &str) -> Result<V, String> {
        match allowed(module, name) {
            Some(g) => Ok(V::Global(g)),
            None => Err(format!(
                "refuses to load: the pickle names the global {module}.{name}, which is not a PyTorch tensor or container"
            )),
        }
    }

    fn run(&mut self) -> Result<V, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            let r = self.op(op);
            match r {
                Ok(true) => {
                    let v = self.pop()?;
                    if !self.stack.is_empty() {
                        return Err("the pickle leaves values on its stack at STOP".into());
                    }
                    return Ok(v);
                }
                Ok(false) => {}
                Err(e) if e.starts_with("refuses") || e.contains(" at byte ") => return Err(e),
                Err(e) => return Err(format!("{e} (opcode 0x{op:02x} at byte {at})")),
            }
        }
    }

    /// One opcode; true at STOP.
    fn op(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b'.' => return Ok(true),
            0x80 => {
                let p = self.u8()?; // PROTO
                if p > 5 {
                    return Err(format!("pickle protocol {p} (at most 5 is known)"));
                }
            }
            0x95 => {
                self.le::<8>()?; // FRAME: a length hint, the opcodes follow inline
            }
            b'(' => self.stack.push(V::Mark),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v);
            }
            b'N' => self.stack.push(V::Leaf(Obj::None)),
            0x88 => self.stack.push(V::Leaf(Obj::Bool(true))),
            0x89 => self.stack.push(V::Leaf(Obj::Bool(false))),
            b'J' => {
                let v = i32::from_le_bytes(self.le()?);
                self.stack.push(V::Leaf(Obj::Int(v as i64)));
            }
            b'K' => {
                let v = self.u8()?;
                self.stack.push(V::Leaf(Obj::Int(v as i64)));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.le()?);
                self.stack.push(V::Leaf(Obj::Int(v as i64)));
            }
            b'I' => {
                let s = self.line()?;
                let v = match s {
                    "00" => Obj::Bool(false),
                    "01" => Obj::Bool(true),
                    _ => Obj::Int(s.parse().map_err(|_| format!("INT argument '{s}'"))?),
                };
                self.stack.push(V::Leaf(v));
            }
            0x8a | 0x8b => {
                // LONG1 / LONG4: little-endian two's complement.
                let n = if op == 0x8a {
                    self.u8()? as u64
                } else {
                    u32::from_le_bytes(self.le()?) as u64
                };
                let n = self.len(n)?;
                let b = self.take(n)?;
                self.stack.push(V::Leaf(long(b)));
            }
            b'G' => {
                let v = f64::from_be_bytes(self.le()?);
                self.stack.push(V::Leaf(Obj::Float(v)));
            }
            b'F' => {
                let s = self.line()?;
                let v = s.parse().map_err(|_| format!("FLOAT argument '{s}'"))?;
                self.stack.push(V::Leaf(Obj::Float(v)));
            }
            b'X' => {
                let n = u32::from_le_bytes(self.le()?) as u64;
                let v = self.utf8(n)?;
                self.stack.push(v);
            }
            0x8c => {
                let n = self.u8()? as u64;
                let v = self.utf8(n)?;
                self.stack.push(v);
            }
            0x8d => {
                let n = u64::from_le_bytes(self.le()?);
                let v = self.utf8(n)?;
                self.stack.push(v);
            }
            b'T' | b'U' => {
                // BINSTRING / SHORT_BINSTRING (Python 2 str): read as text when it is UTF-8.
                let n = if op == b'U' {
                    self.u8()? as u64
                } else {
                    u32::from_le_bytes(self.le()?) as u64
                };
                let n = self.len(n)?;
                let b = self.take(n)?;
                let v = match std::str::from_utf8(b) {
                    Ok(s) => Obj::Str(s.to_string()),
                    Err(_) => Obj::Bytes(b.to_vec()),
                };
                self.stack.push(V::Leaf(v));
            }
            b'C' => {
                let n = self.u8()? as u64;
                let v = self.bytes(n)?;
                self.stack.push(v);
            }
            b'B' => {
                let n = u32::from_le_bytes(self.le()?) as u64;
                let v = self.bytes(n)?;
                self.stack.push(v);
            }
            0x8e | 0x96 => {
                let n = u64::from_le_bytes(self.le()?);
                let v = self.bytes(n)?;
                self.stack.push(v);
            }
            b']' => self.stack.push(V::List(Rc::default())),
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(V::List(Rc::new(RefCell::new(items))));
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b')' => self.stack.push(V::Tuple(Rc::default())),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(V::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n
                    || self.stack[self.stack.len() - n..]
                        .iter()
                        .any(|v| matches!(v, V::Mark))
                {
                    return Err("the pickle builds a tuple from an empty stack".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(V::Tuple(Rc::new(items)));
            }
            b'}' => self.stack.push(V::Dict(Rc::default())),
            b'd' => {
                let items = self.pop_mark()?;
                let d = pairs(items)?;
                self.stack.push(V::Dict(Rc::new(RefCell::new(d))));
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![(k, v)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let d = pairs(items)?;
                self.set_items(d)?;
            }
            0x8f => self.stack.push(V::List(Rc::default())), // EMPTY_SET, read as a list
            0x90 => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            0x91 => {
                let items = self.pop_mark()?;
                self.stack.push(V::List(Rc::new(RefCell::new(items))));
            }
            b'c' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                let g = self.global(&module, &name)?;
                self.stack.push(g);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module.str(), name.str()) {
                    (Some(m), Some(n)) => {
                        let g = self.global(m, n)?;
                        self.stack.push(g);
                    }
                    _ => return Err("STACK_GLOBAL on values that are not strings".into()),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let v = self.reduce(f, args)?;
                self.stack.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                self.build(state)?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let s = storage_of_pid(&pid)?;
                self.storages.push(s.clone());
                self.stack.push(V::Leaf(Obj::Storage(s)));
            }
            b'p' => {
                let s = self.line()?;
                let i = s.parse().map_err(|_| format!("PUT argument '{s}'"))?;
                self.memo_put(i)?;
            }
            b'q' => {
                let i = self.u8()? as u64;
                self.memo_put(i)?;
            }
            b'r' => {
                let i = u32::from_le_bytes(self.le()?) as u64;
                self.memo_put(i)?;
            }
            0x94 => {
                let i = self.memo.len() as u64;
                self.memo_put(i)?;
            }
            b'g' => {
                let s = self.line()?;
                let i = s.parse().map_err(|_| format!("GET argument '{s}'"))?;
                let v = self.memo_get(i)?;
                self.stack.push(v);
            }
            b'h' => {
                let i = self.u8()? as u64;
                let v = self.memo_get(i)?;
                self.stack.push(v);
            }
            b'j' => {
                let i = u32::from_le_bytes(self.le()?) as u64;
                let v = self.memo_get(i)?;
                self.stack.push(v);
            }
            _ => {
                return Err(format!(
                    "pickle opcode {} is not read here (only plain data and PyTorch tensors are)",
                    opcode_name(op)
                ))
            }
        }
        Ok(false)
    }

    fn append(&mut self, items: Vec<V>) -> Result<(), String> {
        match self.top()? {
            V::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            v => Err(format!("the pickle appends to a {}", v.kind())),
        }
    }

    fn set_items(&mut self, items: Vec<(V, V)>) -> Result<(), String> {
        match self.top()? {
            V::Dict(d) => {
                // Python's pickler writes each key once; a hand-made repeat is kept, and the
                // importer refuses a state dict that names a tensor twice.
                d.borrow_mut().extend(items);
                Ok(())
            }
            v => Err(format!("the pickle sets items on a {}", v.kind())),
        }
    }

    fn reduce(&mut self, f: V, args: V) -> Result<V, String> {
        let g = match f {
            V::Global(g) => g,
            v => return Err(format!("the pickle calls a {}", v.kind())),
        };
        let a = match &args {
            V::Tuple(t) => t.to_vec(),
            v => return Err(format!("the pickle calls {g:?} with a {}", v.kind())),
        };
        let bad = |what: &str| format!("{what} with unexpected arguments");
        Ok(match g {
            Global::OrderedDict => match a.as_slice() {
                [] => V::Dict(Rc::default()),
                [items] => {
                    let mut d = Vec::new();
                    for p in items.items().ok_or_else(|| bad("OrderedDict"))? {
                        match p.items().as_deref() {
                            Some([k, v]) => d.push((k.clone(), v.clone())),
                            _ => return Err(bad("OrderedDict")),
                        }
                    }
                    V::Dict(Rc::new(RefCell::new(d)))
                }
                _ => return Err(bad("OrderedDict")),
            },
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                if a.len() < 4 {
                    return Err(bad("_rebuild_tensor"));
                }
                let storage = match &a[0] {
                    V::Leaf(Obj::Storage(s)) => s.clone(),
                    v => return Err(format!("a tensor built on a {}, not a storage", v.kind())),
                };
                let offset = a[1].usize().ok_or_else(|| bad("_rebuild_tensor"))?;
                let dims = |v: &V| -> Result<Vec<usize>, String> {
                    v.items()
                        .ok_or_else(|| bad("_rebuild_tensor"))?
                        .iter()
                        .map(|d| d.usize().ok_or_else(|| bad("_rebuild_tensor")))
                        .collect()
                };
                let size = dims(&a[2])?;
                let stride = dims(&a[3])?;
                if size.len() != stride.len() {
                    return Err(format!(
                        "a tensor with {} sizes and {} strides",
                        size.len(),
                        stride.len()
                    ));
                }
                V::Leaf(Obj::Tensor(TensorRef {
                    storage,
                    offset,
                    size,
                    stride,
                }))
            }
            Global::RebuildParameter => match a.first() {
                Some(t @ V::Leaf(Obj::Tensor(_))) => t.clone(),
                _ => return Err(bad("_rebuild_parameter")),
            },
            Global::TorchSize => match a.as_slice() {
                [t] if t.items().is_some() => V::Tuple(Rc::new(t.items().unwrap())),
                _ => return Err(bad("torch.Size")),
            },
            Global::Storage(_) => return Err("the pickle calls a storage class".into()),
            Global::NumpyDtype => match a.first().and_then(|d| d.str()) {
                Some(d) => V::NpDtype(d.to_string(), false),
                None => return Err(bad("numpy.dtype")),
            },
            Global::NumpyScalar => match a.as_slice() {
                [V::NpDtype(d, big), V::Leaf(Obj::Bytes(b))] => V::Leaf(numpy_scalar(d, *big, b)),
                _ => return Err(bad("numpy scalar")),
            },
            Global::CodecsEncode => match a.as_slice() {
                [s, e] if matches!(e.str(), Some("latin1" | "latin-1")) && s.str().is_some() => {
                    let s = s.str().unwrap();
                    let b: Option<Vec<u8>> =
                        s.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                    V::Leaf(Obj::Bytes(b.ok_or_else(|| bad("_codecs.encode"))?))
                }
                _ => return Err(bad("_codecs.encode")),
            },
        })
    }

    /// BUILD: an OrderedDict's attributes (`_metadata`) and a parameter's state are dropped; a
    /// numpy dtype takes its byte order.
    fn build(&mut self, state: V) -> Result<(), String> {
        match self.top()? {
            V::Dict(_) | V::Leaf(Obj::Tensor(_)) => Ok(()),
            V::NpDtype(_, big) => {
                if let Some(s) = state.items() {
                    *big = s.get(1).and_then(|v| v.str()) == Some(">");
                }
                Ok(())
            }
            v => Err(format!("the pickle sets the state of a {}", v.kind())),
        }
    }
}

fn pairs(items: Vec<V>) -> Result<Vec<(V, V)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("a dict built from an odd number of values".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// LONG1/LONG4 bytes: an i64 when it fits, else the bytes.
fn long(b: &[u8]) -> Obj {
    if b.is_empty() {
        return Obj::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut w = [if neg { 0xff } else { 0 }; 8];
        w[..b.len()].copy_from_slice(b);
        return Obj::Int(i64::from_le_bytes(w));
    }
    Obj::BigInt(b.to_vec())
}

/// A numpy scalar from its dtype descr and raw bytes (the official code's kNN accuracy is a
/// numpy float64).
fn numpy_scalar(descr: &str, big: bool, b: &[u8]) -> Obj {
    let arr = |n: usize| -> Option<Vec<u8>> {
        (b.len() == n).then(|| {
            let mut v = b.to_vec();
            if big {
                v.reverse();
            }
            v
        })
    };
    let v = match descr.trim_start_matches(['<', '>', '=', '|']) {
        "f8" => arr(8).map(|v| Obj::Float(f64::from_le_bytes(v.try_into().unwrap()))),
        "f4" => arr(4).map(|v| Obj::Float(f32::from_le_bytes(v.try_into().unwrap()) as f64)),
        "i8" => arr(8).map(|v| Obj::Int(i64::from_le_bytes(v.try_into().unwrap()))),
        "i4" => arr(4).map(|v| Obj::Int(i32::from_le_bytes(v.try_into().unwrap()) as i64)),
        "b1" => arr(1).map(|v| Obj::Bool(v[0] != 0)),
        _ => None,
    };
    v.unwrap_or_else(|| Obj::Opaque(format!("numpy scalar {descr}")))
}

/// PyTorch's persistent id: ('storage', torch.XStorage, key, location, numel[, view]), where a
/// legacy view is (view_key, offset, numel) into the record `key`.
fn storage_of_pid(pid: &V) -> Result<StorageRef, String> {
    let bad = || "a persistent id that is not a PyTorch storage reference".to_string();
    let t = pid.items().ok_or_else(bad)?;
    if t.len() < 5 || t.len() > 6 || t[0].str() != Some("storage") {
        return Err(bad());
    }
    let elem = match &t[1] {
        V::Global(Global::Storage(e)) => *e,
        _ => return Err(bad()),
    };
    let key = t[2].str().ok_or_else(bad)?.to_string();
    if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
        return Err(format!("a storage key '{key}' that is not a plain name"));
    }
    let location = t[3].str().ok_or_else(bad)?.to_string();
    let numel = t[4].usize().ok_or_else(bad)?;
    let mut s = StorageRef {
        elem,
        key,
        location,
        offset: 0,
        numel,
    };
    if let Some(view) = t.get(5) {
        match view.items().as_deref() {
            None if matches!(view, V::Leaf(Obj::None)) => {}
            Some([_, off, n]) => {
                s.offset = off.usize().ok_or_else(bad)?;
                s.numel = n.usize().ok_or_else(bad)?;
            }
            _ => return Err(bad()),
        }
    }
    Ok(s)
}

fn opcode_name(op: u8) -> String {
    let name = match op {
        b'P' => "PERSID",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'L' => "LONG",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82..=0x84 => "EXT",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "",
    };
    if name.is_empty() {
        format!("0x{op:02x}")
    } else {
        format!("{name} (0x{op:02x})")
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(b: &[u8]) -> Obj {
        load(b).unwrap_or_else(|e| panic!("{e}")).obj
    }

    #[test]
    fn scalars_strings_and_containers() {
        // protocol 2: {'a': [1, -2, 300, 70000], 'b': (True, None, 1.5), 'c': 'x'}
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(']; // {} PUT 0 MARK
        p.extend([b'X', 1, 0, 0, 0, b'a', b']', b'(']); // 'a' [] MARK
        p.extend([b'K', 1, b'J', 0xfe, 0xff, 0xff, 0xff, b'M', 0x2c, 0x01]);
        p.extend([b'J', 0x70, 0x11, 0x01, 0x00, b'e']); // 70000, APPENDS
        p.extend([0x8c, 1, b'b', 0x88, b'N', b'G']);
        p.extend(1.5f64.to_be_bytes());
        p.extend([0x87, 0x8c, 1, b'c', 0x8c, 1, b'x', b'u', b'.']);
        let o = ok(&p);
        assert_eq!(
            o.get("a"),
            Some(&Obj::List(vec![
                Obj::Int(1),
                Obj::Int(-2),
                Obj::Int(300),
                Obj::Int(70000)
            ]))
        );
        assert_eq!(
            o.get("b"),
            Some(&Obj::Tuple(vec![
                Obj::Bool(true),
                Obj::None,
                Obj::Float(1.5)
            ]))
        );
        assert_eq!(o.get("c"), Some(&Obj::Str("x".into())));
        assert_eq!(o.get("d"), None);
    }

    #[test]
    fn the_memo_shares_containers_as_python_does() {
        // l = []; d = {'x': l}; l.append(7); pickled as: [] PUT 0, then the dict refers to it by
        // GET before the list is filled: [] q0 } ( 'x' h0 u ... the append comes after.
        let p = [
            0x80, 2, b']', b'q', 0, b'0', b'}', b'(', 0x8c, 1, b'x', b'h', 0, b'u', b'h', 0, b'K',
            7, b'a', b'0', b'.',
        ];
        let o = ok(&p);
        assert_eq!(o.get("x"), Some(&Obj::List(vec![Obj::Int(7)])));
    }

    #[test]
    fn long1_big_ints_and_negative_ints() {
        // LONG1 with 10 bytes: PyTorch's legacy magic number 0x1950a86a20f9469cfc6c.
        let magic = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
        let mut p = vec![0x80, 2, 0x8a, 10];
        p.extend(magic);
        p.push(b'.');
        assert_eq!(ok(&p), Obj::BigInt(magic.to_vec()));
        assert_eq!(ok(&[0x8a, 2, 0x18, 0xfc, b'.']), Obj::Int(-1000));
        assert_eq!(ok(&[0x8a, 0, b'.']), Obj::Int(0));
        assert_eq!(ok(b"I01\n."), Obj::Bool(true));
    }

    #[test]
    fn a_tensor_in_an_ordered_dict() {
        // Built by hand: OrderedDict([('w', tensor(FloatStorage key '0', offset 0, size (2, 3),
        // stride (3, 1)))]), with the dict's _metadata BUILD.
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
        p.extend(b"X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((");
        p.extend(b"X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04");
        p.extend(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89");
        p.extend(b"h\x00)R"); // the OrderedDict global again through the memo: empty hooks
        p.extend(b"tRu}b.");
        let o = ok(&p);
        let t = match o.get("w") {
            Some(Obj::Tensor(t)) => t.clone(),
            x => panic!("{x:?}"),
        };
        assert_eq!(t.storage.elem, Elem::F32);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.numel, 6);
        assert_eq!((t.size, t.stride), (vec![2, 3], vec![3, 1]));
        let l = load(&p).unwrap();
        assert_eq!(l.storages.len(), 1);
        assert_eq!(l.end, p.len());
    }

    #[test]
    fn a_legacy_storage_view_and_torch_size() {
        // ('storage', torch.HalfStorage, '7', 'cuda:0', 10, ('8', 4, 3)): 3 halves from element 4
        // of record '7'; then torch.Size((3,)) REDUCE'd to a tuple.
        let mut p = vec![0x80, 2, b'('];
        p.extend(b"X\x07\x00\x00\x00storagectorch\nHalfStorage\n");
        p.extend(b"X\x01\x00\x00\x007X\x06\x00\x00\x00cuda:0K\x0a");
        p.extend(b"X\x01\x00\x00\x008K\x04K\x03\x87tQ");
        p.extend(b"ctorch\nSize\nK\x03\x85\x85R\x86.");
        let o = ok(&p);
        let want = StorageRef {
            elem: Elem::F16,
            key: "7".into(),
            location: "cuda:0".into(),
            offset: 4,
            numel: 3,
        };
        assert_eq!(
            o,
            Obj::Tuple(vec![Obj::Storage(want), Obj::Tuple(vec![Obj::Int(3)])])
        );
        // A key that would leave the archive's data folder is refused.
        let bad = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x04\x00\x00\x00../xX\x03\x00\x00\x00cpuK\x01tQ.";
        assert!(load(bad).unwrap_err().contains("not a plain name"));
    }

    #[test]
    fn disallowed_globals_are_refused_by_name() {
        for (p, name) in [
            (
                &b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R."[..],
                "os.system",
            ),
            (&b"cposix\nsystem\n(S'ls'\ntR."[..], "posix.system"),
            (
                &b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93."[..],
                "builtins.eval",
            ),
            (&b"ctorch\nload\n."[..], "torch.load"),
        ] {
            let e = load(p).unwrap_err();
            assert_eq!(
                e,
                format!("refuses to load: the pickle names the global {name}, which is not a PyTorch tensor or container")
            );
        }
    }

    #[test]
    fn truncated_and_corrupt_pickles_are_errors_not_panics() {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00wK\x05u.");
        assert_eq!(ok(&p).get("w"), Some(&Obj::Int(5)));
        for n in 0..p.len() {
            let e = load(&p[..n]).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
        for bad in [
            &b"X\xff\xff\xff\xff."[..], // a string longer than the data
            &b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff."[..], // BINUNICODE8 of 2^64-1 bytes
            &b"h\x05."[..],             // GET of nothing
            &b"a."[..],                 // APPEND on an empty stack
            &b"K\x01K\x02a."[..],       // APPEND to an int
            &b"u."[..],                 // SETITEMS without a MARK
            &b"K\x01K\x02."[..],        // two values left at STOP
            &b"\x80\x09."[..],          // protocol 9
            &b"\x81."[..],              // NEWOBJ
            &b"K\x01Q."[..],            // a persistent id that is an int
        ] {
            let e = load(bad).unwrap_err();
            assert!(!e.contains('\n') && !e.is_empty(), "{e}");
        }
        // Nesting deeper than MAX_DEPTH: 100 nested lists.
        let mut deep = vec![0x80, 2];
        deep.extend(std::iter::repeat_n(b'(', 100));
        deep.extend(std::iter::repeat_n(b'l', 100));
        deep.push(b'.');
        let e = load(&deep).unwrap_err();
        assert!(e.contains("nested deeper"), "{e}");
    }

    #[test]
    fn numpy_float64_and_protocol2_bytes() {
        // numpy.float64(12.5) at protocol 2: scalar(dtype('f8', False, True) BUILD (3, '<', ...),
        // _codecs.encode('<8 latin-1 chars>', 'latin1')).
        let mut p = vec![0x80, 2];
        p.extend(b"cnumpy.core.multiarray\nscalar\nq\x00cnumpy\ndtype\nq\x01");
        p.extend(b"X\x02\x00\x00\x00f8\x89\x88\x87Rq\x02");
        p.extend(b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb");
        p.extend(b"c_codecs\nencode\n");
        // 12.5 as f64 LE: 00 00 00 00 00 00 29 40 -> latin-1 chars, UTF-8 encoded in the pickle.
        let s: String = 12.5f64.to_le_bytes().iter().map(|&b| b as char).collect();
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
        p.extend(b"X\x06\x00\x00\x00latin1\x86R\x86R.");
        assert_eq!(ok(&p), Obj::Float(12.5));
    }
}
