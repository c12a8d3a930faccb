"""SuiteInfo, the schema of suite.json: defaults, round trip, and a clear error for a bad file."""

import json
from pathlib import Path

import pytest
import torch

from hub_sae import TopKSAE
from hub_sae.masking import Corruption
from hub_sae.suite import (
    SUITE_FILE,
    SUITE_VERSION,
    SuiteError,
    SuiteInfo,
    layer_folders,
    read_suite,
    save_suite,
)

INFO = dict(base_model="minilm", policy="mask", layers=[3, 1, 5], ks=[8, 4], d_in=16, d_sae=32)


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    info = SuiteInfo(**INFO)
    assert (info.layers, info.ks, info.default_layer, info.default_k) == ([1, 3, 5], [4, 8], 3, 4)
    assert (info.version, info.hookpoint, info.corruption) == (1, "resid_post", Corruption())
    assert info.folder(3, 8) == "layer_3/k_8"
    assert SuiteInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    data = info.heldout()
    assert (data.corpus, data.split, data.ctx_len, info.eval_tokens, info.dtype) == (
        "pydoc",
        "heldout",
        128,
        16_384,
        "float32",
    )


def test_default_k_is_what_readers_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saes = {(layer, k): TopKSAE(16, 32, k, layer=layer) for layer in (1, 3, 5) for k in (4, 8)}
    save_suite(tmp_path, saes, {}, SuiteInfo(**INFO, default_k=8))
    assert TopKSAE.from_pretrained(tmp_path).k == 8
    assert {sae.k for sae in TopKSAE.load_suite(tmp_path).values()} == {8}
    assert TopKSAE.from_pretrained(tmp_path, layer=1, k=4).k == 4
    assert sorted(layer_folders(tmp_path)) == sorted(saes)


def test_save_suite_refuses_saes_that_do_not_match_the_info(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not every \\(layer, k\\)"):
        save_suite(tmp_path / "s", {(1, 4): TopKSAE(16, 32, 4, layer=1)}, {}, SuiteInfo(**INFO))
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        (b"\xff\xfe\x00binary", "is not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({**INFO, "ks": [8, "16/../../../../victim"]}, "`ks` holds \\['16/../../../../victim'\\]"),
        ({**INFO, "layers": [1.5]}, "`layers` holds \\[1.5\\]"),
        ({**INFO, "ks": [True]}, "`ks` holds \\[True\\]"),
        ({**INFO, "layers": []}, "`layers` must be a non-empty list"),
        ({**INFO, "d_sae": "32"}, "`d_sae` must be a positive integer"),
        ({k: v for k, v in INFO.items() if k != "base_model"}, "missing `base_model`"),
        ({**INFO, "policy": "masked"}, "`policy` 'masked' is not one of"),
        ({**INFO, "default_k": 16}, "`default_k` 16 is not in `ks`"),
        ({**INFO, "version": SUITE_VERSION + 1}, "newer than this hub-sae reads .* pip install -U"),
        ({**INFO, "corruption": {"schedule": "cosine"}}, "unknown corruption schedule"),
        ({**INFO, "corruption": {"t_minimum": 0.1}}, "unexpected keyword argument 't_minimum'"),
        ({**INFO, "training": {"eval_tokens": -5}}, "`training.eval_tokens` must be an integer"),
        ({**INFO, "training": {"dtype": "nn"}}, "`training.dtype` must be one of"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"d_in": ' + "9" * 5000 + "}", r"Exceeds the limit \(4300 digits\)"),
    ],
)
def test_a_bad_suite_json_is_named_with_the_fix(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / SUITE_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SuiteError, match=message) as error:
        read_suite(tmp_path)
    assert str(path) in str(error.value)
    assert "train the suite again" in str(error.value)
