"""Decode captured bodies for comparison: Content-Encoding undone, with a hard output cap."""

from __future__ import annotations

import zlib
from dataclasses import replace

from shadowproxy.pairs.observation import Observation

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decoded(observation: Observation, cap: int) -> Observation:
    """The observation with its body decompressed (at most ``cap`` bytes; a bomb stops there).

    Unknown encodings or corrupt data leave the body as it was.
    """
    encoding = next(
        (v for k, v in observation.headers if len(k) == 16 and k.lower() == "content-encoding"),
        "",
    )
    wbits = _WBITS.get(encoding.strip().lower())
    if wbits is None or not observation.body:
        return observation
    try:
        inflater = zlib.decompressobj(wbits)
        body = inflater.decompress(observation.body, cap)
    except zlib.error:
        return observation
    truncated = observation.body_truncated or bool(inflater.unconsumed_tail)
    return replace(observation, body=body, body_truncated=truncated)
