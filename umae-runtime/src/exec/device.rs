//! Choosing the device at run time: `cpu`, `cuda`, `cuda:N`, `tch`.

use umae_api::burn::backend::flex::FlexDevice;
use umae_api::Device;

/// Parse a comma-separated list of devices for data parallelism (`cuda:0,cuda:1`; `cpu,cpu`
/// runs two CPU replicas, for testing), each checked as [`parse_device`] does.
pub fn parse_devices(list: &str) -> Result<Vec<Device>, String> {
    let names: Vec<&str> = list.split(',').map(str::trim).collect();
    for (i, n) in names.iter().enumerate() {
        if n.is_empty() {
            return Err(format!("`{list}`: empty device name in the list"));
        }
        if n.starts_with("cuda") && names[..i].contains(n) {
            return Err(format!("`{list}`: {n} is listed twice"));
        }
    }
    names.into_iter().map(parse_device).collect()
}

/// Parse a device name and check that it can be used here, before anything touches it.
pub fn parse_device(name: &str) -> Result<Device, String> {
    let name = name.trim();
    if name.contains(',') {
        return Err(format!(
            "`{name}` names several devices: only `umae run` trains on several (data parallel); use one here"
        ));
    }
    match name {
        "cpu" | "flex" => Ok(Device::Flex(FlexDevice)),
        "tch" | "libtorch" => tch_device(),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let index = match name.strip_prefix("cuda:") {
                None => 0,
                Some(i) => i.parse::<usize>().map_err(|_| {
                    format!("`{name}`: the CUDA device index must be a number, as in `cuda:0`")
                })?,
            };
            cuda_device(index)
        }
        other => Err(format!(
            "unknown device `{other}`: use cpu, cuda, cuda:N or tch{}",
            umae_api::suggest::nearest(other, ["cpu", "cuda", "tch"])
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default()
        )),
    }
}

/// Ask the NVIDIA driver how many GPUs there are, without letting anything panic: load
/// `libcuda.so.1` ourselves and call `cuInit` and `cuDeviceGetCount`. burn's CUDA backend
/// (cudarc) panics in a library thread when the driver is missing, so this runs first.
pub fn cuda_probe() -> Result<usize, String> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: libcuda is the NVIDIA driver library; loading it runs no user code, and the two
    // functions are called with the signatures of the CUDA driver API.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1").map_err(|_| {
            "no NVIDIA driver found (libcuda.so.1 cannot be loaded): run on a machine with an \
             NVIDIA GPU and its driver, or use --device cpu"
                .to_string()
        })?;
        let init: libloading::Symbol<CuInit> = lib.get(b"cuInit\0").map_err(|e| {
            format!("libcuda.so.1 has no cuInit ({e}): reinstall the NVIDIA driver")
        })?;
        let count_fn: libloading::Symbol<CuDeviceGetCount> = lib
            .get(b"cuDeviceGetCount\0")
            .map_err(|e| format!("libcuda.so.1 has no cuDeviceGetCount ({e})"))?;
        let code = init(0);
        if code != 0 {
            return Err(format!(
                "the NVIDIA driver did not start (cuInit error {code}{}): check `nvidia-smi`, or use --device cpu",
                if code == 100 { ", no CUDA-capable device" } else { "" }
            ));
        }
        let mut count = 0i32;
        let code = count_fn(&mut count);
        if code != 0 {
            return Err(format!(
                "cuDeviceGetCount failed with error {code}: check `nvidia-smi`"
            ));
        }
        // The library stays loaded: the CUDA backend loads it again and shares the instance.
        std::mem::forget(lib);
        Ok(count.max(0) as usize)
    }
}

/// The error for `cuda:index` when the machine has `count` GPUs, if any.
fn check_index(index: usize, count: usize) -> Result<(), String> {
    match count {
        0 => Err("the NVIDIA driver reports no GPU: use --device cpu".into()),
        n if index >= n => Err(format!(
            "cuda:{index} does not exist: this machine has {n} GPU(s), cuda:0 to cuda:{}",
            n - 1
        )),
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device, String> {
    check_index(index, cuda_probe()?)?;
    Ok(Device::Cuda(
        umae_api::burn::backend::cuda::CudaDevice::new(index),
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(index: usize) -> Result<Device, String> {
    let gpus = match cuda_probe() {
        Ok(n) => {
            check_index(index, n)?;
            format!(" (this machine has {n} GPU(s))")
        }
        Err(_) => String::new(),
    };
    Err(format!(
        "this umae was built without CUDA support{gpus}: rebuild with `cargo build --release --features cuda`"
    ))
}

#[cfg(feature = "tch")]
fn tch_device() -> Result<Device, String> {
    Ok(Device::LibTorch(Default::default()))
}

#[cfg(not(feature = "tch"))]
fn tch_device() -> Result<Device, String> {
    Err("this umae was built without libtorch support: rebuild with `--features tch` (needs libtorch 2.9)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Flex(_))));
        let e = parse_device("cdu").unwrap_err();
        assert!(e.contains("cpu") && e.contains("did you mean"), "{e}");
        assert!(parse_device("cuda:x").unwrap_err().contains("index"));
    }

    #[test]
    fn device_lists() {
        assert_eq!(parse_devices("cpu, cpu").unwrap().len(), 2);
        assert!(parse_devices("cpu,,cpu").unwrap_err().contains("empty"));
        assert!(parse_devices("cuda:0,cuda:0")
            .unwrap_err()
            .contains("twice"));
        assert!(parse_devices("cpu,gpu")
            .unwrap_err()
            .contains("unknown device `gpu`"));
        assert!(parse_device("cpu,cpu").unwrap_err().contains("umae run"));
    }

    #[test]
    fn cuda_index_is_checked_against_the_gpu_count() {
        assert!(check_index(0, 1).is_ok());
        assert!(check_index(3, 8).is_ok());
        let e = check_index(2, 2).unwrap_err();
        assert!(
            e.contains("cuda:2 does not exist") && e.contains("cuda:0 to cuda:1"),
            "{e}"
        );
        assert!(check_index(0, 0).unwrap_err().contains("no GPU"));
    }

    /// On a machine without an NVIDIA driver the probe says so instead of panicking; with one,
    /// `cuda` is accepted or refused for a reason that names the fix.
    #[test]
    fn cuda_without_a_driver_is_a_clear_error() {
        match cuda_probe() {
            Err(e) => {
                assert!(e.contains("--device cpu"), "{e}");
                let e = parse_device("cuda").unwrap_err();
                assert!(
                    e.contains("--device cpu") || e.contains("--features cuda"),
                    "{e}"
                );
            }
            Ok(n) => eprintln!("this machine has {n} GPU(s): the no-driver path is not exercised"),
        }
    }
}
