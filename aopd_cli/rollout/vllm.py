"""vLLM rollouts (GPU; optional extra `aopd-cli[gpu]`). The engine holds its own copy of the weights, so
`sync_weights` pushes the trainer's current state dict into it after every optimizer step.

Sampling matches the HF path: temperature sampling over the full vocabulary (top_k=-1, top_p=1), stop on
EOS and the end-of-turn token, `n` samples per prompt.

    python -m pytest tests -m gpu -q
"""

from __future__ import annotations


from aopd_cli.errors import UserError
from aopd_cli.rollout import Rollout, RolloutBatch, left_pad, mask_through_first_stop, right_pad


def vllm_rollout(policy, rollout_cfg) -> Rollout:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UserError("rollout=vllm needs vLLM: pip install 'aopd-cli[gpu]' (or use rollout=hf)") from None
    source = policy.model.config._name_or_path
    llm = LLM(model=source, tensor_parallel_size=rollout_cfg.tensor_parallel_size,
              gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, dtype="bfloat16",
              enable_prefix_caching=True, seed=0)

    def generate(prompts_ids: list[list[int]], *, n: int, temperature: float, max_new_tokens: int,
                 seed: int | None = None) -> RolloutBatch:
        params = SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                                stop_token_ids=sorted(policy.stop_ids), seed=seed)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts_ids], params, use_tqdm=False)
        rows, responses = [], []
        for index, output in enumerate(outputs):
            for completion in output.outputs:
                rows.append((index, prompts_ids[index]))
                responses.append(list(completion.token_ids))
        pad_id = policy.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([ids for _, ids in rows], pad_id)
        response_ids, generated = right_pad(responses, pad_id)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids,
                            mask_through_first_stop(response_ids, policy.stop_ids, generated), [i for i, _ in rows])

    def sync_weights() -> None:
        state = {name: tensor.detach() for name, tensor in policy.model.state_dict().items()}
        # vLLM's model loader takes (name, tensor) pairs in the HF naming
        llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(
            ((k, v.to(worker.device)) for k, v in state.items())))
        llm.reset_prefix_cache()  # cached KV blocks came from the old weights

    return Rollout(generate=generate, sync_weights=sync_weights)



