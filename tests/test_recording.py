"""build_record: redaction, body policy, truncation, text safety."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from shadowproxy.config.settings import RedactSettings, StorageSettings
from shadowproxy.pairs.record_build import TRUNCATION_MARKER, body_text, build_record, safe_text
from shadowproxy.pairs.redact import REDACTED, redact_headers, redact_json_body
from shadowproxy.storage.record import DiffEntry
from tests.recordkit import make_comparison, make_exchange

STORAGE = StorageSettings(
    redact=RedactSettings(headers=("authorization", "cookie"), json=("input.ssn",))
)


def test_record_carries_the_exchange_and_comparison() -> None:
    record = build_record(make_exchange(), make_comparison(), STORAGE, "host-1")
    assert record.request_id == "req-1"
    assert record.route == "sentiment"
    assert (record.method, record.path, record.query) == ("POST", "/predict", "a=1")
    assert (record.primary_upstream, record.shadow_upstream) == ("model-v1", "model-v2")
    assert (record.primary_status, record.shadow_status) == (200, 200)
    assert (record.primary_label, record.shadow_label) == ("pos", "neg")
    assert record.agreement is False
    assert record.diff == [{"path": "label", "primary": "pos", "shadow": "neg"}]
    assert (record.instance, record.config_sha) == ("host-1", "sha-1")
    assert record.shadow_body == '{"label": "neg"}'


def test_headers_redacted_case_insensitively() -> None:
    record = build_record(make_exchange(), make_comparison(), STORAGE, "i")
    assert record.request_headers == {
        "Content-Type": "application/json",
        "Authorization": REDACTED,
        "Cookie": REDACTED,
    }
    assert "secret-token" not in orjson.dumps(record.request_headers).decode()


def test_repeated_headers_are_joined() -> None:
    headers = redact_headers([("X-A", "1"), ("x-a", "2"), ("COOKIE", "s")], ["Cookie"])
    assert headers == {"X-A": "1, 2", "COOKIE": REDACTED}


def test_json_paths_redacted_in_request_and_responses() -> None:
    exchange = make_exchange(
        primary_body=b'{"input": {"ssn": "1"}, "label": "pos"}',
        shadow_body=b'[{"input": {"ssn": "2"}}, {"input": {"other": 3}}]',
    )
    record = build_record(exchange, make_comparison(), STORAGE, "i")
    assert record.request_body is not None and "123-45-6789" not in record.request_body
    assert orjson.loads(record.request_body) == {"input": {"ssn": REDACTED, "text": "hi"}}
    assert orjson.loads(record.primary_body or "") == {"input": {"ssn": REDACTED}, "label": "pos"}
    assert orjson.loads(record.shadow_body or "") == [
        {"input": {"ssn": REDACTED}},
        {"input": {"other": 3}},
    ]


def test_unmatched_json_body_kept_byte_for_byte() -> None:
    body = b'{ "a" : 1 }'
    assert redact_json_body(body, ["input.ssn"]) == body


def test_list_index_path() -> None:
    body = b'{"rows": [{"ssn": "a"}, {"ssn": "b"}]}'
    assert orjson.loads(redact_json_body(body, ["rows.1.ssn"])) == {
        "rows": [{"ssn": "a"}, {"ssn": REDACTED}]
    }


def test_redaction_in_a_body_cut_at_capture() -> None:
    cut = b'{"input": {"text": "x", "ssn": "123-45-6789", "more": "aaaa'
    exchange = make_exchange(shadow_body=cut, shadow_truncated=True)
    record = build_record(exchange, make_comparison(), STORAGE, "i")
    assert record.shadow_body is not None
    assert "123-45-6789" not in record.shadow_body
    assert record.shadow_body.endswith(TRUNCATION_MARKER)


def test_redaction_happens_before_truncation() -> None:
    body = b'{"input": {"ssn": "123-45-6789"}, "pad": "' + b"x" * 100 + b'"}'
    storage = StorageSettings(max_stored_body_bytes=30, redact=STORAGE.redact)
    record = build_record(make_exchange(request_body=body), make_comparison(), storage, "i")
    assert record.request_body is not None
    assert "123-45" not in record.request_body
    assert record.request_body.endswith(TRUNCATION_MARKER)


def test_diff_values_under_redacted_paths_are_redacted() -> None:
    comparison = make_comparison(diff=(DiffEntry("input.ssn", "1", "2"), DiffEntry("label", 1, 2)))
    record = build_record(make_exchange(), comparison, STORAGE, "i")
    assert record.diff == [
        {"path": "input.ssn", "primary": REDACTED, "shadow": REDACTED},
        {"path": "label", "primary": 1, "shadow": 2},
    ]


def test_store_bodies_false_keeps_no_body() -> None:
    storage = StorageSettings(store_bodies=False)
    record = build_record(make_exchange(), make_comparison(), storage, "i")
    assert (record.request_body, record.primary_body, record.shadow_body) == (None, None, None)


def test_truncation_marked() -> None:
    assert body_text(b"abcdef", 4) == "abcd" + TRUNCATION_MARKER
    assert body_text(b"abcd", 4) == "abcd"
    assert body_text(b"ab", 4, already_truncated=True) == "ab" + TRUNCATION_MARKER


def test_truncation_never_splits_a_character() -> None:
    text = body_text("aé€".encode(), 4)  # a(1) é(2) €(3): the cut lands inside €
    assert text == "aé" + TRUNCATION_MARKER


def test_invalid_utf8_escaped_and_nul_escaped() -> None:
    assert body_text(b"ok\xff\xfe", 100) == "ok\\xff\\xfe"
    assert body_text(b"a\x00b", 100) == "a\\x00b"
    assert safe_text("a\udcffb") == "a\\udcffb"


def test_shadow_transport_error_is_recorded() -> None:
    exchange = make_exchange(shadow_error="timeout", shadow_body=b"")
    comparison = make_comparison(outcome="shadow_error", agreement=None, shadow_error=None)
    record = build_record(exchange, comparison, STORAGE, "i")
    assert record.shadow_error == "timeout"
    assert record.shadow_status is None
    assert record.agreement is None


def test_nul_in_every_text_field_is_escaped() -> None:
    exchange = make_exchange(headers=(("X-Evil", "a\x00b"),), request_body=b"\x00")
    comparison = make_comparison(
        primary_label="p\x00", diff=(DiffEntry("a\x00", {"k\x00": "v\x00"}, "s"),)
    )
    record = build_record(exchange, comparison, STORAGE, "i")
    assert "\x00" not in orjson.dumps(record.diff).decode()
    assert record.request_headers == {"X-Evil": "a\\x00b"}
    assert record.primary_label == "p\\x00"


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=64))
def test_body_text_is_always_storable(raw: bytes, limit: int) -> None:
    text = body_text(raw, limit)
    assert "\x00" not in text
    text.encode("utf-8")  # never raises
    kept = text.removesuffix(TRUNCATION_MARKER)
    assert len(kept.encode("utf-8")) <= max(limit, 0)  # escapes count against the limit too
    if len(raw) > limit:
        assert kept != text
    elif kept != text:  # cut only because escaping made the text longer than the limit
        assert len(safe_text(raw.decode("utf-8", "backslashreplace")).encode("utf-8")) > limit


@given(
    st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=100).map(str.encode),
    st.integers(min_value=0, max_value=120),
    st.booleans(),
)
def test_plain_ascii_bodies_are_stored_as_they_are(raw: bytes, limit: int, cut: bool) -> None:
    text = body_text(raw, limit, already_truncated=cut)
    if len(raw) > limit:
        assert text == raw[:limit].decode() + TRUNCATION_MARKER
    else:
        assert text == raw.decode() + (TRUNCATION_MARKER if cut else "")


@given(
    secret=st.text(alphabet="0123456789", min_size=4, max_size=12),
    filler=st.text(alphabet="abcdefgh ", max_size=30),
    cut=st.integers(min_value=0, max_value=120),
)
def test_a_redacted_value_never_survives_a_capture_cut(secret: str, filler: str, cut: int) -> None:
    """Whatever the capture kept of the body, no digit of the secret is stored."""
    body = orjson.dumps({"input": {"a": filler, "ssn": secret, "b": True}})
    exchange = make_exchange(shadow_body=body[:cut], shadow_truncated=cut < len(body))
    record = build_record(exchange, make_comparison(), STORAGE, "i")
    assert record.shadow_body is not None
    assert not any(ch.isdigit() for ch in record.shadow_body)
