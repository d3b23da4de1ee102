"""The precision recipes and the one weight quantizer behind them."""
from __future__ import annotations

import numpy as np
import pytest

from edgevl.cli import build_parser
from edgevl.export.quantizer import symmetric_weights
from edgevl.manifest import GRAPH_PRECISIONS
from edgevl.precisions import BUILD_PRECISIONS, EXPORT_PRECISIONS, INT4, build_recipe, export_recipe


def test_int8_per_column_by_hand():
    w = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 0.0]], np.float32)
    q, scale = symmetric_weights(w, 8)
    assert np.allclose(scale[:2], [2 / 127, 0.5 / 127]) and scale[2] > 0  # an all-zero column stays finite
    assert q.tolist() == [[64, -127, 0], [-127, 64, 0]]  # 1 / (2/127) = 63.5 rounds to even: 64


def test_int4_per_block_by_hand():
    w = np.array([[7.0], [-3.5], [0.7], [-0.1]], np.float32)  # two blocks of 2 rows
    q, scale = symmetric_weights(w, 4, block_size=2)
    assert np.allclose(scale[:, 0], [1.0, 0.1]) and q[:, 0].tolist() == [7, -4, 7, -1]  # -3.5 rounds to even


@pytest.mark.parametrize("bits, block", [(8, None), (4, 32)])
def test_error_is_within_half_a_step(bits, block):
    w = np.random.default_rng(0).normal(size=(128, 48)).astype(np.float32)
    q, scale = symmetric_weights(w, bits, block)
    step = scale if block is None else np.repeat(scale, block, axis=0)
    assert np.abs(q).max() <= (1 << (bits - 1)) - 1
    assert np.all(np.abs(q * step - w) <= step / 2 + 1e-7)


def test_export_recipes_name_manifest_precisions():
    for recipe in EXPORT_PRECISIONS.values():
        assert recipe.vision in GRAPH_PRECISIONS and recipe.decoder in GRAPH_PRECISIONS
        assert recipe.kv_layout in ("concat", "shared")
    assert EXPORT_PRECISIONS["int4"].decoder_weights == INT4 and INT4.bytes_per_weight(4) == 0.5 + 4 / 128


def test_the_cli_offers_exactly_the_tables():
    parser = build_parser()
    for command, table in (("export", EXPORT_PRECISIONS), ("build", BUILD_PRECISIONS)):
        sub = parser._subparsers._group_actions[0].choices[command]
        precision = next(a for a in sub._actions if a.dest == "precision")
        assert list(precision.choices) == list(table)


def test_unknown_precisions_name_the_choices():
    with pytest.raises(ValueError, match=r"precision='int2': expected one of \('fp32', 'fp16', 'int8', 'int4'\)"):
        export_recipe("int2")
    with pytest.raises(ValueError, match=r"expected one of \('fp16', 'int8', 'int8-vision-fp16-llm'"):
        build_recipe("fp32")
