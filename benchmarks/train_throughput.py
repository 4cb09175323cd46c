"""LoRA train-step throughput and MFU on the bench model (prints one line per arm and dtype).

Bench model: Llama, vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads / 4 kv heads
(head_dim 64), LoRA rank 16 alpha 32, batch 4 x 512. Our step runs as a user would tune it for this
shape on a CPU (`bench_config`): layers unrolled (`model.scan_layers=False`: the scan's stacking
of each layer's saved activations cost ~12% of the step) and the loss in sequence chunks of 128
(`train.loss_chunk_tokens`, 4 x 128 rows per LM-head matmul, ~6% faster than 512 here).
The peer (--peer peft) is pinned and printed: transformers' SDPA attention (its default, and its
fastest on CPU: ~30% faster than eager here), float32, torch threads = the host's cores.

    python benchmarks/train_throughput.py [--arms o_proj,o_proj+fc2,qkv,all] [--dtypes float32,bfloat16]
    python benchmarks/train_throughput.py --peer peft [--rounds 3]   # ours vs PEFT, interleaved, float32

MFU = achieved FLOP/s (lora_jax.accounting's training-step definition) / the best of >= 5 timed
float32 2048^3 matmuls measured in this process, on one device. Median of --steps timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.step_timer import TimedStep, synthetic_batch  # noqa: E402
from benchmarks.torch_peer import ATTENTION, pin_torch  # noqa: E402
from configs import base  # noqa: E402
from lora_jax.io.peft_adapter import HF_MODULES
from lora_jax.model.transformer import Transformer
from lora_jax.run.config import lora_spec, random_model_config, runtime_options
from lora_jax.sharding import make_mesh, shard_model  # noqa: E402
from lora_jax.train import accounting
from lora_jax.train.trainer import build_trainer

BENCH = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64
)


LOSS_CHUNK = 128  # sequence positions per LM-head + loss chunk (4 x 128 rows per matmul here)


def bench_config(targets, dtype, attention_impl, remat, batch, seq_len, scan_layers=False):
    config = base.get_config()
    for k, v in BENCH.items():
        config.model[k] = v
    config.model.max_position_embeddings = seq_len
    config.model.param_dtype = config.model.compute_dtype = dtype
    config.model.attention_impl, config.model.remat = attention_impl, remat
    config.lora.targets, config.lora.rank, config.lora.alpha, config.lora.dropout = targets, 16, 32.0, 0.0
    config.train.global_batch_size, config.data.max_seq_len, config.train.total_steps = batch, seq_len, 1000
    config.train.loss_chunk_tokens = LOSS_CHUNK
    config.model.scan_layers = scan_layers
    config.mesh.shape = (1, 1, 1)
    return config


class OursStep(TimedStep):
    """Our jitted train step on the bench model, compiled once; `run(n)` -> median seconds per step."""

    def __init__(self, config, mesh, model=None):
        """model: the config's own random model by default (benchmarks/many_adapters.py passes a bank)."""
        if model is None:
            model = Transformer(
                random_model_config(config),
                lora_spec(config),
                runtime_options(config),
                rngs=nnx.Rngs(0),
            )
            shard_model(model, mesh)
        self.t = build_trainer(model, config, mesh)
        b, s = config.train.global_batch_size, config.data.max_seq_len
        super().__init__(self.t, synthetic_batch(b, s, config.model.vocab_size))

    def run(self, steps: int) -> float:
        return statistics.median(self.times(steps))


def peer_settings() -> str:
    return pin_torch("PEFT peer", "AdamW (torch), full logits + transformers' loss")


class PeftStep:
    """The same step as a PEFT user runs it: transformers Llama (float32, SDPA attention) + LoRA on the
    arm's modules (q/k/v separately for qkv, gate/up for fc1), AdamW on the adapters, batch x seq_len."""

    def __init__(self, targets, batch, seq_len):
        import peft
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=BENCH["vocab_size"],
            hidden_size=BENCH["hidden_size"],
            intermediate_size=BENCH["intermediate_size"],
            num_hidden_layers=BENCH["num_layers"],
            num_attention_heads=BENCH["num_heads"],
            num_key_value_heads=BENCH["num_kv_heads"],
            head_dim=BENCH["head_dim"],
            max_position_embeddings=seq_len,
            attn_implementation=ATTENTION,
        )
        model = transformers.LlamaForCausalLM(cfg)
        assert model.config._attn_implementation == ATTENTION, model.config._attn_implementation
        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=[m for t in targets for _, m in HF_MODULES[t]])
        self.torch, self.model = torch, peft.get_peft_model(model, lora).train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        tokens = torch.as_tensor(np.random.default_rng(0).integers(0, BENCH["vocab_size"], size=(batch, seq_len)))
        self.tokens = tokens
        self.run(1)  # warm-up

    def run(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def compare_with_peft(arms, args, mesh):
    """Interleaved rounds (ours, PEFT, ours, PEFT, ...): the host drifts, so only the ratio is a claim."""
    print(f"float32, batch {args.batch} x {args.seq_len}, {args.rounds} interleaved rounds of {args.steps} steps")
    print(peer_settings())
    print(
        f"ours: attention {args.attention!r}, remat {args.remat!r}, scan_layers {args.scan_layers}, loss chunk {LOSS_CHUNK}"
    )
    print(f"{'arm':<14}{'ours tok/s':>11}{'PEFT tok/s':>11}{'ours/PEFT':>10}{'our MFU':>9}  per round")
    tokens = args.batch * args.seq_len
    for arm in arms:
        targets = ("qkv", "o_proj", "fc1", "fc2") if arm == "all" else tuple(arm.split("+"))
        config = bench_config(
            targets, "float32", args.attention, args.remat, args.batch, args.seq_len, args.scan_layers
        )
        ours = OursStep(config, mesh)
        theirs = PeftStep(targets, args.batch, args.seq_len)
        peak = accounting.measure_matmul_peak()
        rounds = [(ours.run(args.steps), theirs.run(args.steps)) for _ in range(args.rounds)]
        peak = max(peak, accounting.measure_matmul_peak())
        o, p = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
        flops = accounting.train_flops_per_step(
            random_model_config(config), lora_spec(config), args.batch, args.seq_len
        )
        per_round = " ".join(f"{b / a:.2f}" for a, b in rounds)
        print(
            f"{arm:<14}{tokens / o:>11.0f}{tokens / p:>11.0f}{p / o:>10.2f}{flops / o / peak:>9.1%}  [{per_round}]",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="o_proj,o_proj+fc2,qkv,all")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--attention", default="causal_blocks")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--scan_layers", action="store_true", help="run the layers under lax.scan (the config default)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--peer", choices=["none", "peft"], default="none")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    if args.peer == "peft":
        compare_with_peft(args.arms.split(","), args, mesh)
        return
    print(f"device: {jax.devices()[0].device_kind}; peak = best of 5+5 float32 2048^3 matmuls around each row")
    print(f"{'arm':<14}{'dtype':<10}{'step s':>8}{'tokens/s':>10}{'TFLOP/step':>12}{'peak GF/s':>11}{'MFU':>7}")
    for arm in args.arms.split(","):
        targets = ("qkv", "o_proj", "fc1", "fc2") if arm == "all" else tuple(arm.split("+"))
        for dtype in args.dtypes.split(","):
            config = bench_config(
                targets, dtype, args.attention, args.remat, args.batch, args.seq_len, args.scan_layers
            )
            # The host's speed drifts (shared machine): the peak is the best of the measurements taken
            # right before and right after each timing.
            before = accounting.measure_matmul_peak()
            runner = OursStep(config, mesh)
            step_s = runner.run(args.steps)
            flops = accounting.train_flops_per_step(
                random_model_config(config), lora_spec(config), args.batch, args.seq_len
            )
            tok_s = args.batch * args.seq_len / step_s
            peak = max(before, accounting.measure_matmul_peak())
            mfu = flops / step_s / peak
            print(
                f"{arm:<14}{dtype:<10}{step_s:>8.3f}{tok_s:>10.0f}{flops / 1e12:>12.3f}{peak / 1e9:>11.1f}{mfu:>7.1%}"
            )


if __name__ == "__main__":
    main()
