//! Export to timm and import from timm / MAE `.pth`: a ViT-T goes out and comes back with the
//! same features. The `.pth` is written here in PyTorch's zip + pickle layout, as `torch.save`
//! writes MAE's released `mae_pretrain_vit_base.pth` (`{"model": OrderedDict(...)}`).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use common::*;
use umae_api::recipe::Recipe;
use umae_runtime::checkpoint::{self, HostTensor};
use umae_runtime::model::{images_tensor, Model};
use umae_runtime::{interop, parse_device};

fn vit_t(seed: u64) -> (Recipe, Model) {
    umae::builtin_plugins();
    let sets = ["data.format=Synthetic".to_string(), format!("seed={seed}")];
    let r = Recipe::load(&repo().join("recipes/mae-vitt-cifar10.ron"), &sets).unwrap();
    let m = Model::build(&r, &parse_device("cpu").unwrap()).unwrap();
    (r, m)
}

fn features(m: &Model) -> Vec<f32> {
    let g = m.geometry;
    let n = 3;
    let mut rng = umae_api::Rng::new(42);
    let px: Vec<f32> = (0..n * g.channels * g.height * g.width)
        .map(|_| rng.normal() as f32)
        .collect();
    let x = images_tensor(px, n, &g, &parse_device("cpu").unwrap());
    let out = m.encoder.forward(x, None);
    out.tokens.into_data().convert::<f32>().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A minimal pickle (protocol 2) + zip writer for `{"model": OrderedDict(name -> FloatTensor)}`.
fn write_pth(path: &Path, state: &HashMap<String, HostTensor>) {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.push(b'X');
        out.extend((v.len() as u32).to_le_bytes());
        out.extend(v.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }
    fn tuple(out: &mut Vec<u8>, vs: &[usize]) {
        out.push(b'(');
        for &v in vs {
            int(out, v);
        }
        out.push(b't');
    }
    let mut names: Vec<&String> = state.keys().collect();
    names.sort();
    let mut p = vec![0x80, 2, b'}'];
    s(&mut p, "model");
    p.extend(b"ccollections\nOrderedDict\n)R(");
    for (key, name) in names.iter().enumerate() {
        let t = &state[*name];
        s(&mut p, name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        s(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        s(&mut p, &key.to_string());
        s(&mut p, "cpu");
        int(&mut p, t.data.len());
        p.extend(b"tQ");
        int(&mut p, 0);
        tuple(&mut p, &t.shape);
        let mut stride = vec![1usize; t.shape.len()];
        for i in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * t.shape[i + 1];
        }
        tuple(&mut p, &stride);
        p.push(0x89);
        p.extend(b"ccollections\nOrderedDict\n)R");
        p.extend(b"tR");
    }
    p.extend(b"us.");
    let file = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(&p).unwrap();
    z.start_file("archive/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    for (key, name) in names.iter().enumerate() {
        z.start_file(format!("archive/data/{key}"), opts).unwrap();
        let bytes: Vec<u8> = state[*name]
            .data
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        z.write_all(&bytes).unwrap();
    }
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

#[test]
fn timm_export_and_mae_import_keep_features() {
    let (_, original) = vit_t(1);
    let want = features(&original);
    let state = interop::to_timm(&original).unwrap();
    // timm's names and layouts.
    assert_eq!(state["cls_token"].shape, vec![1, 1, 192]);
    assert_eq!(state["pos_embed"].shape, vec![1, 65, 192]);
    assert_eq!(state["patch_embed.proj.weight"].shape, vec![192, 3, 4, 4]);
    assert_eq!(state["blocks.0.attn.qkv.weight"].shape, vec![576, 192]);
    assert_eq!(state["blocks.11.mlp.fc1.weight"].shape, vec![768, 192]);
    assert_eq!(state["norm.weight"].shape, vec![192]);
    assert_eq!(state.len(), 4 + 12 * 12 + 2);

    let dir = tempfile::tempdir().unwrap();
    let device = parse_device("cpu").unwrap();
    // Through safetensors (what `umae export` writes) ...
    let st = dir.path().join("vit_t.safetensors");
    checkpoint::write_safetensors(&st, &state).unwrap();
    let (_, mut back) = vit_t(2);
    assert!(
        max_diff(&features(&back), &want) > 1e-2,
        "a different seed must differ"
    );
    interop::load_timm(
        &mut back,
        &interop::read_state_dict(&st).unwrap(),
        &device,
        &st,
    )
    .unwrap();
    assert!(max_diff(&features(&back), &want) < 1e-5);

    // ... and through an MAE-style .pth with decoder tensors the encoder ignores.
    let mut mae = state.clone();
    mae.insert(
        "decoder_embed.weight".into(),
        HostTensor {
            shape: vec![128, 192],
            data: vec![0.5; 128 * 192],
        },
    );
    mae.insert(
        "mask_token".into(),
        HostTensor {
            shape: vec![1, 1, 128],
            data: vec![0.0; 128],
        },
    );
    let pth = dir.path().join("mae_pretrain_vit_tiny.pth");
    write_pth(&pth, &mae);
    let read = interop::read_state_dict(&pth).unwrap();
    assert_eq!(read.len(), mae.len());
    assert_eq!(
        read["patch_embed.proj.weight"],
        state["patch_embed.proj.weight"]
    );
    let (_, mut from_pth) = vit_t(3);
    let ignored = interop::load_timm(&mut from_pth, &read, &device, &pth).unwrap();
    assert_eq!(
        ignored,
        vec!["decoder_embed.weight".to_string(), "mask_token".to_string()]
    );
    assert!(max_diff(&features(&from_pth), &want) < 1e-5);
}

#[test]
fn import_and_export_commands_round_trip_and_reject_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipe = repo().join("recipes/mae-vitt-cifar10.ron");
    let export = d.join("init.safetensors");
    let o = run(&[
        "export",
        recipe.to_str().unwrap(),
        "--set",
        "data.format=Synthetic",
        "-o",
        export.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let run_dir = d.join("imported");
    let import = |file: &Path, out: &Path| {
        run(&[
            "import",
            file.to_str().unwrap(),
            "--recipe",
            recipe.to_str().unwrap(),
            "--set",
            "data.format=Synthetic",
            "-o",
            out.to_str().unwrap(),
        ])
    };
    let o = import(&export, &run_dir);
    assert!(o.status.success(), "{}", text(&o));
    assert!(run_dir
        .join("checkpoints/epoch-0000/model.safetensors")
        .exists());
    // A second import into the same folder is refused and leaves it alone.
    let before = std::fs::read(run_dir.join("checkpoints/epoch-0000/model.safetensors")).unwrap();
    let o = import(&export, &run_dir);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("already holds a run"), "{}", text(&o));
    assert_eq!(
        before,
        std::fs::read(run_dir.join("checkpoints/epoch-0000/model.safetensors")).unwrap()
    );

    // A ViT-T file does not fit a 128-d encoder: a clear error naming the tensor.
    let o = run(&[
        "import",
        export.to_str().unwrap(),
        "--recipe",
        "recipes/mae-fmnist.ron",
        "-o",
        d.join("wrong").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("does not fit this encoder") && text(&o).contains("shape"),
        "{}",
        text(&o)
    );
    assert!(!d.join("wrong").exists());

    // Not a checkpoint at all.
    let junk = d.join("junk.pth");
    std::fs::write(&junk, b"not a zip").unwrap();
    let o = run(&[
        "import",
        junk.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-o",
        d.join("j").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("not a readable PyTorch checkpoint"),
        "{}",
        text(&o)
    );
}
