"""Small helpers shared by the stage scripts (download, train_model, train_concept).

Settings come only from environment variables.  Expected failures raise
:class:`StageError` and are turned into ONE line on stderr by :func:`main`
(no traceback):

* exit 2 -- a setting is missing or has the wrong type/range (:class:`SettingError`)
* exit 3 -- input data is missing, unreachable or corrupt
* exit 1 -- anything else (unexpected; a traceback is printed)
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

EXIT_SETTING = 2
EXIT_DATA = 3


class StageError(Exception):
    """An expected failure: reported as one line, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class SettingError(StageError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_SETTING)


def log(stage: str, message: str) -> None:
    """One progress line on stdout, flushed (the backend streams it live).

    Under mlflowctl (``STAGE_NAME`` set) the backend already prefixes every
    line with ``[stage]``; run by hand, the script names itself.
    """
    print(message if os.environ.get("STAGE_NAME") == stage else f"{stage}: {message}", flush=True)


# --------------------------------------------------------------------- settings
def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_str(name: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
    value = _raw(name)
    if value is None:
        if default is None:
            raise SettingError(f"environment variable {name} is not set")
        value = default
    if choices is not None and value not in choices:
        raise SettingError(f"environment variable {name}={value!r}: expected one of {', '.join(choices)}")
    return value


def env_int(name: str, default: int | None = None, minimum: int | None = None) -> int:
    value = _raw(name)
    if value is None:
        if default is None:
            raise SettingError(f"environment variable {name} is not set (expected an integer)")
        result = default
    else:
        try:
            result = int(value)
        except ValueError:
            raise SettingError(f"environment variable {name}={value!r}: expected an integer") from None
    if minimum is not None and result < minimum:
        raise SettingError(f"environment variable {name}={result}: expected an integer >= {minimum}")
    return result


def env_float(
    name: str,
    default: float | None = None,
    low: float | None = None,
    high: float | None = None,
    inclusive: bool = False,
) -> float:
    """A float; ``low``/``high`` bound it (exclusive unless ``inclusive``)."""
    value = _raw(name)
    if value is None:
        if default is None:
            raise SettingError(f"environment variable {name} is not set (expected a number)")
        result = float(default)
    else:
        try:
            result = float(value)
        except ValueError:
            raise SettingError(f"environment variable {name}={value!r}: expected a number") from None
    if result != result or result in (float("inf"), float("-inf")):
        raise SettingError(f"environment variable {name}={value!r}: expected a finite number")
    bad_low = low is not None and (result < low if inclusive else result <= low)
    bad_high = high is not None and (result > high if inclusive else result >= high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        brackets = "[]" if inclusive else "()"
        raise SettingError(
            f"environment variable {name}={result}: expected a number in {brackets[0]}{lo}, {hi}{brackets[1]}"
        )
    return result


def env_dir(name: str, must_exist: bool = True) -> str:
    """A directory path from ``name`` (required). Pass ``must_exist=False`` for an
    output dir and create it with :func:`make_dir` once all settings are validated."""
    path = env_str(name)
    if must_exist and not os.path.isdir(path):
        raise SettingError(f"environment variable {name}={path!r}: expected an existing directory")
    return path


def make_dir(name: str, path: str) -> None:
    """Create the output directory ``path`` (from env var ``name``) if needed."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SettingError(f"environment variable {name}={path!r}: cannot create directory ({exc.strerror})") from None


# ------------------------------------------------------------------------- data
def load_split(data_dir: str, split: str):
    """Load ``<data_dir>/<split>.npz`` -> (x uint8 N×28×28, y uint8 N)."""
    import numpy as np

    path = os.path.join(data_dir, f"{split}.npz")
    if not os.path.isfile(path):
        raise StageError(f"{path} not found (run the data stage first)", EXIT_DATA)
    try:
        with np.load(path) as npz:
            x, y = npz["x"], npz["y"]
    except Exception as exc:  # zip/pickle/key errors: the file is not what the data stage writes
        raise StageError(f"{path} is not a valid data file: {exc}", EXIT_DATA) from None
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
        raise StageError(f"{path}: unexpected shapes x{x.shape} y{y.shape}", EXIT_DATA)
    return x, y


def as_features(x):
    """uint8 N×28×28 -> float32 N×784 in [0, 1]."""
    import numpy as np

    return x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)


# ---------------------------------------------------------------------- outputs
def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` via a temp file in the same dir + ``os.replace``: never half a file."""
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------- TF/Keras bits
# (TensorFlow is imported by the caller, after settings are validated, and passed in.)
# ------------------------------------------------------------------------- main
def main(stage: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` and exit: expected errors -> one stderr line + their exit code."""
    try:
        fn()
    except StageError as exc:
        print(f"{stage}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.stdout.flush()
