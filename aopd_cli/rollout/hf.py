"""In-process rollouts with HF `generate`: batched, KV cache, n samples per prompt, temperature sampling
over the full vocabulary (no top-k, no top-p) or greedy (temperature 0), stop on EOS and on the end-of-turn
token, and on optional stop strings, whatever the checkpoint's own `generation_config.json` says (Qwen3
instruct models ship temperature 0.6, top_p 0.95).

Sampling is Gumbel-max with a random stream per sample: token = argmax(logits / T + G), G a Gumbel noise
drawn from the sample's own generator (seeded by `stream_seed(seed, prompt's index, sample)`), which is an
exact draw from softmax(logits / T). HF's own sampling draws every row from one stream, so a sample would
depend on its batch-mates; this way it depends on its prompt and seed only, as vLLM's per-request seeds do,
and a rank's share of a benchmark samples what one process samples.

    python -m pytest tests/test_engine.py -q -k rollout
"""

from __future__ import annotations

import torch

from aopd_cli.rollout.interface import Rollout, RolloutBatch, left_pad, mask_through_first_stop, right_pad, stream_seed
from aopd_cli.training.distributed import gathered


def gumbel_sampling(seeds: list[int], temperature: float):
    """A logits processor that turns greedy decoding into sampling at `temperature`, row r drawing its
    noise from a generator seeded with `seeds[r]`."""
    from transformers import LogitsProcessor

    class GumbelSampling(LogitsProcessor):
        def __init__(self):
            self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

        def __call__(self, input_ids, scores_BV):
            vocab = scores_BV.shape[-1]
            exponential_BV = torch.stack([torch.empty(vocab).exponential_(generator=g) for g in self.generators])
            gumbel_BV = exponential_BV.log_().neg_()  # -log(E), E ~ Exp(1): a standard Gumbel
            return scores_BV.float() / temperature + gumbel_BV.to(scores_BV.device)

    return GumbelSampling()


def hf_rollout(policy, batch_size: int = 256) -> Rollout:
    def generate(prompts_ids: list[list[int]], *, n: int, temperature: float, max_new_tokens: int,
                 seed: int | None = None, indices: list[int] | None = None, stop_strings: list[str] | None = None
                 ) -> RolloutBatch:
        """`temperature=0` decodes greedily. `indices`: each prompt's global index (its seed's key; default
        0, 1, ...). `stop_strings` end a row where its text contains one (ToolAlpaca's `Observation:`); the
        row's mask then runs to its last generated token (pads after it are pad ids)."""
        from transformers import GenerationConfig, LogitsProcessorList

        rows = [(index, sample, ids) for index, ids in enumerate(prompts_ids) for sample in range(n)]
        pad_id = policy.tokenizer.pad_token_id
        gen_config = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(policy.stop_ids), pad_token_id=pad_id,
            use_cache=True, stop_strings=stop_strings or None,
        )
        if seed is None:  # unseeded: from the trainer's stream, as HF's own sampling would be
            seed = int(torch.randint(2**62, ()))
        keys = list(range(len(prompts_ids))) if indices is None else list(indices)
        seeds = [stream_seed(seed, keys[index], sample) for index, sample, _ in rows]
        prompt_ids, prompt_mask = left_pad([ids for _, _, ids in rows], pad_id) if rows else (None, None)
        responses: list[list[int]] = []
        was_training = policy.model.training
        policy.model.eval()
        # transformers 4.x replaces the values of a GenerationConfig that equal its global defaults
        # (temperature 1.0, top_p 1.0, top_k 50) by the checkpoint's generation_config: with the model's own
        # config set to ours for the call, nothing is left to replace them with
        checkpoint_defaults = policy.model.generation_config
        policy.model.generation_config = gen_config
        try:
            # a sharded model is gathered whole for generation: ranks then decode for different numbers of steps
            with torch.no_grad(), gathered(policy.model):
                for start in range(0, len(rows), batch_size):
                    chunk_ids = prompt_ids[start:start + batch_size].to(policy.device)
                    chunk_mask = prompt_mask[start:start + batch_size].to(policy.device)
                    sampler = gumbel_sampling(seeds[start:start + batch_size], temperature) if temperature > 0 else None
                    out = policy.model.generate(input_ids=chunk_ids, attention_mask=chunk_mask,
                                                generation_config=gen_config,
                                                logits_processor=LogitsProcessorList([sampler] if sampler else []),
                                                tokenizer=policy.tokenizer if stop_strings else None)
                    responses += out[:, chunk_ids.shape[1]:].cpu().tolist()
        finally:  # checkpoints save the model's generation_config: it stays the checkpoint's
            policy.model.generation_config = checkpoint_defaults
        policy.model.train(was_training)
        if not rows:  # a rank with no share this time (it still joined the gathering above)
            empty = torch.zeros(0, 1, dtype=torch.long)
            return RolloutBatch(empty, empty, empty, empty.bool(), [])
        response_ids, generated = right_pad(responses, pad_id, max(1, max(len(r) for r in responses)))
        response_mask = mask_through_first_stop(response_ids, policy.stop_ids, generated)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, [index for index, _, _ in rows])

    # the rollout samples from the very model being trained: nothing to copy
    return Rollout(generate=generate, sync_weights=lambda: None)
