import numpy as np
import torch
from PIL import Image

from grto_cli.core.policy import (completion_logprobs, completion_mask, encode_prompts, load_policy, repeat_prompts,
                                  sampling_config)


def test_completion_mask_stops_after_first_eos_even_when_pad_is_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 2, 2],   # pad == eos: the first EOS counts, the rest do not
                        [5, 2, 7, 8, 9],   # garbage after EOS is masked
                        [5, 6, 7, 8, 9]])  # no EOS: everything counts
    assert completion_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_recomputed_logprobs_match_sampling_logits(tiny_system):
    """Left-padded prompts of different lengths, repeated per rollout, temperature != 1: the
    training-time log-probs must equal the log-softmax of the logits the sampler used."""
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    batch = encode_prompts(policy, _images(2), ["the red circle", "the shape left of the blue square"])
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    batch = repeat_prompts(batch, 3)
    temperature = 0.7
    torch.manual_seed(0)
    cfg = sampling_config(policy, 10, temperature=temperature)
    cfg.output_logits, cfg.return_dict_in_generate = True, True
    out = policy.model.generate(**batch, generation_config=cfg)
    completion = out.sequences[:, batch["input_ids"].shape[1]:]
    mask = completion_mask(completion, policy.eos_token_id)
    sampled = torch.stack([torch.log_softmax(l.float() / temperature, -1) for l in out.logits], 1)
    expected = sampled.gather(-1, completion[..., None]).squeeze(-1) * mask
    with torch.no_grad():
        got = completion_logprobs(policy.model, batch, completion, mask, temperature)
    assert torch.allclose(got, expected, atol=1e-4)
    # At another temperature the numbers differ: the test would catch a missing `/ T`.
    with torch.no_grad():
        wrong = completion_logprobs(policy.model, batch, completion, mask, 1.0)
    assert not torch.allclose(wrong, expected, atol=1e-3)


def test_repeat_prompts_repeats_each_images_patch_block(tiny_system):
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    batch = encode_prompts(policy, _images(2), ["a", "b"])
    rep = repeat_prompts(batch, 2)
    n = batch["pixel_values"].shape[0] // 2
    first, second = batch["pixel_values"][:n], batch["pixel_values"][n:]
    assert torch.equal(rep["pixel_values"], torch.cat([first, first, second, second]))
    assert torch.equal(rep["input_ids"][1], batch["input_ids"][0])


def test_sampling_config_ignores_checkpoint_defaults(tiny_system):
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    policy.model.generation_config.top_k = 50
    policy.model.generation_config.repetition_penalty = 1.3
    cfg = sampling_config(policy, 8, temperature=1.0)
    assert cfg.top_k == 0 and cfg.top_p == 1.0 and cfg.repetition_penalty == 1.0
