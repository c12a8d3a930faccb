"""family(): which family runs a model, from its name or config.json, without loading weights."""

import json

import pytest
import torch

from hub_sae.models import FAMILIES, family, family_of_config, load_base_model


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "llada", "architectures": ["LLaDAModelLM"]}, "llada"),
        ({"model_type": "Dream", "architectures": ["DreamModel"]}, "dream"),
        ({"model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"]}, "mlm"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, "mlm"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "ar"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "ar"),
    ],
)
def test_family_of_a_config(tmp_path, config, expected):
    assert family_of_config(config) == expected
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert family(str(tmp_path)) == expected


def test_family_of_known_names_needs_no_file():
    assert family("minilm") == "mlm"
    assert family("GSAI-ML/LLaDA-8B-Base") == family("GSAI-ML/LLaDA-8B-Instruct") == "llada"
    assert family("Dream-org/Dream-v0-Base-7B") == "dream"
    assert family("Qwen/Qwen2.5-7B") == "ar"
    assert set(FAMILIES) == {"llada", "dream", "mlm", "ar"}


def test_family_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        family(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        family(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a model_type nor architectures"):
        family(str(tmp_path))


def test_align_shifts_only_shifted_families():
    base = load_base_model()
    assert base.family == "mlm" and not base.shifted
    logits = torch.arange(12.0).view(1, 3, 4)
    assert base.align(logits) is logits
    shifted = base.__class__(**{**base.__dict__, "family": "dream"})
    aligned = shifted.align(logits)
    assert torch.equal(aligned[:, 1:], logits[:, :-1]) and torch.equal(aligned[:, 0], logits[:, 0])
