"""Hyper-parameter search with Optuna over the DeepFM paper's Sec. 3.3 axes ("Hyper-Parameter Study"):
dropout, neurons per layer, number of hidden layers, activation and network shape, plus the embedding size,
the learning rate and the embedding L2.

- Objective: validation AUC (maximised) of the trial's best epoch (early stopping restores it), trained on
  data read, fitted and encoded ONCE (``pipeline.prepare``; every trial slices the same store).
- Sampler: TPE, seeded. Pruner: median (``MedianPruner``) fed each epoch's validation AUC through
  ``trainer.fit``'s ``on_epoch`` callback: once 5 trials are done, a trial stops after epoch t when its AUC
  is below the median of the earlier trials' AUC after epoch t (from epoch 1 on: CTR models often peak in
  their first epochs, so that is where a poor configuration shows). A trial runs exactly what ``pipeline.train``
  runs without an output folder (seed, build the model, ``fit``, score the validation rows); it calls
  ``fit`` itself because ``pipeline.train`` has no per-epoch hook to report to the pruner.
- Network shape (paper Sec. 3.3): with L hidden layers and n neurons per layer, the total T = L * n is kept
  and spread over the layers as constant (n, ..., n), increasing (proportional to 1, 2, ..., L), decreasing
  (L, ..., 1) or diamond (1, 2, .., 2, 1: widest in the middle); the paper's example, L = 3 and T = 600:
  200-200-200, 100-200-300, 300-200-100, 150-300-150 (``hidden_sizes``).
- The study lives in ``OUT/study.db`` (SQLite), so ``--resume`` continues it after an interruption.

CLI: ``deepfm tune`` (deepfm.commands.tune); Python: ``tune(prepared, model_cfg, train_cfg, out, trials=20)``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deepfm import outputs
from deepfm.config import RUNTIME_KEYS  # how a run executes, not what it learns: left out of best.yaml
from deepfm.errors import DeepFMError
from deepfm.models.ctr import MODELS, ModelConfig
from deepfm.train.trainer import TrainConfig

SHAPES = ("constant", "increasing", "decreasing", "diamond")
STUDY_NAME = "deepfm-tune"


def hidden_sizes(shape: str, layers: int, neurons: int) -> list[int]:
    """Hidden layer widths [layers] for a network shape, keeping the total ``layers * neurons`` (paper Sec. 3.3).

    Weights per layer k = 1..L: constant 1; increasing k; decreasing L + 1 - k; diamond min(k, L + 1 - k).
    Widths are the total split in proportion to the weights, rounded by largest remainder (they add up to
    the total exactly), at least 1 each.

    >>> [hidden_sizes(s, 3, 200) for s in SHAPES]
    [[200, 200, 200], [100, 200, 300], [300, 200, 100], [150, 300, 150]]
    """
    if shape not in SHAPES:
        raise DeepFMError(f"unknown network shape {shape!r} (expected one of {', '.join(SHAPES)})")
    if layers < 1 or neurons < 1:
        raise DeepFMError(f"need at least 1 layer and 1 neuron per layer, got {layers} and {neurons}")
    k = np.arange(1, layers + 1)
    weights = {"constant": np.ones(layers), "increasing": k, "decreasing": layers + 1 - k,
               "diamond": np.minimum(k, layers + 1 - k)}[shape].astype(np.float64)
    total = layers * neurons
    raw = total * weights / weights.sum()
    sizes = np.floor(raw + 1e-9).astype(np.int64)
    rest = total - int(sizes.sum())
    if rest > 0:  # largest remainders first; ties to the earlier layer, then the later (a diamond stays symmetric)
        frac = raw - sizes
        order = sorted(range(layers), key=lambda i: (-round(frac[i], 9), min(i, layers - 1 - i), i))
        sizes[order[:rest]] += 1
    return [int(max(1, s)) for s in sizes]


@dataclass(frozen=True)
class SearchSpace:
    """The axes and their ranges (paper Sec. 3.3: dropout 0.1-0.9, neurons per layer 100-800, 1-5 hidden
    layers, relu / tanh / sigmoid, four network shapes). ``dropout`` is the drop probability."""

    dropout: tuple[float, float] = (0.1, 0.9)
    neurons: tuple[int, int] = (100, 800)
    neuron_step: int = 100
    layers: tuple[int, int] = (1, 5)
    activations: tuple[str, ...] = ("relu", "tanh", "sigmoid")
    shapes: tuple[str, ...] = SHAPES
    embed_dims: tuple[int, ...] = (4, 8, 10, 16, 32)
    lr: tuple[float, float] = (1e-4, 1e-2)  # log scale
    embedding_l2: tuple[float, float] = (1e-7, 1e-2)  # log scale

    @classmethod
    def capped(cls, max_neurons: int = 800, max_layers: int = 5) -> SearchSpace:
        """The paper's space with other caps: neurons per layer in 100..max_neurons, in steps of 100 when
        max_neurons is a multiple of 100 (else of 1); below 100 (tests, quick looks) in max_neurons // 2..max."""
        lo = 100 if max_neurons >= 100 else max(1, max_neurons // 2)
        step = 100 if max_neurons >= 100 and max_neurons % 100 == 0 else 1
        return cls(neurons=(lo, max_neurons), neuron_step=step, layers=(1, max(1, max_layers)))

    def suggest(self, trial: Any, deep: bool = True, embedded: bool = True) -> dict[str, Any]:
        """Draw one point: ``{"model": {...}, "train": {...}}`` options for the preset. deep: the model has
        an MLP (the Sec. 3.3 axes); embedded: it has the embedding table ``v`` (the embedding size)."""
        model: dict[str, Any] = {}
        if deep:
            model["dropout"] = trial.suggest_float("dropout", *self.dropout)
            neurons = trial.suggest_int("neurons", *self.neurons, step=self.neuron_step)
            layers = trial.suggest_int("layers", *self.layers)
            model["activation"] = trial.suggest_categorical("activation", list(self.activations))
            shape = trial.suggest_categorical("shape", list(self.shapes))
            model["hidden"] = hidden_sizes(shape, layers, neurons)
        if embedded:
            model["embed_dim"] = trial.suggest_categorical("embed_dim", list(self.embed_dims))
        model["embedding_l2"] = trial.suggest_float("embedding_l2", *self.embedding_l2, log=True)
        train = {"lr": trial.suggest_float("lr", *self.lr, log=True)}
        return {"model": model, "train": train}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def configs(base_model: ModelConfig, base_train: TrainConfig, point: dict[str, Any]
            ) -> tuple[ModelConfig, TrainConfig]:
    """The base (preset) configuration with a search point applied."""
    return (ModelConfig.from_dict({**base_model.to_dict(), **point["model"]}),
            TrainConfig.from_dict({**base_train.to_dict(), **point["train"]}))


def run_trial(prepared: Any, model_cfg: ModelConfig, train_cfg: TrainConfig,
              on_epoch: Callable[[dict[str, Any]], None] | None = None, progress: bool = False) -> dict[str, Any]:
    """Train as ``pipeline.train`` does without an output folder, with ``on_epoch`` called after each epoch
    (the pruner's hook). Returns {"valid": metrics of the restored best epoch, "history": per-epoch records}."""
    from deepfm.models.build import build_model
    from deepfm.pipeline import batcher, score, train_row_count
    from deepfm.train.trainer import fit, seed_everything

    seed_everything(train_cfg.seed)
    fields = prepared.fields
    model = build_model(fields, model_cfg, train_row_count(prepared))
    history = fit(model, batcher(prepared.train, fields), train_cfg, prepared.train_rows,
                  batcher(prepared.valid, fields), prepared.valid_rows, None, progress, on_epoch)
    return {"valid": score(model, prepared.valid, fields, prepared.valid_rows), "history": history}


# ------------------------------------------------------------------------------------------- the study
def _optuna():
    try:
        import optuna
    except ImportError:
        raise DeepFMError("deepfm tune needs Optuna: pip install 'deepfm[tune]' (or pip install optuna)") from None
    return optuna


def _kind_blocks(kind: str) -> tuple[bool, bool]:
    """(has an MLP, has the embedding table v) for a model kind (the baselines all have both)."""
    _, fm, dnn = MODELS.get(kind, (False, True, True))
    return dnn, fm or dnn


def tune(prepared: Any, base_model: ModelConfig, base_train: TrainConfig, out: str | Path,
         trials: int | None = None, minutes: float | None = None, space: SearchSpace | None = None,
         seed: int | None = None, prune: bool = True, resume: bool = False, setup: dict[str, Any] | None = None,
         log: Callable[[str], None] = print, force: bool = False) -> Any:
    """Run (or, with ``resume``, continue) the study in ``out/study.db`` until ``trials`` trials are
    finished in all (complete, pruned or failed) or ``minutes`` have passed (no new trial starts after
    that; a running one ends), whichever is first. Writes trials.csv, best.yaml, study.json after every
    trial and history.png, importance.png at the end (``write_outputs``). Returns the optuna Study.

    setup: what the study was started with (data, preset, ...), stored in it; a resume with another
    setup is refused."""
    optuna = _optuna()
    if trials is None and minutes is None:
        raise DeepFMError("give a budget: --trials N and/or --minutes M")
    space = space or SearchSpace()
    seed = base_train.seed if seed is None else seed
    out = Path(out)
    # never write into a folder that is not a tune output (unless force); one tune per folder at a time
    outputs.check_dir_out(out, ("tune",), force=force)
    with outputs.locked(out):
        out.mkdir(parents=True, exist_ok=True)
        if not (out / outputs.MARKER).exists():
            outputs.mark(out, "tune")
        return _tune(optuna, prepared, base_model, base_train, out, trials, minutes, space, seed, prune, resume,
                     setup, log)


def _tune(optuna: Any, prepared: Any, base_model: ModelConfig, base_train: TrainConfig, out: Path,
          trials: int | None, minutes: float | None, space: SearchSpace, seed: int, prune: bool, resume: bool,
          setup: dict[str, Any] | None, log: Callable[[str], None]) -> Any:
    from optuna.trial import TrialState

    db = out / "study.db"
    if db.exists() and not resume:
        raise DeepFMError(f"{out} already holds a study (study.db): pass --resume to continue it, or use "
                          "another --out")
    train = {k: v for k, v in base_train.to_dict().items() if k not in RUNTIME_KEYS}  # --threads may change
    setup = json.loads(json.dumps({**(setup or {}), "model": base_model.to_dict(), "train": train,
                                   "space": space.to_dict(), "prune": prune}, default=str))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db.resolve()}"
    existing = 0
    if db.exists():
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        if study.user_attrs.get("setup") != setup:
            raise DeepFMError(f"the study in {out} was started with other settings (data, preset, options or search "
                              "space); rerun with the same options to resume it, or use another --out")
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            study.tell(t.number, state=TrialState.FAIL)  # left running by an interrupted run
        existing = len(study.get_trials(deepcopy=False))
    # a resumed study gets a shifted sampler seed, so its random start-up points are not those already tried
    sampler = optuna.samplers.TPESampler(seed=seed + existing)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0) if prune else \
        optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if not existing:
        study.set_user_attr("setup", setup)
        study.set_user_attr("seed", seed)
    deep, embedded = _kind_blocks(base_model.model)

    def objective(trial: Any) -> float:
        point = space.suggest(trial, deep, embedded)
        model_cfg, train_cfg = configs(base_model, base_train, point)
        trial.set_user_attr("hidden", model_cfg.hidden if deep else [])
        t0 = time.perf_counter()

        def report(rec: dict[str, Any]) -> None:
            trial.report(rec["valid_auc"], rec["epoch"])
            trial.set_user_attr("epochs", rec["epoch"])
            if trial.should_prune():
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                raise optuna.TrialPruned(f"epoch {rec['epoch']}: valid AUC {rec['valid_auc']:.4f}")

        result = run_trial(prepared, model_cfg, train_cfg, report)
        valid = result["valid"]
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("valid_logloss", valid["logloss"])
        trial.set_user_attr("best_epoch", result["history"][-1].get("best_epoch") if result["history"] else None)
        if not math.isfinite(valid["auc"]):
            raise DeepFMError("the validation AUC is not defined (one class only in the validation rows)")
        return float(valid["auc"])

    def after(study: Any, trial: Any) -> None:
        write_outputs(study, out, base_model, base_train, space, plots=False)
        log(_trial_line(study, trial))

    done = len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    n_trials = None if trials is None else max(0, trials - done)
    if n_trials == 0:
        log(f"the study already has {done} finished trials (--trials {trials}): nothing to run")
    else:
        try:
            study.optimize(objective, n_trials=n_trials, timeout=None if minutes is None else minutes * 60,
                           callbacks=[after], catch=(RuntimeError, ValueError, FloatingPointError))
        finally:  # also on Ctrl-C: what finished is written
            if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                write_outputs(study, out, base_model, base_train, space, plots=True)
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise DeepFMError(f"no trial completed in {out} (see trials.csv for failed/pruned ones)")
    return study


def _trial_line(study: Any, trial: Any) -> str:
    p, a = trial.params, trial.user_attrs
    what = (f"dropout {p['dropout']:.2f} hidden {a.get('hidden')} {p['activation']} ({p['shape']}), "
            if "dropout" in p else "")
    what += f"embed {p.get('embed_dim', '-')}, lr {p['lr']:.2g}, emb L2 {p['embedding_l2']:.2g}"
    state = trial.state.name.lower()
    if trial.state.name == "COMPLETE":
        result = f"valid AUC {trial.value:.4f}"
    elif trial.intermediate_values:  # pruned (or failed) after some epochs
        step = max(trial.intermediate_values)
        result = f"{state} after epoch {step} (valid AUC {trial.intermediate_values[step]:.4f})"
    else:
        result = state
    try:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    return f"trial {trial.number}: {result}; {best}; {what}; {a.get('seconds', 0):.1f} s"


# ------------------------------------------------------------------------------------------- outputs
PARAMS = ("dropout", "neurons", "layers", "activation", "shape", "embed_dim", "lr", "embedding_l2")


def best_preset(study: Any, base_model: ModelConfig, base_train: TrainConfig) -> dict[str, dict[str, Any]]:
    """The best trial as a preset (``model:`` and ``train:`` sections, as presets/*.yaml)."""
    best = study.best_trial
    point: dict[str, Any] = {"model": {}, "train": {"lr": best.params["lr"]}}
    if "dropout" in best.params:
        point["model"].update(dropout=best.params["dropout"], activation=best.params["activation"],
                              hidden=list(best.user_attrs["hidden"]))
    if "embed_dim" in best.params:
        point["model"]["embed_dim"] = best.params["embed_dim"]
    point["model"]["embedding_l2"] = best.params["embedding_l2"]
    model_cfg, train_cfg = configs(base_model, base_train, point)
    train = {k: v for k, v in train_cfg.to_dict().items() if k not in RUNTIME_KEYS}
    return {"model": model_cfg.to_dict(), "train": train}


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def param_importance(study: Any) -> tuple[dict[str, float] | None, str | None]:
    """(Optuna's parameter importances, None) or (None, why not): they need a few complete trials."""
    optuna = _optuna()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None, f"parameter importances need at least 2 complete trials, the study has {len(complete)}"
    try:
        imp = optuna.importance.get_param_importances(study)
    except Exception as e:  # Optuna's evaluators refuse some small or degenerate studies: a note, not a failure
        return None, f"Optuna could not compute parameter importances: {type(e).__name__}: {e}"
    return {k: float(v) for k, v in imp.items()}, None


def write_outputs(study: Any, out: Path, base_model: ModelConfig, base_train: TrainConfig, space: SearchSpace,
                  plots: bool = True) -> None:
    """trials.csv, best.yaml, study.json; with ``plots``, history.png and importance.png."""
    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    with outputs.atomic_file(out / "trials.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "state", "valid_auc", "valid_logloss", "best_epoch", "epochs", "seconds", "hidden",
                    *PARAMS])
        for t in trials:
            a = t.user_attrs
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value,  # full precision
                        "" if a.get("valid_logloss") is None else a["valid_logloss"], a.get("best_epoch", ""),
                        a.get("epochs", ""), f"{a.get('seconds', 0):.1f}", " ".join(map(str, a.get("hidden", []))),
                        *(t.params.get(p, "") for p in PARAMS)])
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {
        "study": STUDY_NAME, "storage": "study.db", "objective": "validation AUC (maximise)",
        "trials": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState},
        "sampler": f"TPESampler(seed={study.user_attrs.get('seed')})",
        "pruner": type(study.pruner).__name__, "space": space.to_dict(), "setup": study.user_attrs.get("setup"),
    }
    if complete:
        best = study.best_trial
        preset = best_preset(study, base_model, base_train)
        summary["best"] = {"number": best.number, "valid_auc": best.value, "params": best.params,
                           "hidden": best.user_attrs.get("hidden"),
                           "valid_logloss": _finite(best.user_attrs.get("valid_logloss")),
                           "best_epoch": best.user_attrs.get("best_epoch"), "preset": preset}
        header = (f"# deepfm tune: the best of {len(complete)} complete trials (of {len(trials)}): trial "
                  f"{best.number}, validation AUC {best.value:.4f}\n# use: deepfm train --preset {out / 'best.yaml'} "
                  "... "
                  "(its other options as for the tuning run)\n")
        outputs.write_text(out / "best.yaml", header + yaml.safe_dump(preset, sort_keys=False))  # unique temp name
    if plots:
        imp, why = param_importance(study)
        summary["param_importance"] = imp if imp is not None else {"error": why}
        plot_history(study, out / "history.png")
        plot_param_importance(imp, why, out / "importance.png")
    outputs.write_text(out / "study.json", json.dumps(summary, indent=1, default=str))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DeepFMError("plots need matplotlib: pip install 'deepfm[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(study: Any, path: Path) -> None:
    """Validation AUC per trial (pruned trials at their last reported epoch) and the best so far."""
    plt = _pyplot()
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    done = [(t.number, t.value) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in trials
              if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    if done:
        x, y = zip(*done, strict=True)
        ax.scatter(x, y, color="#4c72b0", zorder=3, label="trial (validation AUC)")
        # best so far after each trial, carried over pruned/failed ones to the last trial
        value = dict(done)
        steps = [t.number for t in trials if t.number >= done[0][0]]
        best = np.maximum.accumulate([value.get(n, -np.inf) for n in steps])
        ax.step(steps, best, where="post", color="#dd8452", lw=2, label="best so far")
    if pruned:
        x, y = zip(*pruned, strict=True)
        ax.scatter(x, y, marker="x", color="grey", zorder=3, label="pruned (last epoch's AUC)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation AUC")
    ax.set_title(f"deepfm tune: {len(done)} complete, {len(pruned)} pruned of {len(trials)} trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_param_importance(imp: dict[str, float] | None, why: str | None, path: Path) -> None:
    """Horizontal bars of Optuna's importances, or a figure that says why there are none."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if imp:
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="#4c72b0")
        ax.set_xlabel("importance (Optuna, normalised)")
        ax.set_title("hyper-parameter importance for validation AUC")
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, f"no parameter importances:\n{why}", ha="center", va="center", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
