"""The embedded default's policy warm-up loss: plain next-token cross-entropy, or distance-aware
targets on coordinate tokens."""

import pytest
import torch

from grto_cli.core.pretrain import coordinate_tokens, sft_loss
from grto_cli.core.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(1200)


def test_coordinate_tokens_are_whole_numbers_by_spelling(tokenizer):
    coords = coordinate_tokens(tokenizer)
    for space in (False, True):
        ids, values = coords[space]
        assert len(ids) > 60 and set(range(64)) <= {int(v) for v in values}
        for i, v in zip(ids.tolist(), values.tolist()):
            text = tokenizer.convert_ids_to_tokens(i)
            assert text == ("Ġ" if space else "") + str(int(v))


def test_without_sigma_it_is_the_models_own_loss(tokenizer):
    torch.manual_seed(0)
    V = len(tokenizer)
    logits = torch.randn(2, 7, V)
    labels = torch.randint(0, V, (2, 7))
    labels[0, :3] = -100
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    assert torch.allclose(sft_loss(logits, labels, coordinate_tokens(tokenizer)), expected, atol=1e-6)


def test_distance_aware_targets_give_credit_for_a_near_miss(tokenizer):
    """The answer's coordinate is 30. A model sure of 31 and one sure of 50 lose the same under
    cross-entropy; with sigma 2 the near miss loses less, and a sure 30 still loses least."""
    coords = coordinate_tokens(tokenizer)
    V = len(tokenizer)
    ids = {int(v): int(i) for i, v in zip(*coords[True])}
    labels = torch.tensor([[-100, ids[30]]])

    def sure_of(value):
        logits = torch.zeros(1, 2, V)
        logits[0, 0, ids[value]] = 12.0
        return logits

    plain = [sft_loss(sure_of(v), labels, coords).item() for v in (31, 50)]
    assert plain[0] == pytest.approx(plain[1])
    soft = {v: sft_loss(sure_of(v), labels, coords, sigma=2.0, mix=0.5).item() for v in (30, 31, 50)}
    assert soft[30] < soft[31] < soft[50]
    # a token that is not a coordinate keeps its one-hot target
    word = tokenizer.convert_tokens_to_ids("bbox")
    logits = torch.randn(1, 2, V)
    other = torch.tensor([[-100, word]])
    assert sft_loss(logits, other, coords, sigma=2.0) == pytest.approx(sft_loss(logits, other, coords).item())
