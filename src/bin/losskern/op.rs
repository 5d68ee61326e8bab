//! What every op command shares: the common options, reading the inputs, running the
//! op on the device, writing the outputs and the JSON summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use losskern::{DType, Device, Error, Op, Tensor};

use crate::json::Json;
use crate::npy::{self, Array};
use crate::{DTypeArg, DeviceChoice, Failure};

/// The options every op command takes.
#[derive(Args)]
#[command(next_help_heading = "Common options")]
pub struct OpArgs {
    /// With best, an op that has no kernel on the device yet runs on the CPU (said in
    /// the notes)
    #[arg(long, value_enum, default_value_t = DeviceChoice::Best)]
    device: DeviceChoice,
    /// dtype of the float inputs (default: the file's; f64 files become f32). NumPy has
    /// no bf16: --dtype bf16 rounds the inputs to bf16 on upload
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Where the .npy outputs go (created)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Write the summary there instead of stdout
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Runs `op` and waits for the device: the result and the milliseconds from the call
/// to the end of the synchronize.
pub fn timed<T>(
    device: &Device,
    op: impl FnOnce() -> losskern::Result<T>,
) -> losskern::Result<(T, f64)> {
    let start = Instant::now();
    let out = op()?;
    device.synchronize()?;
    Ok((out, start.elapsed().as_secs_f64() * 1e3))
}

/// What an input array is converted to on upload.
#[derive(Clone, Copy)]
pub enum Want {
    /// The op's float dtype: `--dtype`, else that of the first such input.
    Compute,
    /// f32 whatever the op's dtype (class weights, sample weights, gamma, beta, distances).
    F32,
    /// i64 class indices.
    Index,
}

/// An input read from a file, with the dtype it is uploaded as.
pub struct Input {
    array: Array,
    dtype: DType,
}

impl Input {
    pub fn upload(&self, device: &Device) -> losskern::Result<Tensor> {
        self.array.to_tensor(device, self.dtype)
    }
}

/// Uploads a list of inputs (the layers of an ensemble).
pub fn upload_all(inputs: &[Input], device: &Device) -> losskern::Result<Vec<Tensor>> {
    inputs.iter().map(|i| i.upload(device)).collect()
}

/// The slices of tensor references the ensemble calls take.
pub fn refs(tensors: &[Tensor]) -> Vec<&Tensor> {
    tensors.iter().collect()
}

/// One run of an op command: reads the inputs, runs the op, writes the outputs and
/// the JSON summary.
pub struct OpRun {
    /// The command's name, as the summary gives it.
    command: &'static str,
    device: Device,
    dtype: Option<DType>,
    out: PathBuf,
    json: Option<PathBuf>,
    inputs: Vec<(String, Json)>,
    outputs: Vec<(String, Json)>,
    pub extra: Vec<(String, Json)>,
    notes: Vec<String>,
    elapsed_ms: f64,
}

impl OpRun {
    /// Opens the device. With `--device best`, an op that the best device has no kernel
    /// for yet (the library's support table) runs on the CPU instead.
    pub fn new(command: &'static str, op: Op, args: &OpArgs) -> Result<OpRun, Failure> {
        let mut run = OpRun {
            command,
            device: args.device.open()?,
            dtype: args.dtype.map(DType::from),
            out: args.out.clone(),
            json: args.json.clone(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            extra: Vec::new(),
            notes: Vec::new(),
            elapsed_ms: f64::NAN,
        };
        let backend = run.device.backend();
        if args.device.backend().is_none() && !backend.supports(op) {
            run.note(format!("{op} has no {backend} kernel yet: ran on the CPU"));
            run.device = Device::Cpu;
        }
        Ok(run)
    }

    /// A note for the summary, also shown on stderr as it happens.
    pub fn note(&mut self, note: String) {
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    /// Reads `--name FILE` when given.
    pub fn optional_input(
        &mut self,
        name: &str,
        path: Option<&Path>,
        want: Want,
    ) -> Result<Option<Input>, Failure> {
        path.map(|path| self.input(name, path, want)).transpose()
    }

    /// Reads a list of files, recorded as `name[0]`, `name[1]`, ...
    pub fn inputs(
        &mut self,
        name: &str,
        paths: &[PathBuf],
        want: Want,
    ) -> Result<Vec<Input>, Failure> {
        paths
            .iter()
            .enumerate()
            .map(|(i, path)| self.input(&format!("{name}[{i}]"), path, want))
            .collect()
    }

    /// Reads `--name FILE` and decides the dtype it uploads as.
    pub fn input(&mut self, name: &str, path: &Path, want: Want) -> Result<Input, Failure> {
        let array = npy::read(path)?;
        let shown = path.display();
        let dtype = match (want, array.float_dtype()) {
            (Want::Index, None) => DType::I64,
            (Want::Compute, Some(natural)) => *self.dtype.get_or_insert(natural),
            (Want::F32, Some(_)) => DType::F32,
            (Want::Index, Some(_)) => {
                return Err(Error::DType(format!(
                    "--{name} {shown}: class indices must be '<i8' or '<i4', got '{}'",
                    array.descr
                ))
                .into())
            }
            (Want::Compute | Want::F32, None) => {
                return Err(Error::DType(format!(
                    "--{name} {shown}: must hold floats ('<f4', '<f2', '<f8'), got '{}'",
                    array.descr
                ))
                .into())
            }
        };
        let natural = array.float_dtype().unwrap_or(DType::I64);
        if array.descr == "<f8" || natural != dtype {
            self.note(format!(
                "--{name}: '{}' values rounded to {dtype}",
                array.descr
            ));
        }
        self.inputs.push((
            name.to_string(),
            Json::object([
                ("file", Json::Str(shown.to_string())),
                ("descr", Json::Str(array.descr.clone())),
                ("shape", Json::shape(&array.shape)),
                ("as", Json::Str(dtype.name().to_string())),
            ]),
        ));
        Ok(Input { array, dtype })
    }

    /// Runs `op` on the device (uploads, the call and [`timed`]), with a progress line
    /// on stderr when it starts and when it ends.
    pub fn execute<T>(
        &mut self,
        op: impl FnOnce(&Device) -> losskern::Result<(T, f64)>,
    ) -> Result<T, Failure> {
        eprintln!("{}: running on {} ...", self.command, self.device.name());
        let (out, ms) = op(&self.device)?;
        eprintln!("{}: done in {ms:.1} ms", self.command);
        self.elapsed_ms = ms;
        Ok(out)
    }

    /// Writes each given output as OUT/NAME.npy and records it in the summary, with its
    /// value when it has one element.
    pub fn outputs(&mut self, outputs: &[(&str, Option<&Tensor>)]) -> Result<(), Failure> {
        // Created only now, so that a run refused earlier leaves nothing behind.
        std::fs::create_dir_all(&self.out).map_err(|e| npy::file_error(&self.out, e))?;
        for &(name, tensor) in outputs {
            let Some(tensor) = tensor else { continue };
            let array = Array::from_tensor(tensor)?;
            let path = self.out.join(format!("{name}.npy"));
            npy::write(&path, &array)?;
            let mut entry = vec![
                ("file", Json::Str(path.display().to_string())),
                ("dtype", Json::Str(tensor.dtype().name().to_string())),
                ("descr", Json::Str(array.descr.clone())),
                ("shape", Json::shape(&array.shape)),
            ];
            if tensor.len() == 1 {
                entry.push(("value", Json::Num(tensor.to_f64_vec()?[0])));
            }
            self.outputs.push((name.to_string(), Json::object(entry)));
        }
        Ok(())
    }

    /// Prints the summary, or writes it to `--json FILE`.
    pub fn finish(self) -> Result<(), Failure> {
        let mut fields = vec![
            ("op".to_string(), Json::Str(self.command.to_string())),
            ("device".into(), Json::Str(self.device.name())),
            // Every op reads a float input first, which sets the dtype.
            (
                "dtype".into(),
                Json::Str(self.dtype.map_or("", DType::name).to_string()),
            ),
            ("inputs".into(), Json::Obj(self.inputs)),
            ("outputs".into(), Json::Obj(self.outputs)),
            ("elapsed_ms".into(), Json::Num(self.elapsed_ms)),
        ];
        fields.extend(self.extra);
        fields.push((
            "notes".into(),
            Json::Arr(self.notes.into_iter().map(Json::Str).collect()),
        ));
        let text = format!("{}\n", Json::Obj(fields).pretty(0, 2));
        match &self.json {
            Some(path) => std::fs::write(path, text).map_err(|e| npy::file_error(path, e))?,
            None => print!("{text}"),
        }
        Ok(())
    }
}
