"""Compare presets for the model-serving protocols users already run.

Each preset fills all of ``label``, ``score``, ``ignore`` and ``similarity``, so a preset
alone fully decides how a route compares; any of these keys written explicitly replaces
the preset's value whole (an explicit ``ignore`` list is not merged with the preset's).
None of these protocols carries a standard confidence field, so no preset sets ``score``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

PRESETS: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {
        # KServe / Triton V2 inference protocol: one tensor per output, values in `data`.
        "kserve-v2": MappingProxyType(
            {
                "label": "outputs[*].data",
                "score": None,
                "ignore": ("id", "model_version", "model_name"),
                "similarity": None,
            }
        ),
        # TF Serving REST predict API (row format), MLflow scoring server >= 2.0.
        "tfserving": MappingProxyType(
            {"label": "predictions", "score": None, "ignore": (), "similarity": None}
        ),
        "mlflow": MappingProxyType(
            {"label": "predictions", "score": None, "ignore": (), "similarity": None}
        ),
        # OpenAI-compatible /v1/chat/completions: sampled text rarely matches byte for byte.
        "openai-chat": MappingProxyType(
            {
                "label": "choices[*].message.content",
                "score": None,
                "ignore": ("id", "created", "system_fingerprint", "usage"),
                "similarity": 0.9,
            }
        ),
    }
)


def apply_preset(preset: str | None, explicit: Mapping[str, object]) -> dict[str, object]:
    """The preset's keys overlaid with ``explicit`` (explicit wins, also when it is None).

    Raises ValueError naming the valid presets when ``preset`` is unknown.
    """
    if preset is None:
        return dict(explicit)
    if preset not in PRESETS:
        valid = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown preset {preset!r}; valid presets: {valid}")
    return {**PRESETS[preset], **explicit}
