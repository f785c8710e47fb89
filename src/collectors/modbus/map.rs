//! The register map: which values to read, how requests are grouped, and how the words a
//! device returns become typed, scaled fields. Pure logic with no I/O, so every grouping and
//! conversion rule is unit-tested here.
//!
//! Invariants:
//! - **Few requests.** Entries of the same unit and function whose addresses are adjacent or
//!   overlap are read by one request, up to the protocol's limit ([`MAX_REGISTERS`] registers,
//!   [`MAX_BITS`] coils or discrete inputs per request). Entries separated by a gap are never
//!   merged: a device may answer "illegal data address" for the registers in between.
//! - **Every entry lies inside its request.** [`plan`] only builds requests that cover each
//!   entry's whole span, so [`decode`] never indexes outside the words a complete answer has;
//!   a short answer is a [`DecodeError`], not a panic.
//! - **Byte and word order are explicit.** Words go on the wire big-endian (Modbus), the
//!   first register holds the most significant word; `byte_order: little` swaps the two bytes
//!   of each register, `word_order: little` puts the least significant word first.

use super::{RegisterConfig, ValueType};
use crate::record::Value;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Most registers one read request may ask for (Modbus spec, functions 3 and 4).
pub const MAX_REGISTERS: u16 = 125;
/// Most coils or discrete inputs one read request may ask for (functions 1 and 2).
pub const MAX_BITS: u16 = 2000;

/// The four read functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// Read holding registers (function code 3).
    Holding,
    /// Read input registers (4).
    Input,
    /// Read coils (1).
    Coil,
    /// Read discrete inputs (2).
    Discrete,
}

impl Function {
    pub fn is_bits(self) -> bool {
        matches!(self, Function::Coil | Function::Discrete)
    }

    /// The protocol's per-request limit for this function.
    pub fn max_per_request(self) -> u16 {
        if self.is_bits() {
            MAX_BITS
        } else {
            MAX_REGISTERS
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Function::Coil => 1,
            Function::Discrete => 2,
            Function::Holding => 3,
            Function::Input => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Function::Holding => "holding",
            Function::Input => "input",
            Function::Coil => "coil",
            Function::Discrete => "discrete",
        }
    }
}

/// Order of the two bytes in a register, or of the registers in a multi-register value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    #[default]
    Big,
    Little,
}

impl ValueType {
    /// Registers (or bits) one value of this type spans.
    pub fn width(self) -> u16 {
        match self {
            ValueType::Bool | ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
        }
    }
}

/// One entry of the map, validated: where it is and how to turn its words into a field.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub field: String,
    pub unit: u8,
    pub function: Function,
    pub address: u16,
    pub value_type: ValueType,
    pub byte_order: Order,
    pub word_order: Order,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
}

impl Entry {
    pub fn from_config(r: &RegisterConfig, default_unit: u8) -> Entry {
        Entry {
            field: r.field.clone(),
            unit: r.unit.unwrap_or(default_unit),
            function: r.function,
            address: r.address.min(u16::MAX as u32) as u16,
            value_type: r.value_type(),
            byte_order: r.byte_order,
            word_order: r.word_order,
            scale: r.scale,
            offset: r.offset,
        }
    }

    fn end(&self) -> u32 {
        self.address as u32 + self.value_type.width() as u32
    }
}

/// One read request and the entries it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub unit: u8,
    pub function: Function,
    pub address: u16,
    pub count: u16,
    /// Indexes into the map's entries, with the offset of each entry's first word (or bit)
    /// in this request's answer.
    pub entries: Vec<(usize, u16)>,
}

impl Request {
    /// `unit 1 holding 100+4`, for logs and loss samples.
    pub fn describe(&self) -> String {
        format!(
            "unit {} {} {}+{}",
            self.unit,
            self.function.as_str(),
            self.address,
            self.count
        )
    }
}

/// Groups the entries into as few requests as the rules in the module doc allow. Requests
/// come out ordered by unit, function and address.
pub fn plan(entries: &[Entry]) -> Vec<Request> {
    let mut by_key: BTreeMap<(u8, Function), Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_key.entry((e.unit, e.function)).or_default().push(i);
    }
    let mut requests = Vec::new();
    for ((unit, function), mut idx) in by_key {
        idx.sort_by_key(|&i| (entries[i].address, entries[i].end()));
        let max = function.max_per_request() as u32;
        let mut current: Option<(u32, u32, Vec<usize>)> = None;
        for i in idx {
            let e = &entries[i];
            let (start, end) = (e.address as u32, e.end());
            match &mut current {
                Some((s, en, members)) if start <= *en && end.max(*en) - *s <= max => {
                    *en = end.max(*en);
                    members.push(i);
                }
                _ => {
                    if let Some(done) = current.take() {
                        requests.push(request(unit, function, done, entries));
                    }
                    current = Some((start, end, vec![i]));
                }
            }
        }
        if let Some(done) = current {
            requests.push(request(unit, function, done, entries));
        }
    }
    requests
}

fn request(
    unit: u8,
    function: Function,
    (start, end, members): (u32, u32, Vec<usize>),
    entries: &[Entry],
) -> Request {
    Request {
        unit,
        function,
        // Validation keeps every entry inside 0..=65535 and one entry under the limit.
        address: start as u16,
        count: (end - start) as u16,
        entries: members
            .into_iter()
            .map(|i| (i, (entries[i].address as u32 - start) as u16))
            .collect(),
    }
}

/// Why an entry's value could not be made a field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("{field}: the answer has {got} values, {need} needed")]
    Short {
        field: String,
        need: usize,
        got: usize,
    },
    #[error("{field}: not a finite number ({value})")]
    NotFinite { field: String, value: f64 },
}

/// The field of one entry from its request's register answer, starting at `at`.
pub fn decode_registers(entry: &Entry, words: &[u16], at: u16) -> Result<Value, DecodeError> {
    let width = entry.value_type.width() as usize;
    let at = at as usize;
    let Some(words) = words.get(at..at + width) else {
        return Err(DecodeError::Short {
            field: entry.field.clone(),
            need: at + width,
            got: words.len(),
        });
    };
    let mut ordered: Vec<u16> = words
        .iter()
        .map(|w| match entry.byte_order {
            Order::Big => *w,
            Order::Little => w.swap_bytes(),
        })
        .collect();
    if entry.word_order == Order::Little {
        ordered.reverse();
    }
    let raw = ordered.iter().fold(0u64, |acc, w| (acc << 16) | *w as u64);
    let value = match entry.value_type {
        ValueType::Bool => Value::Bool(raw != 0),
        ValueType::U16 | ValueType::U32 | ValueType::U64 => Value::U64(raw),
        ValueType::I16 => Value::I64(raw as u16 as i16 as i64),
        ValueType::I32 => Value::I64(raw as u32 as i32 as i64),
        ValueType::I64 => Value::I64(raw as i64),
        // The shortest decimal that gives back the same f32 (21.1, not 21.100000381469727).
        ValueType::F32 => {
            let f = f32::from_bits(raw as u32);
            Value::F64(f.to_string().parse().unwrap_or(f as f64))
        }
        ValueType::F64 => Value::F64(f64::from_bits(raw)),
    };
    scaled(entry, value)
}

/// The field of one coil or discrete input from its request's bit answer.
pub fn decode_bits(entry: &Entry, bits: &[bool], at: u16) -> Result<Value, DecodeError> {
    match bits.get(at as usize) {
        Some(b) => Ok(Value::Bool(*b)),
        None => Err(DecodeError::Short {
            field: entry.field.clone(),
            need: at as usize + 1,
            got: bits.len(),
        }),
    }
}

/// Applies `value * scale + offset` (a float then); rejects NaN and infinities, which the
/// wire cannot carry and which devices use for "no value".
fn scaled(entry: &Entry, value: Value) -> Result<Value, DecodeError> {
    let as_f64 = |v: &Value| match v {
        Value::U64(u) => *u as f64,
        Value::I64(i) => *i as f64,
        Value::F64(f) => *f,
        _ => 0.0,
    };
    let value = match (&value, entry.scale, entry.offset) {
        (Value::Bool(_), _, _) | (_, None, None) => value,
        (v, scale, offset) => Value::F64(as_f64(v) * scale.unwrap_or(1.0) + offset.unwrap_or(0.0)),
    };
    match value {
        Value::F64(f) if !f.is_finite() => Err(DecodeError::NotFinite {
            field: entry.field.clone(),
            value: f,
        }),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(unit: u8, function: Function, address: u16, t: ValueType) -> Entry {
        Entry {
            field: format!("f{address}"),
            unit,
            function,
            address,
            value_type: t,
            byte_order: Order::Big,
            word_order: Order::Big,
            scale: None,
            offset: None,
        }
    }

    fn spans(reqs: &[Request]) -> Vec<(u8, Function, u16, u16)> {
        reqs.iter()
            .map(|r| (r.unit, r.function, r.address, r.count))
            .collect()
    }

    #[test]
    fn adjacent_and_overlapping_entries_share_a_request_gaps_do_not() {
        use Function::*;
        use ValueType::*;
        let entries = vec![
            entry(1, Holding, 0, U16),
            entry(1, Holding, 1, F32),  // 1..3, adjacent
            entry(1, Holding, 2, U16),  // overlaps the f32
            entry(1, Holding, 3, U64),  // 3..7, adjacent
            entry(1, Holding, 10, U16), // gap: a new request
            entry(1, Input, 0, U16),    // other function
            entry(2, Holding, 0, U16),  // other unit
            entry(1, Coil, 0, Bool),
            entry(1, Coil, 1, Bool),
            entry(1, Coil, 5, Bool),
        ];
        let reqs = plan(&entries);
        assert_eq!(
            spans(&reqs),
            [
                (1, Holding, 0, 7),
                (1, Holding, 10, 1),
                (1, Input, 0, 1),
                (1, Coil, 0, 2),
                (1, Coil, 5, 1),
                (2, Holding, 0, 1),
            ]
        );
        assert_eq!(reqs[0].entries, [(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(reqs[3].entries, [(7, 0), (8, 1)]);
    }

    #[test]
    fn requests_stop_at_the_protocol_limits() {
        // 130 adjacent u16: 125 + 5. 32 adjacent f64 (128 registers): 31 + 1 (no value split).
        let regs: Vec<Entry> = (0..130)
            .map(|a| entry(1, Function::Input, a, ValueType::U16))
            .collect();
        assert_eq!(
            spans(&plan(&regs)),
            [(1, Function::Input, 0, 125), (1, Function::Input, 125, 5)]
        );
        let wide: Vec<Entry> = (0..32)
            .map(|i| entry(1, Function::Holding, i * 4, ValueType::F64))
            .collect();
        assert_eq!(
            spans(&plan(&wide)),
            [
                (1, Function::Holding, 0, 124),
                (1, Function::Holding, 124, 4)
            ]
        );
        let bits: Vec<Entry> = (0..2001)
            .map(|a| entry(1, Function::Discrete, a, ValueType::Bool))
            .collect();
        assert_eq!(
            spans(&plan(&bits)),
            [
                (1, Function::Discrete, 0, 2000),
                (1, Function::Discrete, 2000, 1)
            ]
        );
        // The last address of the address space.
        let top = [entry(1, Function::Holding, 65532, ValueType::U64)];
        assert_eq!(spans(&plan(&top)), [(1, Function::Holding, 65532, 4)]);
    }

    #[test]
    fn every_entry_lies_inside_its_request() {
        // A pseudo-random map, checked against the invariant rather than a fixed answer.
        let types = [
            ValueType::U16,
            ValueType::F32,
            ValueType::U64,
            ValueType::I32,
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        let entries: Vec<Entry> = (0..500)
            .map(|_| {
                let t = types[rng.usize(..types.len())];
                let f = if rng.bool() {
                    Function::Holding
                } else {
                    Function::Input
                };
                entry(rng.u8(1..3), f, rng.u16(0..400), t)
            })
            .collect();
        let reqs = plan(&entries);
        let mut seen = vec![0; entries.len()];
        for r in &reqs {
            assert!(r.count <= MAX_REGISTERS);
            for &(i, at) in &r.entries {
                seen[i] += 1;
                let e = &entries[i];
                assert_eq!((e.unit, e.function), (r.unit, r.function));
                assert_eq!(e.address, r.address + at);
                assert!(at + e.value_type.width() <= r.count);
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
        // Merged as far as allowed: consecutive requests of one key have a gap or a full one.
        for w in reqs.windows(2) {
            if (w[0].unit, w[0].function) == (w[1].unit, w[1].function) {
                let end = w[0].address as u32 + w[0].count as u32;
                assert!(w[1].address as u32 > end || w[0].count > MAX_REGISTERS - 4);
            }
        }
    }

    #[test]
    fn types_and_orders_decode() {
        let mut e = entry(1, Function::Holding, 0, ValueType::F32);
        // 21.5f32 = 0x41AC0000: ABCD on the wire.
        assert_eq!(
            decode_registers(&e, &[0x41AC, 0x0000], 0),
            Ok(Value::F64(21.5))
        );
        e.word_order = Order::Little; // CDAB
        assert_eq!(
            decode_registers(&e, &[0x0000, 0x41AC], 0),
            Ok(Value::F64(21.5))
        );
        e.byte_order = Order::Little; // DCBA
        assert_eq!(
            decode_registers(&e, &[0x0000, 0xAC41], 0),
            Ok(Value::F64(21.5))
        );
        e.word_order = Order::Big; // BADC
        assert_eq!(
            decode_registers(&e, &[0xAC41, 0x0000], 0),
            Ok(Value::F64(21.5))
        );
        // f32 values print as their shortest decimal.
        let bits = 21.1f32.to_bits();
        let e = entry(1, Function::Holding, 0, ValueType::F32);
        assert_eq!(
            decode_registers(&e, &[(bits >> 16) as u16, bits as u16], 0),
            Ok(Value::F64(21.1))
        );
        let t = |t: ValueType, words: &[u16]| {
            decode_registers(&entry(1, Function::Input, 0, t), words, 0)
        };
        assert_eq!(t(ValueType::U16, &[0xFFFF]), Ok(Value::U64(65535)));
        assert_eq!(t(ValueType::I16, &[0xFFFE]), Ok(Value::I64(-2)));
        assert_eq!(t(ValueType::U32, &[0x0001, 0x0002]), Ok(Value::U64(65538)));
        assert_eq!(t(ValueType::I32, &[0xFFFF, 0xFFFF]), Ok(Value::I64(-1)));
        assert_eq!(
            t(ValueType::U64, &[0x0123, 0x4567, 0x89AB, 0xCDEF]),
            Ok(Value::U64(0x0123_4567_89AB_CDEF))
        );
        assert_eq!(t(ValueType::I64, &[0xFFFF; 4]), Ok(Value::I64(-1)));
        let pi = std::f64::consts::PI.to_bits();
        let words: Vec<u16> = (0..4).rev().map(|i| (pi >> (16 * i)) as u16).collect();
        assert_eq!(
            t(ValueType::F64, &words),
            Ok(Value::F64(std::f64::consts::PI))
        );
        // A u32 in CDAB order, from the middle of a longer answer.
        let mut e = entry(1, Function::Input, 0, ValueType::U32);
        e.word_order = Order::Little;
        assert_eq!(
            decode_registers(&e, &[9, 0x0002, 0x0001], 1),
            Ok(Value::U64(65538))
        );
    }

    #[test]
    fn scale_offset_short_answers_and_non_finite_values() {
        let mut e = entry(1, Function::Holding, 0, ValueType::I16);
        e.scale = Some(0.1);
        e.offset = Some(-40.0);
        let Ok(Value::F64(v)) = decode_registers(&e, &[615], 0) else {
            panic!("a float")
        };
        assert!((v - 21.5).abs() < 1e-9, "{v}");
        assert!(matches!(
            decode_registers(&e, &[1], 1),
            Err(DecodeError::Short {
                need: 2,
                got: 1,
                ..
            })
        ));
        let e = entry(1, Function::Holding, 0, ValueType::F32);
        let nan = f32::NAN.to_bits();
        assert!(matches!(
            decode_registers(&e, &[(nan >> 16) as u16, nan as u16], 0),
            Err(DecodeError::NotFinite { .. })
        ));
        let c = entry(1, Function::Coil, 0, ValueType::Bool);
        assert_eq!(decode_bits(&c, &[false, true], 1), Ok(Value::Bool(true)));
        assert!(decode_bits(&c, &[true], 1).is_err());
    }
}
