"""The ``slurm`` backend of `cilbench sweep` (optional extra ``cilbench[slurm]``: submitit).

One SLURM job array (``map_array``); each array task runs one `cilbench run` in its own job process.
``RunJob`` is a submitit ``Checkpointable``: on a timeout or pre-emption submitit requeues it with the
same arguments, and the run resumes from its last per-task checkpoint (up to ``max_num_timeout``
times). ``submitit-local`` is the same path on this machine (submitit's ``LocalExecutor``: real
subprocesses and real timeouts), which is how the requeue is tested without a cluster.
"""
from __future__ import annotations

import time

try:
    import submitit
except ImportError as e:  # pragma: no cover - depends on the install
    from cilbench.errors import ConfigError

    raise ConfigError("the slurm backend needs submitit, which is not installed",
                      'pip install "cilbench[slurm]", or use --emit-sbatch for a plain job-array script') from e

from cilbench.sweep import RunSpec, Sweep


class RunJob(submitit.helpers.Checkpointable):
    """``cilbench run ARGV`` inside the job process; requeued with the same ARGV on timeout."""

    def __call__(self, argv: list[str]) -> int:
        from cilbench.cli import main

        code = main(["run", *argv])
        if code:
            raise RuntimeError(f"cilbench run exited with {code}; see the job's log")
        return code


def run_submitit(sweep: Sweep, specs: list[RunSpec], backend: str, retries: int, partition: str = "",
                 timeout_min: float = 600, gpus_per_run: int = 0, parallelism: int = 16, cpus_per_run: int = 0,
                 max_num_timeout: int = 10, signal_delay_s: int = 120, poll_s: float = 2.0) -> None:
    """Submit ``specs`` as one array and wait, recording job ids and final states. A failed run is
    submitted again (a new array of the failed ones) while it has failed at most ``retries`` times."""
    folder = sweep.folder / "submitit" / "%j"
    if backend == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_num_timeout)
        params = dict(timeout_min=int(timeout_min), slurm_array_parallelism=parallelism,
                      slurm_signal_delay_s=signal_delay_s)
        if partition:
            params["slurm_partition"] = partition
        if gpus_per_run:
            params["gpus_per_node"] = gpus_per_run
        if cpus_per_run:
            params["cpus_per_task"] = cpus_per_run
    else:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_num_timeout)
        # the warning signal comes signal_delay_s before the limit: at most a quarter of a short limit
        params = dict(timeout_min=timeout_min, signal_delay_s=max(1, min(signal_delay_s, int(timeout_min * 15))))
    executor.update_parameters(**params)
    while specs:
        for spec in specs:
            st = sweep.status[spec.run_id]
            sweep.update(spec.run_id, state="running", attempts=st.attempts + 1, error="")
        jobs = executor.map_array(RunJob(), [list(s.argv) for s in specs])
        for spec, job in zip(specs, jobs):
            sweep.update(spec.run_id, job_id=str(job.job_id), log=str(job.paths.stdout))
        t0 = time.time()
        while not all(job.done() for job in jobs):
            time.sleep(poll_s)
        retry = []
        for spec, job in zip(specs, jobs):
            st = sweep.status[spec.run_id]
            wall = round(st.wall_s + time.time() - t0, 1)
            try:
                job.result()
                sweep.update(spec.run_id, state="done", wall_s=wall)
            except Exception as e:  # noqa: BLE001 - a failed job's exception, with its log
                sweep.update(spec.run_id, state="failed", wall_s=wall, failures=st.failures + 1,
                             error=str(e).strip().splitlines()[-1][:200])
                if st.failures + 1 <= retries:
                    retry.append(spec)
        sweep.refresh()
        specs = retry
