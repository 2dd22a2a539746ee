//! Checkpoint interoperability with PyTorch: the encoder as a timm `VisionTransformer` state
//! dict (safetensors), and import of timm / official MAE checkpoints (`.pth` or safetensors).
//!
//! The encoder says where each of its parameters sits in timm's layout
//! (`Encoder::timm_param`, implemented by `vit`); this module moves the values: tokens `[D]`
//! <-> `[1, 1, D]`, Linear weights `[in, out]` <-> `[out, in]`, the patch embedding
//! `[C*p*p, D]` <-> the strided convolution `[D, C, p, p]`, and the fixed sin-cos position
//! embedding (an encoder constant) <-> `pos_embed` `[1, 1 + N, D]` with the class slot.

use std::collections::HashMap;
use std::path::Path;

use umae_api::{Device, TimmLayout, TimmParam, Trainable};

use crate::checkpoint::{self, HostTensor};
use crate::model::Model;

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

/// Refuse an encoder without a timm layout, naming it.
fn ensure_timm_layout(model: &Model) -> Result<(), String> {
    let mut has = false;
    model.encoder.visit_params(&mut |info, _| {
        has |= model.encoder.timm_param(info.path).is_some();
    });
    if !has {
        return Err(format!(
            "encoder `{}` has no timm layout (the `vit` encoder has one)",
            model.names[1]
        ));
    }
    Ok(())
}

/// umae's values in timm's layout.
fn to_layout(host: HostTensor, layout: TimmLayout) -> HostTensor {
    match layout {
        TimmLayout::AsIs => host,
        TimmLayout::Token => HostTensor {
            shape: vec![1, 1, host.data.len()],
            data: host.data,
        },
        TimmLayout::Transposed => transpose(&host),
        TimmLayout::PatchConv { channels, patch } => {
            let mut t = transpose(&host);
            t.shape = vec![t.shape[0], channels, patch, patch];
            t
        }
    }
}

/// timm's values in umae's layout (shapes are checked by the caller).
fn from_layout(t: &HostTensor, layout: TimmLayout) -> HostTensor {
    match layout {
        TimmLayout::Token => HostTensor {
            shape: vec![t.data.len()],
            data: t.data.clone(),
        },
        TimmLayout::PatchConv { .. } if t.shape.len() == 4 => transpose(&HostTensor {
            shape: vec![t.shape[0], t.shape[1] * t.shape[2] * t.shape[3]],
            data: t.data.clone(),
        }),
        TimmLayout::Transposed | TimmLayout::PatchConv { .. } if t.shape.len() == 2 => transpose(t),
        _ => t.clone(),
    }
}

/// The encoder as a timm `VisionTransformer` state dict.
pub fn to_timm(model: &Model) -> Result<HashMap<String, HostTensor>, String> {
    ensure_timm_layout(model)?;
    let mut out = HashMap::new();
    let enc: &dyn Trainable = model.encoder.as_ref();
    enc.visit_params(&mut |info, t| {
        if let Some(p) = model.encoder.timm_param(info.path).filter(|p| p.export) {
            out.insert(
                p.name,
                to_layout(HostTensor::from_inner(t, info.shape), p.layout),
            );
        }
    });
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
    ensure_timm_layout(model)?;
    let g = model.geometry;
    let mut problems = Vec::new();
    let mut used = std::collections::HashSet::new();
    let params: HashMap<String, TimmParam> = {
        let mut m = HashMap::new();
        model.encoder.visit_params(&mut |info, _| {
            if let Some(p) = model.encoder.timm_param(info.path) {
                m.insert(info.path.to_string(), p);
            }
        });
        m
    };
    model.encoder.map_params(&mut |info, current| {
        let Some(p) = params.get(info.path) else {
            return current;
        };
        let Some(t) = state.get(&p.name) else {
            problems.push(format!("`{}` is missing", p.name));
            return current;
        };
        used.insert(p.name.clone());
        let host = from_layout(t, p.layout);
        if host.shape != info.shape {
            problems.push(format!(
                "`{}` has shape {:?} in the file, this encoder needs {:?} (in umae's layout)",
                p.name, t.shape, info.shape
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
    fn layouts_round_trip() {
        let w = HostTensor {
            shape: vec![12, 2],
            data: (0..24).map(|x| x as f32).collect(),
        };
        let conv = TimmLayout::PatchConv {
            channels: 3,
            patch: 2,
        };
        let timm = to_layout(w.clone(), conv);
        assert_eq!(timm.shape, [2, 3, 2, 2]);
        assert_eq!(timm.data[..4], [0., 2., 4., 6.], "output channel 0 first");
        assert_eq!(from_layout(&timm, conv), w);
        let token = HostTensor {
            shape: vec![4],
            data: vec![1., 2., 3., 4.],
        };
        assert_eq!(to_layout(token.clone(), TimmLayout::Token).shape, [1, 1, 4]);
        assert_eq!(
            from_layout(
                &to_layout(token.clone(), TimmLayout::Token),
                TimmLayout::Token
            ),
            token
        );
        let t = to_layout(w.clone(), TimmLayout::Transposed);
        assert_eq!(t.shape, [2, 12]);
        assert_eq!(from_layout(&t, TimmLayout::Transposed), w);
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
