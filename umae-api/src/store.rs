//! Host tensors and safetensors files: how checkpoints, exports and fitted plugin state (a
//! tokenizer's codebook) are stored.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};

use crate::{Device, Inner};

/// A flat f32 tensor with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn from_inner(t: Tensor<Inner, 1>, shape: &[usize]) -> Self {
        let data = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 tensor data");
        HostTensor {
            shape: shape.to_vec(),
            data,
        }
    }

    pub fn to_inner(&self, device: &Device) -> Tensor<Inner, 1> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), [self.data.len()]),
            device,
        )
    }
}

pub fn write_safetensors(path: &Path, tensors: &HashMap<String, HostTensor>) -> Result<(), String> {
    write_safetensors_meta(path, tensors, &[])
}

/// [`write_safetensors`] with string metadata in the header.
pub fn write_safetensors_meta(
    path: &Path,
    tensors: &HashMap<String, HostTensor>,
    metadata: &[(&str, &str)],
) -> Result<(), String> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view"),
            )
        })
        .collect();
    let meta: Option<HashMap<String, String>> = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    let out = safetensors::serialize(views, meta)
        .map_err(|e| format!("cannot encode {}: {e}", path.display()))?;
    fs::write(path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn read_safetensors(path: &Path) -> Result<HashMap<String, HostTensor>, String> {
    read_safetensors_meta(path).map(|(t, _)| t)
}

/// [`read_safetensors`] with the header's string metadata.
#[allow(clippy::type_complexity)]
pub fn read_safetensors_meta(
    path: &Path,
) -> Result<(HashMap<String, HostTensor>, HashMap<String, String>), String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("{} is not a valid safetensors file: {e}", path.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{} is not a valid safetensors file: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "{}: tensor `{name}` is {:?}, expected F32",
                path.display(),
                view.dtype()
            ));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, metadata))
}
