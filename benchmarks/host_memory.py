"""Host memory per rank, measured: a ~94M-parameter Qwen3 checkpoint (the lab's tokenizer, 6 layers of
width 1024) loaded the way aopd loads a student under torchrun (`load_policy`: built on the meta device,
sharded, each rank reading its own rows of the safetensors), then one AdamW update, at 1 and 2 ranks
(gloo, CPU). Prints each rank's peak resident set size (ru_maxrss) and the ratio of world 2 to world 1.

    python benchmarks/host_memory.py
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from aopd_cli.data.lab import ensure_lab

    tokenizer = AutoTokenizer.from_pretrained(ensure_lab() / "tokenizer")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=1024, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=128, intermediate_size=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def worker(checkpoint: str, out: str) -> None:
    import torch

    from aopd_cli.config.schema import ModelConfig, TrainConfig
    from aopd_cli.training import distributed as dist
    from aopd_cli.training.models import load_policy
    from aopd_cli.training.objectives import seqkd_loss
    from aopd_cli.training.update import MicroBatch, make_optimizer, update

    dist.init()
    started = time.perf_counter()
    policy = load_policy(ModelConfig(path=checkpoint), role="student", trainable=True)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    optimizer, scheduler = make_optimizer(policy.model, TrainConfig(lr=1e-5))
    ids = torch.randint(3, 60, (2, 128), generator=torch.Generator().manual_seed(dist.rank()))
    micro = MicroBatch(ids, torch.ones_like(ids), 16, torch.ones(2, 112, dtype=torch.bool))
    update(policy, optimizer, scheduler, [micro], lambda h, m, n: seqkd_loss(h, m.targets_BT, m.mask_BT, normalizer=n),
           2 * dist.world_size(), 1.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = sum(p.numel() for p in policy.model.parameters())
    Path(out).with_suffix(f".rank{dist.rank()}.json").write_text(json.dumps(
        {"rank": dist.rank(), "world": dist.world_size(), "params": params, "peak_rss_gib_after_load": loaded,
         "peak_rss_gib": peak, "seconds": time.perf_counter() - started}))
    dist.shutdown()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "ckpt")
        results = {}
        for world in (1, 2):
            out = Path(tmp) / f"world{world}"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                            __file__, "--worker", str(checkpoint), str(out)], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            results[world] = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob(f"world{world}.rank*.json"))]
        for world, ranks in results.items():
            for r in ranks:
                print(f"world {world} rank {r['rank']}: peak RSS {r['peak_rss_gib']:.2f} GiB "
                      f"(after loading {r['peak_rss_gib_after_load']:.2f}), {r['params'] / 1e6:.0f}M parameters")
        ratio = max(r["peak_rss_gib"] for r in results[2]) / results[1][0]["peak_rss_gib"]
        print(f"largest world-2 rank / world 1: {ratio:.2f} (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "OUT"))
    args = parser.parse_args()
    worker(*args.worker) if args.worker else main()
