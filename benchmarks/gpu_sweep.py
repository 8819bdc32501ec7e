r"""Train configurations back to back on one GPU, every stage, and judge each run.

Each run trains CLIP, embeds every pair, trains the prior and each decoder stage through the
recipe functions the pipeline's steps call (dalle2/recipes), then draws `evaluate`'s prompts
of every prompt set: emoji runs are read by the independent judge (benchmarks/emoji_judge.py,
through emoji_stages.stage_rows), shapes64 runs by shapes64's pixel reader (prompt fidelity
and empty canvases, as withheld_pairs.py and composition.py read them), each on the text path
(prior + cascade) and on the cascade drawing from the true image embeddings. ZenML is left
out on purpose: its per-step start-up, artifact store and tracker cost tens of seconds a
step, a large share of an 8-minute budget, and a sweep needs neither its cache nor lineage.

One JSON (OUT/sweep.json) holds a row per run: per stage its minutes, samples/s (overall,
and steady: the median of the logged windows after the first, which holds compile and
warm-up), steps and whether the clock cut it; the judge's figures; a sample grid beside it
(OUT/NN-NAME.png). It is rewritten after every stage, so a crash or the budget's end keeps
every finished row.

The budget (--budget-min, from the start): a stage starts only when its worst case, its
train.max_minutes (the GPU presets set one per stage), fits in the minutes left less
--judge-min for the run's judging; it then runs capped at those minutes (the trainer stops
it on the clock, its cosine following). A stage that does not fit stops its run and the
sweep, cleanly.

    # here, on CPU: what the GPU machine needs, in <= 64 MiB (docs/benchmarks.md)
    python benchmarks/gpu_sweep.py --pack .gpu --config configs/emoji64-gpu.yaml \
        --config configs/shapes64-withheld-gpu.yaml
    # on the GPU machine
    python3 benchmarks/gpu_sweep.py --data .gpu --budget-min 8.75 \
        --config configs/emoji64-gpu.yaml
    # CPU smoke: two tiny configurations end to end, packed and unpacked (the suite runs it)
    python benchmarks/gpu_sweep.py --smoke

`--set [I:]KEY=VALUE` changes every config, or only the I-th (0-based).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import emoji_judge as J  # noqa: E402
import emoji_stages as S  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import machine, markdown  # noqa: E402
from sweep_data import (  # noqa: E402
    TRANSFER_MIB,
    Pack,
    PackError,
    dataset_of,
    mib,
    travelling_mib,
    write_pack,
)
from withheld_pairs import apply_override, draw_pairs, withheld_config  # noqa: E402

from dalle2.config import ConfigError, TrainConfig, UnclipConfig, parse_config  # noqa: E402
from dalle2.data import shapes64  # noqa: E402
from dalle2.data import shards as D  # noqa: E402
from dalle2.data.download import dataset_key  # noqa: E402
from dalle2.evaluation import captioned_grid, empty_canvas, to_uint8  # noqa: E402
from dalle2.recipes.evaluate import eval_pairs  # noqa: E402
from dalle2.training.fit import Run  # noqa: E402
from dalle2.training.trainer import TrainResult, compile_on  # noqa: E402
from dalle2.unclip import UnCLIP  # noqa: E402

OUT = ROOT / ".cache" / "bench" / "gpu_sweep"
# the smoke's two configurations: the test configs' models, a few steps each; the emoji one
# holds out as tests/test_emoji_judge.py does, so its small set keeps some dark tones to train
SMOKE = (
    ("tests/configs/tiny.yaml", ["decoder.0.train.steps=6"]),
    (
        "tests/configs/tiny-emoji.yaml",
        ["data.holdout_fraction=0.15", "data.holdout_rules.0.fraction=0.3"],
    ),
)
SMOKE_JUDGE = {"epochs": 2, "batch_size": 32, "width": 8}  # seconds on a CPU


class SweepError(Exception):
    """Something the user can fix before a sweep can start, said in one sentence."""


class OutOfBudgetError(Exception):
    """A stage's worst case does not fit in the minutes left."""


@dataclass
class Spec:
    """One run of the sweep: its name, where its config came from, and the config."""

    name: str
    config: str
    sets: list[str]
    cfg: UnclipConfig


@dataclass
class Budget:
    """Minutes from the sweep's start; `reserve` of them are kept at the end of each run for
    drawing and judging it."""

    minutes: float
    reserve: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.minutes - (time.monotonic() - self.start) / 60

    def admit(self, stage: str, cap: float | None = None) -> float:
        """The minutes a stage may run: those left before judging. OutOfBudgetError where
        none are, or where its own cap (its worst case) does not fit in them."""
        room = self.left() - self.reserve
        if room <= 0 or (cap is not None and cap > room):
            capped = "" if cap is None else f", its cap is {cap:g} min"
            raise OutOfBudgetError(
                f"{stage} not started: {max(room, 0):.2f} min left before judging{capped}"
            )
        return room

    def capped(self, stage: str, train: TrainConfig) -> TrainConfig:
        """`train` with its max_minutes cut to the minutes `admit` gives the stage, so the
        trainer ends it on the clock when the budget does."""
        room = self.admit(stage, train.max_minutes)
        return train.model_copy(update={"max_minutes": min(train.max_minutes or room, room)})


def kind(cfg: UnclipConfig) -> str:
    """Which reader judges a run: the emoji judge or shapes64's pixel reader."""
    if cfg.data.url_list is None:
        return cfg.data.source
    raise SweepError(
        f"{cfg.name}: the sweep judges emoji and shapes64 runs; this one has a URL list"
    )


def load_specs(configs: list[str], sets: list[str]) -> list[Spec]:
    """The run configs, each with the --set assignments meant for it ([I:]KEY=VALUE)."""
    specs = []
    for i, path in enumerate(configs):
        raw = yaml.safe_load((ROOT / path).read_text())
        raw = raw["parameters"]["config"] if "parameters" in raw else raw
        mine = []
        for s in sets:
            target = re.match(r"^(\d+):(.*)$", s)
            if target is None or int(target.group(1)) == i:
                mine.append(s if target is None else target.group(2))
        for assignment in mine:
            apply_override(raw, assignment)
        cfg = parse_config(raw)
        kind(cfg)  # a run no reader can judge is refused before any training
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{i:02d}-{cfg.name}")
        specs.append(Spec(name, path, mine, cfg))
    return specs


# ----------------------------------------------------------------------------- training


def stage_figures(
    result: TrainResult, windows: list[float], train: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """What one trained stage did, for its row."""
    steady = windows[1:] or windows  # the first window holds the compile and warm-up
    return {
        "steps": result.final_step,
        "target_steps": train.steps,
        "batch_size": train.batch_size,
        "minutes": result.seconds / 60,
        "cap_minutes": train.max_minutes,
        "cut_by_clock": result.stopped_early,
        "samples_per_s": result.samples_per_s,
        "samples_per_s_steady": statistics.median(steady) if steady else None,
        "compiled": compile_on(train.compile, device),
        "final_loss": result.final_loss,
    }


def train_run(
    spec: Spec,
    shard_dir: Path,
    emb_dir: Path,
    device: torch.device,
    budget: Budget,
    row: dict,
    save: Callable[[], None],
    progress: bool,
) -> UnCLIP:
    """CLIP, embeddings, prior and every decoder stage, as the pipeline's steps train them;
    each stage's figures go into row["stages"] as it ends."""
    from dalle2.decoder import Decoder
    from dalle2.recipes.clip import fit_clip  # open_clip: seconds to import, after the GPU check
    from dalle2.recipes.decoder import fit_decoder_stage
    from dalle2.recipes.embeddings import compute_embeddings
    from dalle2.recipes.prior import fit_prior

    cfg, stages = spec.cfg, row["stages"]

    def fit(name: str, section: Any, fit_fn: Callable[[Any, Run], tuple[Any, TrainResult]]) -> Any:
        train = budget.capped(name, section.train)
        windows: list[float] = []
        run = Run(
            device, callback=lambda _, m: windows.append(m["samples_per_s"]), progress=progress
        )
        model, result = fit_fn(section.model_copy(update={"train": train}), run)
        stages[name] = stage_figures(result, windows, train, device)
        save()
        print(f"{spec.name}: {name} {json.dumps(stages[name])}", flush=True)
        return model.eval()

    clip = fit("clip", cfg.clip, lambda c, run: fit_clip(c, cfg.data, shard_dir, run))
    budget.admit("embeddings")
    t0 = time.perf_counter()
    n, _ = compute_embeddings(
        clip,
        shard_dir,
        emb_dir,
        with_tokens=cfg.reads_text_tokens,
        batch_size=cfg.clip.embed_batch_size,
        device=device,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    stages["embeddings"] = {"images": n, "minutes": seconds / 60, "images_per_s": n / seconds}
    save()
    prior = fit("prior", cfg.prior, lambda p, run: fit_prior(p, cfg.data, emb_dir, run))
    unets = [
        fit(
            f"decoder.{i}",
            s,
            lambda s, run, i=i: fit_decoder_stage(s, i, cfg.data, shard_dir, emb_dir, run),
        )
        for i, s in enumerate(cfg.decoder)
    ]
    return UnCLIP(clip, prior, Decoder(unets)).eval()


# ----------------------------------------------------------------------------- judging


def fidelity_rows(cfg: UnclipConfig, unclip: UnCLIP, shard_dir: Path) -> list[dict]:
    """Per prompt set, shapes64's pixel reader on the text path and on the cascade drawing
    from the true image embeddings (no prior), with empty canvases and the prior's cosine:
    which stage loses a withheld pair."""
    rows = []
    for d in S.draw_sets(cfg, unclip, shard_dir, progress=lambda _: None):
        paths = (
            ("prior + cascade (text)", d.text, d.prior_cos),
            ("cascade, true embedding", d.drawn[-1], None),
        )
        for path, u8, prior_cos in paths:
            read = shapes64.prompt_fidelity(list(u8.permute(0, 2, 3, 1).numpy()), d.prompts)
            rows.append(
                {
                    "set": d.name,
                    "path": path,
                    "prompts": len(d.prompts),
                    **read,
                    "empty_canvas": float(empty_canvas(u8).sum()),
                    "prior_cos": prior_cos,
                }
            )
    return rows


def fidelity_table(rows: list[dict]) -> str:
    head = ("prompt set", "path", "prompts", "colour", "shape", "size", "all four", "empty")
    cells = [
        (
            r["set"],
            r["path"],
            r["prompts"],
            *(f"{r[k]:.2f}" for k in ("color", "shape", "size", "all")),
            int(r["empty_canvas"]),
        )
        for r in rows
    ]
    return markdown(head, cells)


def write_grid(cfg: UnclipConfig, unclip: UnCLIP, shard_dir: Path, path: Path) -> None:
    """Generated beside real images: eval.grid_size prompts shared out over the held-out
    sets (held-out captions, then each hold-out rule's set, withheld pairs included), or
    seen prompts where nothing is held out."""
    *held, (seen, _) = D.Holdout.of(cfg.data).sets
    each = max(1, cfg.eval.grid_size // len(held))
    few = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_prompts": each})})
    sets = [p for split, _ in held if (p := eval_pairs(few, shard_dir, None, split))]
    sets = sets or [eval_pairs(few, shard_dir, None, seen)]  # nothing held out: seen prompts
    captions = [c for pairs in sets for c in pairs["caption"]]
    real = torch.cat([pairs["image"] for pairs in sets]).permute(0, 3, 1, 2) / 255
    images = unclip.generate(captions, seed=cfg.eval.seed).images
    real = to_uint8(F.interpolate(real, size=images.shape[-1], mode="bilinear", antialias=True))
    hwc = [to_uint8(images).permute(0, 2, 3, 1).numpy(), real.permute(0, 2, 3, 1).numpy()]
    captioned_grid(*hwc, captions).save(path)


# ----------------------------------------------------------------------------- the sweep


@dataclass
class Sources:
    """Where runs get their shards and the emoji judge: a pack (--data, or the smoke's),
    unpacked under `work`, or this checkout's own downloads and judge cache."""

    pack: Pack | None
    work: Path

    def shards(self, cfg: UnclipConfig) -> Path:
        key = dataset_key(cfg.data)
        if self.pack is not None:
            return self.pack.shards(key, self.work)
        shard_dir = ROOT / cfg.data.data_dir / key
        if not shard_dir.is_dir():
            raise SweepError(
                f"no data at {shard_dir}: download it here, or pass --data with a pack"
            )
        return shard_dir

    def judge(self, cfg: UnclipConfig, shard_dir: Path) -> J.EmojiJudge:
        if self.pack is not None:
            return J.EmojiJudge.load(self.pack.judge(dataset_key(cfg.data)))[0]
        return J.judge_for(shard_dir, D.Holdout.of(cfg.data))[0]


def train_and_judge(
    spec: Spec,
    shard_dir: Path,
    judge: J.EmojiJudge | None,
    device: torch.device,
    budget: Budget,
    row: dict,
    save: Callable[[], None],
    out: Path,
    progress: bool,
) -> str:
    """One run trained, judged (the emoji judge where given, else shapes64's pixel reader)
    and its grid written; returns its table. Its models go with it, freeing the memory."""
    with tempfile.TemporaryDirectory(prefix="gpu-sweep-emb-") as emb:
        unclip = train_run(spec, shard_dir, Path(emb), device, budget, row, save, progress)
    t0 = time.perf_counter()
    if judge is not None:
        row["judge"] = S.stage_rows(spec.cfg, unclip, judge, shard_dir)
        table = S.table(row["judge"])
    else:
        row["fidelity"] = fidelity_rows(spec.cfg, unclip, shard_dir)
        table = fidelity_table(row["fidelity"])
    write_grid(spec.cfg, unclip, shard_dir, out / f"{spec.name}.png")
    row |= {"grid": f"{spec.name}.png", "judge_minutes": (time.perf_counter() - t0) / 60}
    return table


class Record:
    """The sweep's JSON, rewritten whole (through a temporary file) after every change."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.data = path, {**header, "runs": []}
        path.parent.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def sweep(
    specs: list[Spec],
    sources: Sources,
    budget: Budget,
    device: torch.device,
    out: Path,
    progress: bool,
) -> int:
    """Every spec in turn, until the budget stops one; 1 if a run failed, else 0."""
    header = {
        "machine": machine(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "budget_min": budget.minutes,
        "judge_min": budget.reserve,
        "command": " ".join(sys.argv),
    }
    record = Record(out / "sweep.json", header)
    # data and judges first: a missing pack entry stops the sweep before any training
    ready = [(s, sources.shards(s.cfg)) for s in specs]
    judges = {s.name: sources.judge(s.cfg, d) for s, d in ready if kind(s.cfg) == "emoji"}
    stopped, failed = False, False
    for spec, shard_dir in ready:
        row: dict[str, Any] = {"name": spec.name, "config": spec.config, "set": spec.sets}
        row |= {"kind": kind(spec.cfg), "status": "running", "stages": {}}
        record.data["runs"].append(row)
        if stopped:
            row["status"] = "not started: budget spent"
            record.save()
            continue
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            judge = judges.get(spec.name)
            table = train_and_judge(
                spec, shard_dir, judge, device, budget, row, record.save, out, progress
            )
            row["status"] = "done"
            print(f"{spec.name}:\n{table}", flush=True)
        except OutOfBudgetError as why:
            row["status"] = f"stopped: {why}"
            stopped = True
        except Exception as err:  # one run's failure (out of memory, say) ends that run only
            traceback.print_exc()
            row["status"] = f"failed: {type(err).__name__}: {str(err).strip()[:300]}"
            failed = True
        row["minutes"] = (time.perf_counter() - t0) / 60
        if device.type == "cuda":
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record.save()
        print(f"{spec.name}: {row['status']} after {row['minutes']:.2f} min", flush=True)
    print(f"wrote {record.path}")
    return int(failed)


def pack(
    out: Path, specs: list[Spec], shard_dir_of: Callable[[UnclipConfig], Path], **judge: Any
) -> None:
    """The datasets `specs` train on, and the judge of each emoji one (from the judge
    cache, or trained there first), packed into `out`. A judge is trained on one hold-out's
    training split, so emoji configs sharing a dataset must share its hold-out."""
    datasets, judges, holdouts = {}, {}, {}
    for spec in specs:
        key, holdout = dataset_key(spec.cfg.data), D.Holdout.of(spec.cfg.data)
        if key in datasets:
            if kind(spec.cfg) == "emoji" and holdout != holdouts[key]:
                raise PackError(
                    f"{spec.config} holds out other pairs of {key} than the config before it "
                    "does, and a judge knows one hold-out; pack them apart"
                )
            continue
        holdouts[key] = holdout
        shard_dir = shard_dir_of(spec.cfg)
        datasets[key] = dataset_of(spec.cfg.data, shard_dir)
        if kind(spec.cfg) == "emoji":
            _, meta = J.judge_for(shard_dir, holdout, progress=False, **judge)
            judges[key] = J.CACHE / meta["key"]
    manifest = write_pack(out, datasets, judges)
    for key, entry in manifest["datasets"].items():
        judged = f", judge {entry['judge_mib']:.1f} MiB" if entry["judge"] else ""
        print(f"{key}: {entry['images']} images, {entry['mib']:.1f} MiB{judged}")


def pack_here(out: Path, specs: list[Spec]) -> int:
    """--pack: this checkout's data and judges; 1 where they would not travel."""
    pack(out, specs, lambda cfg: ROOT / cfg.data.data_dir / dataset_key(cfg.data))
    wheels = ROOT / ".whl"
    total = mib(out) + travelling_mib() + (mib(wheels) if wheels.is_dir() else 0)
    print(
        f"{out}: {mib(out):.1f} MiB; with the working tree and .whl/ it sends "
        f"{total:.1f} of the {TRANSFER_MIB} MiB a device call takes"
    )
    return 0 if total <= TRANSFER_MIB else 1


def smoke_pack(tmp: Path, specs: list[Spec], out: Path) -> Path:
    """The smoke's data, made here and packed into `out` as --pack packs: its shapes64
    drawn, its emoji the emoji-grammar shards tests/test_emoji_judge.py writes, judged by a
    tiny judge."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_emoji_judge import write_emoji_shards

    emoji_dir = write_emoji_shards(tmp / "emoji")
    J.CACHE = tmp / "judge-cache"

    def shard_dir_of(cfg: UnclipConfig) -> Path:  # shapes64: none, so it is drawn
        return emoji_dir if kind(cfg) == "emoji" else tmp / "undownloaded"

    pack(out, specs, shard_dir_of, **SMOKE_JUDGE)
    return out


def smoke_specs(sets: list[str]) -> list[Spec]:
    """The two tiny configurations; the shapes64 one withholds withheld_pairs.py's first
    draw of colour-shape pairs, as the GPU preset does."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (config, overrides) in enumerate(SMOKE):
            run = yaml.safe_load((ROOT / config).read_text())
            if i == 0:
                run = withheld_config(run, draw_pairs(seed=0), "smoke")
            for assignment in overrides:
                apply_override(run["parameters"]["config"], assignment)
            paths.append(Path(tmp) / f"smoke-{i}.yaml")
            paths[-1].write_text(yaml.safe_dump(run, sort_keys=False))
        specs = load_specs([str(p) for p in paths], sets)
    for spec, (config, _) in zip(specs, SMOKE, strict=True):
        spec.config = config
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", action="append", default=[], help="a run config (repeat: runs in order)"
    )
    p.add_argument("--set", action="append", default=[], metavar="[I:]KEY=VALUE")
    p.add_argument("--budget-min", type=float, default=8.0, help="minutes for the whole sweep")
    p.add_argument("--judge-min", type=float, default=0.75, help="minutes kept to judge each run")
    p.add_argument("--data", type=Path, help="a pack written by --pack (else this checkout's data)")
    p.add_argument(
        "--pack", type=Path, metavar="DIR", help="write the configs' data and judge here"
    )
    p.add_argument("--smoke", action="store_true", help="CPU: two tiny configurations end to end")
    p.add_argument("--out", type=Path, default=OUT, help="sweep.json and the grids")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.smoke == bool(args.config):
        p.error("name at least one --config, or --smoke (which has its own two)")
    if not (args.smoke or args.pack or torch.cuda.is_available()):
        print(
            "gpu_sweep: no CUDA GPU is visible here; run it on a GPU machine, or --smoke on CPU",
            file=sys.stderr,
        )
        return 2
    if args.smoke:  # tiny models: a second thread only waits (40x slower beside other work)
        torch.set_num_threads(1)
    try:
        specs = smoke_specs(args.set) if args.smoke else load_specs(args.config, args.set)
        if args.pack:
            return pack_here(args.pack, specs)
        with tempfile.TemporaryDirectory(prefix="gpu-sweep-") as tmp:
            data = args.data
            if args.smoke and data is None:
                data = smoke_pack(Path(tmp), specs, args.out / "smoke-pack")
            sources = Sources(Pack(data) if data else None, Path(tmp))
            budget = Budget(args.budget_min, 0.0 if args.smoke else args.judge_min)
            device = torch.device("cpu" if args.smoke else "cuda")
            return sweep(specs, sources, budget, device, args.out, not args.no_progress)
    except (SweepError, PackError, ConfigError, FileNotFoundError) as err:
        print(f"gpu_sweep: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
