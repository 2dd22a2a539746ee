//! Where training steps run. The trainer talks to one [`Executor`]: [`Local`] (one device) or
//! [`Replicas`](replicas::Replicas) (several devices, and later nodes, each training a replica on
//! its rows of every batch and averaging gradients). The data-parallel gradient weighting lives
//! here, not in the objective (see [`replicas`]).

pub mod device;
pub mod nodes;
pub mod replicas;

use std::path::PathBuf;
use std::sync::Arc;

use umae_api::recipe::Recipe;
use umae_api::{Device, Rng};

use crate::data::{Batch, Dataset};
use crate::model::{images_tensor, Model};
use crate::optim::AdamW;
use crate::step::{apply_step, train_micro_batch, ProbeNorm, StepScalars};

/// Runs the steps of a training run, whatever the devices.
pub trait Executor {
    /// Devices training together (1 for [`Local`]).
    fn world(&self) -> usize;
    /// Forward and backward of one micro-batch (`batch` is the global batch; `accum`
    /// micro-batches make a step), gradients accumulated into `opt`. Returns the batch's terms.
    #[allow(clippy::too_many_arguments)]
    fn micro_batch(
        &mut self,
        model: &Model,
        norm: Option<&mut ProbeNorm>,
        opt: &mut AdamW,
        batch: Batch,
        rng: &mut Rng,
        accum: usize,
    ) -> crate::Result<StepScalars>;
    /// Make the accumulated gradients the whole step's (averaged over devices) and return
    /// their global L2 norm, the same on every device.
    fn reduce(&mut self, opt: &mut AdamW) -> crate::Result<f64>;
    /// Apply the step: the model at `lr`, the online probe at `probe_lr`.
    fn apply(
        &mut self,
        model: &mut Model,
        opt: &mut AdamW,
        lr: f64,
        probe_lr: f64,
    ) -> crate::Result<()>;
    /// Drop the step's gradients on every device (a skipped step).
    fn discard(&mut self, opt: &mut AdamW) -> crate::Result<()>;
}

/// One device.
pub struct Local {
    pub device: Device,
}

impl Executor for Local {
    fn world(&self) -> usize {
        1
    }

    fn micro_batch(
        &mut self,
        model: &Model,
        norm: Option<&mut ProbeNorm>,
        opt: &mut AdamW,
        batch: Batch,
        rng: &mut Rng,
        accum: usize,
    ) -> crate::Result<StepScalars> {
        let images = images_tensor(batch.images, batch.n, &model.geometry, &self.device);
        let scalars = train_micro_batch(model, norm, opt, images, &batch.labels, rng, accum)?;
        Ok(StepScalars::read(scalars, model.regularizers.len())?)
    }

    fn reduce(&mut self, opt: &mut AdamW) -> crate::Result<f64> {
        Ok(opt.grad_norm())
    }

    fn apply(
        &mut self,
        model: &mut Model,
        opt: &mut AdamW,
        lr: f64,
        probe_lr: f64,
    ) -> crate::Result<()> {
        apply_step(model, opt, lr, probe_lr);
        Ok(())
    }

    fn discard(&mut self, opt: &mut AdamW) -> crate::Result<()> {
        opt.discard();
        Ok(())
    }
}

/// Where a run trains: its first device, further local devices, other nodes.
pub struct Placement<'a> {
    pub device: &'a Device,
    pub parallel: &'a [Device],
    pub nodes: Option<&'a nodes::Nodes>,
}

impl Placement<'_> {
    /// Devices training together, on every node.
    pub fn world(&self) -> usize {
        (1 + self.parallel.len()) * self.nodes.map_or(1, |n| n.count)
    }
}

/// The executor for `placement`: [`Local`] for one device, else replicas started from the
/// trainer's model, probe statistics and optimizer. Multi-node runs are refused here (see
/// [`nodes::check_available`]), so that library callers meet the same rule as the CLI.
pub fn start(
    recipe: &Recipe,
    placement: &Placement<'_>,
    parts: (&Model, &Option<ProbeNorm>, &AdamW),
    train_set: Arc<dyn Dataset>,
    cache: Option<PathBuf>,
) -> crate::Result<Box<dyn Executor>> {
    nodes::check_available(placement.nodes)?;
    if placement.world() == 1 {
        return Ok(Box::new(Local {
            device: placement.device.clone(),
        }));
    }
    let devices: Vec<Device> = std::iter::once(placement.device.clone())
        .chain(placement.parallel.iter().cloned())
        .collect();
    let (model, norm, opt) = parts;
    let snapshot = replicas::Snapshot::of(model, norm, opt);
    Ok(Box::new(replicas::Replicas::start(
        recipe,
        &devices,
        placement.nodes,
        snapshot,
        train_set,
        cache,
    )?))
}
