"""Runtime tokenization and CLIP preprocessing equal transformers' (the baseline's) exactly."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.clip_image import clip_pixel_values
from runtime.text import ClipTokenizer

PROMPTS = ["a photo of an astronaut!!", "", "Hello   World  ÉCOLE café", " ".join(["word"] * 100),
           "x, y; z: (1girl) <lora:foo>, 4k", "emoji 🙂 and ünïcödé"]


@pytest.mark.parametrize("sub", ["tokenizer", "tokenizer_2"])
def test_tokenizer_equals_transformers(tiny_weights, sub):
    from transformers import CLIPTokenizer

    folder = tiny_weights / "stable-diffusion-xl-base-1.0" / sub
    ours = ClipTokenizer(folder)(PROMPTS)
    want = CLIPTokenizer.from_pretrained(folder)(PROMPTS, padding="max_length", max_length=77,
                                                 truncation=True).input_ids
    assert ours.shape == (len(PROMPTS), 77) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, np.array(want))
    assert ours[0, 0] == 49406 and ours[3, 76] == 49407  # BOS; a truncated prompt still ends with EOS


def test_clip_preprocessing_equals_clip_image_processor():
    from skimage import data
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()
    astronaut = data.astronaut()
    for rgb in (astronaut, astronaut[:300, :451], astronaut[:451, :300], data.chelsea()):
        rgb = np.ascontiguousarray(rgb)
        want = processor(images=Image.fromarray(rgb), return_tensors="np").pixel_values
        got = clip_pixel_values(rgb)
        assert got.shape == (1, 3, 224, 224)
        assert np.abs(got - want).max() < 1e-5
