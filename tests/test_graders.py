"""Math grading, pass@k and the ToolAlpaca call grader."""

import threading
from math import comb

import pytest

from aopd_cli.eval.math import grade_math, pass_at_k
from aopd_cli.eval.tools import grade_tool_calls


@pytest.mark.parametrize("response, gold", [
    ("so \\boxed{0.5}", "\\frac{1}{2}"), ("\\boxed{004}", "4"), ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
    ("first \\boxed{3} then \\boxed{7}", "7"), ("The answer is $144$.", "144"), ("\\boxed{2\\pi}", "2\\pi"),
    ("\\boxed{\\frac{1}{4}}", "\\frac{1}{4}"), ("1+2=3 so \\boxed{3}", "3"),
])
def test_equivalent_answers_are_correct(response, gold):
    assert grade_math(response, gold)


@pytest.mark.parametrize("response, gold", [
    ("\\boxed{3}", "4"), ("first \\boxed{7} then \\boxed{3}", "7"), ("no answer at all", "5"), ("\\boxed{}", "1"),
    ("\\boxed{0.51}", "\\frac{1}{2}"),
])
def test_wrong_answers_are_wrong(response, gold):
    assert not grade_math(response, gold)


def test_grading_works_outside_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append((grade_math("\\boxed{0.5}", "1/2"),
                                                             grade_math("\\boxed{3}", "4"))))
    thread.start()
    thread.join(60)
    assert results == [(True, False)]


@pytest.mark.parametrize("n, c, k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 8, 4), (16, 5, 4), (100, 1, 50), (4, 1, 4)])
def test_pass_at_k_matches_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_k_is_stable_for_large_n_and_checks_arguments():
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


GOLD_ONE = [{"action": "getWeather", "action_input": '{"city": "Paris", "units": ""}'}]


def test_single_call_with_case_insensitive_scalars_and_extra_keys():
    grade = grade_tool_calls('ASSISTANT Thought: x\nASSISTANT Action: getWeather\nASSISTANT Action Input: {"city": "paris", "lang": "en"}', GOLD_ONE)
    assert grade.success and grade.first_call
    assert not grade_tool_calls('Action: getWeather\nAction Input: {"city": "Rome"}', GOLD_ONE).success
    assert not grade_tool_calls('Action: getForecast\nAction Input: {"city": "Paris"}', GOLD_ONE).first_call
    assert not grade_tool_calls("I will not call anything.", GOLD_ONE).success


def test_multi_step_in_order_with_placeholders_and_optional_steps():
    gold = [{"action": "searchAnime", "action_input": '{"q": "naruto"}'},
            {"action": "[Optional]getDetails", "action_input": '{"Question": "which?"}'},
            {"action": "getEpisodes", "action_input": '{"animeId": ${animeId from searchAnime}, "n": 3}'}]
    ok = 'Action: searchAnime\nAction Input: {"q": "Naruto"}\nObservation: {"id": 9}\nAction: getEpisodes\nAction Input: {"animeId": 9, "n": "3"}'
    grade = grade_tool_calls(ok, gold)
    assert grade.success and grade.first_call and grade.n_calls == 2
    wrong_order = 'Action: getEpisodes\nAction Input: {"animeId": 9, "n": 3}\nAction: searchAnime\nAction Input: {"q": "naruto"}'
    assert not grade_tool_calls(wrong_order, gold).success
    assert not grade_tool_calls('Action: searchAnime\nAction Input: {"q": "naruto"}', gold).success


def test_invalid_golden_json_falls_back_to_string_comparison():
    gold = [{"action": "f", "action_input": "{broken: json"}]
    assert grade_tool_calls("Action: f\nAction Input: {broken:  json", gold).success
    assert not grade_tool_calls('Action: f\nAction Input: {"broken": "json"}', gold).success


def test_unparsable_prediction_is_wrong():
    assert not grade_tool_calls("Action: getWeather\nAction Input: {city: Paris", GOLD_ONE).success
