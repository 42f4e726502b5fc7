"""Loaders on fixtures in the real schemas (tests/fixtures, written by make_fixtures.py)."""

import json
from pathlib import Path

import pytest

from aopd_cli.data.loaders import load_records
from aopd_cli.data.prompts import sft_example, tool_messages, tool_sft_messages
from aopd_cli.errors import UserError

FIX = Path(__file__).parent / "fixtures"


def test_openthoughts_markers_become_a_think_block_and_system_a_message():
    records = load_records("sft", str(FIX / "openthoughts"))
    messages = records[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == "<think>\nSeven eights: 56.\n</think>\n\nThe product is \\boxed{56}."


def test_openthoughts3_human_gpt_roles_are_mapped():
    records = load_records("sft", str(FIX / "openthoughts3"))
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
    assert [m["role"] for m in records[1]["messages"]] == ["user", "assistant"]
    assert records[0]["messages"][1]["content"].startswith("<think>\n1024")


def test_deepmath_prompts_keep_difficulty_topic_and_reference():
    records = load_records("prompts", str(FIX / "deepmath"))
    assert records[0]["problem"].startswith("Evaluate") and records[0]["answer"] == "3"
    assert records[0]["difficulty"] == 4.0 and records[0]["topic"].endswith("Limits")
    assert records[0]["reference"] == "<think>\nsin u ~ u.\n</think>\n\nThe limit is \\boxed{3}."


@pytest.mark.parametrize("folder, config, first", [
    ("aime24_h4", None, {"id": "60", "answer": "4"}),
    ("aime24_maxwell/aime_2024_problems.parquet", None, {"id": "2024-I-1", "answer": "7"}),
    ("aime25_yentinglin", None, {"id": "1", "answer": "81"}),
    ("aime25_matharena", None, {"id": "1", "answer": "4"}),
    ("hmmt25", None, {"id": "7", "answer": "\\frac{1}{4}"}),
    ("aime25_opencompass", "AIME2025-II", {"id": "0", "answer": "32"}),
])
def test_math_benchmark_variants_normalise_to_string_answers(folder, config, first):
    split = "test" if "opencompass" in folder else None
    records = load_records("math_benchmark", str(FIX / folder), config=config, split=split)
    assert {k: records[0][k] for k in first} == first
    assert all(isinstance(r["answer"], str) and r["problem"] for r in records)


def test_toolalpaca_train_skips_like_build_dataset_and_strips_hints():
    records = load_records("tool_train", str(FIX / "toolalpaca"))
    # the failed instance and the getDetails-only instance are skipped
    assert [r["instruction"] for r in records] == ["What's the weather in Paris right now?", "Forecast for Rome?"]
    assert records[1]["steps"][1]["action"] == "getForecast"
    assert records[0]["steps"][0]["thought"] == "I should call getCurrentWeather."
    assert "components" not in records[0]["functions"]


def test_toolalpaca_eval_simulated_and_real():
    sim = load_records("tool_eval", str(FIX / "toolalpaca"))
    real = load_records("tool_eval", str(FIX / "toolalpaca"), split="real")
    assert len(sim) == 2 and len(real) == 1
    assert sim[1]["golden"][1] == {"action": "[Optional]getForecast",
                                  "action_input": "{\"city\": ${city from getCurrentWeather}, \"days\": \"\"}",
                                  "observation": None}


def test_malformed_row_names_source_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok?", "final_answer": "1"}) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl: row 1: field 'final_answer/answer': missing"):
        load_records("prompts", str(path))
    assert len(load_records("prompts", str(path), on_bad_row="skip")) == 1


def test_unparsable_toolalpaca_file_is_refused(tmp_path):
    (tmp_path / "eval_simulated.json").write_text("[{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_records("tool_eval", str(tmp_path))


def test_hub_ids_go_through_datasets_and_fail_clearly_offline(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # read at import: patch the loaded config too
        if hasattr(datasets.config, name):
            monkeypatch.setattr(datasets.config, name, True)
    with pytest.raises(UserError, match="cannot load dataset 'zwhe99/DeepMath-103K'"):
        load_records("prompts", "deepmath")


def test_lab_data_reads_back_through_the_real_loaders(lab_cache):
    assert len(load_records("sft", "lab_math")) == 4000
    bench = load_records("math_benchmark", "lab_math")
    train = {r["problem"] for r in load_records("prompts", "lab_math")}
    assert not train & {r["problem"] for r in bench}  # held out
    tools = load_records("tool_eval", "lab_tools")
    assert tools and all(r["golden"] for r in tools)


def test_sft_mask_covers_assistant_tokens_and_end_of_turn(lab_tokenizer):
    messages = [{"role": "user", "content": "1+2=?"}, {"role": "assistant", "content": "<think>\n1+2=3\n</think>\n\n\\boxed{3}"}]
    stop = {lab_tokenizer.convert_tokens_to_ids("<|im_end|>")}
    ids, mask = sft_example(lab_tokenizer, messages, stop)
    trained = [i for i, m in zip(ids, mask) if m]
    assert lab_tokenizer.decode(trained) == "<think>\n1+2=3\n</think>\n\n\\boxed{3}<|im_end|>"


def test_tool_prompts_follow_toolalpaca_react_format():
    record = load_records("tool_train", str(FIX / "toolalpaca"))[1]
    prompt = tool_messages(record, "full")[0]["content"]
    assert "getForecast: Forecast." in prompt and "getDetails" in prompt and prompt.endswith("USER: Forecast for Rome?")
    conversation = tool_sft_messages(record, "full")
    assert conversation[1]["content"].endswith('ASSISTANT Action Input: {"city": "Rome"}')
    assert conversation[2]["role"] == "user" and conversation[2]["content"].startswith("ASSISTANT Observation:")


def test_two_local_folders_of_the_same_name_read_their_own_rows(tmp_path):
    # datasets caches a local folder by its name: without a cache per content, the second reads the first's rows
    from aopd_cli.data.lab import AIME_FEATURES, _write_hub_layout

    for i, folder in enumerate([tmp_path / "a" / "bench", tmp_path / "b" / "bench"]):
        _write_hub_layout(folder, [{"id": 1, "problem": f"problem {i}", "solution": "", "answer": "1", "url": "",
                                    "year": ""}], AIME_FEATURES)
        assert load_records("math_benchmark", str(folder))[0]["problem"] == f"problem {i}"
