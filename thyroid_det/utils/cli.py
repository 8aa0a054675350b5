"""What every command-line tool shares: the argument parser of a config-driven tool, the output
folder and file checks, the check of a data set named on the command line, and one error
wrapper: errors that bad input causes become one line.

A wrong path, an unknown config key, a broken data set or checkpoint, an unreadable image: the
message already names the file and the problem, and a traceback through detectron2 only hides it.
Programming errors (anything else) keep their traceback. ``THYROID_DET_TRACEBACK=1`` keeps it
for every error.
"""
import argparse
import functools
import os

from detectron2.data import DatasetCatalog

__all__ = [
    "UnknownDatasetError",
    "check_dataset",
    "check_output_dir",
    "check_output_file",
    "cli_errors",
    "config_tool_parser",
    "user_errors",
]


class UnknownDatasetError(LookupError):
    """A data set named on the command line that is not registered."""


def user_errors():
    """The exception types a user's mistake raises (a config, a data set, a checkpoint, a file),
    which tools print on one line; imported when a tool runs, as tools import this module before
    the plugin registers."""
    from ..data.datasets.kfold import FoldCountError
    from ..data.datasets.tn5000 import DatasetFormatError
    from ..engine.checkpoint import CheckpointError
    from ..engine.defaults import ConfigError

    return (
        ConfigError, DatasetFormatError, UnknownDatasetError, FoldCountError, CheckpointError, OSError
    )


def one_line(error):
    """The message of ``error`` on one line. An error re-raised from a DataLoader worker carries
    the worker's traceback in its message: its last line is the original message."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.strerror}: {error.filename}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1].split(": ", 1)[-1] if "Original Traceback" in str(error) else lines[0]


def cli_errors(tool):
    """Decorate a tool's ``main``: a user-input error ends it with ``<tool>: error: <message>``
    on stderr and exit status 1, as argparse reports a bad argument."""

    def decorate(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except user_errors() as e:
                if os.environ.get("THYROID_DET_TRACEBACK"):
                    raise
                raise SystemExit(f"{tool}: error: {one_line(e)}") from None

        return run

    return decorate


def config_tool_parser(doc, config_help=None):
    """
    The argument parser of a tool that runs a config: the first paragraph of the tool's
    docstring as its description, ``--config-file`` (required) and trailing ``KEY VALUE ...``
    config overrides (``opts``), as detectron2's tools take them. The tool adds its own flags.
    """
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help=config_help)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def check_output_dir(output, inputs=(), flag="--output"):
    """
    Create the output folder, refusing one that would overwrite the user's files.

    Args:
        output (str): the folder a tool writes to.
        inputs (list[str]): the files and folders the tool reads. ``output`` may not be one of
            these folders, nor the folder of one of these files: a tool's outputs (``scan1.json``
            for ``scan1.png``, ``metrics.json``, ...) would replace the user's files there.
            A new sub-folder is fine.
        flag (str): the option that named ``output``, for the messages.

    Raises:
        OSError: ``output`` is a file, cannot be created, is not writable, or is an input folder.
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise NotADirectoryError(f"{flag} {output} is a file, not a folder")
    real = os.path.realpath(output)
    for path in inputs:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        if os.path.realpath(folder) == real:
            raise IsADirectoryError(
                f"{flag} {output} holds the input {path}: outputs would overwrite files there; "
                "choose another folder (a new sub-folder is fine)"
            )
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise OSError(f"{flag} {output} cannot be created ({e.strerror or e})") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {output} is not writable")


def check_output_file(output, inputs=(), flag="--output"):
    """
    Refuse an output file that is one of the tool's inputs: a second run would replace the
    file the first one read (a checkpoint, a config) with its own result.

    Args:
        output (str): the file a tool writes.
        inputs (list[str]): the files the tool reads; None entries are skipped.
        flag (str): the option that named ``output``, for the messages.

    Raises:
        OSError: ``output`` is a folder or one of ``inputs``.
    """
    if os.path.isdir(output):
        raise IsADirectoryError(f"{flag} {output} is a folder, not a file")
    real = os.path.realpath(output)
    for path in inputs:
        if path and os.path.realpath(path) == real:
            raise FileExistsError(
                f"{flag} {output} is the input {path}: it would be overwritten; "
                "choose another file"
            )


def check_dataset(name, need_images=True):
    """
    Load a registered data set once, as a tool that names it on the command line needs it.

    Args:
        name (str): a name in detectron2's DatasetCatalog.
        need_images (bool): also require every record's image file (a tool that only reads the
            boxes, such as the prior fitting, does not).

    Returns:
        list[dict]: the data set's records.

    Raises:
        UnknownDatasetError: ``name`` is not registered.
        DatasetFormatError, OSError: the data set cannot be loaded (the loader's error), has no
            images, or (``need_images``) names an image that does not exist.
    """
    from ..data.datasets.tn5000 import DatasetFormatError

    if name not in DatasetCatalog.list():
        raise UnknownDatasetError(
            f"dataset {name!r} is not registered "
            f"(registered: {', '.join(sorted(DatasetCatalog.list()))})"
        )
    # The loaders name the file and the problem (DatasetFormatError, OSError); anything else they
    # raise is a bug and keeps its traceback.
    records = DatasetCatalog.get(name)
    if not records:
        raise DatasetFormatError(f"dataset {name!r} has no images")
    if need_images:
        missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetFormatError(
                f"dataset {name!r} references a missing image: {missing[0]}{more}"
            )
    return records
