from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowproxy.config.presets import PRESETS, apply_preset
from shadowproxy.config.settings import CompareSettings
from shadowproxy.pairs.compare import compare_responses
from shadowproxy.pairs.observation import Observation
from shadowproxy.storage.record import AGREE, DISAGREE

FAST = settings(max_examples=60, deadline=None)


def rule_for(preset: str, **explicit: object) -> CompareSettings:
    return CompareSettings(preset=preset, **apply_preset(preset, explicit))  # type: ignore[arg-type]


def obs(body: Any) -> Observation:
    return Observation("up", 200, (), orjson.dumps(body), False, 1.0)


def kserve(data: list[float], request_id: str) -> dict[str, Any]:
    return {
        "model_name": "sentiment",
        "model_version": request_id[:3],
        "id": request_id,
        "outputs": [{"name": "probs", "shape": [1, len(data)], "datatype": "FP32", "data": data}],
    }


def openai(content: str, request_id: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt",
        "system_fingerprint": request_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    }


probabilities = st.lists(st.floats(0, 1), min_size=1, max_size=4)
ids = st.text("0123456789abcdef", min_size=3, max_size=8)


@FAST
@given(probabilities, ids, ids)
def test_kserve_v2_labels_outputs_data(data: list[float], id_a: str, id_b: str) -> None:
    rule = rule_for("kserve-v2")
    c = compare_responses(rule, obs(kserve(data, id_a)), obs(kserve(data, id_b)))
    assert c.outcome == AGREE
    assert c.primary_label == orjson.dumps([data]).decode()
    shifted = [x + 0.5 for x in data]
    assert compare_responses(rule, obs(kserve(data, id_a)), obs(kserve(shifted, id_a))).outcome == (
        DISAGREE
    )


@FAST
@given(st.sampled_from(["tfserving", "mlflow"]), st.lists(st.integers(0, 3), max_size=5))
def test_tfserving_and_mlflow_label_predictions(preset: str, classes: list[int]) -> None:
    rule = rule_for(preset)
    body = {"predictions": classes}
    c = compare_responses(rule, obs(body), obs({**body, "model": "other"}))
    assert (c.outcome, c.primary_label) == (AGREE, orjson.dumps(classes).decode())
    flipped = [*classes, 9]
    assert compare_responses(rule, obs(body), obs({"predictions": flipped})).outcome == DISAGREE


def test_openai_chat_uses_text_similarity() -> None:
    rule = rule_for("openai-chat")
    answer = "Paris is the capital of France, and it is also its largest city by population."
    reworded = answer.replace("by population", "by population!")
    c = compare_responses(rule, obs(openai(answer, "a")), obs(openai(reworded, "b")))
    assert (c.outcome, c.primary_label) == (AGREE, f'["{answer}"]')
    other = "The capital of France is Paris."
    assert compare_responses(rule, obs(openai(answer, "a")), obs(openai(other, "b"))).outcome == (
        DISAGREE
    )


def test_preset_ignore_applies_when_label_is_cleared() -> None:
    rule = rule_for("openai-chat", label=None)
    same = compare_responses(rule, obs(openai("hi", "a")), obs(openai("hi", "b")))
    assert same.outcome == AGREE


@FAST
@given(
    st.sampled_from(sorted(PRESETS)),
    st.dictionaries(
        st.sampled_from(["label", "score", "ignore", "similarity", "tolerance"]),
        st.none() | st.text(max_size=5) | st.floats(0, 1),
    ),
)
def test_explicit_keys_override_preset(preset: str, explicit: dict[str, object]) -> None:
    merged = apply_preset(preset, explicit)
    for key, value in PRESETS[preset].items():
        assert merged[key] == explicit.get(key, value)
    assert {k: merged[k] for k in explicit} == explicit


def test_presets_fill_every_compare_key() -> None:
    for values in PRESETS.values():
        assert set(values) == {"label", "score", "ignore", "similarity"}
        CompareSettings(**values)  # type: ignore[arg-type]


def test_no_preset_and_unknown_preset() -> None:
    assert apply_preset(None, {"label": "x"}) == {"label": "x"}
    with pytest.raises(
        ValueError, match="valid presets: kserve-v2, mlflow, openai-chat, tfserving"
    ):
        apply_preset("kserve", {})
