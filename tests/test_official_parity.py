"""The public paths against the official G2VLM PyTorch code (issue #17).

tests/golden/official/ holds a tiny G2VLM in the official release layout (seeded random weights, a
tiny Qwen2-style tokenizer) and what the official code computes with it (`recon`, `chat_with_recon`,
`Pi3Loss`, float32 on CPU); tools/official_reference.py makes both, README.md there says how. These
tests run the commands and functions a user runs -- `g2vlm convert --official`, `g2vlm reconstruct`,
`g2vlm chat`, `generate`, the training loss -- and compare with those arrays. No torch here.
"""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from data_pipelines import sequence
from g2vlm_jax import cli, convert, losses
from g2vlm_jax.batch import TOKEN_TEXT, GeometryTruth
from g2vlm_jax.config import LossConfig
from g2vlm_jax.inference import chat, load, reconstruct
from g2vlm_jax.inference import generate as gen
from g2vlm_jax.metrics import pose
from g2vlm_jax.tokenizer import load_tokenizer
from tests.parity import TOLERANCE, relative_error

OFFICIAL = pathlib.Path(__file__).parent / "golden" / "official"
CKPT = OFFICIAL / "tiny_g2vlm"
RGB = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pi3_room" / "rgb"
FLOAT32 = ["--set", "model.compute_dtype=float32"]


@pytest.fixture(scope="module")
def ref():
    return np.load(OFFICIAL / "reference.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The README's import: `g2vlm convert --official DIR --out OUT` (float32 to compare at 1e-4)."""
    out = tmp_path_factory.mktemp("official") / "tiny_g2vlm"
    assert cli.main(["convert", "--official", str(CKPT), "--out", str(out), "--dtype", "float32"]) == 0
    return out


def _files(ref, key):
    return [RGB / name for name in str(ref[key]).split(",")]


def test_prompts_are_the_official_token_ids_and_positions(ref):
    """Reconstruction and chat prompts: token for token and position for position the official ones."""
    tok = load_tokenizer(f"qwen2:{CKPT}")
    assert [tok.special.im_start, tok.special.im_end, tok.special.vision_start, tok.special.vision_end] == \
        list(ref["meta_special_ids"][:4])
    v, _, h, w = ref["recon_images"].shape
    recon = sequence.recon_sample(tok, v, h, w, bos=True)
    text = recon.token_type == TOKEN_TEXT
    np.testing.assert_array_equal(recon.token_ids[text], np.concatenate([ref["recon_prefill_ids"],
                                                                         ref["recon_geo_text_ids"]]))
    np.testing.assert_array_equal(recon.positions, np.concatenate([ref["recon_prefill_positions"],
                                                                   ref["recon_geo_positions"]], axis=1))
    # Chat: system/user prefix, geometry frames, each semantic image, question + assistant turn, then "\n".
    geo = np.zeros(ref["chat_geo_pixels"].shape, np.float32).transpose(0, 2, 3, 1)
    grid = ref["chat_vit0_grid_thw"]
    sem = np.zeros((2, grid[1] * 14, grid[2] * 14, 3), np.float32)
    prompt = gen.prompt_sample(tok, gen.Prompt(str(ref["chat_prompt"]), geo, sem))
    text = prompt.token_type == TOKEN_TEXT
    parts = ["chat_stage0", "chat_geo", "chat_vit0", "chat_vit1", "chat_stage1"]
    want_ids = [ref["chat_stage0_ids"], ref["chat_geo_text_ids"], ref["chat_vit0_text_ids"], ref["chat_vit1_text_ids"],
                ref["chat_stage1_ids"], ref["chat_start_token"]]
    np.testing.assert_array_equal(prompt.token_ids[text], np.concatenate(want_ids))
    want_positions = [ref[f"{p}_positions"] for p in parts] + [ref["chat_start_position"]]
    np.testing.assert_array_equal(prompt.positions, np.concatenate(want_positions, axis=1))


def test_reconstruct_matches_the_official_recon(ref, converted, tmp_path):
    """`g2vlm reconstruct` on the converted checkpoint: the official pixels, depth (local z) and c2w poses;
    `reconstruct.predict` (the library call) also local and world points."""
    images = tmp_path / "images"
    images.mkdir()
    for f in _files(ref, "meta_image_files"):
        (images / f.name).write_bytes(f.read_bytes())
    width = int(ref["meta_dino_width"])
    loaded = reconstruct.load_images(reconstruct.list_images(images), width)
    np.testing.assert_array_equal(loaded, np.rint(ref["recon_images"].transpose(0, 2, 3, 1) * 255).astype(np.uint8))
    out = tmp_path / "recon"
    assert cli.main(["reconstruct", "--checkpoint", str(converted), "--images", str(images), "--width", str(width),
                     "--out", str(out), *FLOAT32]) == 0
    cameras = json.loads((out / "cameras.json").read_text())
    c2w = np.array([view["c2w"] for view in cameras["views"]])
    assert relative_error(c2w, ref["recon_camera_poses"][0]) < TOLERANCE
    depth = np.stack([np.load(out / "depth" / f"{i:04d}.npy") for i in range(len(c2w))])
    assert relative_error(depth, ref["recon_local_points"][0, ..., 2]) < TOLERANCE

    cfg, model = load.load_model(converted, ["model.compute_dtype=float32"])
    pred = reconstruct.predict(model, load_tokenizer(cfg.data.tokenizer), loaded)
    assert relative_error(pred["local_points"], ref["recon_local_points"][0]) < TOLERANCE
    assert relative_error(pred["world_points"], ref["recon_points"][0]) < TOLERANCE


def test_chat_matches_the_official_chat_with_recon(ref, converted, capsys):
    """Greedy chat: every step's logits and the generated ids of the official decode loop, and the text
    `g2vlm chat` prints. The official semantic transform resizes with PIL `(h, w)`, i.e. h wide."""
    files = _files(ref, "meta_chat_image_files")
    vit_h, vit_w = (int(x) for x in ref["meta_vit_size"])
    sem_size = (vit_w, vit_h)  # (height, width) of what the official ViT saw
    cfg, model = load.load_model(converted, ["model.compute_dtype=float32"])
    geo = reconstruct.load_images(files, int(ref["meta_dino_width"])).astype(np.float32) / 255
    sem = chat.load_semantic_images([str(f) for f in files], sem_size)
    steps = len(ref["chat_generated_ids"])
    out = gen.generate(model, load_tokenizer(cfg.data.tokenizer), [gen.Prompt(str(ref["chat_prompt"]), geo, sem)],
                       max_new_tokens=steps, keep_logits=True)
    # Official row i: logits after feeding ids[i] (ids[0] is the "\n" start token); ours: step i's logits.
    assert relative_error(out.logits[0], ref["chat_logits"]) < TOLERANCE
    assert out.token_ids[0][:steps - 1] == list(ref["chat_generated_ids"][1:])

    height, width = geo.shape[1:3]
    assert cli.main(["chat", "--checkpoint", str(converted), "--question", str(ref["chat_prompt"]),
                     "--images", *map(str, files), "--max-new-tokens", str(steps - 1), *FLOAT32,
                     "--set", f"data.image_size={height},{width}", "--set", f"data.vit_image_size={sem_size[0]},{sem_size[1]}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(ref["chat_text"]).strip()


def test_training_loss_matches_the_official_pi3_loss(ref):
    """Every term of the visual-geometry loss on the official Pi3Loss inputs: 2 samples with different
    valid pixels (the point losses are pixel-weighted), the normal loss enabled for one of them, invalid
    pixels with finite depth (edges from the raw GT). Compared with the official loss with its GT scale
    in float32 (the shipped code rounds it to bf16, which moves the translation term by ~1e-3)."""
    names = str(ref["loss_view_infos"]).split(",")
    b, v = ref["loss_extrinsics"].shape[:2]
    enabled = np.array([names[i * v].split("/")[0] in ("scannet", "scannetpp", "hypersim") for i in range(b)])
    assert enabled.tolist() == [True, False]
    gt = GeometryTruth(world_points=jnp.asarray(ref["loss_world_points"]), valid=jnp.asarray(ref["loss_point_masks"]),
                       poses=jnp.asarray(ref["loss_extrinsics"]), normal_loss_enabled=jnp.asarray(enabled),
                       sample_valid=jnp.ones((b,), bool))
    pred = {"local_points": jnp.asarray(ref["loss_pred_local_points"]),
            "global_points": jnp.asarray(ref["loss_pred_global_points"]),
            "camera_poses": jnp.asarray(ref["loss_pred_camera_poses"])}
    loss, details = losses.visual_geometry_loss(pred, gt, LossConfig(subtract_floors=False))
    official = {"local": "local_pts_loss", "normal": "normal_loss", "global": "global_pts_loss",
                "cam_trans": "trans_loss", "cam_rot": "rot_loss", "scale": "scale"}
    for ours, theirs in official.items():
        want = np.mean(ref[f"loss_{theirs}_fp32gt"])
        assert abs(float(details[ours]) - want) <= TOLERANCE * abs(want), (ours, float(details[ours]), want)
    assert abs(float(loss) - float(ref["loss_total_fp32gt"])) <= TOLERANCE * float(ref["loss_total_fp32gt"])
    assert abs(float(loss) - float(ref["loss_total"])) <= 1e-3 * float(ref["loss_total"])  # the shipped bf16 scale


def test_official_checkpoint_round_trips_exactly(converted, tmp_path):
    """official -> ours (float32) -> official: every tensor bitwise, the config JSONs equal."""
    out = tmp_path / "again"
    assert cli.main(["convert", "--to-official", "--checkpoint", str(converted), "--out", str(out),
                     "--dtype", "float32"]) == 0
    # Readable by others as any written file (safetensors' own writer leaves 0600).
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "text_config.json").stat().st_mode & 0o777
    before, after = load_file(str(CKPT / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    for name in convert.CONFIG_FILES:
        assert json.loads((out / name).read_text()) == json.loads((CKPT / name).read_text()), name


@pytest.mark.parametrize("case", ["recon", "perturbed8"])
def test_pose_metrics_match_the_official_metric_code(ref, case):
    """The evaluator's pose metrics against the official modeling/g2vlm/metric.py (camera_to_rel_deg +
    calculate_auc_np): the same pairs (i < j) in the same order, per-pair errors to float32 accuracy, the
    same AUC. (The official torch `calculate_auc` bins 31 x 30/31 degrees and gives other values; the
    VGGT-style evaluation reports the numpy one, 1-degree bins.)"""
    pred, gt = ref[f"metric_{case}_pred_c2w"], ref[f"metric_{case}_gt_c2w"]
    r_err, t_err = pose.pose_errors(pred, gt)
    np.testing.assert_allclose(r_err, ref[f"metric_{case}_r_error"], atol=1e-3)
    np.testing.assert_allclose(t_err, ref[f"metric_{case}_t_error"], atol=1e-3)
    got = pose.relative_pose_metrics(pred, gt)
    for tau in (5, 15, 30):
        assert got[f"auc@{tau}"] == pytest.approx(100 * float(ref[f"metric_{case}_auc_np_{tau}"]), abs=1e-4)
    if case == "perturbed8":
        assert 0 < got["auc@30"] < 100 and len(r_err) == 28  # errors span the thresholds: a real comparison
