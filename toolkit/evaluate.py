"""``toolkit evaluate RUN_DIR``: score a trained run again, without training.

    toolkit evaluate runs/digits                           # the final model.safetensors
    toolkit evaluate runs/wt2 --checkpoint step_600 -- --cache-theta 0.5 --cache-lambda 0.2
    torchrun --nproc_per_node 2 -m toolkit.cli evaluate runs/cifar10

The run's recipe (named in ``model.json``) is rebuilt from its ``config.json``, with any
recipe flags after ``--`` on top (the cache pointer's theta, lambda and window, ``--tta``),
its weights loaded (the final ``model.safetensors``, or a checkpoint's), and scored with the
recipe's evaluation: the validation pass the run logged and its final evaluation (WikiText-2:
batch size 1 with and without the cache pointer; images: accuracy with and without TTA).
The numbers go to ``RUN_DIR/eval.json`` (or ``--out``); the run folder is otherwise left as
it is. Evaluation runs under DDP (over the launched processes) on the full fp32 weights, whatever
strategy trained them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
from pathlib import Path

import torch

from toolkit import lifecycle
from toolkit.checkpoint import weights as checkpoint_weights
from toolkit.config import from_dict, parse, write_json
from toolkit.errors import UserError
from toolkit.lm import LMTrainer
from toolkit.run_folder import RunFolder


def recipe_of(folder: RunFolder):
    """The recipe module that made the run (``model.json``'s builder lives in it)."""
    if not folder.config.is_file() or not folder.model_spec.is_file():
        raise UserError(f"{folder.path} is not a finished run folder (no {folder.CONFIG} and "
                        f"{folder.MODEL_SPEC}: a run writes them)")
    module = folder.read_model_spec()["builder"].partition(":")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{folder.model_spec}: cannot import the recipe {module} ({e})") from None


THETAS = tuple(round(0.1 * i, 1) for i in range(1, 11))
LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def evaluate(run_dir: Path, checkpoint: str | None, overrides: list[str],
             tune: tuple[list[float], list[float]] | None = None,
             generate: tuple[int, float, int] | None = None) -> dict:
    """Rebuild, load, score; the results (collective: every launched process calls it)."""
    folder = RunFolder(run_dir)
    recipe = recipe_of(folder)
    saved = from_dict(recipe.Config, folder.read_config())
    # A trainer touches its folder only when it trains: scoring writes nothing into the run
    # but eval.json.
    train = dataclasses.replace(saved.train, output_dir=str(run_dir), resume=None,
                                progress=False, strategy="ddp", deepspeed_config=None)
    cfg = parse({"run": lambda: dataclasses.replace(saved, train=train)}, overrides)
    if checkpoint is not None:
        step_dir = folder.checkpoints / checkpoint
        if not step_dir.is_dir():
            have = sorted(p.name for p in folder.checkpoints.glob("step_*"))
            raise UserError(f"--checkpoint {checkpoint}: no {step_dir}; the run has "
                            f"{', '.join(have) or 'no checkpoints'}")
        weights = checkpoint_weights(step_dir)
    else:
        if not folder.weights.is_file():
            raise UserError(f"{run_dir} has no {folder.WEIGHTS} (an unfinished run? pass "
                            "--checkpoint step_N)")
        weights = folder.read_weights()
    torch.manual_seed(cfg.train.seed)
    run = recipe.build(cfg)
    trainer = run.trainer
    trainer.unwrapped().load_state_dict(weights)
    try:
        results = {"run": str(run_dir), "checkpoint": checkpoint or folder.WEIGHTS,
                   **trainer.evaluate()}
        if run.final_evaluation is not None:
            results.update(run.final_evaluation())
        if tune is not None:
            if not isinstance(trainer, LMTrainer):
                raise UserError(f"--tune-cache: {recipe.__name__} has no cache pointer to tune "
                                "(a language-model recipe has)")
            results.update(trainer.tune_cache(*tune))
        if generate is not None:
            if not isinstance(trainer, LMTrainer):
                raise UserError(f"--generate: {recipe.__name__} is not a language model")
            n, temperature, seed = generate
            results["sample"] = {"tokens": n, "temperature": temperature, "seed": seed,
                                 "text": trainer.generate(n, temperature, seed)}
    finally:
        trainer.close()
    return results


def main(argv: list[str]) -> None:
    own, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="toolkit evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="a checkpoint of the run (step_N) instead of its "
                   "final weights")
    p.add_argument("--out", help="where to write the results (default RUN_DIR/eval.json)")
    p.add_argument("--tune-cache", action="store_true", help="search the cache pointer's theta "
                   "and lambda on the validation set (the run's own pair included)")
    p.add_argument("--generate", type=int, metavar="N", help="language models: print N "
                   "tokens sampled from the model")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--thetas", type=float, nargs="+", default=list(THETAS))
    p.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    ns = p.parse_args(own)
    bad = [t for t in ns.thetas if not (t > 0 and math.isfinite(t))] + \
          [x for x in ns.lambdas if not 0 <= x <= 1]
    if bad:
        raise UserError(f"--thetas must be > 0 and --lambdas in [0, 1]; got {bad[0]}")
    if ns.generate is not None and ns.generate < 1:
        raise UserError(f"--generate {ns.generate} must be >= 1 token")
    if not (ns.temperature > 0 and math.isfinite(ns.temperature)):
        raise UserError(f"--temperature {ns.temperature} must be > 0")
    if lifecycle.launched():
        lifecycle.exit_with_launcher()
    run_dir = Path(ns.run_dir)
    results = evaluate(run_dir, ns.checkpoint, overrides,
                       (ns.thetas, ns.lambdas) if ns.tune_cache else None,
                       (ns.generate, ns.temperature, ns.seed) if ns.generate else None)
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(ns.out) if ns.out else RunFolder(run_dir).eval
        write_json(out, results)
        print(", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
        if "sample" in results:
            print(f"--- {ns.generate} tokens sampled at temperature {ns.temperature}:\n"
                  f"{results['sample']['text']}\n---")
        if "tune_cache" in results:
            t = results["tune_cache"]
            b, d = t["best"], t["default"]
            print(f"cache pointer: best theta {b['theta']} lambda {b['lambda']}: valid "
                  f"{b['valid_cache_ppl']:.2f}, test {b['test_cache_ppl']:.2f} (the run's "
                  f"{d['theta']}/{d['lambda']}: {d['valid_cache_ppl']:.2f} / "
                  f"{d['test_cache_ppl']:.2f}); {t['pairs']} pairs in {t['grid_s']} s, one "
                  f"forward pass {t['forward_pass_s']} s")
        print(f"wrote {out}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        lifecycle.exit_process(0)  # gloo's threads may abort the interpreter's teardown
