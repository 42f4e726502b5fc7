"""The memory of a training step traced on aopd's own code, with no GPU: models built from their shapes
under torch's `FakeTensorMode` (tensors with shapes and dtypes, no storage), sharded by aopd's
`distributed.shard` over a fake process group of the stage's world size, and one step run through the
real code path (aopd's optimizer, `update`, the objective on the chunked LM head, `hf_scorer` for the
teacher and the ExOPD base), while `FSDPMemTracker` counts per GPU what is alive: sharded and
gathered parameters, gradients, activations, optimizer state, collectives' buffers.

What cannot run on fake tensors is stood in for by plausible values (`Plausible`): a scalar read back is
1, and a boolean mask selects every position (every response token counted: the most a micro-batch
holds). Layers are identical, so memory is linear in depth: each phase is traced at two depths of the
true widths, vocabulary and sequence lengths, and extrapolated to the true depth (checked against a full
depth trace in tests/test_plan.py).

The phases of a step: the teacher (and base) score the micro-batch, then the student updates. Between
them what stays alive is the other's residue: the student's sharded parameters and optimizer state
while the teacher scores; the teacher's sharded parameters and its scores while the student updates.

    aopd plan experiment=paper_8b_1k --gpus 8 --gpu-memory 80
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from aopd_cli.plan.shapes import PROMPT_TOKENS

DEPTHS = (3, 4)  # layers at which each phase is traced (from 3 on, prefetching is as at any depth); linear beyond


@dataclass(frozen=True)
class Phase:
    peak: dict[str, float]  # bytes by kind at the phase's peak ("Total" among them)
    residue: float  # bytes still alive once the phase is over (what the next phase lives beside)


@contextmanager
def fake_world(world: int):
    """A fake process group of `world` ranks (this process is rank 0) and its device mesh, made before
    fake mode is entered (a mesh made on fake tensors fails)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the memory trace needs a process of its own (a process group is already running)")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def plausible_mode():
    """A dispatch mode above fake tensors answering what they cannot (a scalar read back, a boolean
    mask's selection)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class Plausible(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is aten._local_scalar_dense.default:  # float(x), x.item(), x.tolist(): finite, and 1
                return True if args[0].dtype == torch.bool else 1.0 if args[0].is_floating_point() else 1
            if func is aten.index.Tensor:
                source, indices = args
                if len(indices) == 1 and indices[0] is not None and indices[0].dtype == torch.bool:
                    # every position selected: [B, T, ...][mask_BT] -> [B*T, ...], a copy as indexing makes
                    return source.reshape(-1, *source.shape[indices[0].dim():]).clone()
            return func(*args, **kwargs)

    return Plausible()


def _model(shape, depth: int, *, trainable: bool, activation_checkpointing: bool, mesh):
    """A Qwen3 of `shape` with `depth` layers on fake tensors, sharded as aopd shards it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.initialization import no_init_weights

    from aopd_cli.training.distributed import shard
    from aopd_cli.training.models import Policy

    config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=depth,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         head_dim=shape.head_dim, intermediate_size=shape.intermediate,
                         tie_word_embeddings=shape.tied, max_position_embeddings=1 << 20)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if trainable else torch.bfloat16)  # fp32 masters; bf16 frozen weights
    try:
        with no_init_weights():
            model = Qwen3ForCausalLM(config)
        model.tie_weights()  # skipped with the initialisation; a tied output layer is the embedding
    finally:
        torch.set_default_dtype(default)
    if not trainable:
        model.requires_grad_(False)
    model = shard(model, trainable=trainable, compute_dtype=torch.bfloat16,
                  activation_checkpointing=activation_checkpointing, mesh=mesh)
    return Policy(model, None, {0}, torch.device("cpu"), torch.bfloat16)


def _micro(rows: int, response: int):
    from aopd_cli.training.update import MicroBatch

    ids_BL = torch.zeros(rows, PROMPT_TOKENS + response, dtype=torch.long)
    return MicroBatch(ids_BL, torch.ones_like(ids_BL), PROMPT_TOKENS, torch.ones(rows, response, dtype=torch.bool),
                      rows_B=torch.arange(rows))


def _snapshot(tracker, which: str) -> dict[str, float]:
    found = next(iter(tracker.get_tracker_snapshot(which).values()), {})
    return {str(getattr(kind, "value", kind)): float(size) for kind, size in found.items()}


def _lazy_init(policy, micro) -> None:
    """FSDP2 initialises a model at its first forward: done before counting."""
    with torch.no_grad():
        policy.model(input_ids=micro.ids_BL[:, :8], attention_mask=micro.attn_BL[:, :8])


def trace_update(shape, depth: int, world: int, rows: int, response: int, objective, train, top_k: int) -> Phase:
    """One optimizer step of a student of `depth` layers on a micro-batch of `rows` x (prompt + `response`)
    tokens, in steady state (AdamW's state already there)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from aopd_cli.training.objectives import TeacherTopK, objective_loss, seqkd_loss
    from aopd_cli.training.update import make_optimizer, update

    with fake_world(world) as mesh, FakeTensorMode(), plausible_mode():
        policy = _model(shape, depth, trainable=True, activation_checkpointing=train.activation_checkpointing, mesh=mesh)
        optimizer, scheduler = make_optimizer(policy.model, train, foreach=True)  # what CUDA tensors get
        for param in policy.model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()  # AdamW's moments, as every step after the first has them
        optimizer.zero_grad(set_to_none=True)
        micro = _micro(rows, response)
        _lazy_init(policy, micro)
        if objective is None:  # the warm-up: SFT on the sequences
            def loss_fn(head, m, normalizer):
                return seqkd_loss(head, m.targets_BT, m.mask_BT, normalizer=normalizer)
        else:
            loss_fn = objective_loss(objective)
            micro.teacher = TeacherTopK(torch.zeros(rows, response, dtype=torch.float32),
                                        torch.zeros(rows, response, top_k, dtype=torch.long),
                                        torch.zeros(rows, response, top_k, dtype=torch.float32))
            micro.base_logprobs_BT = torch.zeros(rows, response, dtype=torch.float32)
            micro.correct_B = torch.zeros(rows, dtype=torch.bool)
        tracker = FSDPMemTracker(policy.model, optimizer)
        with tracker:
            update(policy, optimizer, scheduler, [micro], loss_fn, rows, train.grad_clip)
            residue = _snapshot(tracker, "current").get("Total", 0.0)
        return Phase(_snapshot(tracker, "peak"), residue)


def trace_scoring(shape, depth: int, world: int, rows: int, response: int, top_k: int) -> Phase:
    """A frozen model of `depth` layers scoring a micro-batch (`hf_scorer`: its top-K and sampled tokens'
    log-probs, chunked over positions)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from aopd_cli.teacher.scorers import hf_scorer

    with fake_world(world) as mesh, FakeTensorMode(), plausible_mode():
        policy = _model(shape, depth, trainable=False, activation_checkpointing=False, mesh=mesh)
        micro = _micro(rows, response)
        _lazy_init(policy, micro)
        tracker = FSDPMemTracker(policy.model)
        with tracker:
            scores = hf_scorer(policy, top_k)(micro)
            residue = _snapshot(tracker, "current").get("Total", 0.0)
        del scores
        return Phase(_snapshot(tracker, "peak"), residue)


def extrapolate(at: dict[int, Phase], depth: int) -> Phase:
    """A phase at `depth` layers from its traces at two depths: linear per kind of memory."""
    (d1, p1), (d2, p2) = sorted(at.items())

    def line(a: float, b: float) -> float:
        return max(0.0, a + (b - a) * (depth - d1) / (d2 - d1))

    kinds = set(p1.peak) | set(p2.peak)
    return Phase({k: line(p1.peak.get(k, 0.0), p2.peak.get(k, 0.0)) for k in kinds}, line(p1.residue, p2.residue))


def traced_phase(kind: str, shape, world: int, rows: int, response: int, *, objective=None, train=None,
                 top_k: int = 32, depths: tuple[int, int] = DEPTHS, cache: dict | None = None) -> Phase:
    """`trace_update` or `trace_scoring` at the shape's true depth (traced at `depths`, extrapolated);
    with a `cache`, identical phases of several stages are traced once."""
    objective_key = repr(objective)  # every field, in order (a pydantic model, or a namespace standing for one)
    train_key = (train.activation_checkpointing, train.grad_clip) if train is not None else None
    key = (kind, shape, world, rows, response, objective_key, train_key, top_k, depths)
    if cache is not None and key in cache:
        return cache[key]
    if kind == "update":
        at = {d: trace_update(shape, d, world, rows, response, objective, train, top_k) for d in depths}
    else:
        at = {d: trace_scoring(shape, d, world, rows, response, top_k) for d in depths}
    phase = extrapolate(at, shape.layers)
    if cache is not None:
        cache[key] = phase
    return phase
