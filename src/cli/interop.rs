//! `umae export` and `umae import`: checkpoints to and from PyTorch (timm, MAE).

use std::path::PathBuf;

use umae_api::recipe::Recipe;
use umae_runtime::{checkpoint, interop, model::Model};

use super::eval::{load, ModelArgs};
use super::Error;

pub fn export(source: ModelArgs, format: &str, output: Option<PathBuf>) -> Result<(), Error> {
    if format != "timm" {
        return Err(Error::command_line(format!(
            "unknown export format `{format}` (available: timm)"
        )));
    }
    let (loaded, _) = load(&source)?;
    let state = interop::to_timm(&loaded.model).map_err(Error::command_line)?;
    let path = output.unwrap_or_else(|| {
        let base = match &loaded.run_dir {
            Some(r) => r.join("export"),
            None => PathBuf::from("runs")
                .join(&loaded.recipe.name)
                .join("export"),
        };
        let ck = loaded.checkpoint_name();
        base.join(format!("{ck}-timm.safetensors"))
    });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Failed(format!("cannot create {}: {e}", dir.display())))?;
    }
    let g = loaded.model.geometry;
    let dim = loaded.model.encoder.dim();
    let depth = state
        .keys()
        .filter(|k| k.ends_with(".attn.qkv.weight"))
        .count();
    let arch = format!(
        "{{\"img_size\": {}, \"patch_size\": {}, \"in_chans\": {}, \"embed_dim\": {dim}, \"depth\": {depth}}}",
        g.height, g.patch, g.channels
    );
    let tmp = path.with_extension("tmp");
    checkpoint::write_safetensors_meta(
        &tmp,
        &state,
        &[("format", "pt"), ("umae.timm_args", &arch)],
    )
    .map_err(Error::Failed)?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| Error::Failed(format!("cannot move {} into place: {e}", path.display())))?;
    println!(
        "wrote {} ({} tensors, timm VisionTransformer layout). In Python:\n  \
         m = timm.models.vision_transformer.VisionTransformer(img_size={}, patch_size={}, in_chans={}, embed_dim={dim}, depth={depth}, num_heads=<heads>, num_classes=0)\n  \
         m.load_state_dict(safetensors.torch.load_file(\"{}\"))",
        path.display(),
        state.len(),
        g.height,
        g.patch,
        g.channels,
        path.display()
    );
    Ok(())
}

pub fn import(
    file: PathBuf,
    recipe: PathBuf,
    sets: Vec<String>,
    output: PathBuf,
) -> Result<(), Error> {
    let r = Recipe::load(&recipe, &sets).map_err(Error::from)?;
    let device = umae_runtime::parse_device("cpu").map_err(Error::command_line)?;
    let state = interop::read_state_dict(&file).map_err(Error::command_line)?;
    let mut model = Model::build(&r, &device).map_err(Error::from)?;
    let ignored =
        interop::load_timm(&mut model, &state, &device, &file).map_err(Error::command_line)?;
    umae_runtime::train::start_run_from(&r, &model, &output)?;
    println!(
        "imported {} tensors of {} into {} (checkpoint epoch-0000){}",
        state.len() - ignored.len(),
        file.display(),
        output.display(),
        if ignored.is_empty() {
            String::new()
        } else {
            format!(
                "; ignored {} tensor(s) the encoder has no place for (e.g. {})",
                ignored.len(),
                ignored
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(())
}
