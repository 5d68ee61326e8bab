use half::{bf16, f16};
use losskern::check::Rng;
use losskern::{Element, Tensor};

use crate::backends;

fn round_trip<T: Element + PartialEq + std::fmt::Debug>(seed: u64) {
    let mut rng = Rng::new(seed);
    for device in backends::all() {
        for len in [1usize, 2, 3, 7, 1024, 4097] {
            let data: Vec<T> = rng
                .normals(len, 10.0)
                .into_iter()
                .map(T::from_f64)
                .collect();
            let t = Tensor::from_slice(&device, &data, &[len]).unwrap();
            assert_eq!(t.shape(), [len]);
            assert_eq!(t.dtype(), T::DTYPE);
            let back: Vec<T> = t.to_vec().unwrap();
            let same = back
                .iter()
                .zip(&data)
                .all(|(a, b)| bytemuck::bytes_of(a) == bytemuck::bytes_of(b));
            assert!(
                same && back.len() == len,
                "{} round trip of {len} {} changed the data",
                device.name(),
                T::DTYPE
            );
        }
    }
}

#[test]
fn f32_round_trips_on_every_backend() {
    round_trip::<f32>(1);
}

#[test]
fn f16_round_trips_on_every_backend() {
    round_trip::<f16>(2);
}

#[test]
fn bf16_round_trips_on_every_backend() {
    round_trip::<bf16>(3);
}

#[test]
fn i64_round_trips_on_every_backend() {
    round_trip::<i64>(4);
}

#[test]
fn tensors_move_between_devices() {
    let data: Vec<f32> = Rng::new(5)
        .normals(33, 1.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    for device in backends::all() {
        let t = Tensor::from_slice(&device, &data, &[3, 11]).unwrap();
        let back = t.to_device(&losskern::Device::Cpu).unwrap();
        assert_eq!(back.to_vec::<f32>().unwrap(), data);
        assert_eq!(back.shape(), [3, 11]);
    }
}

#[test]
fn asking_for_the_wrong_dtype_is_an_error() {
    let t = Tensor::from_slice(&losskern::Device::Cpu, &[1.0f32, 2.0], &[2]).unwrap();
    assert!(matches!(t.to_vec::<f16>(), Err(losskern::Error::DType(_))));
    assert!(matches!(
        Tensor::from_slice(&losskern::Device::Cpu, &[1.0f32, 2.0], &[3]),
        Err(losskern::Error::Shape(_))
    ));
}

#[test]
fn trim_hands_back_pooled_memory_and_keeps_live_tensors() {
    let mut rng = Rng::new(7);
    for device in backends::all() {
        let kept: Vec<f32> = rng
            .normals(4097, 3.0)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let live = Tensor::from_slice(&device, &kept, &[kept.len()]).unwrap();
        // A dropped tensor's buffer goes to the pool, which trim empties.
        drop(Tensor::from_slice(&device, &kept, &[kept.len()]).unwrap());
        device.trim().unwrap();
        assert_eq!(live.to_vec::<f32>().unwrap(), kept, "{}", device.name());
        let after = Tensor::from_slice(&device, &kept, &[kept.len()]).unwrap();
        assert_eq!(after.to_vec::<f32>().unwrap(), kept, "{}", device.name());
    }
}
