"""Job templates: what an operator lets submitters run, argument by argument.

An allowed entrypoint with free arguments is still a wide door: a training
script's ``--final-weights PATH`` can overwrite the server's own database, a
``--trace PATH`` appends to any file, a ``--ckpt-url URL`` makes the rank
fetch and post anywhere (SSRF). A template closes it: a named entrypoint,
fixed arguments, and the only arguments a submitter may set, each typed and
ranged:

    {
      "demo": {
        "entrypoint": "/app/demo/train.py",
        "args": ["--data", "/app/data"],
        "max_world_size": 4,
        "params": {
          "epochs": {"flag": "--epochs", "type": "int", "min": 1, "max": 100},
          "lr": {"flag": "--lr", "type": "float", "min": 0, "max": 1},
          "final-weights": {"flag": "--final-weights", "type": "output"},
          "ckpt-url": {"flag": "--ckpt-url", "type": "url", "schemes": ["s3"], "hosts": ["rankwarden-checkpoints"]}
        }
      }
    }

Types: ``int`` and ``float`` (``min``/``max``), ``str`` (``pattern``, matched
in full; default: letters, digits, ``._-``, at most 64), ``bool`` (the flag
alone, when true), ``choice`` (``choices``), ``output`` (a file name the job
writes: it becomes a path inside the job's own ``outputs/`` directory, so a
job can only write there or to its checkpoint store), and ``url`` (its scheme
and host must be in the param's ``schemes`` and ``hosts``). A value is always
passed as its own argv item after its flag, so it can never become another
option.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from rankwarden.errors import ApiError, RankwardenError

__all__ = ["Param", "Template", "expand", "load_templates"]

_NAME = r"[a-z][a-z0-9_-]{0,62}"
_FLAG = r"--?[A-Za-z0-9][A-Za-z0-9_-]*"
_SAFE_STR = r"[A-Za-z0-9._-]{1,64}"
_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class Param(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    flag: Annotated[str, Meta(pattern=f"^{_FLAG}$")]
    type: Literal["int", "float", "str", "bool", "choice", "output", "url"]
    min: float | None = None
    max: float | None = None
    pattern: str = _SAFE_STR
    choices: list[str] = []
    schemes: list[str] = []
    hosts: list[str] = []
    required: bool = False


class Template(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    entrypoint: str
    module: bool = False
    args: list[str] = []
    max_world_size: Annotated[int, Meta(ge=1)] = 1
    params: dict[Annotated[str, Meta(pattern=f"^{_NAME}$")], Param] = {}


def load_templates(path: str | os.PathLike[str]) -> dict[str, Template]:
    """Templates from a JSON file: ``{name: template}``. A bad file is a RankwardenError naming the field."""
    try:
        raw = Path(path).read_bytes()
        templates = msgspec.json.decode(raw, type=dict[Annotated[str, Meta(pattern=f"^{_NAME}$")], Template])
    except OSError as exc:
        raise RankwardenError(f"cannot read the templates file {path}: {exc}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise RankwardenError(f"the templates file {path} is invalid: {exc}") from None
    for name, template in templates.items():
        if not template.module and not os.path.isabs(template.entrypoint):
            raise RankwardenError(f"template {name!r}: entrypoint {template.entrypoint!r} must be an absolute path")
        for pname, param in template.params.items():
            if param.type == "url" and not (param.schemes and param.hosts):
                raise RankwardenError(f"template {name!r}: url param {pname!r} needs `schemes` and `hosts` lists")
            if param.type == "choice" and not param.choices:
                raise RankwardenError(f"template {name!r}: choice param {pname!r} needs `choices`")
            try:
                re.compile(param.pattern)
            except re.error as exc:
                raise RankwardenError(f"template {name!r}: param {pname!r} has a bad pattern: {exc}") from None
    return templates


def expand(template: Template, name: str, params: dict[str, Any], job_dir: Path) -> list[str]:
    """The argv after the entrypoint for these params, or ApiError(422) naming the bad one."""
    unknown = sorted(set(params) - set(template.params))
    if unknown:
        raise ApiError(422, f"template {name!r} has no parameter {unknown[0]!r}",
                       f"its parameters: {', '.join(sorted(template.params)) or 'none'}")
    argv = list(template.args)
    for pname, param in template.params.items():
        if pname not in params:
            if param.required:
                raise ApiError(422, f"template {name!r} needs parameter {pname!r}")
            continue
        value = _check(name, pname, param, params[pname], job_dir)
        if param.type == "bool":
            if value:
                argv.append(param.flag)
        else:
            argv += [param.flag, value]
    return argv


def _check(name: str, pname: str, param: Param, value: Any, job_dir: Path) -> Any:
    def bad(why: str) -> ApiError:
        return ApiError(422, f"template {name!r} parameter {pname!r}: {why}")

    kind = param.type
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {json.dumps(value)}")
        return value
    if kind in ("int", "float"):
        ok = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (kind == "float" and not math.isfinite(value)):
            raise bad(f"expected {'an integer' if kind == 'int' else 'a finite number'}, got {json.dumps(value)}")
        if param.min is not None and value < param.min:
            raise bad(f"{value} is below the minimum {param.min}")
        if param.max is not None and value > param.max:
            raise bad(f"{value} is above the maximum {param.max}")
        return str(value)
    if not isinstance(value, str):
        raise bad(f"expected a string, got {json.dumps(value)}")
    if kind == "str":
        if not re.fullmatch(param.pattern, value):
            raise bad(f"{value!r} does not match {param.pattern}")
        return value
    if kind == "choice":
        if value not in param.choices:
            raise bad(f"{value!r} is not one of {', '.join(param.choices)}")
        return value
    if kind == "output":
        # A bare file name, placed in the job's own directory: a job cannot
        # write to the server's database, its token, or another job.
        if not _FILE.fullmatch(value):
            raise bad(f"{value!r} is not a plain file name (letters, digits, '._-'; no '/')")
        return str(job_dir / "outputs" / value)
    url = urlsplit(value)
    if url.scheme not in param.schemes:
        raise bad(f"scheme {url.scheme!r} is not allowed (allowed: {', '.join(param.schemes)})")
    if (url.hostname or "") not in param.hosts or url.username or url.password:
        raise bad(f"host {url.hostname!r} is not allowed (allowed: {', '.join(param.hosts)})")
    return value
