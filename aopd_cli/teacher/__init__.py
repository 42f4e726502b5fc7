"""The teacher as a scorer: `TeacherTopK` for given sequences, scored in-process (HF, vLLM) or by a served
vLLM teacher (`openai_server.py`: the OpenAI-compatible server, started, asked and checked).
May import: errors, progress, training, rollout (the in-process vLLM engine).

    python -m pytest tests/test_vllm.py -q -k teacher
"""
