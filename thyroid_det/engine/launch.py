"""detectron2's ``launch``, plus several CPU processes where there is no GPU.

detectron2 0.6's worker asserts CUDA and uses NCCL; current detectron2 falls back to gloo on a
machine without GPUs. This does the same on either version, so that the multi-process path
(DDP, the cascade's re-wrap, the evaluators' gather) runs, and is tested, on a CPU.

A user's mistake that stops a process (a missing data set, a broken checkpoint: the errors that
:func:`~thyroid_det.utils.cli.cli_errors` prints on one line) is raised again in the launching
process as itself, not as torch's ProcessRaisedException around the process's traceback, so that
a tool reports it as it does with one process.
"""
import errno
import faulthandler
import functools
import gc
import os
import pickle
import socket
import tempfile
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

from ..utils.cli import user_errors

__all__ = ["launch"]


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=()):
    """
    As :func:`detectron2.engine.launch`; without CUDA, ``num_gpus_per_machine`` CPU processes
    per machine on the gloo backend (one process: ``main_func(*args)`` here). A user error
    (see the module docstring) that ends a process is raised here as itself, from torch's
    exception, which keeps the process's traceback; any other error is torch's as before.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return d2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args
        )
    if num_machines == 1:
        check_port_free(dist_url)
    with tempfile.TemporaryDirectory(prefix="thyroid_det_launch_") as errors:
        main_func = functools.partial(_record_user_error, main_func, errors)
        try:
            if torch.cuda.is_available():
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
        except mp.ProcessRaisedException as e:
            error = _recorded_error(errors, e.error_pid)
            if error is None:
                raise
            raise error from e


def check_port_free(dist_url):
    """
    detectron2's parser gives ``--dist-url`` one fixed port per user, so a second run on the
    same machine would fail deep inside torch with "address already in use"; say so first.

    Raises:
        OSError: the ``tcp://`` URL's port is already listened on.
    """
    url = urlparse(dist_url or "")
    if url.scheme != "tcp" or not url.port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # A port left in TIME_WAIT by a finished run is free to bind; a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((url.hostname or "127.0.0.1", url.port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # not ours to judge (a remote host name, say): torch reports it
            raise OSError(
                errno.EADDRINUSE,
                "port already in use (another run on this machine? --dist-url auto picks a free "
                "port)",
                dist_url,
            ) from None


def _record_user_error(main_func, errors, *args):
    """``main_func(*args)`` in a process; a user error is also pickled to ``errors/<pid>``
    for :func:`launch` to raise (torch passes back only its traceback, as text)."""
    try:
        return main_func(*args)
    except user_errors() as e:
        try:
            data = pickle.dumps(e)
            pickle.loads(data)
        except Exception:  # an error that does not survive the trip stays torch's
            data = None
        if data is not None:
            path = os.path.join(errors, str(os.getpid()))
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)  # whole when launch reads it
        raise


def _recorded_error(errors, pid):
    """The user error that process ``pid`` recorded, else one that another process recorded
    (``pid`` then failed because that one stopped: a collective lost its peer), else None."""
    names = sorted((n for n in os.listdir(errors) if n.isdigit()), key=lambda n: n != str(pid))
    if not names:
        return None
    with open(os.path.join(errors, names[0]), "rb") as f:
        return pickle.load(f)


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
