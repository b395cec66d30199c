"""Loading the frozen LM: the compute dtype each device runs natively, and 4-bit that really is smaller."""
import gc
import shutil

import pytest
import torch

from conftest import tiny_config
from model.grounded import GroundedLM
from model.lm import compute_dtype_for, dequantized, load_lm, native_bf16


def test_bf16_computes_where_it_is_native_and_fp32_elsewhere():
    cpu = torch.device("cpu")
    assert compute_dtype_for(cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert compute_dtype_for(cpu, "bfloat16") == compute_dtype_for(cpu), "bf16 is never emulated"
    assert compute_dtype_for(cpu, "float32") == torch.float32
    assert compute_dtype_for(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="compute dtype"):
        compute_dtype_for(cpu, "float16")


def test_a_4bit_lm_keeps_no_full_precision_weights(tiny_lm_dir, tmp_path):
    folder = shutil.copytree(tiny_lm_dir, tmp_path / "lm")  # a file no other test's model maps
    model, _ = load_lm(str(folder), "4bit", "cpu")
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert str(folder / "model.safetensors") not in maps.read(), \
            "the full-precision file is still mapped: a tensor of it is still referenced"
    linear = model.model.layers[0].mlp.up_proj
    assert linear.weight.dtype == torch.uint8 and linear.weight.numel() * 2 == 64 * 32, "4 bits per weight"
    assert linear.compute_dtype == compute_dtype_for(torch.device("cpu"))


def test_a_checkpoint_loads_as_it_was_trained(tiny_lm_dir, tiny_clip_dir, tmp_path):
    trained = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu",
                         compute_dtype="float32")
    assert (trained.config.quantize, trained.config.compute_dtype) == ("none", "float32")
    trained.save_pretrained(tmp_path / "ckpt")
    loaded = GroundedLM.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert (loaded.config.quantize, loaded.config.compute_dtype) == ("none", "float32")
    assert not hasattr(loaded.lm.model.layers[0].mlp.up_proj, "quant_state")
    four_bit = GroundedLM.from_pretrained(tmp_path / "ckpt", quantize="4bit", device="cpu")
    assert four_bit.config.quantize == "4bit", "an explicit choice overrides the checkpoint's"


def test_dequantised_once_computes_what_the_4bit_lm_computes_on_a_batch(tiny_lm_dir):
    model, tokenizer = load_lm(str(tiny_lm_dir), "4bit", "cpu", compute_dtype="float32")
    ids = tokenizer(["a small red circle", "the quick brown fox"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        # in training mode, as a trainer would call it: bitsandbytes' path that dequantises at each call (in eval
        # mode on an AVX512-BF16 CPU a call without gradient repacks the weights for an inference-only kernel)
        four_bit = model.train()(ids).logits
        plain = dequantized(model.eval())(ids).logits
    assert torch.equal(four_bit, plain)
    assert not any(p.requires_grad for p in model.parameters()), "still frozen"
