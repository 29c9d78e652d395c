"""``batch``: a recipe's targets protected one ``protect`` each, in a local process pool or as Ray
tasks. The engine streams inside each task; the fleet fans out above it.

Everything is checked before anything runs: the recipe, every output (distinct, touching no input,
not existing unless ``overwrite``) and every prompt file. A target that fails is reported with its
one-line error and the others go on; ``resume`` skips a target whose output is complete and whose
run record matches the recipe and the inputs as they are now.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from safegene_fast.fleet.protect import RUN_RECORD, Settings, Shots, fingerprint, gene_fingerprint, protect
from safegene_fast.fleet.recipe import Recipe, RecipeError, load_recipe
from safegene_fast.gene import SafetyGene
from safegene_fast.io import check_distinct, check_output, output_lock
from safegene_fast.io.inputs import load_coeffs, read_prompts
from safegene_fast.lora import base_of, is_adapter, open_checkpoint
from safegene_fast.pipeline import PIECE, extract

logger = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    name: str
    model: str
    out: str
    base: str | None
    settings: Settings


def settings_of(recipe: Recipe) -> Settings:
    """The settings every target of the recipe is protected with (prompt files read here, once)."""
    shots = None
    if recipe.recalibrate is not None:
        r = recipe.recalibrate
        shots = Shots(read_prompts(r.harmful), read_prompts(r.keep), r.refusal, r.shots, r.steps, r.lr, r.alpha_max)
    coeffs = (load_coeffs(recipe.coeffs) if recipe.coeffs is not None else
              None if shots is not None else recipe.alpha if recipe.alpha is not None else 1.0)
    evaluate = None
    if recipe.evaluate is not None:
        evaluate = read_prompts(recipe.evaluate.harmful)[:recipe.evaluate.limit]
    return Settings(format=recipe.format, coeffs=coeffs, recalibrate=shots, evaluate=evaluate)


def plan(recipe: Recipe) -> list[Job]:
    settings = settings_of(recipe)
    jobs = []
    for t in recipe.targets:
        name = t.name or Path(t.model.rstrip("/")).name
        jobs.append(Job(name, t.model, t.out or str(Path(recipe.out_dir) / name), t.base, settings))
    return jobs


def gene_folder(recipe: Recipe) -> Path:
    """Where the recipe's gene is: its folder, or where ``extract`` writes it."""
    if recipe.gene is not None:
        return Path(recipe.gene)
    return Path(recipe.extract.out or Path(recipe.out_dir) / "gene")


def make_gene(recipe: Recipe, resume: bool, overwrite: bool, progress: bool) -> Path:
    """The recipe's gene, extracted here when the recipe says how (reused by ``resume`` when it was
    made from the same inputs and settings)."""
    out = gene_folder(recipe)
    e = recipe.extract
    if e is None:
        return out
    if resume and (out / "safegene.json").is_file():
        made = SafetyGene.load(out).provenance
        if made.get("aligned") == e.aligned and made.get("degraded") == e.degraded and \
                made.get("settings", {}).get("rank") == e.rank:
            return out
    logger.info(f"extracting the gene into {out}")
    extract(e.aligned, e.degraded, rank=e.rank, progress=progress).save(
        out, overwrite=resume or overwrite, inputs=[e.aligned, *e.degraded], base_model=e.aligned)
    return out


def up_to_date(job: Job, gene: Path) -> bool:
    """The job's output is complete and was made from these inputs with these settings."""
    try:
        record = json.loads((Path(job.out) / RUN_RECORD).read_text(encoding="utf-8"))
        return (record["settings"] == job.settings.as_dict()
                and record["target"]["fingerprint"] == fingerprint(job.model, job.base)
                and record["gene"]["fingerprint"] == gene_fingerprint(gene))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_job(job: Job, gene: SafetyGene | str, overwrite: bool) -> dict:
    """One target, as a row; a failure is the row's one-line error, not an exception."""
    start = time.perf_counter()
    row = {"target": job.name, "model": job.model, "out": job.out}
    try:
        done = protect(job.model, gene, job.out, base=job.base, overwrite=overwrite, settings=job.settings)
    except Exception as exc:  # noqa: BLE001 - isolated: the batch reports it and goes on
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {**row, "status": "failed", "seconds": round(time.perf_counter() - start, 2), "error": message}
    return {**row, "status": "ok", "seconds": round(time.perf_counter() - start, 2), "gb": round(done.nbytes / 1e9, 4),
            "coefficients": done.coefficients, "evaluation": done.record["evaluation"]}


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def run_local(jobs: list[Job], gene: Path, workers: int, overwrite: bool) -> Iterator[dict]:
    """Each job in a process of a pool of ``workers`` (spawned: no state inherited), the machine's
    cores shared among them."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    try:
        futures = [pool.submit(run_job, job, str(gene), overwrite) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:  # on a stop, targets not started are dropped; those running finish whole (or not at all)
        pool.shutdown(wait=True, cancel_futures=True)


def planned_memory(job: Job, gene: SafetyGene) -> int:
    """Bytes a task may use, for Ray's scheduler: the streaming engine's few pieces (two buffers,
    two mapped pieces, float32 at most) and the gene, or, when the target is loaded to recalibrate
    or evaluate, the model in float32 three times over (weights, gradients, activations)."""
    genes = sum(m.A.nbytes + m.B.nbytes for m in gene.modules.values())
    engine = 4 * PIECE * 4 + genes + 512 * 2**20  # + the interpreter, torch and the engine
    if job.settings.recalibrate is None and not job.settings.evaluate:
        return engine
    with open_checkpoint(job.model, job.base) as ckpt:
        params = sum(i.nbytes // i.dtype.itemsize for i in ckpt.tensors.values())
    return engine + 3 * 4 * params


def run_ray(jobs: list[Job], gene: Path, workers: int, overwrite: bool, address: str | None) -> Iterator[dict]:
    """Each job one Ray task, with the CPUs and memory it needs declared (a node is never given
    more than it holds) and retried if its worker dies; the gene goes into the object store once.
    Without ``address`` (or RAY_ADDRESS), a local Ray with ``workers`` CPUs is started and stopped."""
    import ray
    address = address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        options = {} if address else {"num_cpus": workers}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **options)
    try:
        loaded = SafetyGene.load(gene)
        gene_ref = ray.put(loaded)
        task = ray.remote(_ray_job)
        pending = {task.options(num_cpus=1, memory=planned_memory(job, loaded), max_retries=3).remote(
            job, gene_ref, overwrite): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayError as exc:  # the task's retries are spent
                yield {"target": job.name, "model": job.model, "out": job.out, "status": "failed", "seconds": None,
                       "error": f"the Ray task failed ({str(exc).splitlines()[0]})"}
    finally:
        if started:
            ray.shutdown()


def _ray_job(job: Job, gene: SafetyGene, overwrite: bool) -> dict:
    import torch
    torch.set_num_threads(1)
    return run_job(job, gene, overwrite)


def check_jobs(recipe: Recipe, jobs: list[Job], overwrite: bool) -> None:
    """Before anything runs: outputs (the targets', and the gene's when it is extracted) distinct,
    none touching an input (targets, their bases, the gene or what it is extracted from), none
    existing unless ``overwrite``."""
    gene = gene_folder(recipe)
    made = [gene] if recipe.extract is not None else []
    check_distinct(*[job.out for job in jobs], *made)
    inputs = [*made] if made else [gene]
    if recipe.extract is not None:
        inputs += [recipe.extract.aligned, *recipe.extract.degraded]
    for job in jobs:
        inputs.append(job.model)
        if is_adapter(job.model):
            inputs.append(base_of(job.model, job.base))
        elif job.base is not None:
            raise RecipeError(f"target {job.name}: base is for LoRA adapter targets, and {job.model} is not one.")
    for out in made:
        check_output(out, [i for i in inputs if i != out], overwrite=overwrite, folder=True)
    for job in jobs:
        check_output(job.out, inputs, overwrite=overwrite, folder=True)


def run_batch(recipe: str | os.PathLike, *, executor: str = "local", workers: int = 1, address: str | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool = True, on_row=None) -> list[dict]:
    """Protects every target of ``recipe`` (a YAML file); returns one row per target in the
    recipe's order. ``on_row(row, done, total)`` is called as each one finishes. ``resume``: skip
    targets that are up to date, and redo (replace) the others."""
    if not isinstance(recipe, (str, os.PathLike)):
        raise TypeError(f"a recipe is the path of a YAML file, not {type(recipe).__name__} {recipe!r}.")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; use {' or '.join(map(repr, EXECUTORS))}.")
    if not (isinstance(workers, int) and workers > 0):
        raise ValueError(f"workers must be a positive integer, not {workers!r}.")
    r = load_recipe(recipe)
    jobs = plan(r)
    check_jobs(r, jobs, overwrite or resume)
    with ExitStack() as locks:
        for out in [job.out for job in jobs] + ([gene_folder(r)] if r.extract is not None else []):
            locks.enter_context(output_lock(out))
        gene = make_gene(r, resume, overwrite, progress)
        rows, todo = {}, []
        for job in jobs:
            if resume and up_to_date(job, gene):
                rows[job.name] = {"target": job.name, "model": job.model, "out": job.out, "status": "up to date",
                                  "seconds": 0.0}
            else:
                todo.append(job)
        results = run_local(todo, gene, workers, overwrite or resume) if executor == "local" else \
            run_ray(todo, gene, workers, overwrite or resume, address)
        for row in results:
            rows[row["target"]] = row
            if on_row is not None:
                on_row(row, len(rows), len(jobs))
    return [rows[job.name] for job in jobs]
