"""Broken checkpoint folders give clear errors of the right type, naming what is wrong.

Each test damages one thing in a freshly written tiny checkpoint (config.json, the
weight files, one tensor) and checks the exception type and that its message names
the file, tensor or field at fault.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.config import ModelConfig, ModelConfigError, UnsupportedModelError
from models.loader import load_model
from models.safetensors_loader import CheckpointError, load_safetensors_params
from tests.tiny_checkpoints import write_tiny_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    """A fresh untied llama checkpoint folder (single model.safetensors)."""
    write_tiny_checkpoint(tmp_path, "llama", seed=int.from_bytes(os.urandom(2), "little"))
    return tmp_path


def load(path) -> dict:
    config = ModelConfig.from_pretrained(str(path))
    return load_safetensors_params(str(path), config, jnp.float32, progress=False)


def rewrite_tensors(path, edit) -> None:
    """Rewrite model.safetensors after ``edit(tensors: dict[str, np.ndarray])`` changes it in place."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_missing_config_json(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_model(str(ckpt))


def test_corrupt_config_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    with pytest.raises(ModelConfigError, match=r"config.json is not valid JSON"):
        load_model(str(ckpt))


def test_unknown_architecture(ckpt):
    d = json.loads((ckpt / "config.json").read_text())
    d.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(UnsupportedModelError, match="'falcon'.*FalconForCausalLM"):
        load_model(str(ckpt))


def test_missing_weights_file(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no safetensors weights in .*config\.json"):
        load_model(str(ckpt))  # the message lists what the folder does hold


def test_index_naming_a_missing_shard(tmp_path):
    write_tiny_checkpoint(tmp_path, "qwen2", max_shard_size="64KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))
    assert len(shards) > 1
    os.remove(tmp_path / shards[-1])
    with pytest.raises(CheckpointError, match=f"missing: \\['{shards[-1]}'\\]"):
        load(tmp_path)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_safetensors(ckpt, keep_fraction):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor '[\w.]+' ends at byte"):
        load(ckpt)


def test_truncated_inside_header(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or not a safetensors file"):
        load(ckpt)


def test_garbage_header(ckpt):
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = os.urandom(32)  # clobber the start of the JSON header
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load(ckpt)


def test_unused_tensors_of_any_dtype_are_ignored(ckpt):
    """Extra tensors the model does not read (unsigned integers, as torch saves buffers; a tag this loader has no
    numpy type for) load fine; reading such a tensor would be the error."""
    def add_extras(t):
        t["model.extra.buffer"] = np.zeros(4, np.uint32)
        t["model.extra.other"] = np.zeros(4, np.uint16)
    rewrite_tensors(ckpt, add_extras)
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    header = bytes(data[8:8 + int.from_bytes(data[:8], "little")])
    assert b'"U32"' in header and b'"U16"' in header
    data[8:8 + len(header)] = header.replace(b'"U16"', b'"F4X"')  # same length: another format's tag
    file.write_bytes(bytes(data))
    params = load(ckpt)
    assert params["layers"]["wq"].shape[0] == 2


def test_missing_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*layers/w_up"):
        load(ckpt)


def test_missing_lm_head_when_untied(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensor 'lm_head\.weight'"):
        load(ckpt)


def test_lm_head_ignored_when_tied(ckpt):
    """A tied config reads the embedding only, even if the file also carries lm_head.weight."""
    d = json.loads((ckpt / "config.json").read_text())
    d["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(d))
    params = load(ckpt)
    assert "lm_head" not in params
    np.testing.assert_array_equal(params["embed"], load_file(str(ckpt / "model.safetensors"))["model.embed_tokens.weight"])


def test_shape_disagreeing_with_config_names_both_shapes(ckpt):
    d = json.loads((ckpt / "config.json").read_text())
    d["intermediate_size"] = 128  # the checkpoint was written with 96
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError,
                       match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' .* shape \[96, 64\] .* implies \[128, 64\]"):
        load(ckpt)


def test_wrong_shape_of_one_tensor(ckpt):
    name = "model.layers.1.self_attn.k_proj.weight"  # [kv heads * head_dim, hidden] = [64, 64]

    def drop_one_head(t):
        t[name] = np.ascontiguousarray(t[name][:32])
    rewrite_tensors(ckpt, drop_one_head)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' .* shape \[32, 64\] .* implies \[64, 64\]"):
        load(ckpt)


def test_a_gguf_file_named_as_safetensors_says_so(tmp_path):
    """A .gguf with load_format='safetensors' was read as a config.json ("not valid JSON")."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="is a GGUF file: load it with load_format 'gguf' or 'auto'"):
        load_model(str(path), load_format="safetensors")
