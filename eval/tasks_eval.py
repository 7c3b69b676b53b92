"""Task accuracy through lm-eval (`lm_eval.simple_evaluate`), on the run's model wrapped as an lm-eval LM.

Local tasks are lm-eval task YAML under eval/tasks/ (datasets built from the embedded texts by eval/tasks/build.py);
they need no network. Any other name is an lm-eval task that needs its Hugging Face Hub dataset: offline, or when the
name is unknown, `resolve_tasks` fails at once with the list of local tasks, before any long work.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from harness.config import ConfigError
from eval.registry import EvalContext, evaluator

TASK_DIR = Path(__file__).resolve().parent / "tasks"


def local_task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def local_task_names() -> list[str]:
    """Tasks and tags defined by the YAML in eval/tasks/ (a fraction of a second: only that folder is indexed)."""
    return local_task_manager().all_tasks


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_hub_dataset(task: str, dataset_path: Optional[str], local: str) -> None:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import get_session

    try:
        if dataset_path:
            HfApi().dataset_info(dataset_path, timeout=10)
        else:  # a group or tag: its members' datasets are on the hub; check that the hub answers at all
            get_session().head(constants.ENDPOINT, timeout=10).raise_for_status()
    except Exception as e:
        raise ConfigError(f"eval.tasks.names: lm-eval task {task!r} needs the Hugging Face Hub dataset "
                          f"{dataset_path or '(of each member task)'}, which is not reachable ({type(e).__name__}). "
                          f"Offline, use the local tasks: {local}") from None


def resolve_tasks(names: list[str], check_hub: bool = True):
    """The lm-eval TaskManager that knows every name, or a ConfigError naming the local tasks. Local names need only
    eval/tasks/; any other name costs an index of lm-eval's built-in tasks (about 15 s here) and a hub check."""
    local_tm = local_task_manager()
    local = ", ".join(local_tm.all_tasks)
    if not names:
        raise ConfigError(f"eval.tasks.names: is empty; local tasks: {local}")
    missing = [n for n in names if n not in local_tm.all_tasks]
    if not missing:
        return local_tm
    if hub_offline():
        raise ConfigError(f"eval.tasks.names: {missing} are not local tasks and the Hugging Face Hub is offline "
                          f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); local tasks: {local}")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASK_DIR))
    unknown = [n for n in missing if n not in tm.all_tasks]
    if unknown:
        raise ConfigError(f"eval.tasks.names: {unknown} are neither local tasks ({local}) nor lm-eval tasks")
    if check_hub:
        for n in missing:
            _check_hub_dataset(n, tm.task_index[n].cfg.get("dataset_path") if tm.task_index[n].cfg else None, local)
    return tm


def _mean_stderr(xs: list[float]) -> Optional[float]:
    """lm-eval's closed form for a mean (sample std / sqrt(n)); computed here so no bootstrap pool is started."""
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def run_tasks(lm, names: list[str], task_manager, limit: Optional[int] = None, num_fewshot: int = 0,
              seed: int = 0) -> dict:
    """lm-eval's simple_evaluate on an LM object -> {task: {metric: value, ..., n, num_fewshot}}."""
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=task_manager, limit=limit,
                                  num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=True,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    out = {}
    for task, metrics in res["results"].items():
        row = {k.split(",")[0]: v for k, v in metrics.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        samples = res.get("samples", {}).get(task, [])
        ordered = sorted(samples, key=lambda s: s.get("doc_id", 0))
        for metric in ("acc", "acc_norm", "acc_mutual_info"):  # standard error of each accuracy (± in the report)
            if samples and metric in samples[0]:
                row[f"{metric}_stderr"] = _mean_stderr([float(s[metric]) for s in samples])
                # each item's score, in doc_id order: two runs on the same items are compared item by item (a paired
                # difference: harness.confidence.paired_mean_diff_ci95), far tighter than two independent intervals
                if all(float(s[metric]) in (0.0, 1.0) for s in ordered):
                    row[f"{metric}_items"] = "".join(str(int(float(s[metric]))) for s in ordered)
        if ordered and [s.get("doc_id") for s in ordered] != list(range(len(ordered))):
            row["doc_ids"] = [s.get("doc_id") for s in ordered]
        row["n"] = res.get("n-samples", {}).get(task, {}).get("effective", len(samples))
        row["num_fewshot"] = num_fewshot
        out[task] = row
    return out


def _source(task: str) -> dict:
    from eval.tasks import build

    if task in build.LOCAL_SOURCES:
        m = build.manifest(task)
        m.pop("jsonl")  # a cache path, not part of what the data is
        return {"source": f"local: eval/tasks/{task}.yaml ({build.DESCRIPTIONS[task]}, built from the embedded "
                          f"{m['source_split']} split)",
                **m}
    return {"source": "lm-eval"}


@evaluator("tasks")
def evaluate_tasks(ctx: EvalContext) -> dict | None:
    tc = ctx.cfg.eval.tasks
    if not tc.enabled:
        return None
    from eval.lm_eval_adapter import from_context

    tm = resolve_tasks(tc.names)
    results = run_tasks(from_context(ctx, tc.batch_size), tc.names, tm, tc.limit, tc.num_fewshot, ctx.cfg.seed)
    return {task: {**row, **_source(task)} for task, row in results.items()}
