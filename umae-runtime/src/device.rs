//! Choosing the device at run time: `cpu`, `cuda`, `cuda:N`, `tch`.

use umae_api::burn::backend::flex::FlexDevice;
use umae_api::Device;

/// Parse a device name and check that it can be used here, before anything touches it.
pub fn parse_device(name: &str) -> Result<Device, String> {
    let name = name.trim();
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

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device, String> {
    // cudarc panics in a library thread when the driver is missing: check first.
    let driver = std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::path::Path::new("/dev/nvidia0").exists();
    if !driver {
        return Err(
            "no NVIDIA driver found (/proc/driver/nvidia/version is missing): \
                    run on a machine with a GPU, or use --device cpu"
                .into(),
        );
    }
    let count = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_prefix("nvidia")
                        .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0);
    if count > 0 && index >= count {
        return Err(format!(
            "cuda:{index} does not exist: this machine has {count} GPU(s)"
        ));
    }
    Ok(Device::Cuda(
        umae_api::burn::backend::cuda::CudaDevice::new(index),
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_index: usize) -> Result<Device, String> {
    Err("this umae was built without CUDA support: rebuild with `cargo build --release --features cuda`".into())
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
}
