//! Where an evaluation reads its encoder from: a run directory (its latest or a named
//! checkpoint), a checkpoint directory, or a recipe (freshly initialised weights, e.g. the
//! parameter-free `identity` encoder on raw pixels or a random-init baseline).

use std::path::{Path, PathBuf};

use umae_api::recipe::Recipe;
use umae_api::Device;

use crate::checkpoint;
use crate::model::Model;

/// A model ready for evaluation.
pub struct Loaded {
    pub recipe: Recipe,
    pub model: Model,
    /// The run directory, when the source is a run or one of its checkpoints.
    pub run_dir: Option<PathBuf>,
    /// The checkpoint directory the weights came from (none: initial weights).
    pub checkpoint: Option<PathBuf>,
    /// A short name for tables and file names: `<run>@epoch-0005` or `<recipe>@init`.
    pub label: String,
    /// Optimizer steps behind the weights (0 for a recipe).
    pub step: u64,
}

impl Loaded {
    /// `epoch-NNNN` of the loaded checkpoint, or `init` for a recipe's initial weights.
    pub fn checkpoint_name(&self) -> String {
        self.checkpoint
            .as_ref()
            .map(|c| base_name(c))
            .unwrap_or_else(|| "init".into())
    }
}

/// The complete checkpoints of a run directory, oldest first.
pub fn checkpoints(run_dir: &Path) -> Result<Vec<PathBuf>, String> {
    Ok(checkpoint::list(run_dir)
        .into_iter()
        .filter(|p| p.join("state.json").exists())
        .collect())
}

/// Resolve `source` (+ an optional checkpoint name for run directories) to a recipe and the
/// checkpoint directory to load, without building anything.
pub fn resolve(
    source: &Path,
    checkpoint_name: Option<&str>,
    sets: &[String],
) -> crate::Result<(Recipe, Option<PathBuf>, Option<PathBuf>)> {
    let input = crate::Error::command_line;
    if source.is_file() {
        if checkpoint_name.is_some() {
            return Err(input(format!(
                "--checkpoint needs a run directory, but {} is a recipe file",
                source.display()
            )));
        }
        let r = Recipe::load(source, sets).map_err(|e| input(e.to_string()))?;
        return Ok((r, None, None));
    }
    if !source.exists() {
        return Err(input(format!(
            "{} does not exist: give a run directory (runs/<name>), a checkpoint directory (runs/<name>/checkpoints/epoch-NNNN) or a recipe file",
            source.display()
        )));
    }
    let (run_dir, ckpt) = if source.join("recipe.ron").is_file() {
        let ckpt = match checkpoint_name {
            Some(name) => {
                let d = source.join("checkpoints").join(name);
                if !d.join("state.json").is_file() {
                    let have: Vec<String> = checkpoints(source)
                        .map_err(input)?
                        .iter()
                        .filter_map(|p| p.file_name()?.to_str().map(String::from))
                        .collect();
                    return Err(input(format!(
                        "{} has no checkpoint `{name}` (it has: {})",
                        source.display(),
                        if have.is_empty() { "none".into() } else { have.join(", ") }
                    )));
                }
                d
            }
            None => checkpoint::latest(source).map_err(crate::Error::Failed)?.ok_or_else(|| {
                input(format!(
                    "{} has no checkpoint yet: train it first (`umae run --resume {}` continues a stopped run)",
                    source.display(),
                    source.display()
                ))
            })?,
        };
        (source.to_path_buf(), ckpt)
    } else if source.join("state.json").is_file() && source.join("model.safetensors").is_file() {
        let run = source
            .parent()
            .and_then(Path::parent)
            .filter(|r| r.join("recipe.ron").is_file())
            .ok_or_else(|| {
                input(format!(
                    "{} looks like a checkpoint but ../../recipe.ron is missing, so the model cannot be rebuilt",
                    source.display()
                ))
            })?;
        (run.to_path_buf(), source.to_path_buf())
    } else {
        return Err(input(format!(
            "{} is neither a run directory (with recipe.ron), a checkpoint directory (with state.json and model.safetensors) nor a recipe file",
            source.display()
        )));
    };
    let recipe =
        Recipe::load(&run_dir.join("recipe.ron"), sets).map_err(|e| input(e.to_string()))?;
    Ok((recipe, Some(run_dir), Some(ckpt)))
}

/// Build the recipe's model and load the encoder weights of the checkpoint, if any.
pub fn load(
    source: &Path,
    checkpoint_name: Option<&str>,
    sets: &[String],
    device: &Device,
) -> crate::Result<Loaded> {
    let (recipe, run_dir, ckpt) = resolve(source, checkpoint_name, sets)?;
    load_resolved(recipe, run_dir, ckpt, device)
}

/// [`load`] after [`resolve`].
pub fn load_resolved(
    recipe: Recipe,
    run_dir: Option<PathBuf>,
    ckpt: Option<PathBuf>,
    device: &Device,
) -> crate::Result<Loaded> {
    let mut model =
        Model::build(&recipe, device).map_err(|e| crate::Error::command_line(e.to_string()))?;
    let mut step = 0;
    if let Some(dir) = &ckpt {
        checkpoint::verify(dir).map_err(crate::Error::command_line)?;
        let file = dir.join("model.safetensors");
        let weights = checkpoint::read_safetensors(&file).map_err(crate::Error::command_line)?;
        checkpoint::load_params(
            &mut [("encoder", model.encoder.as_mut())],
            &weights,
            device,
            &file,
        )
        .map_err(crate::Error::command_line)?;
        step = checkpoint::read_state(dir)
            .map_err(crate::Error::command_line)?
            .step;
    }
    model.encoder.set_trainable(false);
    let label = match (&run_dir, &ckpt) {
        (Some(r), Some(c)) => format!("{}@{}", base_name(r), base_name(c)),
        _ => format!("{}@init", recipe.name),
    };
    Ok(Loaded {
        recipe,
        model,
        run_dir,
        checkpoint: ckpt,
        label,
        step,
    })
}

fn base_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
