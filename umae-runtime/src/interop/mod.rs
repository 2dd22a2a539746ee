//! Checkpoint interoperability with PyTorch: the encoder as a timm `VisionTransformer` state
//! dict (safetensors), and import of timm / official MAE checkpoints (`.pth` or safetensors).
//!
//! Name and layout mapping (umae `vit` -> timm):
//! - `cls_token` `[D]` -> `cls_token` `[1, 1, D]`
//! - `patch_embed.weight` `[C*p*p, D]` (Linear on channel-row-column patches) ->
//!   `patch_embed.proj.weight` `[D, C, p, p]` (the strided convolution); bias -> `.proj.bias`
//! - every other Linear weight `[in, out]` -> `[out, in]` (fused qkv keeps q, k, v order)
//! - LayerNorm `gamma` / `beta` -> `weight` / `bias`
//! - the fixed sin-cos position embedding -> `pos_embed` `[1, 1 + N, D]` with the class slot

use std::collections::HashMap;
use std::path::Path;

use umae_api::Device;

use crate::checkpoint::{self, HostTensor};
use crate::model::Model;

/// timm name of a umae `vit` parameter path.
fn timm_name(path: &str) -> String {
    let p = path.replacen("patch_embed.", "patch_embed.proj.", 1);
    if let Some(stem) = p.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = p.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        p
    }
}

fn transpose(t: &HostTensor) -> HostTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut data = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            data[j * r + i] = t.data[i * c + j];
        }
    }
    HostTensor {
        shape: vec![c, r],
        data,
    }
}

fn ensure_vit(model: &Model) -> Result<(), String> {
    if model.names[1] != "vit" {
        return Err(format!(
            "the timm layout exists for the `vit` encoder only; this model's encoder is `{}`",
            model.names[1]
        ));
    }
    Ok(())
}

/// The encoder as a timm `VisionTransformer` state dict.
pub fn to_timm(model: &Model) -> Result<HashMap<String, HostTensor>, String> {
    ensure_vit(model)?;
    let g = model.geometry;
    let mut out = HashMap::new();
    let enc: &dyn umae_api::Trainable = model.encoder.as_ref();
    enc.visit_params(&mut |info, t| {
        let host = HostTensor::from_inner(t, info.shape);
        let name = timm_name(info.path);
        let value = match info.path {
            "cls_token" | "mask_token" => HostTensor {
                shape: vec![1, 1, host.data.len()],
                data: host.data,
            },
            "patch_embed.weight" => {
                let mut t = transpose(&host);
                t.shape = vec![t.shape[0], g.channels, g.patch, g.patch];
                t
            }
            _ if info.shape.len() == 2 => transpose(&host),
            _ => host,
        };
        out.insert(name, value);
    });
    out.remove("mask_token");
    for (name, shape, data) in model.encoder.constants() {
        out.insert(name, HostTensor { shape, data });
    }
    Ok(out)
}

/// Load a timm / MAE state dict into the model's encoder. Keys the encoder does not have
/// (MAE's decoder, a classification head) are ignored and returned; missing keys and shape
/// mismatches are errors.
pub fn load_timm(
    model: &mut Model,
    state: &HashMap<String, HostTensor>,
    device: &Device,
    source: &Path,
) -> Result<Vec<String>, String> {
    ensure_vit(model)?;
    let g = model.geometry;
    let mut problems = Vec::new();
    let mut used = std::collections::HashSet::new();
    model.encoder.map_params(&mut |info, current| {
        let name = timm_name(info.path);
        let Some(t) = state.get(&name) else {
            problems.push(format!("`{name}` is missing"));
            return current;
        };
        used.insert(name.clone());
        let host = match info.path {
            "cls_token" | "mask_token" => HostTensor {
                shape: vec![t.data.len()],
                data: t.data.clone(),
            },
            "patch_embed.weight" if t.shape.len() == 4 => {
                let flat = HostTensor {
                    shape: vec![t.shape[0], t.shape[1] * t.shape[2] * t.shape[3]],
                    data: t.data.clone(),
                };
                transpose(&flat)
            }
            _ if t.shape.len() == 2 => transpose(t),
            _ => t.clone(),
        };
        if host.shape != info.shape {
            problems.push(format!(
                "`{name}` has shape {:?} in the file, this encoder needs {:?} (in umae's layout)",
                t.shape, info.shape
            ));
            return current;
        }
        host.to_inner(device)
    });
    for (name, shape, data) in model.encoder.constants() {
        match state.get(&name) {
            Some(t) if t.shape != shape => problems.push(format!(
                "`{name}` has shape {:?}, this encoder needs {shape:?} ({}x{} images, patch {})",
                t.shape, g.height, g.width, g.patch
            )),
            Some(t) => {
                let diff = t
                    .data
                    .iter()
                    .zip(&data)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                if diff > 1e-3 {
                    problems.push(format!(
                        "`{name}` differs from the fixed sin-cos embedding by up to {diff:.3}: learned position embeddings are not supported"
                    ));
                }
                used.insert(name);
            }
            None => {}
        }
    }
    checkpoint::misfit(source, "this encoder", &problems)?;
    let mut ignored: Vec<String> = state
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    ignored.sort();
    Ok(ignored)
}

/// Read a state dict: safetensors, or a PyTorch `.pth` / `.pt` (zip or legacy pickle) whose
/// tensors sit at the top level or under `model` / `state_dict` (as in MAE's releases).
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, HostTensor>, String> {
    if !path.is_file() {
        return Err(format!(
            "{} does not exist or is not a file",
            path.display()
        ));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "safetensors" {
        return checkpoint::read_safetensors(path);
    }
    use burn_store::pytorch::PytorchReader;
    let mut last = String::new();
    for key in [Some("model"), Some("state_dict"), None] {
        let reader = match key {
            Some(k) => PytorchReader::with_top_level_key(path, k),
            None => PytorchReader::new(path),
        };
        match reader {
            Ok(r) if !r.is_empty() => {
                let mut out = HashMap::new();
                for (name, snap) in r.into_tensors() {
                    let data = snap
                        .to_data()
                        .map_err(|e| format!("{}: cannot read `{name}`: {e:?}", path.display()))?;
                    let shape = data.shape.to_vec();
                    let values = data.convert::<f32>().to_vec::<f32>().map_err(|e| {
                        format!("{}: `{name}` is not numeric: {e:?}", path.display())
                    })?;
                    out.insert(
                        name,
                        HostTensor {
                            shape,
                            data: values,
                        },
                    );
                }
                return Ok(out);
            }
            Ok(_) => last = "no tensors".into(),
            Err(e) => last = format!("{e}"),
        }
    }
    Err(format!(
        "{} is not a readable PyTorch checkpoint or safetensors file ({last})",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_timm() {
        assert_eq!(timm_name("patch_embed.weight"), "patch_embed.proj.weight");
        assert_eq!(timm_name("blocks.3.norm1.gamma"), "blocks.3.norm1.weight");
        assert_eq!(timm_name("norm.beta"), "norm.bias");
        assert_eq!(
            timm_name("blocks.0.attn.qkv.weight"),
            "blocks.0.attn.qkv.weight"
        );
    }

    #[test]
    fn transpose_is_an_involution() {
        let t = HostTensor {
            shape: vec![2, 3],
            data: vec![1., 2., 3., 4., 5., 6.],
        };
        let tt = transpose(&t);
        assert_eq!(tt.shape, vec![3, 2]);
        assert_eq!(tt.data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(transpose(&tt), t);
    }
}
