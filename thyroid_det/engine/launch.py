"""detectron2's ``launch``, plus several CPU processes where there is no GPU.

detectron2 0.6's worker asserts CUDA and uses NCCL; current detectron2 falls back to gloo on a
machine without GPUs. This does the same on either version, so that the multi-process path
(DDP, the cascade's re-wrap, the evaluators' gather) runs, and is tested, on a CPU.
"""
import faulthandler
import functools
import gc

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

__all__ = ["launch"]


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=()):
    """
    As :func:`detectron2.engine.launch`; without CUDA, ``num_gpus_per_machine`` CPU processes
    per machine on the gloo backend (one process: ``main_func(*args)`` here).
    """
    world_size = num_machines * num_gpus_per_machine
    if torch.cuda.is_available() or world_size == 1:
        return d2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args
        )
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args),
        daemon=False,
        start_method="spawn",
    )


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args):
    # A native abort in a worker then prints each thread's Python stack, not just a signal name.
    faulthandler.enable()
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank)
    # As detectron2's local process group: every process creates every machine's group.
    groups = [
        dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        for i in range(world_size // num_per_machine)
    ]
    comm._LOCAL_PROCESS_GROUP = groups[machine_rank]
    del groups  # comm holds the one it needs; it drops it after the run
    # DefaultTrainer wraps the model with device_ids=[local rank], which DDP refuses for a CPU
    # module; a CPU module takes device_ids=None.
    d2_defaults.create_ddp_model = functools.partial(d2_defaults.create_ddp_model, device_ids=None)
    comm.synchronize()
    try:
        main_func(*args)
        # Shut gloo down on every process together, not while another still works (the main
        # one evaluating): the likeliest cause of a SIGABRT that CI saw once after a successful
        # two-process evaluation.
        comm.synchronize()
    finally:
        # Without this, gloo's threads can outlive the interpreter's teardown and abort the
        # process ("terminate called without an active exception") after a successful run.
        dist.destroy_process_group()
        # The groups that detectron2's comm still holds would otherwise be freed during that
        # teardown too; free them now, while the interpreter is whole.
        comm._LOCAL_PROCESS_GROUP = None
        comm._get_global_gloo_group.cache_clear()
        gc.collect()
