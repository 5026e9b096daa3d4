"""Attention maps in TensorBoard: the configured prompt, the images of a run, and the drawing's shortcut."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from callbacks.attention import DEFAULT_PROMPT, AttentionMaps, HeadGrid
from llm.errors import UserError
from tests.conftest import TINY, compose_config

LABELS = ["<|bos|>", "It", "▁is", "▁a", "▁truth"]


def test_the_prompt_is_the_first_sample_prompt_and_null_switches_it_off():
    cfg = compose_config([])
    assert instantiate(cfg.callbacks.attention).prompt == cfg.callbacks.samples.prompts[0]
    finetune = compose_config(["experiment=finetune"])
    assert instantiate(finetune.callbacks.attention).prompt == finetune.callbacks.samples.prompts[0]
    assert instantiate(compose_config(["callbacks.samples=null"]).callbacks.attention).prompt == DEFAULT_PROMPT
    assert compose_config(["callbacks.attention=null"]).callbacks.attention is None
    with pytest.raises(UserError, match="max_tokens"):
        AttentionMaps(max_tokens=0)


def test_each_image_is_what_a_full_draw_of_its_weights_gives():
    """The background drawn once and the maps drawn over it (blitting) give the pixels of a full redraw, and no
    trace of the layer drawn before."""
    torch.manual_seed(0)
    a, b = torch.rand(6, 5, 5).softmax(-1), torch.rand(6, 5, 5).softmax(-1)
    grid = HeadGrid(6, LABELS)
    grid(b, "layer 0")
    image = grid(a, "layer 1")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3

    grid.fig.canvas.draw()  # everything drawn again, with the last weights and title
    full = np.asarray(grid.fig.canvas.buffer_rgba())[..., :3]
    np.testing.assert_array_equal(image, full)
    assert not np.array_equal(image, HeadGrid(6, LABELS)(b, "layer 1"))  # the maps are in the image


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("attention") / "run"
    extra = ["callbacks.embeddings=null", "model.qk_norm=true"]
    train.train(compose_config([*TINY, *extra], run_dir=run_dir, cache_dir=data_cache))
    return run_dir


def test_a_run_logs_one_image_per_layer_at_every_validation(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = sorted(t for t in acc.Tags()["images"] if t.startswith("attention/"))
    assert tags == ["attention/layer_0", "attention/layer_1"]  # the debug model's 2 layers
    for tag in tags:
        # step 0 (before training), 3 and 6; the final validation of the best checkpoint (step 6) not twice
        events = acc.Images(tag)
        assert [e.step for e in events] == [0, 3, 6]
        first, last = (np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for e in (events[0], events[-1]))
        assert first.shape == last.shape and not np.array_equal(first, last)  # training changed the maps
