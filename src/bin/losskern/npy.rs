//! NumPy `.npy` files through npyz: the CLI's way in and out, so a PyTorch user can run
//! the kernels on their own arrays (`np.save("z.npy", z.float().numpy())`).
//!
//! Reads format 1.0, 2.0 and 3.0 files holding a C-order, little-endian array of
//! `'<f4'`, `'<f2'`, `'<f8'`, `'<i8'` or `'<i4'` (the last widened to i64 on read).
//! NumPy has no bf16: bf16 inputs are reached by uploading f32 data as
//! [`DType::BF16`] (rounded to nearest), and bf16 tensors are written as `'<f4'`,
//! which holds every bf16 value exactly.
//!
//! npyz parses and writes the headers and converts the data (f16 through its `half`
//! feature). One check is ours: npyz reads exactly the elements the shape asks for, so
//! the data length is checked here, which makes a truncated or overlong file an error.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use half::{bf16, f16};
use losskern::{DType, Device, Element, Tensor};
use npyz::{NpyFile, NpyHeader, Order, WriterBuilder};

use crate::Failure;

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
    pub fn new(shape: Vec<usize>, data: Data) -> losskern::Result<Array> {
        let count = element_count(&shape)
            .ok_or_else(|| losskern::Error::Shape(too_many_elements(&shape)))?;
        if count != data.len() {
            return Err(losskern::Error::Shape(format!(
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
    pub fn to_tensor(&self, device: &Device, dtype: DType) -> losskern::Result<Tensor> {
        let is_int = matches!(self.data, Data::I64(_));
        if is_int != (dtype == DType::I64) {
            return Err(losskern::Error::DType(format!(
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
    pub fn from_tensor(tensor: &Tensor) -> losskern::Result<Array> {
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
fn upload<S: Element>(
    device: &Device,
    src: &[S],
    shape: &[usize],
    dtype: DType,
) -> losskern::Result<Tensor> {
    fn convert<S: Element, T: Element>(
        device: &Device,
        src: &[S],
        shape: &[usize],
    ) -> losskern::Result<Tensor> {
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

fn too_many_elements(shape: &[usize]) -> String {
    format!("{shape:?} has more elements than fit in usize")
}

/// `Failure::File` naming the file, since `io::Error` alone says "No such file or
/// directory" without saying which (also used for the output directory and JSON file).
pub fn file_error(path: &Path, e: impl std::fmt::Display) -> Failure {
    Failure::File(format!("{}: {e}", path.display()))
}

/// Reads a `.npy` file; errors name the file.
pub fn read(path: &Path) -> Result<Array, Failure> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    decode(&bytes).map_err(|msg| file_error(path, msg))
}

/// Writes `array` as a `.npy` file; errors name the file.
pub fn write(path: &Path, array: &Array) -> Result<(), Failure> {
    let file = File::create(path).map_err(|e| file_error(path, e))?;
    let mut out = BufWriter::new(file);
    encode(array, &mut out)
        .and_then(|()| out.flush())
        .map_err(|e| file_error(path, e))
}

/// Parses the bytes of a `.npy` file.
pub fn decode(bytes: &[u8]) -> Result<Array, String> {
    let mut data = bytes;
    let header = NpyHeader::from_reader(&mut data).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => "truncated inside the header".to_string(),
        _ => format!("not a valid .npy file: {e}"),
    })?;
    if header.order() == Order::Fortran {
        return Err("fortran_order is True; save a C-order array (np.ascontiguousarray)".into());
    }
    let descr = match header.dtype() {
        npyz::DType::Plain(type_str) => type_str.to_string(),
        other => {
            return Err(format!(
                "dtype {} is not supported (structured or array dtype)",
                other.descr()
            ))
        }
    };
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
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| format!("shape {:?} does not fit in usize", header.shape()))?;
    let count = element_count(&shape).ok_or_else(|| too_many_elements(&shape))?;
    if Some(data.len()) != count.checked_mul(item_size) {
        return Err(format!(
            "shape {shape:?} of '{descr}' needs {count} x {item_size} bytes of data, the file has {}",
            data.len()
        ));
    }
    let file = NpyFile::with_header(header, data);
    let values = match descr.as_str() {
        "<f4" => file.into_vec().map(Data::F32),
        "<f8" => file.into_vec().map(Data::F64),
        "<i8" => file.into_vec().map(Data::I64),
        "<i4" => file
            .into_vec::<i32>()
            .map(|v| Data::I64(v.into_iter().map(i64::from).collect())),
        _ => file.into_vec::<f16>().map(Data::F16),
    };
    let data = values.map_err(|e| format!("reading the data: {e}"))?;
    Ok(Array { shape, data, descr })
}

/// Writes `array` as a `.npy` file to `out`.
pub fn encode(array: &Array, out: &mut impl Write) -> io::Result<()> {
    let descr = array.data.descr();
    let type_str = descr
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("'{descr}': {e}")))?;
    let dtype = npyz::DType::Plain(type_str);
    let shape: Vec<u64> = array.shape.iter().map(|&d| d as u64).collect();
    match &array.data {
        Data::F32(v) => encode_values(dtype, &shape, v, out),
        Data::F64(v) => encode_values(dtype, &shape, v, out),
        Data::I64(v) => encode_values(dtype, &shape, v, out),
        Data::F16(v) => encode_values(dtype, &shape, v, out),
    }
}

fn encode_values<T: npyz::Serialize + Copy>(
    dtype: npyz::DType,
    shape: &[u64],
    values: &[T],
    out: &mut impl Write,
) -> io::Result<()> {
    let mut writer = npyz::WriteOptions::new()
        .dtype(dtype)
        .shape(shape)
        .writer(out)
        .begin_nd()?;
    writer.extend(values.iter().copied())?;
    writer.finish()
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

    fn encoded(array: &Array) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode(array, &mut bytes).unwrap();
        bytes
    }

    /// The offset of the data: the header ends with a newline.
    fn data_start(bytes: &[u8]) -> usize {
        bytes.iter().position(|&b| b == b'\n').unwrap() + 1
    }

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
        // npyz spells the shape "(2, 3, )" where NumPy writes "(2, 3)"; both are the same
        // Python tuple, and the data starts at the same 64-byte-aligned offset with the
        // same bytes as in NumPy's file.
        let bytes = encoded(&decode(NUMPY_F32).unwrap());
        let header = std::str::from_utf8(&bytes[10..data_start(&bytes)]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, ), }"));
        assert_eq!(&bytes[..8], &NUMPY_F32[..8]);
        assert_eq!(data_start(&bytes), data_start(NUMPY_F32));
        assert_eq!(
            &bytes[data_start(&bytes)..],
            &NUMPY_F32[data_start(NUMPY_F32)..]
        );
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
            let bytes = encoded(&array);
            assert_eq!(data_start(&bytes) % 64, 0);
            let back = decode(&bytes).unwrap();
            assert_eq!(back.shape, array.shape);
            assert_eq!(back.descr, array.descr);
            // Compare bits: NaN != NaN as floats.
            assert_eq!(format!("{:?}", back.data), format!("{:?}", array.data));
        }
    }

    /// Files that npyz itself writes (its own typed writer and default dtypes, not our
    /// encoder) read back with the same values.
    #[test]
    fn reads_files_npyz_writes() {
        let dir = std::env::temp_dir().join(format!("losskern-npyz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f32_path = dir.join("z.npy");
        let f32_values = [1.5f32, -0.0, f32::MAX, f32::MIN_POSITIVE, 7.0, -3.25];
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[3, 2])
            .writer(BufWriter::new(File::create(&f32_path).unwrap()))
            .begin_nd()
            .unwrap();
        writer.extend(f32_values).unwrap();
        writer.finish().unwrap();
        let i4_path = dir.join("y.npy");
        npyz::to_file_1d(&i4_path, [5i32, -100, i32::MAX]).unwrap();
        let f8_path = dir.join("t.npy");
        npyz::to_file_1d(&f8_path, [0.0f64, 0.125, 1e-300]).unwrap();

        let z = read(&f32_path).unwrap();
        let y = read(&i4_path).unwrap();
        let t = read(&f8_path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((z.shape.as_slice(), z.descr.as_str()), (&[3, 2][..], "<f4"));
        assert_eq!(z.data, Data::F32(f32_values.to_vec()));
        assert_eq!((y.shape.as_slice(), y.descr.as_str()), (&[3][..], "<i4"));
        assert_eq!(y.data, Data::I64(vec![5, -100, i64::from(i32::MAX)]));
        assert_eq!(t.data, Data::F64(vec![0.0, 0.125, 1e-300]));
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
            Err(losskern::Error::DType(_))
        ));
    }

    #[test]
    fn rejects_bad_files() {
        let err = |bytes: &[u8]| decode(bytes).unwrap_err();
        assert!(err(NUMPY_FORTRAN).contains("fortran_order"));
        assert!(err(&NUMPY_F32[..NUMPY_F32.len() - 1]).contains("needs 6 x 4 bytes"));
        assert!(err(&[NUMPY_F32, &[0]].concat()).contains("needs 6 x 4 bytes"));
        assert!(err(&NUMPY_F32[..40]).contains("truncated"));
        assert!(err(b"PK\x03\x04").contains("magic"));
        let mut big_endian = NUMPY_F32.to_vec();
        let at = big_endian.windows(3).position(|w| w == b"<f4").unwrap();
        big_endian[at] = b'>';
        assert!(err(&big_endian).contains("'>f4' is not supported"));
        let mut v4 = NUMPY_F32.to_vec();
        v4[6] = 4;
        assert!(err(&v4).contains("unsupported version: (4, 0)"));
        let mut garbled = NUMPY_F32.to_vec();
        let at = garbled.windows(5).position(|w| w == b"shape").unwrap();
        garbled[at + 9] = b'x';
        assert!(err(&garbled).starts_with("not a valid .npy file"));
    }

    #[test]
    fn file_errors_name_the_file() {
        let message = |failure: Failure| match failure {
            Failure::File(m) => m,
            _ => panic!("not a file failure"),
        };
        let missing = Path::new("/nonexistent/z.npy");
        assert!(message(read(missing).unwrap_err()).contains("/nonexistent/z.npy"));
        let path = std::env::temp_dir().join(format!("losskern-npy-{}.npy", std::process::id()));
        std::fs::write(&path, NUMPY_FORTRAN).unwrap();
        let m = message(read(&path).unwrap_err());
        std::fs::remove_file(&path).unwrap();
        assert!(m.contains("losskern-npy") && m.contains("fortran"));
    }
}
