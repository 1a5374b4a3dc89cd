"""Schedules against the docs/method.md §3.3 test vectors, endpoints, aliases and refusals."""

import math

import pytest

from prores_megatron import SCHEDULES, alpha, alpha_table
from prores_megatron.core.schedules import (
    canonical_schedule,
    layer_full_step,
    needs_warmup_steps,
    total_warmup_steps,
    warmup_steps_from_total,
)

L, T = 12, 1000
LAYERS = (1, 2, 3, 6, 12)

# Method doc §3.3, copied from the table (4 decimals there).
VECTORS = {
    "linear": ([1, 0.75, 0.5, 0.25, 0.125], [1, 1, 1, 1, 0.5]),
    "linear-sqrt": ([1, 0.8660, 0.7071, 0.5, 0.3536], [1, 1, 1, 1, 0.7071]),
    "linear-square": ([1, 0.5625, 0.25, 0.0625, 0.015625], [1, 1, 1, 1, 0.25]),
    "equal": ([1] * 5, [1] * 5),
    "reverse": ([0.125, 0.1364, 0.15, 0.2143, 1], [0.5, 0.5455, 0.6, 0.8571, 1]),
    "stagewise-0": ([1, 0.5, 0, 0, 0], [1, 1, 1, 1, 0]),
    "stagewise-inv-depth": ([1, 0.5417, 0.0833, 0.0833, 0.0833], [1, 1, 1, 1, 0.0833]),
    "stagewise-inv-sqrt-layer": ([1, 0.8536, 0.5774, 0.4082, 0.2887], [1, 1, 1, 1, 0.2887]),
    "fix-inv-sqrt-layer": ([1, 0.7071, 0.5774, 0.4082, 0.2887], [1, 0.7071, 0.5774, 0.4082, 0.2887]),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_method_doc_vectors(name):
    for step, expected in zip((1500, 6000), VECTORS[name]):
        got = [alpha(name, l, step, T, L) for l in LAYERS]
        assert got == pytest.approx(expected, abs=5e-5), (name, step)


def test_linear_more_points():
    assert [alpha("linear", l, 1, T, L) for l in LAYERS] == [1 / (1000 * l) for l in LAYERS]
    assert [alpha("linear", l, 1000, T, L) for l in LAYERS] == [1 / l for l in LAYERS]
    assert alpha_table("linear", 12000, T, L) == [1.0] * L


def test_vectors_not_in_the_table_by_hand():
    # stagewise-inv-sqrt-depth: floor 1/sqrt(12); layer 2 is half-way at t=1500.
    m = 1 / math.sqrt(12)
    assert alpha("stagewise-inv-sqrt-depth", 2, 1500, T, L) == pytest.approx(m + (1 - m) * 0.5)
    assert alpha("stagewise-inv-sqrt-depth", 3, 1500, T, L) == pytest.approx(m)
    assert alpha("fix-inv-depth", 5, 0, None, L) == 1 / 12
    assert alpha("fix-inv-sqrt-depth", 5, 99999, None, L) == 1 / math.sqrt(12)


@pytest.mark.parametrize("name", [s for s in SCHEDULES if s not in ("none",)])
def test_endpoints(name):
    T_ = None if not needs_warmup_steps(name) else 7.5
    at0 = alpha_table(name, 0, T_, L)
    floors = {
        "stagewise-inv-depth": [1 / L] * L,
        "stagewise-inv-sqrt-depth": [1 / math.sqrt(L)] * L,
        "stagewise-inv-sqrt-layer": [1 / math.sqrt(l) for l in range(1, L + 1)],
        "fix-inv-depth": [1 / L] * L,
        "fix-inv-sqrt-depth": [1 / math.sqrt(L)] * L,
        "fix-inv-sqrt-layer": [1 / math.sqrt(l) for l in range(1, L + 1)],
    }
    assert at0 == pytest.approx(floors.get(name, [0.0] * L))
    late = alpha_table(name, 10**9, T_, L)
    if name.startswith("fix-"):
        assert late == at0  # static for the whole run (doc §10.3)
    else:
        assert late == [1.0] * L
        # Exactly 1 from the layer's full step on, below 1 just before (T = 7.5: non-integer).
        for l in range(1, L + 1):
            full = layer_full_step(name, l, T_, L)
            assert alpha(name, l, math.ceil(full), T_, L) == 1.0
            if math.ceil(full) - 1 >= 0 and full > 0:
                assert alpha(name, l, math.ceil(full) - 1, T_, L) < 1.0


def test_none_is_one():
    assert alpha_table("none", 0, None, 5) == [1.0] * 5
    assert alpha_table("none", 17, 3.0, 5) == [1.0] * 5


def test_non_integer_T():
    # T = 1000/24 (paper Table 6, "linear 1k" at L = 24): layer 24 ends exactly at t = 1000.
    T_ = 1000 / 24
    assert alpha("linear", 24, 1000, T_, 24) == 1.0
    assert alpha("linear", 24, 500, T_, 24) == pytest.approx(0.5)
    assert alpha("linear", 1, 20, T_, 24) == pytest.approx(20 / T_)
    assert total_warmup_steps("linear", T_, 24) == pytest.approx(1000)
    assert warmup_steps_from_total("linear", 1000, 24) == pytest.approx(T_)
    assert warmup_steps_from_total("equal", 1000, 24) == 1000
    assert total_warmup_steps("equal", 300.0, 24) == 300.0
    assert total_warmup_steps("fix-inv-depth", 3.0, 24) is None


REF = {
    "sqrt": "linear-sqrt",
    "square": "linear-square",
    "linear_equal": "equal",
    "linear_reverse": "reverse",
    "stagewise_0": "stagewise-0",
    "stagewise_L": "stagewise-inv-depth",
    "stagewise_sqrt_L": "stagewise-inv-sqrt-depth",
    "stagewise_sqrt_l": "stagewise-inv-sqrt-layer",
    "fix_L": "fix-inv-depth",
    "fix_sqrt_L": "fix-inv-sqrt-depth",
    "fix_sqrt_l": "fix-inv-sqrt-layer",
}


@pytest.mark.parametrize("ref,canonical", sorted(REF.items()))
def test_reference_aliases(ref, canonical):
    assert canonical_schedule(ref) == canonical
    T_ = 2.5 if needs_warmup_steps(canonical) else None
    assert alpha_table(ref, 7, T_, 6) == alpha_table(canonical, 7, T_, 6)


def test_case_matters():
    # fix_L (1/L) and fix_sqrt_l (1/sqrt(l)) must never be confused by case folding.
    with pytest.raises(ValueError, match="fix_l"):
        canonical_schedule("fix_l")
    with pytest.raises(ValueError, match="Linear"):
        canonical_schedule("Linear")


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(schedule="linear_sqrt"), "schedule='linear_sqrt'.*valid choices: linear, linear-sqrt"),
        (dict(schedule=None), "schedule=None"),
        (dict(warmup_steps=0), "warmup_steps=0.0"),
        (dict(warmup_steps=-3), "warmup_steps=-3.0"),
        (dict(warmup_steps=float("nan")), "warmup_steps=nan"),
        (dict(warmup_steps=float("inf")), "warmup_steps=inf"),
        (dict(warmup_steps=None), "warmup_steps=None"),
        (dict(warmup_steps="10"), "warmup_steps='10'"),
        (dict(layer=0), "layer=0.*1..num_layers=12"),
        (dict(layer=13), "layer=13"),
        (dict(layer=1.0), "layer=1.0"),
        (dict(step=-1), "step=-1"),
        (dict(step=2.5), "step=2.5"),
        (dict(num_layers=0), "num_layers=0"),
        (dict(num_layers=True), "num_layers=True"),
    ],
)
def test_refusals(kwargs, needle):
    args = dict(schedule="linear", layer=3, step=5, warmup_steps=10.0, num_layers=12)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        alpha(**args)


def test_static_schedules_still_check_T_when_given():
    with pytest.raises(ValueError, match="warmup_steps=0.0"):
        alpha("fix-inv-depth", 1, 0, 0, 4)
    with pytest.raises(ValueError, match="num_layers=0"):
        alpha_table("linear", 0, 1.0, 0)


def test_pure_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, prores_megatron.core.schedules as s, prores_megatron;"
        "assert s.alpha('linear', 1, 1, 1, 1) == 1;"
        "bad = [m for m in sys.modules if m.startswith(('torch', 'megatron'))];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
