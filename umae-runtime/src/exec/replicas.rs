//! Data parallelism over several devices, through burn-collective.
//!
//! One peer per device. Peer 0 is the trainer's own thread and model; peers 1.. are threads
//! with a replica each. Every optimizer step, the trainer draws the global batch and its masks
//! (exactly as a single device would for a batch that size), gives each peer its rows, and each
//! peer runs forward and backward on them. Regularizers see the features of the whole global
//! batch: each peer all-gathers them, its own rows keeping their gradients (as the paper's
//! code gathers features across GPUs). The gradients are then averaged across peers by one
//! all-reduce and every peer applies the same AdamW step, so the replicas stay identical. With
//! the same global batch this is the single-device computation, up to summation order.
//!
//! Several machines ([`Nodes`]) use the same calls: burn-collective's global mode joins the
//! peers of every node through an orchestrator process
//! ([`orchestrator`](super::nodes::orchestrator)). Peers are numbered
//! globally (node rank x devices per node + local index); every node's trainer draws the same
//! global batch and masks from the same seed and keeps its own peers' rows, so the computation
//! is the single-device one on any number of nodes. See docs/performance.md.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use umae_api::burn::collective::{self, PeerId, ReduceOperation};
use umae_api::burn::tensor::{Tensor, TensorData, TensorPrimitive};
use umae_api::recipe::Recipe;
use umae_api::{Device, EncoderOutput, Inner, Mask, MaskPlan, Rng, B};

use super::nodes::{config, Nodes};
use super::Executor;
use crate::data::{Batch, Dataset};
use crate::model::{images_tensor, Model};
use crate::optim::{AdamW, AdamWState};
use crate::step::{apply_step, forward_backward, prepare_target, training_parts, ProbeNorm};
use crate::step::{FeatureExchange, StepScalars};

/// This peer's place among the peers.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub rank: usize,
    pub world: usize,
}

fn collective_error(what: &str, e: collective::CollectiveError) -> String {
    format!("{what} between devices failed: {e:?}")
}

impl Peer {
    /// The sum or mean of `t` over all peers (every peer calls this with the same shape).
    pub fn all_reduce(
        &self,
        t: Tensor<Inner, 1>,
        op: ReduceOperation,
    ) -> Result<Tensor<Inner, 1>, String> {
        let out = collective::all_reduce::<Inner>(
            PeerId::from(self.rank),
            t.into_primitive().tensor(),
            op,
        )
        .map_err(|e| collective_error("all-reduce", e))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Every peer's `local` (the same shape on each) stacked along dimension 0 in rank order.
    /// Only this peer's rows are differentiable; the others are constants here, and their
    /// gradients are computed by their own peers.
    pub fn gather<const D: usize>(&self, local: Tensor<B, D>) -> Result<Tensor<B, D>, String> {
        let dims = local.dims();
        let rows = dims[0];
        let inner = local.clone().inner();
        let n = inner.shape().num_elements();
        let device = inner.device();
        // This peer's values in its slot, zeros elsewhere: the sum over peers is the gather.
        let (before, after) = (self.rank * n, (self.world - self.rank - 1) * n);
        let mut slots = Vec::with_capacity(3);
        if before > 0 {
            slots.push(Tensor::<Inner, 1>::zeros([before], &device));
        }
        slots.push(inner.reshape([n]));
        if after > 0 {
            slots.push(Tensor::zeros([after], &device));
        }
        let all = self.all_reduce(Tensor::cat(slots, 0), ReduceOperation::Sum)?;
        let mut shape = dims;
        shape[0] = rows * self.world;
        let all = Tensor::<B, D>::from_inner(all.reshape(shape));
        let mut parts = Vec::with_capacity(3);
        if self.rank > 0 {
            parts.push(all.clone().narrow(0, 0, self.rank * rows));
        }
        parts.push(local);
        let after = (self.world - self.rank - 1) * rows;
        if after > 0 {
            parts.push(all.narrow(0, (self.rank + 1) * rows, after));
        }
        Ok(Tensor::cat(parts, 0))
    }
}

/// Weights, probe statistics and optimizer state on the host: how peer 0 starts the replicas.
#[derive(Clone, Default)]
pub struct Snapshot {
    params: Vec<(String, Vec<f32>)>,
    norm: Option<(Vec<f32>, Vec<f32>)>,
    step: u64,
    m: Vec<(String, Vec<f32>)>,
    v: Vec<(String, Vec<f32>)>,
}

fn host(t: Tensor<Inner, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap_or_default()
}

fn device_vec(v: &[f32], device: &Device) -> Tensor<Inner, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

impl Snapshot {
    pub fn of(model: &Model, norm: &Option<ProbeNorm>, opt: &AdamW) -> Snapshot {
        let mut params = Vec::new();
        for (prefix, part) in model.trainables() {
            part.visit_params(&mut |info, t| {
                params.push((format!("{prefix}.{}", info.path), host(t)));
            });
        }
        let state = opt.state();
        let moments =
            |m: Vec<(String, Tensor<Inner, 1>)>| m.into_iter().map(|(k, t)| (k, host(t))).collect();
        Snapshot {
            params,
            norm: norm
                .as_ref()
                .map(|n| (host(n.mean.clone()), host(n.var.clone()))),
            step: state.step,
            m: moments(state.m),
            v: moments(state.v),
        }
    }

    /// Load the snapshot into a model built from the same recipe (on any device).
    pub fn apply(
        &self,
        model: &mut Model,
        norm: &mut Option<ProbeNorm>,
        opt: &mut AdamW,
        device: &Device,
    ) -> Result<(), String> {
        let params: std::collections::HashMap<&str, &Vec<f32>> =
            self.params.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut missing = None;
        for (prefix, part) in model.trainables_mut() {
            part.map_params(&mut |info, t| match params
                .get(format!("{prefix}.{}", info.path).as_str())
            {
                Some(v) if v.len() == t.dims()[0] => device_vec(v, device),
                _ => {
                    missing = Some(format!("{prefix}.{}", info.path));
                    t
                }
            });
        }
        if let Some(k) = missing {
            return Err(format!("replica parameter {k} differs from the trainer's"));
        }
        if let (Some(n), Some((mean, var))) = (norm.as_mut(), &self.norm) {
            n.mean = device_vec(mean, device);
            n.var = device_vec(var, device);
        }
        let on_device = |m: &[(String, Vec<f32>)]| {
            m.iter()
                .map(|(k, v)| (k.clone(), device_vec(v, device)))
                .collect()
        };
        opt.load_state(AdamWState {
            step: self.step,
            m: on_device(&self.m),
            v: on_device(&self.v),
        });
        Ok(())
    }
}

/// One peer's rows of a micro-batch.
struct Shard {
    /// `n` normalised images on the host.
    images: Vec<f32>,
    n: usize,
    labels: Vec<i64>,
    mask: MaskPlan,
    /// Divides the loss (gradient accumulation).
    scale: f64,
}

/// Work for a replica.
enum Job {
    /// Forward and backward on a shard, accumulating gradients.
    Batch(Shard),
    /// Average the accumulated gradients with the other peers.
    Reduce,
    /// Apply the averaged gradients.
    Step { lr: f64, probe_lr: f64 },
    /// Drop them (a skipped step).
    Discard,
    /// Join the collective (once every replica is built).
    Register,
}

/// The replicas of a data-parallel run on this node (its peers after the first), driven by
/// the trainer (this node's first peer).
pub struct Replicas {
    /// The trainer's peer: global rank and world.
    pub peer: Peer,
    /// The trainer's device.
    device: Device,
    jobs: Vec<Sender<Job>>,
    results: Vec<Receiver<Result<(), String>>>,
    handles: Vec<JoinHandle<()>>,
    /// False after any error: a replica may then wait in a collective call forever, so it is
    /// not joined (the process is ending with the error).
    healthy: std::cell::Cell<bool>,
}

impl Replicas {
    /// Start one replica per device of `devices[1..]`, each a copy of the trainer's state
    /// (`devices[0]` is the trainer's), and join the other nodes when there are several.
    pub fn start(
        recipe: &Recipe,
        devices: &[Device],
        nodes: Option<&Nodes>,
        snapshot: Snapshot,
        train_set: Arc<dyn Dataset>,
        cache: Option<PathBuf>,
    ) -> Result<Replicas, String> {
        let local = devices.len();
        let world = local * nodes.map_or(1, |n| n.count);
        let first = local * nodes.map_or(0, |n| n.rank);
        collective::reset_collective::<Inner>();
        let peer = Peer { rank: first, world };
        let mut replicas = Replicas {
            peer,
            device: devices[0].clone(),
            jobs: Vec::new(),
            results: Vec::new(),
            handles: Vec::new(),
            healthy: std::cell::Cell::new(true),
        };
        let snapshot = Arc::new(snapshot);
        for (i, device) in devices.iter().enumerate().skip(1) {
            let rank = first + i;
            let (job_tx, job_rx) = channel::<Job>();
            let (res_tx, res_rx) = channel();
            let (recipe, device, snapshot, data, cache) = (
                recipe.clone(),
                device.clone(),
                snapshot.clone(),
                train_set.clone(),
                cache.clone(),
            );
            let nodes = nodes.cloned();
            let handle = std::thread::Builder::new()
                .name(format!("umae-replica-{rank}"))
                .spawn(move || {
                    let peer = Peer { rank, world };
                    let set_up = Setup {
                        peer,
                        local,
                        nodes,
                        recipe,
                        device,
                        data,
                        cache,
                    };
                    replica(set_up, &snapshot, job_rx, res_tx)
                })
                .map_err(|e| format!("cannot start a replica thread: {e}"))?;
            replicas.jobs.push(job_tx);
            replicas.results.push(res_rx);
            replicas.handles.push(handle);
        }
        // Every replica reports once it is built, or why it could not be; then all register.
        for r in 0..replicas.results.len() {
            replicas.receive(r)?;
        }
        for tx in &replicas.jobs {
            tx.send(Job::Register)
                .map_err(|_| "a replica stopped before registering".to_string())?;
        }
        // With several nodes this returns once every node has joined through the orchestrator.
        collective::register::<Inner>(
            PeerId::from(first),
            devices[0].clone(),
            config(local, nodes),
        )
        .map_err(|e| collective_error(&format!("registering device {first}"), e))?;
        for r in 0..replicas.results.len() {
            replicas.receive(r)?;
        }
        Ok(replicas)
    }

    fn receive(&self, r: usize) -> Result<(), String> {
        let got = self.results[r]
            .recv()
            .map_err(|_| format!("replica {} stopped", self.peer.rank + r + 1))
            .and_then(|res| res.map_err(|e| format!("replica {}: {e}", self.peer.rank + r + 1)));
        if got.is_err() {
            self.healthy.set(false);
        }
        got
    }

    /// Send `job` to every replica.
    fn send_all(&self, job: impl Fn() -> Job) -> Result<(), String> {
        for (r, tx) in self.jobs.iter().enumerate() {
            tx.send(job())
                .map_err(|_| format!("replica {} stopped", self.peer.rank + r + 1))?;
        }
        Ok(())
    }

    /// Wait until every replica has done its job.
    fn receive_all(&self) -> Result<(), String> {
        (0..self.jobs.len()).try_for_each(|r| self.receive(r))
    }
}

impl Executor for Replicas {
    fn world(&self) -> usize {
        self.peer.world
    }

    /// The global batch split evenly over all peers; this node's peers train on their rows.
    /// The scalars are the whole batch's (losses averaged over the peers, probe hits summed).
    fn micro_batch(
        &mut self,
        model: &Model,
        norm: Option<&mut ProbeNorm>,
        opt: &mut AdamW,
        batch: Batch,
        rng: &mut Rng,
        accum: usize,
    ) -> crate::Result<StepScalars> {
        // The masks of the whole batch, drawn as one device would.
        let mask = model.masker.sample(&model.geometry, batch.n, rng);
        let per = batch.n / self.peer.world;
        let size = batch.images.len() / batch.n;
        let shard = |rank: usize| {
            let rows = rank * per..(rank + 1) * per;
            Shard {
                images: batch.images[rows.start * size..rows.end * size].to_vec(),
                n: per,
                labels: batch.labels[rows.clone()].to_vec(),
                mask: mask.rows(rows),
                scale: accum as f64,
            }
        };
        let first = self.peer.rank;
        for (r, tx) in self.jobs.iter().enumerate() {
            tx.send(Job::Batch(shard(first + r + 1)))
                .map_err(|_| format!("replica {} stopped", first + r + 1))?;
        }
        let own = local_batch(model, norm, opt, shard(first), &self.device, &self.peer)?;
        self.receive_all()?;
        Ok(own)
    }

    fn reduce(&mut self, opt: &mut AdamW) -> crate::Result<f64> {
        self.send_all(|| Job::Reduce)?;
        opt.reduce_accumulated(|g| self.peer.all_reduce(g, ReduceOperation::Mean))?;
        self.receive_all()?;
        // The averaged gradients are the same on every peer, and so is their norm.
        Ok(opt.grad_norm())
    }

    fn apply(
        &mut self,
        model: &mut Model,
        opt: &mut AdamW,
        lr: f64,
        probe_lr: f64,
    ) -> crate::Result<()> {
        self.send_all(|| Job::Step { lr, probe_lr })?;
        apply_step(model, opt, lr, probe_lr);
        Ok(self.receive_all()?)
    }

    fn discard(&mut self, opt: &mut AdamW) -> crate::Result<()> {
        self.send_all(|| Job::Discard)?;
        opt.discard();
        Ok(self.receive_all()?)
    }
}

impl FeatureExchange for Peer {
    /// Every peer's features, this peer's rows keeping their gradients.
    fn features(&self, local: &EncoderOutput) -> Result<EncoderOutput, String> {
        Ok(EncoderOutput {
            tokens: self.gather(local.tokens.clone())?,
            pooled: self.gather(local.pooled.clone())?,
            prefix: local.prefix,
        })
    }

    /// Each peer differentiates the regularizers over the global batch through its own rows
    /// only; weighting by the number of peers makes the peers' mean gradient (the all-reduce)
    /// the regularizers' gradient over the global batch.
    fn regularizer_gradient(&self, regularizers: Tensor<B, 1>) -> Tensor<B, 1> {
        regularizers * self.world as f64
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.jobs.clear();
        if self.healthy.get() {
            for h in self.handles.drain(..) {
                let _ = h.join();
            }
        }
        let _ = collective::finish_collective::<Inner>(PeerId::from(self.peer.rank));
    }
}

fn local_batch(
    model: &Model,
    norm: Option<&mut ProbeNorm>,
    opt: &mut AdamW,
    shard: Shard,
    device: &Device,
    peer: &Peer,
) -> Result<StepScalars, String> {
    let images = images_tensor(shard.images, shard.n, &model.geometry, device);
    let mask: Mask = shard.mask.to_device(device);
    let out = forward_backward(model, norm, images, &shard.labels, &mask, shard.scale, peer)?;
    for (prefix, m) in model.trainables() {
        opt.accumulate(prefix, m, &out.grads);
    }
    // The whole batch's scalars: one all-reduce of the packed terms, the losses then averaged
    // over the peers, the probe's hits summed.
    let sums = peer.all_reduce(out.scalars.inner(), ReduceOperation::Sum)?;
    let sums = StepScalars::read(Tensor::from_inner(sums), model.regularizers.len())?;
    Ok(sums.mean_over(peer.world as f64))
}

/// What a replica thread is built from.
struct Setup {
    peer: Peer,
    /// Devices on this node.
    local: usize,
    nodes: Option<Nodes>,
    recipe: Recipe,
    device: Device,
    data: Arc<dyn Dataset>,
    cache: Option<PathBuf>,
}

fn replica(
    setup: Setup,
    snapshot: &Snapshot,
    jobs: Receiver<Job>,
    results: Sender<Result<(), String>>,
) {
    let Setup {
        peer,
        local,
        nodes,
        recipe,
        device,
        data,
        cache,
    } = setup;
    let set_up = || -> Result<(Model, AdamW, Option<ProbeNorm>), String> {
        let (mut model, mut opt, mut norm) =
            training_parts(&recipe, &device).map_err(|e| e.to_string())?;
        prepare_target(&mut model, &recipe, Some(data), cache.as_deref(), &device)
            .map_err(|e| e.to_string())?;
        snapshot.apply(&mut model, &mut norm, &mut opt, &device)?;
        Ok((model, opt, norm))
    };
    let (mut model, mut opt, mut norm) = match set_up() {
        Ok(parts) => {
            let _ = results.send(Ok(()));
            parts
        }
        Err(e) => {
            let _ = results.send(Err(e));
            return;
        }
    };
    // Registration returns once every peer has registered (peer 0 last).
    if !matches!(jobs.recv(), Ok(Job::Register)) {
        return;
    }
    let registered = collective::register::<Inner>(
        PeerId::from(peer.rank),
        device.clone(),
        config(local, nodes.as_ref()),
    )
    .map_err(|e| collective_error(&format!("registering device {}", peer.rank), e));
    let failed = registered.is_err();
    if results.send(registered).is_err() || failed {
        return;
    }
    for job in jobs {
        let result = match job {
            // Every peer takes part in the scalars' all-reduce; the trainer reports them.
            Job::Batch(shard) => {
                local_batch(&model, norm.as_mut(), &mut opt, shard, &device, &peer).map(drop)
            }
            Job::Reduce => opt.reduce_accumulated(|g| peer.all_reduce(g, ReduceOperation::Mean)),
            Job::Step { lr, probe_lr } => {
                apply_step(&mut model, &mut opt, lr, probe_lr);
                Ok(())
            }
            Job::Discard => {
                opt.discard();
                Ok(())
            }
            Job::Register => Err("registered twice".into()),
        };
        let failed = result.is_err();
        if results.send(result).is_err() || failed {
            break;
        }
    }
    let _ = collective::finish_collective::<Inner>(PeerId::from(peer.rank));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_stacks_rows_in_rank_order_with_gradients_to_own_rows() {
        collective::reset_collective::<Inner>();
        let peers: Vec<_> = (0..2usize)
            .map(|rank| {
                std::thread::spawn(move || {
                    let device = Device::Flex(Default::default());
                    collective::register::<Inner>(
                        PeerId::from(rank),
                        device.clone(),
                        config(2, None),
                    )
                    .unwrap();
                    let peer = Peer { rank, world: 2 };
                    let local = Tensor::<B, 2>::from_data(
                        TensorData::new(vec![rank as f32 + 1.0; 4], [2, 2]),
                        &device,
                    )
                    .require_grad();
                    let all = peer.gather(local.clone()).unwrap();
                    let values = all.clone().into_data().to_vec::<f32>().unwrap();
                    let w = Tensor::<B, 2>::from_data(
                        TensorData::new((1..=8).map(|x| x as f32).collect(), [4, 2]),
                        &device,
                    );
                    let grads = (all * w).sum().backward();
                    let g = local.grad(&grads).unwrap().into_data().to_vec::<f32>();
                    collective::finish_collective::<Inner>(PeerId::from(rank)).unwrap();
                    (values, g.unwrap())
                })
            })
            .collect();
        let r: Vec<(Vec<f32>, Vec<f32>)> = peers.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(r[0].0, [1., 1., 1., 1., 2., 2., 2., 2.]);
        assert_eq!(r[1].0, r[0].0);
        assert_eq!(r[0].1, [1., 2., 3., 4.]);
        assert_eq!(r[1].1, [5., 6., 7., 8.]);
    }
}
