#!/usr/bin/env python3
"""The PyTorch side of umae's side-by-side benchmarks: one MAE pretraining step, timed.

The model is the one `umae bench` trains for the same recipe (recipes/mae-vitb.ron by default):
a ViT encoder that sees the class token and the visible patches only (fixed 2-D sin-cos
positions, pre-norm blocks, LayerNorm epsilon 1e-6, fused qkv with bias, exact GELU), a
transformer decoder that fills the hidden positions with a learned mask token, a per-patch
normalised pixel target with the MSE over hidden patches, and the online linear probe on the
detached class feature (batch statistics, no affine, cross-entropy), all trained by AdamW with
MAE's betas (0.9, 0.95) and weight decay 0.05 on matrices only. `--uniformity W` adds the
paper's uniformity term on the class feature (U-MAE).

Modes: f32 (TF32 matrix units off, as umae's f32), bf16 (autocast, as MAE's mixed precision),
and `--compile` (torch.compile of the whole step's model). Attention uses PyTorch's fused
scaled_dot_product_attention, as timm does; `--plain-attention` writes it out.

Prints one JSON object on the last line, for scripts/gpu-check.sh and docs/performance.md.

    python3 scripts/torch_mae_step.py --device cuda --precision bf16 --batch 128
    python3 scripts/torch_mae_step.py --img 32 --patch 4 --dim 192 --depth 12 --heads 3 \
        --ddim 128 --ddepth 2 --dheads 4 --batch 64 --threads 2        # ViT-T, CIFAR-sized
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_2d(dim, grid):
    """Fixed 2-D sin-cos position embedding: half the channels encode the row, half the column;
    a zero row first for the class token."""
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # Width (column) first, then height (row), as MAE's reference table.
    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


class Attention(nn.Module):
    def __init__(self, dim, heads, fused):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
            y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim, heads, fused):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, fused)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class MaskedAutoencoder(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.patch, self.grid = a.patch, a.img // a.patch
        self.patch_dim = a.patch * a.patch * a.chans
        n = self.grid * self.grid
        self.keep = int(n * (1.0 - a.mask_ratio))
        self.embed = nn.Linear(self.patch_dim, a.dim)
        self.cls = nn.Parameter(torch.randn(1, 1, a.dim) * 0.02)
        self.register_buffer("pos", sincos_2d(a.dim, self.grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(a.dim, a.heads, not a.plain_attention) for _ in range(a.depth))
        self.norm = nn.LayerNorm(a.dim, eps=1e-6)
        self.dec_embed = nn.Linear(a.dim, a.ddim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, a.ddim) * 0.02)
        self.register_buffer("dec_pos", sincos_2d(a.ddim, self.grid).unsqueeze(0), persistent=False)
        self.dec_blocks = nn.ModuleList(Block(a.ddim, a.dheads, not a.plain_attention) for _ in range(a.ddepth))
        self.dec_norm = nn.LayerNorm(a.ddim, eps=1e-6)
        self.pred = nn.Linear(a.ddim, self.patch_dim)
        self.probe_norm = nn.BatchNorm1d(a.dim, affine=False, eps=1e-6)
        self.probe = nn.Linear(a.dim, a.classes)
        self.uniformity, self.tau = a.uniformity, a.tau

    def patchify(self, images):
        b, c, _, _ = images.shape
        p, g = self.patch, self.grid
        x = images.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, g * g, p * p * c)

    def forward(self, images, noise, labels):
        patches = self.patchify(images)
        b, n, _ = patches.shape
        # Random masking with an exact ratio: keep the `keep` patches of lowest noise.
        order = noise.argsort(dim=1)
        restore = order.argsort(dim=1)
        kept = order[:, : self.keep]
        x = self.embed(patches) + self.pos[:, 1:]
        x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([(self.cls + self.pos[:, :1]).expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        cls = x[:, 0]

        y = self.dec_embed(x)
        hidden = self.mask_token.expand(b, n - self.keep, -1)
        y_patches = torch.cat([y[:, 1:], hidden], dim=1)
        y_patches = y_patches.gather(1, restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        y = torch.cat([y[:, :1], y_patches], dim=1) + self.dec_pos
        for blk in self.dec_blocks:
            y = blk(y)
        pred = self.pred(self.dec_norm(y))[:, 1:]

        # Per-patch normalised pixels, MSE over the hidden patches only.
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        target = (patches - mean) / (var + 1e-6).sqrt()
        hidden_mask = torch.ones(b, n, device=images.device)
        hidden_mask[:, : self.keep] = 0
        hidden_mask = hidden_mask.gather(1, restore)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        loss = (per_patch * hidden_mask).sum() / hidden_mask.sum()

        if self.uniformity > 0:
            z = F.normalize(cls.float(), dim=-1)
            sim = (z @ z.t()) / self.tau
            loss = loss + self.uniformity * (sim ** 2).mean()

        probe_loss = F.cross_entropy(self.probe(self.probe_norm(cls.detach().float())), labels)
        return loss, probe_loss


def parameter_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name in ("cls", "mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--plain-attention", action="store_true", help="no fused attention kernel")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--chans", type=int, default=3)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ddim", type=int, default=512)
    ap.add_argument("--ddepth", type=int, default=8)
    ap.add_argument("--dheads", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--uniformity", type=float, default=0.0, help="weight of the uniformity term")
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.img % a.patch or a.dim % a.heads or a.ddim % a.dheads or a.batch < 1 or a.steps < 1:
        ap.error("--img must be a multiple of --patch, --dim of --heads, --ddim of --dheads; "
                 "--batch and --steps at least 1")

    torch.manual_seed(a.seed)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        # f32 means f32: no TF32 rounding in the matrix units (umae's f32 does not round either).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = MaskedAutoencoder(a).to(device)
    opt = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1.5e-4, betas=(0.9, 0.95),
                            fused=cuda)
    forward = torch.compile(model) if a.compile else model
    images = torch.randn(a.batch, a.chans, a.img, a.img, device=device)
    labels = torch.randint(0, a.classes, (a.batch,), device=device)
    n = (a.img // a.patch) ** 2

    def step():
        noise = torch.rand(a.batch, n, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss, probe_loss = forward(images, noise, labels)
        (loss + probe_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t_first = time.perf_counter()
    losses = [step().item() for _ in range(a.warmup)]
    sync()
    warmup_s = time.perf_counter() - t_first
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    last = None
    for _ in range(a.steps):
        last = step()
    losses.append(last.item())  # also waits for the device
    sync()
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(x) for x in losses):
        sys.exit(f"error: the loss became non-finite: {losses}")
    result = {
        "program": "pytorch",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "precision": a.precision,
        "compile": a.compile,
        "attention": "plain" if a.plain_attention else "sdpa",
        "batch": a.batch,
        "steps": a.steps,
        "warmup_s": round(warmup_s, 3),
        "seconds": round(seconds, 4),
        "images_per_s": round(a.batch * a.steps / seconds, 2),
        "ms_per_step": round(seconds * 1000 / a.steps, 3),
        "params": sum(p.numel() for p in model.parameters()),
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        "loss_first": round(losses[0], 5),
        "loss_last": round(losses[-1], 5),
    }
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
