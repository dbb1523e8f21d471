"""KV-cache decoding equals recomputing the whole sequence (tokens and logits), and sampling rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g2vlm_jax import config as c
from g2vlm_jax.inference import generate as gen
from g2vlm_jax.model.g2vlm import G2VLM
from g2vlm_jax.tokenizer import load_tokenizer

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    model = G2VLM(c.tiny_model(use_vit=True), rngs=nnx.Rngs(3))
    # dino2llm starts at zero (SPEC 1.3); give it weights so the geometry tokens shape the answer.
    model.dino2llm.kernel.set_value(jax.random.normal(jax.random.key(1), model.dino2llm.kernel.shape) * 0.05)
    tok = load_tokenizer("sentencepiece:builtin")
    rng = np.random.default_rng(0)
    prompts = [gen.Prompt(q, rng.random((2, 28, 42, 3), np.float32), rng.random((1, 56, 56, 3), np.float32))
               for q in ("How far is the red box from the camera?", "Which is closer, A or B? Answer with the letter.")]
    return model, tok, prompts


def _full_recompute_logits(model, tok, prompts, answers):
    """Logits predicting the token after `answers[b]`, from a forward pass over the whole sequence."""
    pb = gen.prompt_batch(tok, prompts, answers)
    out = model(pb.batch, compute_geometry=False)
    # The last answer token is the last semantic token of the row in reading order.
    return np.asarray(out.logits)[np.arange(len(prompts)), pb.last_slot]


def test_cached_decoding_matches_full_recompute(setup):
    model, tok, prompts = setup
    # The two prompts differ in length: rows of one batch continue from different positions.
    pb = gen.prompt_batch(tok, prompts)
    assert pb.next_order[0] != pb.next_order[1]
    out = gen.generate(model, tok, prompts, max_new_tokens=STEPS, keep_logits=True)
    steps = out.logits.shape[1]
    assert out.logits.shape == (2, steps, 512) and steps >= 3, "too few decoding steps to compare"
    compared = 0
    for k in range(steps):
        answers = [ids[:k] for ids in out.token_ids]
        if any(len(a) < k for a in answers):  # a row already stopped at <|im_end|>
            break
        full = _full_recompute_logits(model, tok, prompts, answers)
        np.testing.assert_allclose(out.logits[:, k], full, atol=1e-4, rtol=1e-4)
        # Greedy: the generated token is the argmax of the full-sequence logits.
        for b in range(2):
            if k < len(out.token_ids[b]):
                assert out.token_ids[b][k] == int(np.argmax(full[b]))
        compared += 1
    assert compared >= 3


def test_prefill_geometry_equals_plain_forward(setup):
    model, tok, prompts = setup
    pb = gen.prompt_batch(tok, prompts)
    plain = model(pb.batch, compute_logits=False)
    got = gen.generate(model, tok, prompts, max_new_tokens=1)
    np.testing.assert_allclose(got.geometry["camera_poses"], np.asarray(plain.geometry["camera_poses"]), atol=1e-5)


def test_sampling_rules():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert int(gen.sample_token(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0
    # top_p 0.7: only tokens 0 and 1 (mass 0.8 >= 0.7) can be drawn.
    draws = {int(gen.sample_token(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
    assert draws == {0, 1}
    # top_p tiny keeps only the most likely token; temperature sampling reaches all tokens.
    assert {int(gen.sample_token(logits, jax.random.key(i), 1.0, 1e-6)[0]) for i in range(50)} == {0}
    assert {int(gen.sample_token(logits, jax.random.key(i), 2.0, 1.0)[0]) for i in range(400)} == {0, 1, 2, 3}


def test_bad_requests_are_named(setup):
    model, tok, prompts = setup
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(model, tok, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(model, tok, prompts, max_new_tokens=2, top_p=0.0)
    odd = gen.Prompt("q", np.zeros((3, 28, 42, 3), np.float32), prompts[0].sem_images)
    with pytest.raises(ValueError, match="same image shapes"):
        gen.prompt_batch(tok, [prompts[0], odd])
