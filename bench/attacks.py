"""A reproducible attack battery: bad inputs and faults against the Python API, the CLI, the server and
the artifact files, each classified by how diffrt handled it (issue 18).

    python -m diffrt.bench.attacks --out bench/results [--quick] [--only api,cli,...]

Attacks are generated from tables (a call or a command x an argument x bad values), not written one
by one. Each runs in a worker process under a hard timeout: a worker that does not answer in time is
killed, the attack is classified as a hang and the next attack gets a fresh worker, so a hang never
blocks the battery. An attack's **verdict** is one of:

* ``ok``: handled well (refused with a message naming the offending argument, file or value; or,
  where the input is legal, a correct result);
* ``hang``: no answer within the attack's timeout;
* ``silently-wrong``: a bad value accepted (no error: a call that returned, a CLI that exited 0, a
  server that answered 2xx), or a result that is not finite / not what the reference gives;
* ``broken-state``: a fault left something unusable (a good call right after it fails or differs),
  or frames were lost;
* ``server-5xx``: the server answered 5xx to bad input (or a WebSocket closed with 1006, 1011 or no code);
* ``traceback``: the CLI printed a Python traceback, or the Python API raised an exception of a kind
  no check raises (IndexError, KeyError, a RuntimeError from deep in torch...): a crash;
* ``poor-message``: refused, but the message does not name what to change. The rule per attack is a
  tuple of words of which one must appear (case-insensitive; the argument's name, the file, the
  value); a message over :data:`MESSAGE_LIMIT` characters, or on several lines for the CLI, is poor too.

Every attack belongs to the **class** of failure it probes (hangs, silently wrong results, lost data /
broken state, server 5xx, CLI tracebacks, poor messages); the table counts per class how many were
tried, how many were handled well, and lists the others with their verdict (every attack runs under its
timeout: the verdict counts over all attacks say how many hung, whatever they probed). The CLI runs in the worker
through ``diffrt.runtime.cli.main`` (what the ``diffrt`` script calls; stdout, stderr and logging
captured), except a few attacks that start the real ``diffrt`` in a subprocess. The server is
exercised through FastAPI's TestClient and raw ASGI calls (the chunked body, a client hanging up). Writes
``<device>-<yyyymmdd>-attacks.json`` and ``.md`` (the table) under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

log = logging.getLogger("diffrt.bench.attacks")

CLASSES = {"hang": "hangs", "silently-wrong": "silently wrong results", "broken-state": "lost data / broken state",
           "server-5xx": "server 5xx for bad input", "traceback": "CLI tracebacks / API crashes",
           "poor-message": "poor messages"}
VERDICTS = ("ok", *CLASSES)
MESSAGE_LIMIT = 2000  # characters: longer is not a message (the 6.9 MB one of steps=10**6)
REFUSALS = (ValueError, TypeError, NotImplementedError, FileNotFoundError)  # what checks raise; others: a crash
SURFACES = ("api", "stream", "artifact", "cli", "server")


# ----------------------------------------------------------------------------------------- the attacks

@dataclass(frozen=True)
class T:
    """A tensor argument, made in the worker: ``kind`` names how it is bad (see :func:`_tensor`)."""

    kind: str


@dataclass(frozen=True)
class Attack:
    """One attack: ``probe`` (a function of this module, by name) called with ``args`` in a worker."""

    id: str
    cls: str  # the failure class it probes (a key of CLASSES)
    surface: str  # api, stream, artifact, cli, server
    probe: str
    args: tuple = ()
    expect: tuple[str, ...] = ()  # a good message holds one of these words
    timeout: float = 30.0
    quick: bool = False  # part of --quick


@dataclass
class Outcome:
    verdict: str
    detail: str = ""


# ----------------------------------------------------------------------------------------- the worker

def _worker(connection, scratch: str) -> None:
    """Run the attacks the parent sends, one at a time, answering an Outcome each (None: stop); files go under
    ``scratch`` (the parent's temporary folder, removed after the battery)."""
    logging.basicConfig(level=logging.ERROR)
    _FIXTURES["scratch"] = Path(scratch)
    connection.send("ready")
    while True:
        attack = connection.recv()
        if attack is None:
            return
        try:
            outcome = globals()[attack.probe](attack, *attack.args)
        except BaseException as error:  # noqa: BLE001 - the probe itself failed: say so, keep the worker
            outcome = Outcome("traceback", f"the probe failed: {type(error).__name__}: {_short(error)}")
        connection.send(outcome)


class Runner:
    """Runs attacks in a worker process; a worker that misses an attack's timeout is killed (a hang) and the
    next attack starts a fresh one. An attack's timeout counts from when the worker is ready."""

    START_TIMEOUT = 300.0  # seconds for a worker to import diffrt on a loaded machine

    def __init__(self, scratch: str | Path):
        self.scratch = str(scratch)
        self._context = multiprocessing.get_context("spawn")
        self._process = self._connection = None

    def _start(self) -> None:
        self._connection, child = self._context.Pipe()
        self._process = self._context.Process(target=_worker, args=(child, self.scratch), daemon=True)
        self._process.start()
        child.close()
        try:
            ready = self._connection.poll(self.START_TIMEOUT) and self._connection.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.close(kill=True)
            raise RuntimeError(f"the attack worker did not start within {self.START_TIMEOUT:g} s (see its error above)")

    def run(self, attack: Attack) -> Outcome:
        if self._process is None or not self._process.is_alive():
            self._start()
        started = time.monotonic()
        self._connection.send(attack)
        try:
            if self._connection.poll(attack.timeout):
                return self._connection.recv()
        except (EOFError, OSError):
            self.close(kill=True)
            return Outcome("traceback", "the worker process died (a crash in native code?)")
        self.close(kill=True)
        return Outcome("hang", f"no answer within {attack.timeout:g} s (after {time.monotonic() - started:.1f} s)")

    def close(self, kill: bool = False) -> None:
        if self._process is None:
            return
        if kill:
            self._process.kill()
        else:
            with contextlib.suppress(OSError, BrokenPipeError):
                self._connection.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)
        self._process = self._connection = None


def run_attacks(attacks: list[Attack], progress: bool = False) -> list[dict[str, Any]]:
    """Each attack's row: its fields, verdict, detail and seconds."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffrt-attacks-") as scratch:
        runner = Runner(scratch)
        try:
            _run_each(runner, attacks, rows, progress)
        finally:
            runner.close()
    return rows


def _run_each(runner: Runner, attacks: list[Attack], rows: list[dict[str, Any]], progress: bool) -> None:
    """Append each attack's row (its fields, verdict, detail, seconds) to ``rows``."""
    for number, attack in enumerate(attacks, 1):
        start = time.monotonic()
        outcome = runner.run(attack)
        rows.append({**asdict(attack), "args": repr(attack.args)[:300], "verdict": outcome.verdict,
                     "detail": outcome.detail[:500], "seconds": round(time.monotonic() - start, 2)})
        if progress:
            print(f"[{number}/{len(attacks)}] {attack.id}: {outcome.verdict}"
                  f"{' - ' + outcome.detail[:150] if outcome.verdict != 'ok' else ''}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- judging

def _short(value: Any, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def judge_message(message: str, expect: tuple[str, ...], one_line: bool = False) -> Outcome:
    """ok when the message names one of ``expect`` (case-insensitive), is short, and (``one_line``) one line."""
    if len(message) > MESSAGE_LIMIT:
        return Outcome("poor-message", f"a message of {len(message)} characters: {_short(message, 120)}")
    if one_line and len(message.strip().splitlines()) > 1:
        return Outcome("poor-message", f"several lines: {_short(message)}")
    if expect and not any(word.lower() in message.lower() for word in expect):
        return Outcome("poor-message", f"names none of {list(expect)}: {_short(message)}")
    return Outcome("ok", _short(message))


def judge_call(attack: Attack, call: Callable[[], Any], check: Callable[[Any], str | None] | None = None,
               allowed: tuple[type, ...] = REFUSALS) -> Outcome:
    """Run ``call``: a refusal of an allowed kind naming ``attack.expect`` is ok; a return is silently wrong
    unless ``check`` (given the result) answers None; any other exception is a crash."""
    try:
        result = call()
    except allowed as error:
        return judge_message(str(error), attack.expect)
    except Exception as error:  # noqa: BLE001 - the point: which exception
        return Outcome("traceback", f"{type(error).__name__}: {_short(error)}")
    if check is None:
        return Outcome("silently-wrong", f"accepted: returned {_short(repr(result), 120)}")
    problem = check(result)
    return Outcome("ok", "a correct result") if problem is None else Outcome("silently-wrong", problem)


def _finite(result: Any) -> str | None:
    import torch  # noqa: PLC0415

    return None if torch.isfinite(result).all() else "the result holds NaN or infinite values"


# ----------------------------------------------------------------------------------------- worker fixtures

_FIXTURES: dict[str, Any] = {}


def _fixture(name: str, make: Callable[[], Any]) -> Any:
    if name not in _FIXTURES:
        _FIXTURES[name] = make()
    return _FIXTURES[name]


def _dit():
    from diffrt.runtime import models  # noqa: PLC0415

    return _fixture("dit", lambda: models.load("digits-dit"))


def _scratch() -> Path:
    """The worker's folder for the files attacks write (set by :func:`_worker`; a new one outside the runner)."""
    return _fixture("scratch", lambda: Path(tempfile.mkdtemp(prefix="diffrt-attacks-")))


def _tensor(kind: str, good: Any) -> Any:
    """A bad variant of the tensor ``good``: nan, inf, huge (1e30), shape (one axis more), 3d (one less),
    int (integer dtype), half (float16), empty (batch 0), list (a Python list), cuda (a device absent here)."""
    import torch  # noqa: PLC0415

    if kind == "nan":
        return good.clone().fill_(math.nan)
    if kind == "inf":
        return good.clone().fill_(math.inf)
    if kind == "huge":
        return good.clone().fill_(1e30)
    if kind == "shape":
        return good.unsqueeze(-1).expand(*good.shape, 2).contiguous()
    if kind == "3d":
        return good[0]
    if kind == "int":
        return good.round().to(torch.int64)
    if kind == "half":
        return good.half()
    if kind == "empty":
        return good[:0]
    if kind == "list":
        return good.tolist()
    if kind == "wide":  # a longer last axis
        return torch.cat([good, good], dim=-1)
    raise ValueError(f"unknown tensor kind {kind}")


def _value(value: Any, good: Any = None) -> Any:
    return _tensor(value.kind, good) if isinstance(value, T) else value


# ----------------------------------------------------------------------------------------- API probes

def _noise(batch: int = 2):
    import torch  # noqa: PLC0415

    return torch.randn(batch, *_dit().sample_shape, generator=torch.Generator().manual_seed(0))


def _labels(batch: int = 2):
    import torch  # noqa: PLC0415

    return torch.arange(batch) % 10


def _qkv():
    import torch  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 16, 2, 8, generator=generator) for _ in range(3)]


def _call_target(target: str, argument: str, value: Any) -> Callable[[], Any]:
    """The call ``target`` with ``argument`` set to the bad ``value`` (other arguments good)."""
    from diffrt.export import calibrate, export_onnx  # noqa: PLC0415
    from diffrt.kernels import attention  # noqa: PLC0415
    from diffrt.runtime import Sampler, optimize  # noqa: PLC0415
    from diffrt.runtime.attention import Sparse, ToDo  # noqa: PLC0415

    if target == "Sampler":
        return lambda: Sampler(_dit(), **{"solver": "dpmpp-2m", "steps": 2, argument: value})
    if target == "Sampler.sample":
        good = {"noise": _noise(), "cond": _labels(), "uncond": None}
        sampler = Sampler(_dit(), "dpmpp-2m", 2, guidance_scale=3.0 if argument == "uncond" else None)
        if argument == "uncond":
            good["uncond"] = _labels().fill_(10)
        return lambda: sampler.sample(**{**good, argument: _value(value, good.get(argument, good["noise"]))})
    if target == "optimize":
        return lambda: optimize(_dit(), **{argument: value})
    if target == "ToDo":
        return lambda: ToDo(**{argument: value})
    if target == "Sparse":
        return lambda: Sparse(**{argument: value})
    if target == "attention":
        q, k, v = _qkv()
        good = {"q": q, "k": k, "v": v}
        return lambda: attention(**{**good, argument: _value(value, good.get(argument, q))})
    if target == "calibrate":
        options = {"solver": "dpmpp-2m", "steps": 2, "cond": _labels(), "uncond": _labels().fill_(10),
                   "groups": "steps", "method": "max", "progress": False}
        return lambda: calibrate(_dit(), **{**options, argument: _value(value, options.get(argument))})
    if target == "export_onnx":
        return lambda: export_onnx(_dit(), _scratch() / "never.onnx", **{argument: value})
    if target == "StreamPipeline":
        from diffrt.runtime.stream import StreamPipeline  # noqa: PLC0415

        return lambda: StreamPipeline(_dit(), **{"t_index_list": (20, 40), "cond": 3, argument: value})
    if target == "Acceleration":
        from diffrt.runtime.acceleration import Acceleration  # noqa: PLC0415

        return lambda: Acceleration.from_dict({argument: value})
    raise ValueError(f"unknown target {target}")


def call(attack: Attack, target: str, args: tuple = ()) -> Outcome:
    """Any function ``"module:name"`` called with ``args``, judged as a refusal (for tests of the machinery)."""
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    return judge_call(attack, lambda: function(*args))


def api_refusal(attack: Attack, target: str, argument: str, value: Any) -> Outcome:
    """The call refuses the bad value with a message naming it (a return is silently wrong)."""
    return judge_call(attack, _call_target(target, argument, value))


def api_finite(attack: Attack, solver: str, steps: int) -> Outcome:
    """A legal plan samples finite values, or is refused saying why (never NaN samples)."""
    from diffrt.runtime import Sampler  # noqa: PLC0415

    return judge_call(attack, lambda: Sampler(_dit(), solver, steps).sample(_noise(1), cond=_labels(1)), _finite)


def api_calibrate_refuses_first(attack: Attack, argument: str, value: Any) -> Outcome:
    """calibrate() refuses a bad option before it samples (counted model calls: none)."""
    calls = []
    den = _dit()
    original = den.model.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    den.model.forward = counting
    try:
        outcome = judge_call(attack, _call_target("calibrate", argument, value))
    finally:
        del den.model.forward
    if outcome.verdict == "ok" and calls:
        return Outcome("poor-message", f"refused only after {len(calls)} model calls: {outcome.detail}")
    return outcome


def api_message_size(attack: Attack, steps: int) -> Outcome:
    """A huge step count is refused with a short message."""
    return api_refusal(attack, "Sampler", "steps", steps)


# ----------------------------------------------------------------------------------------- stream probes

def _pipe(**options):
    from diffrt.runtime.stream import StreamPipeline  # noqa: PLC0415

    return StreamPipeline(_dit(), **{"t_index_list": (20, 40), "cond": 3, **options})


def _frame(value: float | None = None):
    import torch  # noqa: PLC0415

    frame = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return frame if value is None else frame.fill_(value)


def stream_tick_refusal(attack: Attack, kind: str) -> Outcome:
    """A bad frame is refused (or comes out as an error result), never a NaN image; the stream goes on."""
    pipe = _pipe()
    try:
        result = pipe.tick(_tensor(kind, _frame()))
    except REFUSALS as error:
        outcome = judge_message(str(error), attack.expect)
    except Exception as error:  # noqa: BLE001
        return Outcome("traceback", f"{type(error).__name__}: {_short(error)}")
    else:
        outcome = _stream_result_ok(pipe, result)
    return outcome if outcome.verdict != "ok" else _stream_goes_on(pipe, outcome)


def _stream_result_ok(pipe, result) -> Outcome:
    """A tick's result for a bad frame: an error naming the problem, or not ready yet (then the error later)."""
    import torch  # noqa: PLC0415

    results = [result] + [pipe.tick(_frame()) for _ in range(pipe.stages - 1)]
    for item in results:
        if item.image is not None and not bool(torch.isfinite(item.image).all()):
            return Outcome("silently-wrong", "a frame came out with NaN / infinite values")
    errors = [item.error for item in results if item.error]
    if not errors:
        return Outcome("silently-wrong", "the bad frame was accepted and came out without an error")
    return Outcome("ok", _short(errors[0]))


def _stream_goes_on(pipe, outcome: Outcome) -> Outcome:
    import torch  # noqa: PLC0415

    images = [pipe.tick(_frame()).image for _ in range(pipe.stages + 1)]
    if not any(image is not None and torch.isfinite(image).all() for image in images):
        return Outcome("broken-state", f"after the bad frame no good frame came out ({outcome.detail})")
    return outcome


def stream_queue(attack: Attack, action: str) -> Outcome:
    """The queue API: a get with nothing submitted returns within its timeout, close drains every frame, a
    closed pipeline restarts, a worker failure is reported (never a hang, never a lost frame)."""
    import queue  # noqa: PLC0415

    from diffrt.runtime.stream import StreamWorkerError  # noqa: PLC0415

    pipe = _pipe()
    if action == "get-empty":
        pipe.start()
        try:
            pipe.get(timeout=1.0)
        except (queue.Empty, TimeoutError) as error:
            pipe.close(timeout=10)
            return Outcome("ok", f"{type(error).__name__} after the timeout")
        return Outcome("silently-wrong", "get() returned a result with nothing submitted")
    if action == "close-drains":
        pipe.start()
        ids = [pipe.submit(_frame(), timeout=10) for _ in range(5)]
        results = [pipe.get(timeout=30) for _ in range(2)] + pipe.close(timeout=60)
        got = [r.frame_id for r in results if r.frame_id is not None]
        missing = sorted(set(ids) - set(got))
        return Outcome("ok", f"{len(got)} frames out") if not missing else \
            Outcome("broken-state", f"frames {missing} were lost by close()")
    if action == "restart":
        pipe.start()
        pipe.submit(_frame(), timeout=10)
        pipe.close(timeout=60)
        pipe.start()
        frame_id = pipe.submit(_frame(), timeout=10)
        results = pipe.close(timeout=60)
        return Outcome("ok", "restarted") if frame_id in [r.frame_id for r in results] else \
            Outcome("broken-state", "a restarted pipeline lost its frame")
    if action == "model-fails":
        den = pipe.den

        def failing(*args, **kwargs):
            raise RuntimeError("device lost")

        den.model.forward = failing
        try:
            pipe.start()
            pipe.submit(_frame(), timeout=10)
            try:
                for _ in range(pipe.stages + 1):
                    pipe.get(timeout=20)
                    pipe.submit(_frame(), timeout=10)
            except StreamWorkerError as error:
                return judge_message(str(error), attack.expect)
            except (queue.Empty, TimeoutError):
                return Outcome("hang", "the worker failed and get() only timed out, without the error")
            finally:
                with contextlib.suppress(Exception):
                    pipe.close(timeout=10)
            return Outcome("silently-wrong", "a failing model produced results")
        finally:
            del den.model.forward
    if action == "submit-bad-then-good":
        pipe.start()
        try:
            pipe.submit(_frame(math.nan), timeout=10)
        except REFUSALS:
            pass
        frame_id = pipe.submit(_frame(), timeout=10)
        results = pipe.close(timeout=60)
        good = [r for r in results if r.frame_id == frame_id and r.image is not None]
        return Outcome("ok", "the good frame came out") if good else \
            Outcome("broken-state", "the good frame after a refused one was lost")
    raise ValueError(f"unknown stream action {action}")


# ----------------------------------------------------------------------------------------- artifact probes

def _calibration():
    from diffrt.export import calibrate  # noqa: PLC0415

    def make():
        return calibrate(_dit(), "dpmpp-2m", 2, cond=_labels(4), uncond=_labels(4).fill_(10), groups="steps",
                         method="max", progress=False)

    return _fixture("calibration", make)


def _mutate(path: Path, how: str) -> None:
    """Damage a file: flip (one byte in the middle), truncate (half), empty, binary (not UTF-8),
    deep (JSON nested past the recursion limit), delete, list (a JSON list, not an object)."""
    data = path.read_bytes() if path.exists() else b""
    if how == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x04]) + data[middle + 1:])
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "binary":
        path.write_bytes(b"\xff\xfe\x00" + data[:50])
    elif how == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "delete":
        path.unlink()
    elif how == "list":
        path.write_text("[1, 2, 3]")
    else:
        raise ValueError(f"unknown mutation {how}")


def _edit_json(path: Path, key: str, value: Any, keep_checksum: bool) -> None:
    document = json.loads(path.read_text())
    if not keep_checksum:
        document.pop("sha256", None)
    if key.startswith("-"):
        document.pop(key[1:], None)
    else:
        document[key] = value
    path.write_text(json.dumps(document))


def _rewrite_scales(base: Path, value: float) -> None:
    """Set one layer's activation scales to ``value`` in a saved calibration (its checksum dropped: the values
    themselves must be checked, as in a file saved before checksums)."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    weights = base.with_suffix(".safetensors")
    tensors = load_file(str(weights))
    name = sorted(key for key in tensors if key.endswith(".scales"))[0]
    tensors[name] = tensors[name].clone().fill_(value)
    save_file(tensors, str(weights))
    _edit_json(base.with_suffix(".json"), "-sha256", None, keep_checksum=False)


def artifact_calibration(attack: Attack, which: str, how: str) -> Outcome:
    """Calibration.load of a damaged file (``which``: json or safetensors) is refused naming the file."""
    from diffrt.export import Calibration  # noqa: PLC0415

    base = _scratch() / f"cal-{which}-{how}"
    _calibration().save(base)
    target = base.with_suffix(f".{which}")
    if how.startswith("scales="):
        _rewrite_scales(base, float(how.split("=")[1]))
    elif how.startswith("edit:"):
        key, raw = how[5:].split("=", 1)
        _edit_json(target, key, json.loads(raw), keep_checksum=False)
    else:
        _mutate(target, how)
    return judge_call(attack, lambda: Calibration.load(base), allowed=(*REFUSALS, FileNotFoundError))


def artifact_acceleration(attack: Attack, how: str) -> Outcome:
    """Acceleration.load of a damaged or edited config is refused naming the file; edited values too."""
    from diffrt.runtime.acceleration import Acceleration  # noqa: PLC0415

    path = _scratch() / f"acc-{how.replace('/', '_')}.json"
    Acceleration(steps=8, solver="dpmpp-2m").save(path)
    if how.startswith("edit:"):
        key, raw = how[5:].split("=", 1)
        _edit_json(path, key, json.loads(raw), keep_checksum=True)
    elif how.startswith("value:"):  # a hand-written config (no checksum) with one bad value
        key, raw = how[6:].split("=", 1)
        _edit_json(path, key, json.loads(raw), keep_checksum=False)
    else:
        _mutate(path, how)
    return judge_call(attack, lambda: Acceleration.load(path), allowed=(*REFUSALS, FileNotFoundError))


def artifact_onnx(attack: Attack, how: str, cached: bool) -> Outcome:
    """A damaged export: loaded directly it is refused naming the file; in the cache it is rebuilt and the
    rebuilt denoiser matches PyTorch (never the damaged graph run silently)."""
    import torch  # noqa: PLC0415

    from diffrt.export import export_onnx  # noqa: PLC0415
    from diffrt.export.artifacts import ArtifactCache  # noqa: PLC0415
    from diffrt.export.ort_backend import OrtDenoiser, ort_denoiser  # noqa: PLC0415

    den = _dit()
    x, t, y = _noise(2), torch.tensor([10.0, 900.0]), _labels(2)

    def matches(candidate) -> str | None:
        with torch.no_grad():
            got, want = candidate(x, t, y), den(x, t, y)
        error = ((got - want).abs().max() / want.abs().max()).item()
        return None if error <= 1e-4 else f"the loaded graph differs from PyTorch by {error:.2e} (relative)"

    folder = _scratch() / f"onnx-{how}-{cached}"
    if cached:
        cache = ArtifactCache(folder)
        ort_denoiser(den, cache=cache)
        _mutate(next((folder / "onnx").glob("*/model.onnx")), how)
        return judge_call(attack, lambda: ort_denoiser(den, cache=cache), check=matches)
    path = export_onnx(den, folder / "dit.onnx").path
    _mutate(path, how)
    return judge_call(attack, lambda: OrtDenoiser(den, path), check=matches)


def artifact_timing_cache(attack: Attack, how: str) -> Outcome:
    """A damaged TensorRT timing cache is discarded (never handed to TensorRT), with a log line."""
    from diffrt.export import tensorrt_backend  # noqa: PLC0415

    path = _scratch() / f"timing-{how}" / "timing.cache"
    tensorrt_backend.write_timing_cache(path, os.urandom(4096))
    _mutate(path if how != "checksum" else path.with_name("timing.cache.sha256"), "flip" if how == "checksum" else how)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(tensorrt_backend.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        data = tensorrt_backend.read_timing_cache(path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if data:
        return Outcome("silently-wrong", f"the damaged timing cache ({len(data)} bytes) would be used")
    messages = [record.getMessage() for record in records]
    if how != "delete" and not any(str(path) in message for message in messages):
        return Outcome("poor-message", f"discarded without a log line naming the file: {messages}")
    return Outcome("ok", _short(messages[0]) if messages else "no file: an empty cache")


# ----------------------------------------------------------------------------------------- CLI probes

def cli_in_process(attack: Attack, argv: list[str]) -> Outcome:
    """``diffrt argv`` through ``diffrt.runtime.cli.main`` in the worker, stdout / stderr / logging captured."""
    from diffrt.runtime import cli  # noqa: PLC0415

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    root.handlers = []  # main() calls logging.basicConfig: it then logs to the captured stderr
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as end:
                code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
            except BaseException:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                code = 1
    finally:
        root.handlers, root.level = saved, saved_level
    return judge_cli(attack, code, out.getvalue(), err.getvalue())


def cli_subprocess(attack: Attack, command: list[str]) -> Outcome:
    """A real process (``diffrt ...``, or any command): the same judgement as :func:`cli_in_process`."""
    if command and command[0] == "diffrt":
        command = [shutil.which("diffrt") or sys.executable, *([] if shutil.which("diffrt") else
                                                              ["-m", "diffrt.runtime.cli"]), *command[1:]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=max(1.0, attack.timeout - 2))
    except subprocess.TimeoutExpired:
        return Outcome("hang", f"{command[:4]} ran past {attack.timeout - 2:g} s")
    return judge_cli(attack, done.returncode, done.stdout, done.stderr)


def judge_cli(attack: Attack, code: int, out: str, err: str) -> Outcome:
    """No traceback; a bad value never exits 0; the error (the last stderr line, alone of its kind) names
    the option or the value."""
    if "Traceback (most recent call last)" in out + err:
        return Outcome("traceback", _short(err.strip().splitlines()[-1] if err.strip() else out, 200))
    if code == 0:
        return Outcome("silently-wrong", f"exit code 0: the bad value was accepted ({_short(out, 120)})")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    if not errors:
        return Outcome("poor-message", f"exit code {code} without an error line: {_short(err or out, 200)}")
    return judge_message(errors[-1], attack.expect, one_line=True)


# ----------------------------------------------------------------------------------------- server probes

SERVE_CONFIGS = {"default": {"models": ("digits-dit", "sd15-unet:tiny")}, "small": {"max_body_bytes": 4096},
                 "idle": {"stream_idle_timeout_s": 1.0}, "full": {"max_streams": 0}}
GOOD_REQUEST = {"model": "digits-dit", "class_label": 3, "steps": 2, "output": "latents"}
GOOD_STREAM = {"model": "digits-dit", "class_label": 4, "t_index_list": [20, 40]}


def _new_client(config: str):
    """A TestClient of a new server with ``SERVE_CONFIGS[config]``, its lifespan running (for the worker's life)."""
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from diffrt.serve import ServeConfig, create_app  # noqa: PLC0415

    options = {"models": ("digits-dit",), "max_wait_ms": 2.0, **SERVE_CONFIGS[config]}
    client = TestClient(create_app(ServeConfig(**options)))
    return client.__enter__()


def _client(config: str):
    """The worker's server for ``config`` (one per config: the attacks of a config share it)."""
    return _fixture(f"client-{config}", lambda: _new_client(config))


def _body(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def http_request(attack: Attack, method: str, path: str, body: Any, config: str = "default",
                 content_type: str = "application/json") -> Outcome:
    """A bad request gets a 4xx in the server's error shape naming the problem; never a 5xx, never a 2xx."""
    client = _client(config)
    response = client.request(method, path, content=None if body is None else _body(body),
                              headers={"content-type": content_type})
    return _judge_http(attack, response.status_code, response.content, response.headers.get("x-request-id"))


def _judge_http(attack: Attack, status: int, content: bytes, request_id: str | None) -> Outcome:
    if status >= 500:
        return Outcome("server-5xx", f"{status}: {_short(content, 200)}")
    if status < 400:
        return Outcome("silently-wrong", f"{status}: the bad request was served")
    try:
        document = json.loads(content)
    except ValueError:
        return Outcome("poor-message", f"{status} with a body that is not JSON: {_short(content, 120)}")
    if not isinstance(document, dict) or not isinstance(document.get("detail"), str) or \
            document.get("request_id") != request_id:
        return Outcome("poor-message", f"{status} not in the error shape {{detail, request_id}}: "
                                       f"{_short(content, 200)}")
    outcome = judge_message(document["detail"], attack.expect)
    return Outcome(outcome.verdict, f"{status}: {outcome.detail}")


def http_chunked(attack: Attack, chunks: int, chunk_bytes: int) -> Outcome:
    """A body without Content-Length (chunked) over the limit: 413 while reading, not read whole, not 5xx."""
    import asyncio  # noqa: PLC0415

    app = _client("small").app
    received, sent = [0], []
    scope = _http_scope([(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")])

    async def receive():
        if received[0] >= chunks:
            await asyncio.sleep(3600)  # the client would wait: the server must not
        received[0] += 1
        return {"type": "http.request", "body": b" " * chunk_bytes, "more_body": received[0] < chunks}

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 20))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return Outcome("hang", "no answer")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    request_id = dict(start.get("headers", [])).get(b"x-request-id", b"").decode() or None
    if received[0] * chunk_bytes > 4096 + 2 * chunk_bytes:
        return Outcome("silently-wrong", f"read {received[0] * chunk_bytes} bytes past a 4096-byte limit")
    return _judge_http(attack, start["status"], body, request_id)


def http_abandoned(attack: Attack) -> Outcome:
    """A client that hangs up right after sending its request: the request never reaches a batch."""
    import asyncio  # noqa: PLC0415

    app = _client("default").app
    engine, ran = app.state.engine, []
    real_run = engine.run

    def recording(requests):
        ran.extend(request.seed for request in requests)
        return real_run(requests)

    body = json.dumps({**GOOD_REQUEST, "seed": 4242}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        pass

    engine.run = recording
    try:
        asyncio.run(asyncio.wait_for(app(_http_scope([(b"content-type", b"application/json")]), receive, send), 30))
        _client("default").post("/v1/generate", json=GOOD_REQUEST)  # a batch after it: the queue was drained
    finally:
        del engine.run
    return Outcome("broken-state", "the abandoned request was computed") if 4242 in ran else \
        Outcome("ok", "dropped before its batch")


def _http_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of ``POST /v1/generate`` with ``headers``."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


def http_still_serving(attack: Attack) -> Outcome:
    """After the bad requests, a good one is served and equals the same request on a fresh server."""
    import base64  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    def sample(client) -> Any:
        response = client.post("/v1/generate", json=GOOD_REQUEST)
        if response.status_code != 200:
            return f"{response.status_code}: {_short(response.text, 200)}"
        return np.load(io.BytesIO(base64.b64decode(response.json()["npy_base64"])))

    used = sample(_client("default"))
    if isinstance(used, str):
        return Outcome("broken-state", f"a good request after the attacks: {used}")
    fresh = sample(_new_client("default"))
    if isinstance(fresh, str) or not np.array_equal(used, fresh):
        return Outcome("broken-state", "a good request after the attacks differs from a fresh server's answer")
    return Outcome("ok", "served, the same sample as a fresh server")


def websocket(attack: Attack, steps: list[tuple[str, Any]], code: int, config: str = "default") -> Outcome:
    """A stream given bad messages closes with ``code`` and a reason naming the problem (or, for ``code`` 0,
    answers the bad frame with an error and goes on); never 1006 / 1011 for bad input."""
    import threading  # noqa: PLC0415

    client = _client(config)
    errors: list[str] = []
    bad_config = code in (1007, 1008) and [kind for kind, _ in steps] == ["text"]
    with client.websocket_connect("/v1/stream") as session:
        for kind, payload in steps:
            if kind == "text":
                session.send_text(payload if isinstance(payload, str) else json.dumps(payload))
            elif kind == "bytes":
                session.send_bytes(_npy(payload) if isinstance(payload, (T, float, type(None))) else payload)
            elif kind == "wait":
                time.sleep(payload)
        for _ in range(4):
            box: list = []
            reader = threading.Thread(target=lambda into=box: into.append(session.receive()), daemon=True)
            reader.start()
            reader.join(20)
            if not box:
                return Outcome("hang", "no message and no close within 20 s")
            message = box[0]
            if message["type"] == "websocket.close":
                return _judge_close(attack, message.get("code"), message.get("reason") or "", code, errors)
            document = json.loads(message["text"]) if message.get("text") else {}
            if "error" in document:
                errors.append(document["error"])
                if code == 0:
                    return judge_message(errors[-1], attack.expect)
            elif code == 0 and message.get("bytes") is not None:
                return Outcome("silently-wrong", "the bad frame was answered with an image")
            elif document.get("accepted") and bad_config:
                return Outcome("silently-wrong", f"the bad config was accepted (expected a close with {code})")
            elif document == {"ready": False} and code:
                return Outcome("silently-wrong", f"the bad frame was accepted (expected a close with {code})")
    return Outcome("silently-wrong", f"the stream was not closed (expected {code})")


def _npy(kind: Any) -> bytes:
    """A frame as .npy bytes: good (None), filled with a number, or a bad tensor (``T``), its dtype kept."""
    import numpy as np  # noqa: PLC0415

    frame = _frame()
    frame = frame if kind is None else _tensor(kind.kind, frame) if isinstance(kind, T) else frame.fill_(kind)
    buffer = io.BytesIO()
    np.save(buffer, frame.numpy())
    return buffer.getvalue()


def _judge_close(attack: Attack, got: int | None, reason: str, code: int, errors: list[str]) -> Outcome:
    if got in (1006, 1011) or got is None:
        return Outcome("server-5xx", f"closed with {got}: {reason}")
    if code and got != code:
        return Outcome("poor-message", f"closed with {got}, not {code}: {reason}")
    if code == 0:
        return Outcome("silently-wrong" if not errors else "broken-state", f"closed ({got}: {reason}) on a bad frame")
    return judge_message(reason, attack.expect)


# ----------------------------------------------------------------------------------------- the tables

NAN, INF = math.nan, math.inf

API = [  # (call, argument, bad values, words a good message holds)
    ("Sampler", "steps", [0, -1, 2.5, "20", True, None, NAN], ("steps",)),
    ("Sampler", "solver", ["bogus", "", 3, None], ("solver",)),
    ("Sampler", "guidance_scale", [NAN, INF, "3", True], ("guidance",)),
    ("Sampler", "backend", ["bogus", 3], ("backend",)),
    ("Sampler", "adaptive_guidance", [NAN, -1.5, "x"], ("adaptive",)),
    ("Sampler", "early_exit", [NAN, -1.0, "x"], ("early_exit", "early exit", "exit")),
    ("Sampler", "eta", [NAN, -1.0, "x"], ("eta",)),
    ("Sampler", "colour", ["red"], ("colour",)),
    ("Sampler.sample", "noise", [T("nan"), T("inf"), T("shape"), T("3d"), T("int"), T("empty"), T("list"), "noise",
                                 None], ("noise", "sample")),
    # a Python list of labels and a single label are conditions (converted once); 10 is the null class
    ("Sampler.sample", "cond", [T("shape"), T("empty"), -1, 11, "7"],
     ("cond", "class", "label")),
    ("Sampler.sample", "uncond", [T("shape"), T("empty"), 11, -1], ("uncond", "class", "label")),
    ("optimize", "dtype", ["fp16", 3, "float8"], ("dtype",)),
    ("optimize", "attention", ["bogus", 3], ("attention",)),
    ("optimize", "todo", [0, -1, 1.5, NAN, "2"], ("todo", "factor")),
    ("optimize", "sparse", ["yes", 3, True], ("sparse",)),
    ("optimize", "cuda_graphs", ["no", "yes", NAN], ("cuda_graphs",)),
    ("optimize", "backend", ["bogus", 3], ("backend",)),
    ("optimize", "step_cache", [NAN, -1.0, INF, "0.1"], ("step_cache",)),
    ("optimize", "int8", ["bogus", 3], ("int8", "bogus")),
    ("optimize", "config", ["no-such-config.json", 3], ("config", "no-such-config.json")),
    ("ToDo", "factor", [0, -1, 1.5, NAN, "2", True, {0: 0}], ("factor",)),
    ("ToDo", "min_tokens", [-1, NAN, "x"], ("min_tokens",)),
    ("ToDo", "mode", ["bogus", 3], ("mode",)),
    ("Sparse", "kind", ["bogus", 3], ("kind",)),
    ("Sparse", "radius", [0, -1, NAN, 1.5], ("radius",)),
    ("Sparse", "tau", [NAN, 1.5, -0.1], ("tau",)),
    ("Sparse", "topk", [0, -1, NAN, 2.0], ("topk",)),
    ("Sparse", "min_similarity", [NAN, 2.0], ("min_similarity",)),
    ("attention", "q", [T("3d"), T("int"), T("half"), T("empty"), T("shape"), T("list")], ("q", "shape", "dtype")),
    ("attention", "k", [T("3d"), T("wide"), T("half")], ("k", "shape", "dtype")),
    ("attention", "scale", [NAN, INF, "x"], ("scale",)),
    ("attention", "kv_downsample", [0, -1, "x"], ("kv_downsample",)),
    ("attention", "block_mask", ["x", 3], ("block_mask",)),
    ("attention", "backend", ["bogus"], ("backend",)),
    ("calibrate", "steps", [0, -1, "2"], ("steps",)),
    ("calibrate", "groups", ["bogus", 0, -1], ("groups",)),
    ("calibrate", "method", ["bogus"], ("method",)),
    ("calibrate", "guidance_scale", [NAN, INF], ("guidance",)),
    ("calibrate", "percentile", [NAN, 0.0, 101.0], ("percentile",)),
    ("calibrate", "smoothquant", [NAN, -0.5, 1.5], ("smoothquant",)),
    ("calibrate", "tolerance", [NAN, -1.0], ("tolerance",)),
    ("calibrate", "batch_size", [0, -1], ("batch_size",)),
    ("calibrate", "cond", [T("shape"), 11], ("cond", "class", "label")),
    ("export_onnx", "batch", [0, -1, 1.5, True], ("batch",)),
    ("export_onnx", "resolution", [0, -16, (0, 16), "x"], ("resolution",)),
    ("export_onnx", "opset", [0, -1, "x"], ("opset",)),
    ("StreamPipeline", "t_index_list", [(), (-1,), (1000,), (40, 20), (20, 20)], ("t_index_list",)),
    ("StreamPipeline", "num_inference_steps", [0, -1, "50"], ("num_inference_steps", "steps")),
    ("StreamPipeline", "cfg_type", ["bogus"], ("cfg_type",)),
    ("StreamPipeline", "guidance_scale", [NAN, INF], ("guidance",)),
    ("StreamPipeline", "similarity_threshold", [NAN, 1.5], ("similarity",)),
    ("StreamPipeline", "queue_size", [0, -1], ("queue_size",)),
    ("StreamPipeline", "max_skip_frames", [-1], ("max_skip_frames",)),
    ("Acceleration", "cuda_graphs", ["no", "yes", 1], ("cuda_graphs",)),
    ("Acceleration", "steps", [0, -1, "20", 2.5], ("steps",)),
    ("Acceleration", "solver", ["bogus", 3], ("solver",)),
    ("Acceleration", "dtype", ["fp8", 3], ("dtype",)),
    ("Acceleration", "todo", [{"factor": 0}, "x", 3], ("todo", "factor")),
    ("Acceleration", "step_cache", [NAN, -1.0, "x"], ("step_cache",)),
    ("Acceleration", "adaptive_guidance", [NAN, -1.5], ("adaptive",)),
    ("Acceleration", "colour", ["red"], ("colour",)),
]
QUICK_API = {("Sampler", "steps"), ("optimize", "cuda_graphs"), ("ToDo", "factor")}

STREAM_FRAMES = [("nan", ("finite", "nan", "non-finite")), ("inf", ("finite", "inf", "non-finite")),
                 ("huge", ("finite", "overflow", "non-finite")), ("shape", ("shape", "frame must")),
                 ("3d", ("shape", "frame must")), ("int", ("dtype", "float")), ("empty", ("shape", "empty", "frame")),
                 ("list", ("tensor", "frame"))]
STREAM_QUEUE = [("get-empty", "hang", ()), ("close-drains", "broken-state", ()), ("restart", "broken-state", ()),
                ("model-fails", "hang", ("device lost", "model")), ("submit-bad-then-good", "broken-state", ())]

CALIBRATION_FAULTS = [("json", "flip"), ("json", "truncate"), ("json", "empty"), ("json", "binary"), ("json", "deep"),
                      ("json", "list"), ("json", "delete"), ("safetensors", "flip"), ("safetensors", "truncate"),
                      ("safetensors", "delete"), ("json", 'edit:timesteps="x"'), ("json", "edit:-step_groups=null"),
                      ("safetensors", "scales=nan"), ("safetensors", "scales=0"), ("safetensors", "scales=-1"),
                      ("safetensors", "scales=inf")]
ACCELERATION_FAULTS = ["flip", "truncate", "empty", "binary", "deep", "list", "edit:steps=9",
                       'value:cuda_graphs="no"', "value:steps=0", 'value:steps="20"', "value:step_cache=-1",
                       'value:todo={"factor": 0}', 'value:colour="red"', 'value:solver="bogus"']
ONNX_FAULTS = ["flip", "truncate"]

# CLI: the bad values per argument type (the parser is walked: every option of every command)
CLI_BAD = {"positive_int": ["0", "-1", "2.5", "ten"], "steps": ["0", "-1", "20000", "ten"],
           "non_negative_int": ["-1", "2.5", "x"],
           "even_positive_int": ["7", "0", "-2"], "port": ["0", "70000", "http"],
           "non_negative_float": ["-1", "nan", "inf", "x"], "positive_float": ["0", "-1", "nan", "inf"],
           "finite_float": ["nan", "inf", "x"], "device": ["tpu", "cuda:x"], "height_width": ["7", "0x64", "axb"],
           "name_list": [","], "name_and_path": ["fast", "=x.json"], "existing_file": ["{missing}", "{folder}"],
           "output_folder": ["{file}"], "output_file": ["{folder}"], "choices": ["bogus"]}
CLI_REQUIRED = {"sample": [], "demo": [], "export": ["onnx", "--model", "digits-dit"],
                "bench": ["--model", "digits-dit"], "tune": ["--model", "digits-dit"], "serve": ["--models", "digits-dit"]}
CLI_WORK = [  # values argparse lets through that the work must refuse: exit 2 and one line naming them
    (["export", "onnx", "--model", "no-such-model"], ("no-such-model",)),
    (["export", "onnx", "--model", "digits-dit", "--int8", "{missing}"], ("missing", "--int8", "calibration")),
    (["export", "onnx", "--model", "digits-dit", "--out", "{folder}"], ("--out", "folder")),
    (["bench", "--model", "no-such-model"], ("no-such-model",)),
    (["tune", "--model", "no-such-model"], ("no-such-model",)),
    (["serve", "--models", "no-such-model"], ("no-such-model",)),
    (["serve", "--models", "digits-dit", "--acceleration", "x={missing}"], ("missing",)),
    (["serve", "--models", "digits-dit", "--acceleration", "x={file}"], ("not-json", "json")),
    (["sample", "--steps", "20000"], ("steps", "20000")),
    (["bench", "--model", "digits-dit", "--steps", "20000"], ("steps", "20000")),
]
CLI_SUBPROCESS = [["diffrt", "bench", "--model", "digits-dit", "--repeats", "0"],
                  ["diffrt", "serve", "--port", "70000"], ["diffrt", "sample", "--steps", "0"],
                  ["diffrt", "export", "onnx", "--model", "digits-dit", "--batch", "0"]]

HTTP_FIELDS = [  # (field, bad values, words a good message holds)
    ("steps", ["2", True, 2.5, 2.0, 0, -1, 10**6, None, [], {}], ("steps",)),
    ("seed", [-1, 2**63, "1", 1.5, True], ("seed",)),
    ("guidance_scale", [-1, 51, "3", True, []], ("guidance_scale",)),
    ("class_label", [-1, 10, 10**9, "3", True, 1.5], ("class_label", "class")),
    ("cond", [[], [[]], [["x"]], [[1.0], [1.0, 2.0]], "x", [[0.5, 0.5]]], ("cond",)),
    ("solver", ["bogus", "", 5, None], ("solver",)),
    ("acceleration", ["bogus", 5, None], ("acceleration",)),
    ("output", ["jpg", 1, None], ("output",)),
    ("model", ["nope", "", 5, None, "../../etc/passwd", "digits-dit:huge"], ("model",)),
    ("colour", ["red"], ("colour",)),
]
HTTP_RAW = [  # (name, method, path, body, content type, words)
    ("nan-guidance", "POST", "/v1/generate", b'{"model": "digits-dit", "steps": 2, "guidance_scale": NaN}',
     "application/json", ("guidance_scale",)),
    ("inf-guidance", "POST", "/v1/generate", b'{"model": "digits-dit", "steps": 2, "guidance_scale": -Infinity}',
     "application/json", ("guidance_scale",)),
    ("nan-cond", "POST", "/v1/generate", b'{"model": "sd15-unet:tiny", "cond": [[NaN]]}', "application/json",
     ("cond", "nan", "finite")),
    ("huge-number", "POST", "/v1/generate", b'{"model": "digits-dit", "steps": 1e999}', "application/json",
     ("steps",)),
    ("not-json", "POST", "/v1/generate", b"{not json", "application/json", ("json",)),
    ("empty-body", "POST", "/v1/generate", b"", "application/json", ("json", "body", "field required", "missing")),
    ("null-body", "POST", "/v1/generate", b"null", "application/json", ("object",)),
    ("list-body", "POST", "/v1/generate", b"[1, 2]", "application/json", ("object",)),
    ("not-utf8", "POST", "/v1/generate", b"\xff\xfe{\x00", "application/json", ("json", "utf")),
    ("deep-json", "POST", "/v1/generate", b"[" * 100_000 + b"]" * 100_000, "application/json", ("json", "object",
                                                                                               "deep", "nested")),
    ("text-plain", "POST", "/v1/generate", b"steps=2", "text/plain", ("json", "object")),
    ("wrong-method", "GET", "/v1/generate", None, "application/json", ("method",)),
    ("put-healthz", "PUT", "/healthz", b"{}", "application/json", ("method",)),
    ("unknown-path", "POST", "/v2/generate", b"{}", "application/json", ("not found",)),
    ("lcm-51-steps", "POST", "/v1/generate", {**GOOD_REQUEST, "solver": "lcm", "steps": 51}, "application/json",
     ("steps <=", "lcm")),
    ("flow-euler-on-vp", "POST", "/v1/generate", {**GOOD_REQUEST, "solver": "flow-euler"}, "application/json",
     ("flow",)),
    ("latent-png", "POST", "/v1/generate", {"model": "sd15-unet:tiny", "cond": [[0.1] * 32] * 77, "steps": 2},
     "application/json", ("latents",)),
    ("wrong-cond-shape", "POST", "/v1/generate", {"model": "sd15-unet:tiny", "cond": [[0.1] * 32] * 5, "steps": 2,
                                                  "output": "latents"}, "application/json", ("cond must be",)),
]
WS_CASES = [  # (name, steps, close code (0: an error message and the stream goes on), words, config)
    ("binary-config", [("bytes", b"\x00\x01")], 1003, ("config",), "default"),
    ("not-json-config", [("text", "{not json")], 1007, ("json",), "default"),
    ("list-config", [("text", "[1, 2]")], 1007, ("object",), "default"),
    ("unknown-key", [("text", {**GOOD_STREAM, "colour": "red"})], 1007, ("colour",), "default"),
    ("string-steps", [("text", {**GOOD_STREAM, "num_inference_steps": "50"})], 1007, ("num_inference_steps",),
     "default"),
    ("string-index", [("text", {**GOOD_STREAM, "t_index_list": ["20"]})], 1007, ("t_index_list",), "default"),
    ("empty-index", [("text", {**GOOD_STREAM, "t_index_list": []})], 1007, ("t_index_list",), "default"),
    ("unknown-model", [("text", {"model": "nope"})], 1008, ("nope",), "default"),
    ("index-out-of-range", [("text", {**GOOD_STREAM, "t_index_list": [99]})], 1008, ("t_index_list", "99",
                                                                                    "num_inference_steps"), "default"),
    ("label-out-of-range", [("text", {**GOOD_STREAM, "class_label": 10})], 1008, ("class_label",), "default"),
    ("negative-label", [("text", {**GOOD_STREAM, "class_label": -1})], 1007, ("class_label",), "default"),
    ("text-frame", [("text", GOOD_STREAM), ("text", "a frame?")], 1003, ("binary", "npy"), "default"),
    ("garbage-frame", [("text", GOOD_STREAM), ("bytes", b"not npy")], 1007, ("npy",), "default"),
    ("big-frame", [("text", GOOD_STREAM), ("bytes", b"\x00" * 5000)], 1009, ("4096",), "small"),
    ("nan-frame", [("text", GOOD_STREAM), ("bytes", NAN)], 0, ("finite", "nan"), "default"),
    ("huge-frame", [("text", GOOD_STREAM), ("bytes", 1e30), ("bytes", None), ("bytes", None)], 0,
     ("finite", "overflow"), "default"),
    ("wrong-shape-frame", [("text", GOOD_STREAM), ("bytes", T("shape"))], 0, ("shape", "frame must"), "default"),
    ("int-frame", [("text", GOOD_STREAM), ("bytes", T("int"))], 1007, ("float", "dtype"), "default"),
    ("full-house", [], 1013, ("slots", "try again"), "full"),
    ("idle-no-config", [("wait", 1.5)], 1008, ("idle",), "idle"),
    ("idle-no-frame", [("text", GOOD_STREAM), ("wait", 1.5)], 1008, ("idle",), "idle"),
]


def _cli_options() -> list[tuple[str, str, str]]:
    """(command, option, argument type name) for every option of every ``diffrt`` command with a checked type."""
    from diffrt.runtime import cli  # noqa: PLC0415

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: SLF001
    found = []
    for command, sub in commands.items():
        for action in sub._actions:  # noqa: SLF001 - argparse keeps them there
            if not action.option_strings or action.nargs == 0:
                continue
            name = "choices" if action.choices else getattr(action.type, "__name__", None)
            if name in CLI_BAD:
                found.append((command, action.option_strings[-1], name))
    return found


def _cli_value(value: str, where: Path) -> str:
    return value.format(missing=where / "missing.json", folder=where, file=where / "a-file.txt")


def build_attacks(quick: bool = False) -> list[Attack]:
    """Every attack of the tables (``quick``: a few per surface, under a minute)."""
    attacks: list[Attack] = []
    where = Path(tempfile.gettempdir()) / "diffrt-attacks-paths"
    where.mkdir(exist_ok=True)
    (where / "a-file.txt").write_text("not json")

    for target, argument, values, words in API:
        for number, value in enumerate(values):
            attacks.append(Attack(f"api/{target}/{argument}={_short(repr(value), 40)}", "silently-wrong", "api",
                                  "api_refusal", (target, argument, value), words, 60.0,
                                  quick=(target, argument) in QUICK_API and number < 3))
    attacks += [Attack("api/Sampler(dpmpp-2m, 1000 steps) samples finite", "silently-wrong", "api", "api_finite",
                       ("dpmpp-2m", 1000), (), 180.0),
                Attack("api/Sampler steps=10**6 short message", "poor-message", "api", "api_message_size", (10**6,),
                       ("steps",), 60.0, quick=True),
                Attack("api/calibrate groups=bogus refused before sampling", "poor-message", "api",
                       "api_calibrate_refuses_first", ("groups", "bogus"), ("groups",), 60.0),
                Attack("api/calibrate method=bogus refused before sampling", "poor-message", "api",
                       "api_calibrate_refuses_first", ("method", "bogus"), ("method",), 60.0)]
    for number, (kind, words) in enumerate(STREAM_FRAMES):
        attacks.append(Attack(f"stream/tick frame={kind}", "silently-wrong", "stream", "stream_tick_refusal", (kind,),
                              words, 60.0, quick=number == 0))
    for action, cls, words in STREAM_QUEUE:
        attacks.append(Attack(f"stream/{action}", cls, "stream", "stream_queue", (action,), words, 60.0,
                              quick=action == "get-empty"))

    for number, (which, how) in enumerate(CALIBRATION_FAULTS):
        attacks.append(Attack(f"artifact/calibration {which} {how}", "poor-message", "artifact",
                              "artifact_calibration", (which, how), (f".{which}", "cal-"), 120.0, quick=number == 0))
    for number, how in enumerate(ACCELERATION_FAULTS):
        words = (".json", how[6:].split("=")[0]) if how.startswith("value:") else (".json",)
        attacks.append(Attack(f"artifact/acceleration {how}", "poor-message", "artifact", "artifact_acceleration",
                              (how,), words, 60.0, quick=number == 0))
    for how in ONNX_FAULTS:
        attacks.append(Attack(f"artifact/onnx export {how}, loaded directly", "silently-wrong", "artifact",
                              "artifact_onnx", (how, False), ("dit.onnx",), 180.0))
        attacks.append(Attack(f"artifact/onnx cache {how}, rebuilt", "silently-wrong", "artifact", "artifact_onnx",
                              (how, True), (), 240.0))
    for number, how in enumerate(["flip", "truncate", "checksum", "delete"]):
        attacks.append(Attack(f"artifact/tensorrt timing cache {how}", "silently-wrong", "artifact",
                              "artifact_timing_cache", (how,), (), 30.0, quick=number == 0))

    for number, (command, option, kind) in enumerate(_cli_options()):
        for value in CLI_BAD[kind]:
            argv = [command, *CLI_REQUIRED[command], f"{option}={_cli_value(value, where)}"]
            attacks.append(Attack(f"cli/{command} {option}={value}", "traceback", "cli", "cli_in_process", (argv,),
                                  (option,), 60.0, quick=number < 2 and value == CLI_BAD[kind][0]))
    for argv, words in CLI_WORK:
        argv = [_cli_value(part, where) for part in argv]
        attacks.append(Attack(f"cli/{' '.join(argv)}".replace(str(where), "DIR"), "traceback", "cli",
                              "cli_in_process", (argv,), words, 120.0))
    for number, command in enumerate(CLI_SUBPROCESS):
        attacks.append(Attack(f"cli/subprocess {' '.join(command)}", "traceback", "cli", "cli_subprocess", (command,),
                              (command[-2],), 120.0, quick=number == 0))

    for field_name, values, words in HTTP_FIELDS:
        for number, value in enumerate(values):
            body = {**GOOD_REQUEST, field_name: value}
            if field_name == "cond" and value != [[0.5, 0.5]]:
                body.pop("class_label")
            attacks.append(Attack(f"server/POST {field_name}={_short(repr(value), 30)}", "server-5xx", "server",
                                  "http_request", ("POST", "/v1/generate", body), words, 60.0,
                                  quick=field_name == "steps" and number < 2))
    for name, method, path, body, content_type, words in HTTP_RAW:
        attacks.append(Attack(f"server/{name}", "server-5xx", "server", "http_request",
                              (method, path, body, "default", content_type), words, 60.0))
    attacks.append(Attack("server/body over the limit (Content-Length)", "server-5xx", "server", "http_request",
                          ("POST", "/v1/generate", b"{" + b" " * 5000 + b"}", "small"), ("4096",), 60.0))
    attacks.append(Attack("server/chunked body over the limit", "server-5xx", "server", "http_chunked", (50, 1000),
                          ("4096",), 60.0, quick=True))
    for name, steps, code, words, config in WS_CASES:
        attacks.append(Attack(f"server/ws {name}", "server-5xx", "server", "websocket", (steps, code, config), words,
                              60.0, quick=name == "nan-frame"))
    attacks.append(Attack("server/a client that hangs up is not computed", "broken-state", "server", "http_abandoned",
                          (), (), 60.0))
    attacks.append(Attack("server/a good request after the attacks", "broken-state", "server", "http_still_serving",
                          (), (), 120.0, quick=True))
    return [a for a in attacks if a.quick] if quick else attacks


# ----------------------------------------------------------------------------------------- the report

def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class: tried / ok / the failures (id, verdict, detail); and the verdicts over all attacks."""
    classes = {}
    for cls, title in CLASSES.items():
        own = [r for r in rows if r["cls"] == cls]
        failures = [{"id": r["id"], "verdict": r["verdict"], "detail": r["detail"]}
                    for r in own if r["verdict"] != "ok"]
        classes[cls] = {"title": title, "tried": len(own), "ok": len(own) - len(failures), "failures": failures}
    verdicts = Counter(r["verdict"] for r in rows)
    return {"classes": classes, "verdicts": {v: verdicts.get(v, 0) for v in VERDICTS},
            "surfaces": dict(Counter(r["surface"] for r in rows)), "attacks": len(rows)}


def render(summary: dict[str, Any], seconds: float) -> str:
    """The markdown table: class -> tried / ok / failed, the verdicts, then each failure."""
    lines = ["| class | tried | ok | failed |", "| --- | --- | --- | --- |"]
    for row in summary["classes"].values():
        lines.append(f"| {row['title']} | {row['tried']} | {row['ok']} | {len(row['failures'])} |")
    total_ok = sum(r["ok"] for r in summary["classes"].values())
    lines.append(f"| **all** | {summary['attacks']} | {total_ok} | {summary['attacks'] - total_ok} |")
    lines += ["", "Verdicts over all attacks (what each attack found, whatever class it probed): " +
              ", ".join(f"{name} {count}" for name, count in summary["verdicts"].items()) + ".",
              "Surfaces: " + ", ".join(f"{name} {count}" for name, count in summary["surfaces"].items()) +
              f". {seconds:.0f} s."]
    failures = [f for row in summary["classes"].values() for f in row["failures"]]
    if failures:
        lines += ["", "| attack | verdict | detail |", "| --- | --- | --- |"]
        lines += [f"| {f['id']} | {f['verdict']} | {f['detail'][:200].replace('|', '/')} |" for f in failures]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.attacks", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and the markdown table")
    parser.add_argument("--quick", action="store_true", help="a few attacks per surface (under a minute)")
    parser.add_argument("--only", default=None, help=f"comma-separated surfaces: {', '.join(SURFACES)}")
    parser.add_argument("--quiet", action="store_true", help="no line per attack on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    attacks = build_attacks(args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        if not wanted <= set(SURFACES):
            parser.error(f"--only: unknown surface(s) {sorted(wanted - set(SURFACES))}; use {', '.join(SURFACES)}")
        attacks = [a for a in attacks if a.surface in wanted]
    start = time.monotonic()
    rows = run_attacks(attacks, progress=not args.quiet)
    seconds = time.monotonic() - start
    summary = summarize(rows)
    from . import harness  # noqa: PLC0415

    stamp = harness.environment_stamp("cpu")
    path = harness.write_results(args.out, "attacks", rows, stamp,
                                 {"summary": summary, "seconds": round(seconds, 1), "quick": args.quick})
    table = render(summary, seconds)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0 if all(not row["failures"] for row in summary["classes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
