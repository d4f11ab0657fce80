"""Zero-shot pieces: prompts from class names, and scores as cosines of projected features
(the end-to-end zero-shot run is in test_evaluate.py)."""

from __future__ import annotations

import pytest
import torch

from pacl_ray.evaluation import zeroshot
from pacl_ray.evaluation.tasks import TaskSpecError


def test_class_prompts_and_names():
    assert zeroshot.class_prompts("A photo with {} emotion.", ["Doubt/Confusion", "awe"]) == [
        "A photo with doubt or confusion emotion.", "A photo with awe emotion."]
    assert zeroshot.class_prompts("The photo makes me feel so [C]!", ["sad"]) == ["The photo makes me feel so sad!"]
    with pytest.raises(TaskSpecError, match="exactly one"):
        zeroshot.class_prompts("no slot", ["a"])


def test_zero_shot_scores_are_cosines_of_projected_features():
    image_proj = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # E=2, Dv=3
    images = torch.tensor([[2.0, 0.0, 5.0], [0.0, -3.0, 1.0]])
    texts = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]), dim=-1)
    scores = zeroshot.zero_shot_scores(images, texts, image_proj)
    expected = torch.tensor([[1.0, 2 ** -0.5, 0.0], [0.0, -(2 ** -0.5), 1.0]])
    torch.testing.assert_close(scores, expected)
