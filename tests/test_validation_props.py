"""Property-based: over every config field, any value (wrong type, non-finite, out of range, huge, path-like) either
validates or is one line of ConfigError naming the field, never another exception; and at the command line, exit 2
with one line and nothing written, or a run that trains."""

import math
from hypothesis import HealthCheck, given, settings, strategies as st
from conftest import run_cli, tiny
from scaletrain.config import all_keys, from_dict, load_config
from scaletrain.errors import ConfigError

KEYS = all_keys()
HOSTILE = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 2**63, 2**64, -1, 0, 1e308, 10**30]),
    st.booleans(),
    st.none(),
    st.text(max_size=40),
    st.sampled_from(["../x", "../../x", "/abs/x", "a/b", ".", "..", "x" * 300, "/proc", "nan", ".inf", "a\0b"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def check(key, call):
    try:
        call()
    except ConfigError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1 and key in msg, (key, msg)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=HOSTILE)
def test_every_field_validates_or_names_itself_in_one_line(key, value):
    sec, name = key.split(".")
    check(key, lambda: from_dict({sec: {name: value}}))  # as a YAML file gives it
    if not isinstance(value, str) or "\0" not in value:
        check(key, lambda: load_config(overrides=[f"{key}={value}"]))  # as the command line gives it


CLI_VALUES = st.tuples(
    st.sampled_from(["model.dropout", "train.lr", "train.seed", "run.name", "train.grad_clip", "model.n_embd"]),
    st.sampled_from(["nan", "inf", "-1", "1e308", str(2**63), "../x", "/abs", "0.1", "ok-name", "64"]),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kv=CLI_VALUES)
def test_cli_exits_2_in_one_line_or_trains(tmp_path_factory, corpus, cache_dir, kv):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "runs"
    r = run_cli("train", *tiny(corpus, cache_dir, out, "train.steps=2", "train.warmup_steps=0", f"{kv[0]}={kv[1]}"))
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    if r.returncode == 2:
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("scaletrain: error: ") and kv[0] in lines[-1], lines
        assert not out.exists() or not any(out.iterdir())
        assert list(tmp.iterdir()) in ([], [out])
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(list(out.iterdir())) == 1
