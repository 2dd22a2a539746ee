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
//! peers of every node through an orchestrator process ([`orchestrator`]). Peers are numbered
//! globally (node rank x devices per node + local index); every node's trainer draws the same
//! global batch and masks from the same seed and keeps its own peers' rows, so the computation
//! is the single-device one on any number of nodes. See docs/performance.md.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use umae_api::burn::collective::{
    self, AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation,
};
use umae_api::burn::tensor::{Tensor, TensorData, TensorPrimitive};
use umae_api::recipe::Recipe;
use umae_api::{Device, Inner, Mask, MaskPlan, B};

use crate::data::Dataset;
use crate::model::{images_tensor, Model};
use crate::optim::AdamW;
use crate::step::{apply_step, forward_backward, prepare_target, training_parts, ProbeNorm};

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
        let moments = |m: &std::collections::HashMap<String, Tensor<Inner, 1>>| {
            m.iter()
                .map(|(k, t)| (k.clone(), host(t.clone())))
                .collect()
        };
        Snapshot {
            params,
            norm: norm
                .as_ref()
                .map(|n| (host(n.mean.clone()), host(n.var.clone()))),
            step: opt.step,
            m: moments(&opt.m),
            v: moments(&opt.v),
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
        opt.step = self.step;
        opt.m = self
            .m
            .iter()
            .map(|(k, v)| (k.clone(), device_vec(v, device)))
            .collect();
        opt.v = self
            .v
            .iter()
            .map(|(k, v)| (k.clone(), device_vec(v, device)))
            .collect();
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
    /// Average the accumulated gradients with the other peers and step.
    Apply { lr: f64, probe_lr: f64 },
    /// Join the collective (once every replica is built).
    Register,
}

/// The replicas of a data-parallel run on this node (its peers after the first), driven by
/// the trainer (this node's first peer).
pub struct Replicas {
    /// The trainer's peer: global rank and world.
    pub peer: Peer,
    jobs: Vec<Sender<Job>>,
    results: Vec<Receiver<Result<Vec<f32>, String>>>,
    handles: Vec<JoinHandle<()>>,
    /// False after any error: a replica may then wait in a collective call forever, so it is
    /// not joined (the process is ending with the error).
    healthy: std::cell::Cell<bool>,
}

/// This process's place in a multi-node run (`umae run --nodes N --node-rank R ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// How many nodes (processes, usually machines) train together.
    pub count: usize,
    /// This node's index, 0..count. Every node runs the same devices per node.
    pub rank: usize,
    /// The orchestrator's address (`umae orchestrator --port P` runs it): `HOST:P`.
    pub orchestrator: String,
    /// Where the other nodes reach this one: `HOST:PORT`; this node serves its tensors on PORT.
    pub address: String,
}

impl Nodes {
    /// Check the fields; the addresses must be `HOST:PORT` (an optional `ws://` in front).
    pub fn new(
        count: usize,
        rank: usize,
        orchestrator: &str,
        address: &str,
    ) -> Result<Nodes, String> {
        if count < 2 {
            return Err(format!(
                "--nodes {count}: a multi-node run needs at least 2 nodes (leave --nodes out for one machine)"
            ));
        }
        if rank >= count {
            return Err(format!(
                "--node-rank {rank} is out of range for --nodes {count}: ranks are 0..{}",
                count - 1
            ));
        }
        let nodes = Nodes {
            count,
            rank,
            orchestrator: orchestrator.to_string(),
            address: address.to_string(),
        };
        port_of(orchestrator, "--orchestrator")?;
        nodes.port()?;
        Ok(nodes)
    }

    /// The port this node serves its tensors on (the port of `address`).
    pub fn port(&self) -> Result<u16, String> {
        port_of(&self.address, "--node-address")
    }
}

fn port_of(address: &str, flag: &str) -> Result<u16, String> {
    let rest = address.strip_prefix("ws://").unwrap_or(address);
    let port = rest
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(port))) if !host.is_empty() && port > 0 => Ok(port),
        _ => Err(format!(
            "{flag} `{address}` is not HOST:PORT (for example 10.0.0.1:3000)"
        )),
    }
}

/// Why `--nodes` is refused: burn-collective 0.21's global all-reduce (every strategy) reuses
/// the same transfer ids in every call, so the second call between nodes waits forever
/// (reproduced with two processes on one machine; upstream: tracel-ai/burn#4549). The
/// wiring is complete and tested up to that point; `UMAE_EXPERIMENTAL_MULTI_NODE=1` lifts
/// the refusal to check a fixed burn.
pub const MULTI_NODE_BLOCKED: &str = "multi-node training is not available yet: burn-collective 0.21's global all-reduce hangs on its second call between nodes (tracel-ai/burn#4549). Train on one machine, with several devices if it has them (--device cuda:0,cuda:1,...)";

/// Run burn-collective's orchestrator for multi-node training on `port` until the process is
/// interrupted (Ctrl-C or SIGTERM). Every node of a run connects to it.
pub fn orchestrator(port: u16) -> Result<(), String> {
    if let Err(e) = std::net::TcpListener::bind(("0.0.0.0", port)) {
        return Err(format!("cannot listen on port {port}: {e}"));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the orchestrator's runtime: {e}"))?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// The collective set-up for `local` devices on this machine, joined to the other nodes'
/// through the orchestrator when there are several.
fn config(local: usize, nodes: Option<&Nodes>) -> CollectiveConfig {
    let config = CollectiveConfig::default()
        .with_num_devices(local)
        .with_local_all_reduce_strategy(AllReduceStrategy::Centralized);
    match nodes {
        None => config,
        Some(n) => config
            .with_num_nodes(n.count as u32)
            .with_global_address(ws_url(&n.orchestrator).parse().expect("infallible"))
            .with_node_address(ws_url(&n.address).parse().expect("infallible"))
            .with_data_service_port(n.port().expect("checked by Nodes::new")),
    }
}

/// `ws://HOST:PORT` for an address given as `HOST:PORT` or `ws://HOST:PORT`.
fn ws_url(s: &str) -> String {
    if s.starts_with("ws://") {
        s.to_string()
    } else {
        format!("ws://{s}")
    }
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

    fn receive(&self, r: usize) -> Result<Vec<f32>, String> {
        let got = self.results[r]
            .recv()
            .map_err(|_| format!("replica {} stopped", self.peer.rank + r + 1))
            .and_then(|res| res.map_err(|e| format!("replica {}: {e}", self.peer.rank + r + 1)));
        if got.is_err() {
            self.healthy.set(false);
        }
        got
    }

    /// One micro-batch of `n` images (the global batch) split evenly over all peers; this
    /// node's peers train on their rows. Returns the step scalars of the whole batch (losses
    /// averaged over the peers, probe hits summed).
    #[allow(clippy::too_many_arguments)]
    pub fn micro_batch(
        &self,
        model: &Model,
        norm: Option<&mut ProbeNorm>,
        opt: &mut AdamW,
        images: Vec<f32>,
        n: usize,
        labels: &[i64],
        mask: &MaskPlan,
        scale: f64,
        device: &Device,
    ) -> Result<Vec<f32>, String> {
        let world = self.peer.world;
        let per = n / world;
        let size = images.len() / n;
        let shard = |rank: usize| {
            let rows = rank * per..(rank + 1) * per;
            Shard {
                images: images[rows.start * size..rows.end * size].to_vec(),
                n: per,
                labels: labels[rows.clone()].to_vec(),
                mask: mask.rows(rows),
                scale,
            }
        };
        let first = self.peer.rank;
        for (r, tx) in self.jobs.iter().enumerate() {
            tx.send(Job::Batch(shard(first + r + 1)))
                .map_err(|_| format!("replica {} stopped", first + r + 1))?;
        }
        // Every peer returns the scalars reduced over all peers.
        let own = local_batch(model, norm, opt, shard(first), device, &self.peer)?;
        for r in 0..self.jobs.len() {
            self.receive(r)?;
        }
        Ok(own)
    }

    /// Average the gradients over the peers and apply the step on every replica.
    pub fn apply(
        &self,
        model: &mut Model,
        opt: &mut AdamW,
        lr: f64,
        probe_lr: f64,
    ) -> Result<(), String> {
        for (r, tx) in self.jobs.iter().enumerate() {
            tx.send(Job::Apply { lr, probe_lr })
                .map_err(|_| format!("replica {} stopped", self.peer.rank + r + 1))?;
        }
        reduce_and_step(&self.peer, model, opt, lr, probe_lr)?;
        for r in 0..self.jobs.len() {
            self.receive(r)?;
        }
        Ok(())
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
) -> Result<Vec<f32>, String> {
    let images = images_tensor(shard.images, shard.n, &model.geometry, device);
    let mask: Mask = shard.mask.to_device(device);
    let out = forward_backward(
        model,
        norm,
        images,
        &shard.labels,
        &mask,
        shard.scale,
        Some(peer),
    )?;
    for (prefix, m) in model.trainables() {
        opt.accumulate(prefix, m, &out.grads);
    }
    // The whole batch's scalars: losses averaged over the peers, the last one (correct probe
    // predictions) summed.
    let sums = peer.all_reduce(out.scalars.inner(), ReduceOperation::Sum)?;
    let mut vals = sums
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    let k = vals.len();
    for v in &mut vals[..k.saturating_sub(1)] {
        *v /= peer.world as f32;
    }
    Ok(vals)
}

fn reduce_and_step(
    peer: &Peer,
    model: &mut Model,
    opt: &mut AdamW,
    lr: f64,
    probe_lr: f64,
) -> Result<(), String> {
    opt.reduce_accumulated(|g| peer.all_reduce(g, ReduceOperation::Mean))?;
    apply_step(model, opt, lr, probe_lr);
    Ok(())
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
    results: Sender<Result<Vec<f32>, String>>,
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
        let (mut model, mut opt, mut norm) = training_parts(&recipe, &device)?;
        prepare_target(&mut model, &recipe, Some(data), cache.as_deref(), &device)?;
        snapshot.apply(&mut model, &mut norm, &mut opt, &device)?;
        Ok((model, opt, norm))
    };
    let (mut model, mut opt, mut norm) = match set_up() {
        Ok(parts) => {
            let _ = results.send(Ok(Vec::new()));
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
    .map(|()| Vec::new())
    .map_err(|e| collective_error(&format!("registering device {}", peer.rank), e));
    let failed = registered.is_err();
    if results.send(registered).is_err() || failed {
        return;
    }
    for job in jobs {
        let result = match job {
            Job::Batch(shard) => {
                local_batch(&model, norm.as_mut(), &mut opt, shard, &device, &peer)
            }
            Job::Apply { lr, probe_lr } => {
                reduce_and_step(&peer, &mut model, &mut opt, lr, probe_lr).map(|()| Vec::new())
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
