//! NumPy `.npy` files: the CLI's way in and out, so a PyTorch user can run the
//! kernels on their own arrays (`np.save("z.npy", z.float().numpy())`).
//!
//! Reads format 1.0, 2.0 and 3.0 files holding a C-order, little-endian array of
//! `'<f4'`, `'<f2'`, `'<f8'`, `'<i8'` or `'<i4'` (the last widened to i64 on read).
//! NumPy has no bf16: bf16 inputs are reached by uploading f32 data as
//! [`DType::BF16`](crate::DType::BF16) (rounded to nearest), and bf16 tensors are
//! written as `'<f4'`, which holds every bf16 value exactly.
//! Writes format 1.0 (2.0 when the header outgrows 1.0's 16-bit length field).

use std::path::Path;

use half::{bf16, f16};

use crate::device::{Device, Tensor};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The elements of an array, in the type they are kept in memory.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    F64(Vec<f64>),
    /// `'<i8'`, or `'<i4'` widened.
    I64(Vec<i64>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    /// The `descr` this data is written with.
    fn descr(&self) -> &'static str {
        match self {
            Data::F32(_) => "<f4",
            Data::F16(_) => "<f2",
            Data::F64(_) => "<f8",
            Data::I64(_) => "<i8",
        }
    }
}

/// A dense C-order array read from or to be written to a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Data,
    /// The dtype string of the file it came from (`'<i4'` for data widened to i64),
    /// so that conversions can be reported.
    pub descr: String,
}

impl Array {
    /// An array of `data` in `shape`; `Error::Shape` when the element counts differ.
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Array> {
        let count = element_count(&shape).ok_or_else(|| overflow(&shape))?;
        if count != data.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} holds {count} elements but the data has {}",
                data.len()
            )));
        }
        let descr = data.descr().to_string();
        Ok(Array { shape, data, descr })
    }

    /// The float dtype the data naturally uploads as: f32 and f16 stay, f64 becomes f32
    /// (the kernels take no f64 input); `None` for integer data.
    pub fn float_dtype(&self) -> Option<DType> {
        match self.data {
            Data::F32(_) | Data::F64(_) => Some(DType::F32),
            Data::F16(_) => Some(DType::F16),
            Data::I64(_) => None,
        }
    }

    /// Uploads the array to `device` as `dtype`, rounding to nearest. Floats convert
    /// only to float dtypes and integers only to i64, so that a file given in the wrong
    /// place is an error rather than silently reinterpreted numbers.
    pub fn to_tensor(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let is_int = matches!(self.data, Data::I64(_));
        if is_int != (dtype == DType::I64) {
            return Err(Error::DType(format!(
                "a '{}' array cannot be used as {dtype}",
                self.descr
            )));
        }
        match &self.data {
            Data::F32(v) => upload(device, v, &self.shape, dtype),
            Data::F16(v) => upload(device, v, &self.shape, dtype),
            Data::F64(v) => upload(device, v, &self.shape, dtype),
            Data::I64(v) => upload(device, v, &self.shape, dtype),
        }
    }

    /// Downloads a tensor; bf16 widens (exactly) to f32 since NumPy has no bf16.
    pub fn from_tensor(tensor: &Tensor) -> Result<Array> {
        let data = match tensor.dtype() {
            DType::F32 => Data::F32(tensor.to_vec()?),
            DType::F16 => Data::F16(tensor.to_vec()?),
            DType::BF16 => Data::F32(
                tensor
                    .to_vec::<bf16>()?
                    .into_iter()
                    .map(bf16::to_f32)
                    .collect(),
            ),
            DType::F64 => Data::F64(tensor.to_vec()?),
            DType::I64 => Data::I64(tensor.to_vec()?),
        };
        Array::new(tensor.shape().to_vec(), data)
    }
}

/// Uploads `src` converted element by element to `dtype` (no intermediate f64 copy of
/// the whole array, which would be 2 GiB for a 4096 x 32000 f32 logits file).
fn upload<S: Element>(device: &Device, src: &[S], shape: &[usize], dtype: DType) -> Result<Tensor> {
    fn convert<S: Element, T: Element>(
        device: &Device,
        src: &[S],
        shape: &[usize],
    ) -> Result<Tensor> {
        if S::DTYPE == T::DTYPE {
            // Same type: upload the bytes as they are.
            return Tensor::from_slice(device, bytemuck::cast_slice::<S, T>(src), shape);
        }
        let values: Vec<T> = src.iter().map(|&v| T::from_f64(v.to_f64())).collect();
        Tensor::from_slice(device, &values, shape)
    }
    match dtype {
        DType::F32 => convert::<S, f32>(device, src, shape),
        DType::F16 => convert::<S, f16>(device, src, shape),
        DType::BF16 => convert::<S, bf16>(device, src, shape),
        DType::F64 => convert::<S, f64>(device, src, shape),
        DType::I64 => convert::<S, i64>(device, src, shape),
    }
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn overflow(shape: &[usize]) -> Error {
    Error::Shape(format!("{shape:?} has more elements than fit in usize"))
}

/// Reads a `.npy` file; errors name the file.
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    decode(&bytes).map_err(|msg| Error::Npy(format!("{}: {msg}", path.display())))
}

/// Writes `array` as a `.npy` file; errors name the file.
pub fn write(path: &Path, array: &Array) -> Result<()> {
    std::fs::write(path, encode(array)).map_err(|e| io_error(path, e))
}

/// `Error::Io` with the io::Error's kind and the file name in its message, since
/// `std::io::Error` alone says "No such file or directory" without saying which
/// (also used by the CLI for its output directory and JSON file).
pub fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    ))
}

/// Parses the bytes of a `.npy` file.
pub fn decode(bytes: &[u8]) -> std::result::Result<Array, String> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("not a .npy file (no \\x93NUMPY magic)")?;
    let (header_len, header_start) = match rest {
        [1, 0, a, b, ..] => (usize::from(u16::from_le_bytes([*a, *b])), 10),
        [2 | 3, 0, a, b, c, d, ..] => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, 12),
        [major, minor, ..] => return Err(format!("unsupported format version {major}.{minor}")),
        _ => return Err("truncated before the header".into()),
    };
    let data_start = header_start + header_len;
    let header = bytes
        .get(header_start..data_start)
        .ok_or("truncated inside the header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not ASCII/UTF-8")?;
    let Header {
        descr,
        fortran_order,
        shape,
    } = parse_header(header)?;
    if fortran_order {
        return Err("fortran_order is True; save a C-order array (np.ascontiguousarray)".into());
    }
    let item_size = match descr.as_str() {
        "<f4" | "<i4" => 4,
        "<f2" => 2,
        "<f8" | "<i8" => 8,
        other => {
            return Err(format!(
                "dtype '{other}' is not supported (use '<f4', '<f2', '<f8', '<i8' or '<i4')"
            ))
        }
    };
    let count = element_count(&shape).ok_or_else(|| overflow(&shape).to_string())?;
    let data = &bytes[data_start..];
    if Some(data.len()) != count.checked_mul(item_size) {
        return Err(format!(
            "shape {shape:?} of '{descr}' needs {count} x {item_size} bytes of data, the file has {}",
            data.len()
        ));
    }
    // Decode explicitly from little-endian so the result is right on any host.
    let data = match descr.as_str() {
        "<f4" => Data::F32(words(data, |b: [u8; 4]| f32::from_le_bytes(b))),
        "<f2" => Data::F16(words(data, |b: [u8; 2]| f16::from_le_bytes(b))),
        "<f8" => Data::F64(words(data, |b: [u8; 8]| f64::from_le_bytes(b))),
        "<i8" => Data::I64(words(data, |b: [u8; 8]| i64::from_le_bytes(b))),
        _ => Data::I64(words(data, |b: [u8; 4]| i64::from(i32::from_le_bytes(b)))),
    };
    Ok(Array { shape, data, descr })
}

fn words<const N: usize, T>(bytes: &[u8], from: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut word = [0u8; N];
            word.copy_from_slice(c);
            from(word)
        })
        .collect()
}

/// The bytes of a `.npy` file holding `array`.
pub fn encode(array: &Array) -> Vec<u8> {
    let shape = match array.shape.as_slice() {
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        array.data.descr()
    );
    // NumPy pads the header with spaces and a final newline so the data starts on a
    // 64-byte boundary; version 2.0 only when the length outgrows 1.0's u16.
    let pad = |prefix_len: usize| (prefix_len + header.len() + 1).next_multiple_of(64) - prefix_len;
    let fits_v1 = pad(10) <= usize::from(u16::MAX);
    let prefix_len = if fits_v1 { 10 } else { 12 };
    let padded = pad(prefix_len);
    header.extend(std::iter::repeat_n(' ', padded - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(prefix_len + padded + array.data.len() * 8);
    out.extend_from_slice(MAGIC);
    if fits_v1 {
        out.extend_from_slice(&[1, 0]);
        // fits_v1 guarantees the length fits in u16.
        out.extend_from_slice(&(padded as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(padded as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    match &array.data {
        Data::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Data::F16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Data::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        Data::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
    }
    out
}

struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses the header, a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`, in any key order.
fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let mut p = Parser(text.trim_end());
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    p.expect('{')?;
    while !p.eat('}') {
        let key = p.quoted()?;
        p.expect(':')?;
        match key.as_str() {
            "descr" if p.peek() == Some('[') => {
                return Err("structured dtypes are not supported".into())
            }
            "descr" => descr = Some(p.quoted()?),
            "fortran_order" => fortran_order = Some(p.boolean()?),
            "shape" => shape = Some(p.tuple()?),
            other => return Err(format!("unexpected header key '{other}'")),
        }
        if !p.eat(',') {
            p.expect('}')?;
            break;
        }
    }
    match (descr, fortran_order, shape) {
        (Some(descr), Some(fortran_order), Some(shape)) => Ok(Header {
            descr,
            fortran_order,
            shape,
        }),
        _ => Err(format!(
            "header lacks one of 'descr', 'fortran_order', 'shape': {text}"
        )),
    }
}

/// A cursor over the header text; every method skips leading whitespace.
struct Parser<'a>(&'a str);

impl Parser<'_> {
    fn peek(&mut self) -> Option<char> {
        self.0 = self.0.trim_start();
        self.0.chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.0 = &self.0[c.len_utf8()..];
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("header: expected '{c}' at \"{}\"", self.0))
        }
    }

    fn quoted(&mut self) -> std::result::Result<String, String> {
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(format!("header: expected a string at \"{}\"", self.0)),
        };
        let body = &self.0[1..];
        let end = body.find(quote).ok_or("header: unterminated string")?;
        self.0 = &body[end + 1..];
        Ok(body[..end].to_string())
    }

    fn boolean(&mut self) -> std::result::Result<bool, String> {
        self.peek();
        for (word, value) in [("True", true), ("False", false)] {
            if let Some(rest) = self.0.strip_prefix(word) {
                self.0 = rest;
                return Ok(value);
            }
        }
        Err(format!("header: expected True or False at \"{}\"", self.0))
    }

    fn tuple(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect('(')?;
        let mut dims = Vec::new();
        while !self.eat(')') {
            self.peek();
            let digits = self
                .0
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(self.0.len());
            let dim = self.0[..digits]
                .parse()
                .map_err(|_| format!("header: expected a dimension at \"{}\"", self.0))?;
            dims.push(dim);
            self.0 = &self.0[digits..];
            if !self.eat(',') {
                self.expect(')')?;
                break;
            }
        }
        Ok(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by NumPy 2.4 (`np.save`), to check the reader against the real format.
    // np.array([[1.5, -2.0, 3.25], [0.0, np.inf, -0.5]], dtype='<f4')
    const NUMPY_F32: &[u8] = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }                                                          \x0a\x00\x00\xc0?\x00\x00\x00\xc0\x00\x00P@\x00\x00\x00\x00\x00\x00\x80\x7f\x00\x00\x00\xbf";
    // np.array([3, -100, 7], dtype='<i4')
    const NUMPY_I4: &[u8] = b"\x93NUMPY\x01\x00v\x00{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }                                                            \x0a\x03\x00\x00\x00\x9c\xff\xff\xff\x07\x00\x00\x00";
    // np.lib.format.write_array(f, np.array([1.0, 2.0]), version=(2, 0))
    const NUMPY_F8_V2: &[u8] = b"\x93NUMPY\x02\x00t\x00\x00\x00{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }                                                          \x0a\x00\x00\x00\x00\x00\x00\xf0?\x00\x00\x00\x00\x00\x00\x00@";
    // np.save(f, np.asfortranarray(np.ones((2, 2), dtype='f4')))
    const NUMPY_FORTRAN: &[u8] = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }                                                           \x0a\x00\x00\x80?\x00\x00\x80?\x00\x00\x80?\x00\x00\x80?";

    #[test]
    fn reads_numpy_files() {
        let a = decode(NUMPY_F32).unwrap();
        assert_eq!(a.shape, [2, 3]);
        assert_eq!(
            a.data,
            Data::F32(vec![1.5, -2.0, 3.25, 0.0, f32::INFINITY, -0.5])
        );
        let y = decode(NUMPY_I4).unwrap();
        assert_eq!((y.shape.as_slice(), y.descr.as_str()), (&[3][..], "<i4"));
        assert_eq!(y.data, Data::I64(vec![3, -100, 7]));
        assert_eq!(y.float_dtype(), None);
        let d = decode(NUMPY_F8_V2).unwrap();
        assert_eq!(d.data, Data::F64(vec![1.0, 2.0]));
        assert_eq!(d.float_dtype(), Some(DType::F32));
    }

    #[test]
    fn writes_what_numpy_writes() {
        // Same header, padding and data bytes as NumPy for the same array.
        assert_eq!(encode(&decode(NUMPY_F32).unwrap()), NUMPY_F32);
    }

    #[test]
    fn round_trips_every_dtype() {
        let arrays = [
            Array::new(vec![2, 2], Data::F32(vec![1.0, -0.0, f32::NAN, 3e38])),
            Array::new(
                vec![3],
                Data::F16(vec![f16::ONE, f16::MAX, f16::NEG_INFINITY]),
            ),
            Array::new(vec![1, 2, 1], Data::F64(vec![1e300, -5e-324])),
            Array::new(vec![], Data::I64(vec![i64::MIN])),
            Array::new(vec![0, 4], Data::I64(vec![])),
        ];
        for array in arrays {
            let array = array.unwrap();
            let bytes = encode(&array);
            assert_eq!(bytes.iter().position(|&b| b == b'\n').unwrap() % 64, 63);
            let back = decode(&bytes).unwrap();
            assert_eq!(back.shape, array.shape);
            // Compare bits: NaN != NaN as floats.
            assert_eq!(format!("{:?}", back.data), format!("{:?}", array.data));
        }
    }

    #[test]
    fn tensors_round_trip_and_bf16_writes_f32() {
        let device = Device::Cpu;
        let a = decode(NUMPY_F32).unwrap();
        let t = a.to_tensor(&device, DType::BF16).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        let back = Array::from_tensor(&t).unwrap();
        // Every value above is exact in bf16, so the round trip is exact; written as f32.
        assert_eq!(back.data, a.data);
        assert_eq!(back.descr, "<f4");
        let y = decode(NUMPY_I4)
            .unwrap()
            .to_tensor(&device, DType::I64)
            .unwrap();
        assert_eq!(y.to_vec::<i64>().unwrap(), [3, -100, 7]);
        assert!(matches!(
            a.to_tensor(&device, DType::I64),
            Err(Error::DType(_))
        ));
    }

    #[test]
    fn rejects_bad_files() {
        let err = |bytes: &[u8]| decode(bytes).unwrap_err();
        assert!(err(NUMPY_FORTRAN).contains("fortran_order"));
        assert!(err(&NUMPY_F32[..NUMPY_F32.len() - 1]).contains("needs 6 x 4 bytes"));
        assert!(err(&NUMPY_F32[..40]).contains("truncated"));
        assert!(err(b"PK\x03\x04").contains("magic"));
        let mut big_endian = NUMPY_F32.to_vec();
        let at = big_endian.windows(3).position(|w| w == b"<f4").unwrap();
        big_endian[at] = b'>';
        assert!(err(&big_endian).contains("'>f4' is not supported"));
        let mut v4 = NUMPY_F32.to_vec();
        v4[6] = 4;
        assert!(err(&v4).contains("version 4.0"));
    }

    #[test]
    fn file_errors_name_the_file() {
        let missing = Path::new("/nonexistent/z.npy");
        let e = read(missing).unwrap_err();
        assert!(matches!(e, Error::Io(_)) && e.to_string().contains("/nonexistent/z.npy"));
        let path = std::env::temp_dir().join(format!("losskern-npy-{}.npy", std::process::id()));
        std::fs::write(&path, NUMPY_FORTRAN).unwrap();
        let e = read(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(e, Error::Npy(m) if m.contains("losskern-npy") && m.contains("fortran")));
    }
}
