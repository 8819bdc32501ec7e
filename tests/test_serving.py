"""The registered model behind `mlflow models serve`: prompts in, PNGs out, bad requests
refused in one sentence without taking the server down; the champion rule; and
`dalle2 generate --model`. A tiny untrained model: these test the plumbing, not quality."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_pipeline_e2e import BIN, REPO, _free_port

from dalle2.clip import OpenClip, build_scratch_clip
from dalle2.config import load_config
from dalle2.decoder import DecoderStage
from dalle2.edges.cli import main
from dalle2.edges.registry import register
from dalle2.edges.serving import log_unclip_model
from dalle2.models import pack_clip, pack_prior, pack_stage
from dalle2.prior import DiffusionPrior

TINY = REPO / "tests" / "configs" / "tiny.yaml"
PROMPT = "a large red circle on a white background"


def build_models(
    root: Path, stages: list[DecoderStage] | None = None, clip: OpenClip | None = None
) -> Path:
    """A model folder laid out like a run's `models/` artifacts, from tiny.yaml's sizes
    (random weights unless trained `stages` and their `clip` are given)."""
    cfg = load_config(TINY)
    torch.manual_seed(0)
    if clip is None:
        clip = build_scratch_clip(cfg.clip.tower, [PROMPT, "a small blue square on a black sky"])
    pack_clip(clip).to_dir(root / "clip")
    pack_prior(DiffusionPrior(cfg.prior)).to_dir(root / "prior")
    if stages is None:
        stages = [DecoderStage(s) for s in cfg.decoder]
        with torch.no_grad():  # unets start with zero outputs: then no setting shows in pixels
            for param in (p for stage in stages for p in stage.parameters()):
                param.add_(0.05 * torch.randn_like(param))
    for i, stage in enumerate(stages):
        pack_stage(stage, i).to_dir(root / f"decoder_unet_{i}")
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A sqlite MLflow holding the tiny model as version 1 of `unclip`, @champion."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("serving", artifact_location=str(tmp / "artifacts"))
        with mlflow.start_run(experiment_id=exp):
            info = log_unclip_model(build_models(tmp / "models"))
        decision = register(info.model_uri, "tiny", 0.5, name="unclip", metric="m")
        assert (decision.version, decision.promoted) == ("1", True)
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def server(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow models serve -m models:/unclip@champion` on a free loopback port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the server execs uvicorn
    }
    command = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/unclip@champion"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(  # its own process group: the server and its uvicorn child
            command,
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"no server:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post(base: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{base}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def test_served_model_answers_with_pngs(server: str) -> None:
    rows = [{"prompt": PROMPT, "seed": 3}, {"prompt": "a red circle", "seed": 4}]
    status, reply = post(server, {"dataframe_records": rows})
    assert status == 200, reply
    images = [png(p["image"]) for p in reply["predictions"]]
    assert [(i.format, i.size, i.mode) for i in images] == [("PNG", (32, 32), "RGB")] * 2
    # the rows sample in one batch, each from its own seed: a prompt and seed give the same
    # image alone or beside others, up to a level of rounding where batches block the math
    # differently
    status, alone = post(server, {"dataframe_records": rows[:1]})
    one, batched = (np.asarray(png(r["predictions"][0]["image"]), np.int16) for r in (alone, reply))
    assert np.abs(one - batched).max() <= 2
    status, second = post(server, {"dataframe_records": rows[1:]})
    other = np.asarray(png(second["predictions"][0]["image"]), np.int16)
    assert np.abs(other - np.asarray(images[1], np.int16)).max() <= 2
    assert np.abs(other - one).mean() > 10, "another prompt and seed: another image"
    status, reply = post(
        server,
        {"dataframe_records": rows[:1], "params": {"guidance_scale": 4.0, "steps": 2}},
    )
    assert status == 200, reply
    assert reply["predictions"][0]["image"] != alone["predictions"][0]["image"]


def test_concurrent_requests_queue_for_the_sampler_and_keep_their_images(server: str) -> None:
    """The model's one sampler thread runs requests in turn (mlflow calls predict from worker
    threads): clients at once get what each gets alone."""
    bodies = [{"dataframe_records": [{"prompt": PROMPT, "seed": s}]} for s in range(4)]
    alone = [post(server, body)[1]["predictions"][0]["image"] for body in bodies]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda body: post(server, body), bodies))
    assert [status for status, _ in replies] == [200] * 4
    for (_, reply), image in zip(replies, alone, strict=True):
        got = np.asarray(png(reply["predictions"][0]["image"]), np.int16)
        assert np.abs(got - np.asarray(png(image), np.int16)).max() <= 2
    assert len(set(alone)) == 4, "each seed its own image"


# request -> words of the model's own one-sentence reason
BAD_REQUESTS = {
    "no prompts": ({"dataframe_split": {"columns": ["prompt"], "data": []}}, "at least one"),
    "empty prompt": ({"dataframe_records": [{"prompt": "   "}]}, "prompt 0 is empty"),
    "10,000 words": ({"dataframe_records": [{"prompt": "word " * 10_000}]}, "shorten it"),
    "number as prompt": ({"dataframe_records": [{"prompt": 5}]}, "not a string"),
    "too many steps": ({"inputs": {"prompt": [PROMPT]}, "params": {"steps": 10**6}}, "steps"),
    "negative guidance": (
        {"inputs": {"prompt": [PROMPT]}, "params": {"guidance_scale": -1.0}},
        "guidance_scale must be",
    ),
}
# refused by MLflow's own schema checks before the model sees them
SCHEMA_ERRORS = {
    "no prompt column": ({"dataframe_records": [{"seed": 1}]}, "prompt"),
    "text as seed": ({"dataframe_records": [{"prompt": PROMPT, "seed": "x"}]}, "seed"),
    "text as steps": ({"inputs": {"prompt": [PROMPT]}, "params": {"steps": "ten"}}, "steps"),
}


def test_bad_requests_are_refused_in_one_sentence_and_the_server_keeps_serving(
    server: str,
) -> None:
    for name, (body, words) in {**BAD_REQUESTS, **SCHEMA_ERRORS}.items():
        status, reply = post(server, body)
        assert 400 <= status < 500 and words in reply["message"], (name, status, reply)
        if name in BAD_REQUESTS:  # MLflow prefixes the data; then "Error: " and the reason
            reason = reply["message"].rsplit("\nError: ", 1)[-1]
            assert words in reason and "\n" not in reason and len(reason) < 200, (name, reason)
    status, reply = post(server, {"inputs": {"prompt": [PROMPT]}})
    assert status == 200 and png(reply["predictions"][0]["image"]).size == (32, 32)


def test_champion_moves_only_to_a_better_version(registry: str) -> None:
    """The alias rule on one logged model registered under several content ids."""
    uri = "models:/unclip/1"  # any model source registers; the rule reads tags and metrics
    name, metric = "rule", "unseen_captions/fidelity_all"

    def reg(content: str, value: float | None, greater: bool = True, eval_set: str = "s1"):
        return register(
            uri,
            content,
            value,
            name=name,
            metric=metric,
            greater_is_better=greater,
            eval_set=eval_set,
        )

    first = reg("a", 0.5)
    assert first.promoted and first.reason.startswith("no version held")
    worse = reg("b", 0.4)
    assert (worse.version, worse.promoted, worse.champion_value) == ("2", False, 0.5)
    better = reg("c", 0.7)
    assert better.promoted and "better than 0.5" in better.reason
    again = reg("c", 0.7)  # the same files again (a cached rerun): no new version
    assert (again.version, again.registered, again.promoted) == ("3", False, False)
    assert not reg("d", None).promoted, "a run without the metric never takes the alias"
    assert not reg("e", float("nan")).promoted
    assert not reg("f", 0.9, greater=False).promoted, "lower is better: 0.9 loses to 0.7"
    other = reg("g", 0.99, eval_set="s2")  # another dataset's or prompt set's figure
    assert not other.promoted and "evaluated on other data or prompts" in other.reason
    assert other.champion_value is None, "no figure from another set is compared"
    aliases = mlflow.MlflowClient().get_registered_model(name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "3"}


def test_generate_from_the_registered_model(registry: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["generate", PROMPT, "--model", "models:/unclip@champion", "--tracking-uri", registry]
    assert main([*argv, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert Image.open(out / "0000.png").size == (32, 32)
    argv[3] = "models:/unclip@nobody"
    assert main([*argv, "--out", str(out)]) == 2


def test_evaluation_set_names_the_data_split_and_prompts_a_metric_comes_from() -> None:
    from dalle2.config import parse_config
    from dalle2.edges.registry import evaluation_set

    base = parse_config({})
    same = evaluation_set(base, "md5-a")
    assert evaluation_set(parse_config({"eval": {"grid_size": 4}}), "md5-a") == same
    assert evaluation_set(base, "md5-b") != same, "other data"
    assert evaluation_set(parse_config({"data": {"holdout_fraction": 0.2}}), "md5-a") != same
    assert evaluation_set(parse_config({"eval": {"num_prompts": 8}}), "md5-a") != same


def test_cli_served_model_and_evaluate_draw_the_same_bytes(tmp_path: Path) -> None:
    """Every path draws through UnCLIP.generate: for one model, prompts and seeds, `dalle2
    generate`, the served model's predict and evaluate's images are the same bytes (a base
    stage drawing best_of 2, reranked by CLIP, included)."""
    from types import SimpleNamespace

    from dalle2.config import parse_config
    from dalle2.edges.serving import MODELS, UnclipModel
    from dalle2.evaluation import to_uint8
    from dalle2.recipes import evaluate as R
    from dalle2.unclip import UnCLIP

    unclip = UnCLIP.load(build_models(tmp_path / "models"))
    unclip.decoder.stages[0].cfg = unclip.decoder.stages[0].cfg.model_copy(update={"best_of": 2})
    folder = unclip.save(tmp_path / "best-of-2")
    prompts = [PROMPT, "a small blue square on a black sky", "a red circle"]

    def u8(images: torch.Tensor) -> list[np.ndarray]:
        return list(to_uint8(images).permute(0, 2, 3, 1).numpy())

    # the CLI: one generator seeded --seed for the whole batch
    out = tmp_path / "cli"
    argv = ["generate", *prompts, "--checkpoint", str(folder), "--seed", "3", "--out", str(out)]
    assert main([*argv, "--quiet", "--device", "cpu"]) == 0
    cli = [np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(3)]
    direct = u8(UnCLIP.load(folder).generate(prompts, seed=3).images)
    assert all(np.array_equal(a, b) for a, b in zip(cli, direct, strict=True))

    # the served model: a generator per row, seeded by the row's seed
    served = UnclipModel()
    served.load_context(SimpleNamespace(artifacts={MODELS: str(folder)}))
    reply = served.predict(None, pd.DataFrame({"prompt": prompts, "seed": [5, 6, 7]}))
    pngs = [np.asarray(png(b64)) for b64 in reply["image"]]
    direct = u8(UnCLIP.load(folder).generate(prompts, seeds=[5, 6, 7], batch_size=32).images)
    assert all(np.array_equal(a, b) for a, b in zip(pngs, direct, strict=True))

    # evaluate: eval.seed and eval.batch_size
    cfg = parse_config({"eval": {"num_prompts": 3, "batch_size": 2, "seed": 11}})
    model = UnCLIP.load(folder)
    with torch.no_grad():
        caption_embeds = model.clip.encode_text(prompts).embed
    reference = R.EvalReference(prompts, caption_embeds, torch.randn(4, 32).half())
    pairs = {
        "caption": prompts,
        "image": torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8),
        "image_embed": torch.randn(3, 32),
    }
    found = R.evaluate(
        cfg, model, pairs, torch.device("cpu"), False, reference=reference, split="holdout"
    )
    direct = u8(UnCLIP.load(folder).generate(prompts, seed=11, batch_size=2).images)
    assert all(np.array_equal(a, b) for a, b in zip(found.generated, direct, strict=True))
    assert not np.array_equal(direct[0], direct[1]), "other prompts and noise: other images"


def test_the_readme_python_api_runs_as_written(
    registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("**From Python**")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["drawn"].images.shape == (1, 3, 32, 32)  # the tiny champion draws 32 px
    assert scope["variations"].shape == (4, 3, 32, 32)
    assert 0 <= float(scope["variations"].min()) <= float(scope["variations"].max()) <= 1


def b64png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_served_edit_interpolate_and_textdiff(server: str) -> None:
    """The CLI's edit, interpolate and textdiff as an `operation` of a request."""
    rng = np.random.default_rng(0)
    a, b = (b64png(rng.integers(0, 256, (32, 32, 3))) for _ in range(2))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    edit = {"prompt": PROMPT, "image": a, "mask": b64png(mask), "seed": 1}
    status, reply = post(server, {"dataframe_records": [edit], "params": {"operation": "edit"}})
    assert status == 200, reply
    edited = np.asarray(png(reply["predictions"][0]["image"]), np.int16)
    source = np.asarray(png(a), np.int16)
    assert np.abs(edited - source)[mask == 0].max() <= 1, "kept pixels stay"
    assert np.abs(edited - source)[mask == 255].mean() > 5, "the masked region is redrawn"
    body = {"dataframe_records": [{"image": a, "image_b": b, "seed": 2}]}
    body["params"] = {"operation": "interpolate", "num": 4}
    status, reply = post(server, body)
    assert status == 200 and len(reply["predictions"]) == 4, reply
    row = {"image": a, "source_prompt": PROMPT, "prompt": "a small blue square", "seed": 2}
    status, reply = post(server, {"dataframe_records": [row], "params": {"operation": "textdiff"}})
    assert status == 200 and len(reply["predictions"]) == 5, reply


def test_served_edits_refuse_bad_images_in_one_sentence(server: str) -> None:
    image = b64png(np.zeros((32, 32, 3)))
    masks = {
        "a mask of another size": (b64png(np.full((16, 16), 255)), "of the image's size"),
        "a grey mask": (b64png(np.full((32, 32), 128)), "is not binary"),
        "an empty mask": (b64png(np.zeros((32, 32))), "marks no pixel to redraw"),
        "no PNG": (base64.b64encode(b"not a png").decode(), "cannot be read as an image"),
    }
    for name, (mask, words) in masks.items():
        row = {"prompt": PROMPT, "image": image, "mask": mask}
        status, reply = post(server, {"dataframe_records": [row], "params": {"operation": "edit"}})
        reason = reply.get("message", "").rsplit("\nError: ", 1)[-1]
        assert status == 400 and words in reason and "\n" not in reason, (name, reply)
    body = {"dataframe_records": [{"image": image}], "params": {"operation": "interpolate"}}
    status, reply = post(server, body)
    assert status == 400 and "image_b" in reply["message"], reply
    body["params"] = {"operation": "paint"}
    status, reply = post(server, body)
    assert status == 400 and "operation must be one of" in reply["message"], reply
