from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from shadowproxy.base.errors import ConfigError, ShadowProxyError
from shadowproxy.control.promotion import (
    ConfigNotWritable,
    PromotionResult,
    RouteNotFound,
    ShadowNotFound,
    _plain_safe,
    read_route,
    swap_primary,
)

ROUTES = """\
# shadowproxy routes — the team's annotated copy
version: 1   # schema version

server:   {host: 0.0.0.0,   port: 8080, max_body_bytes: 10485760}   # odd spacing kept
admin:    {host: 127.0.0.1, port: 9901, token_env: SHADOWPROXY_ADMIN_TOKEN}

upstreams:
  # the model in production
  sentiment-v1: {url: http://127.0.0.1:9001, timeout_ms: 1000, max_connections: 100}
  sentiment-v2: {url: http://127.0.0.1:9002, timeout_ms: 2000}   # candidate
  sentiment-v3: {url: "http://127.0.0.1:9003"}
  "ranker-a": {url: http://127.0.0.1:9101}
  ranker-b:   {url: http://127.0.0.1:9102}
  ranker-c:   {url: http://127.0.0.1:9103}

routes:
    # first match wins
    - name: sentiment
      match: {path_prefix: /predict, methods: [POST]}   # or path: exact
      primary: sentiment-v1      # <- promoted away
      shadows: [sentiment-v2,  sentiment-v3]   # flow style, two spaces kept
      sample_rate: 1.0
      compare:
        label: prediction        # JMESPath
        tolerance: 0.01

    - name: ranker
      primary: "ranker-a"        # double-quoted stays double-quoted
      shadows:
        - ranker-b               # block style
        # a comment between items
        - 'ranker-c'             # single-quoted stays single-quoted
      gate: {min_samples: 100, min_agreement: 0.95, max_latency_ratio: 1.2,
             min_score_delta: 0.0, max_shadow_error_rate: 0.01}
# trailing comment, no newline at end"""


def write(tmp_path: Path, text: str = ROUTES, name: str = "routes.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_flow_list_first_shadow_by_default_byte_identical(tmp_path: Path) -> None:
    path = write(tmp_path)
    result = swap_primary(str(path), "sentiment", None)
    expected = ROUTES.replace(
        "primary: sentiment-v1      #", "primary: sentiment-v2      #"
    ).replace("[sentiment-v2,  sentiment-v3]", "[sentiment-v1,  sentiment-v3]")
    assert path.read_bytes() == expected.encode()
    assert result == PromotionResult(
        route="sentiment",
        previous_primary="sentiment-v1",
        new_primary="sentiment-v2",
        old_sha256=sha(ROUTES.encode()),
        new_sha256=sha(expected.encode()),
    )


def test_flow_list_named_second_shadow(tmp_path: Path) -> None:
    path = write(tmp_path)
    result = swap_primary(str(path), "sentiment", "sentiment-v3")
    expected = ROUTES.replace(
        "primary: sentiment-v1      #", "primary: sentiment-v3      #"
    ).replace("[sentiment-v2,  sentiment-v3]", "[sentiment-v2,  sentiment-v1]")
    assert path.read_bytes() == expected.encode()
    assert (result.previous_primary, result.new_primary) == ("sentiment-v1", "sentiment-v3")


def test_block_list_each_position_keeps_its_quoting(tmp_path: Path) -> None:
    path = write(tmp_path)
    swap_primary(str(path), "ranker", "ranker-c")
    expected = ROUTES.replace('primary: "ranker-a"', 'primary: "ranker-c"').replace(
        "- 'ranker-c'", "- 'ranker-a'"
    )
    assert path.read_bytes() == expected.encode()
    assert read_route(str(path), "ranker").primary == "ranker-c"


def test_block_list_plain_item(tmp_path: Path) -> None:
    path = write(tmp_path)
    swap_primary(str(path), "ranker", "ranker-b")
    expected = ROUTES.replace('primary: "ranker-a"', 'primary: "ranker-b"').replace(
        "- ranker-b               #", "- ranker-a               #"
    )
    assert path.read_bytes() == expected.encode()


def test_swap_twice_restores_the_original_bytes(tmp_path: Path) -> None:
    path = write(tmp_path)
    first = swap_primary(str(path), "sentiment", "sentiment-v3")
    second = swap_primary(str(path), "sentiment", "sentiment-v1")
    assert path.read_bytes() == ROUTES.encode()
    assert second.new_sha256 == first.old_sha256


def test_crlf_and_non_ascii_comments_are_kept(tmp_path: Path) -> None:
    text = (
        "# modèle — prod ✓\r\nroutes:\r\n  - name: r\r\n    primary: a   # ünïcode\r\n"
        "    shadows: [b]\r\n"
    )
    path = write(tmp_path, text)
    swap_primary(str(path), "r", None)
    assert path.read_bytes() == text.replace("primary: a", "primary: b").replace(
        "[b]", "[a]"
    ).encode("utf-8")


def test_flow_mapping_route_and_scalar_shadows(tmp_path: Path) -> None:
    text = "routes: [{name: r, primary: a, shadows: b}]  # all flow\n"
    path = write(tmp_path, text)
    swap_primary(str(path), "r", None)
    assert path.read_text() == "routes: [{name: r, primary: b, shadows: a}]  # all flow\n"


def test_value_that_needs_quotes_in_a_plain_position_is_quoted(tmp_path: Path) -> None:
    text = "routes:\n  - name: r\n    primary: plain\n    shadows: ['v: 1, #x']\n"
    path = write(tmp_path, text)
    swap_primary(str(path), "r", None)
    assert (
        path.read_text()
        == "routes:\n  - name: r\n    primary: \"v: 1, #x\"\n    shadows: ['plain']\n"
    )
    assert YAML(typ="safe").load(path.read_text())["routes"][0]["primary"] == "v: 1, #x"


def test_keeps_file_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = write(tmp_path)
    os.chmod(path, 0o640)
    swap_primary(str(path), "sentiment", None)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routes.yaml"]


def test_unknown_route(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(RouteNotFound) as info:
        swap_primary(str(path), "nope", None)
    assert "'nope'" in str(info.value)
    assert str(path) in str(info.value)
    assert "sentiment, ranker" in str(info.value)
    assert isinstance(info.value, ShadowProxyError)
    assert path.read_bytes() == ROUTES.encode()


def test_unknown_shadow_names_the_routes_shadows(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(ShadowNotFound) as info:
        swap_primary(str(path), "sentiment", "sentiment-v9")
    assert "sentiment-v2, sentiment-v3" in str(info.value)
    assert info.value.shadows == ("sentiment-v2", "sentiment-v3")
    assert path.read_bytes() == ROUTES.encode()


def test_the_primary_itself_is_not_a_shadow(tmp_path: Path) -> None:
    path = write(tmp_path)
    with pytest.raises(ShadowNotFound):
        swap_primary(str(path), "sentiment", "sentiment-v1")


def test_route_without_shadows(tmp_path: Path) -> None:
    path = write(tmp_path, "routes:\n  - name: r\n    primary: a\n")
    with pytest.raises(ShadowNotFound, match="has no shadows"):
        swap_primary(str(path), "r", None)


def test_symlink_is_refused_with_configmap_hint(tmp_path: Path) -> None:
    data = tmp_path / "..2026_11_30"
    data.mkdir()
    write(data)
    (tmp_path / "..data").symlink_to(data.name)
    link = tmp_path / "routes.yaml"
    link.symlink_to("..data/routes.yaml")
    with pytest.raises(ConfigNotWritable, match="edit the ConfigMap instead"):
        swap_primary(str(link), "sentiment", None)
    assert (data / "routes.yaml").read_bytes() == ROUTES.encode()


def test_read_only_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path)
    os.chmod(path, 0o444)
    with pytest.raises(ConfigNotWritable, match="read-only"):
        swap_primary(str(path), "sentiment", None)
    assert path.read_bytes() == ROUTES.encode()


def _refused_as_unprivileged(path: Path) -> bool:
    """Try the swap as an ordinary user (root writes into read-only directories anyway):
    in a forked child that drops to `nobody`, so the check runs the same under CI's root."""
    if os.geteuid() != 0:
        try:
            swap_primary(str(path), "sentiment", None)
        except ConfigNotWritable:
            return True
        return False
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 2
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            swap_primary(str(path), "sentiment", None)
            code = 1
        except ConfigNotWritable:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_read_only_directory_is_refused() -> None:
    # A directory of its own under /tmp: pytest's tmp_path is private to root's user.
    directory = Path(tempfile.mkdtemp(prefix="shadowproxy-ro-"))
    try:
        path = write(directory)
        os.chmod(path, 0o666)  # the file itself is writable: only the directory is not
        os.chmod(directory, 0o555)
        assert _refused_as_unprivileged(path)
        assert path.read_bytes() == ROUTES.encode()
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(directory)


def test_anchor_is_refused_rather_than_rewritten(tmp_path: Path) -> None:
    text = "routes:\n  - name: r\n    primary: &p a\n    shadows: [b]\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="anchor"):
        swap_primary(str(path), "r", None)
    assert path.read_text() == text


def test_alias_is_refused_rather_than_rewriting_the_anchor(tmp_path: Path) -> None:
    text = "x: &p a\nroutes:\n  - name: r\n    primary: *p\n    shadows: [b]\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="anchor"):
        swap_primary(str(path), "r", None)
    assert path.read_text() == text


def test_shared_list_is_refused_because_another_route_would_change(tmp_path: Path) -> None:
    text = (
        "routes:\n  - name: r\n    primary: a\n    shadows: &s [b]\n"
        "  - name: q\n    primary: c\n    shadows: *s\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="in place"):
        swap_primary(str(path), "r", None)
    assert path.read_text() == text


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "routes:\n  - name: r\n    primary: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        swap_primary(str(path), "r", None)
    assert str(info.value).startswith(f"{path}:")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        swap_primary(str(tmp_path / "absent.yaml"), "r", None)


# --- property: any names, any quoting --------------------------------------------------

NAME = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Cf", "Zl", "Zp")),
    min_size=1,
    max_size=12,
)


def written(name: str, style: str) -> str:
    if style == "'" and "\n" not in name:
        return "'" + name.replace("'", "''") + "'"
    if style == "plain" and _plain_safe(name):
        return name
    return json.dumps(name, ensure_ascii=False)


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(NAME, min_size=3, max_size=3, unique=True),
    styles=st.lists(st.sampled_from(["plain", "'", '"']), min_size=3, max_size=3),
    pick=st.sampled_from([0, 1]),
)
def test_any_names_any_quoting_swap_only_the_two_values(
    names: list[str], styles: list[str], pick: int
) -> None:
    primary, *shadows = names
    p, s1, s2 = (written(n, s) for n, s in zip(names, styles, strict=True))
    head = "# top\nroutes:\n  - name: r   # c\n    primary: "
    middle = "   # p\n    shadows: ["
    tail = "]   # s\n"
    text = f"{head}{p}{middle}{s1}, {s2}{tail}"
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "routes.yaml"
        path.write_text(text, encoding="utf-8")
        result = swap_primary(str(path), "r", shadows[pick])
        new_text = path.read_text(encoding="utf-8")
    assert (result.previous_primary, result.new_primary) == (primary, shadows[pick])
    assert new_text.startswith(head)
    assert middle in new_text
    assert new_text.endswith(tail)
    route = YAML(typ="safe").load(new_text)["routes"][0]
    expected_shadows = list(shadows)
    expected_shadows[pick] = primary
    assert route == {"name": "r", "primary": shadows[pick], "shadows": expected_shadows}
