"""StreamPipeline: StreamDiffusion's Stream Batch, residual CFG and similarity filter on any VP Denoiser.

n frames at n denoising stages run as one batched model call per tick. The stages are LCM
timesteps t_0 > t_1 > ... > t_{n-1} (``t_index_list`` into LCM's ``num_inference_steps``
schedule, as StreamDiffusion picks them). Per stage i, with a_i = sqrt(abar_{t_i}),
b_i = sqrt(1 - abar_{t_i}) and LCM's boundary scalings (c_skip_i, c_out_i):

    F_i        = xc_i * x + mc_i * m                 (the data prediction from the model output m)
    denoised_i = c_out_i * F_i + c_skip_i * x
    x_{i+1}    = a_{i+1} * denoised_i + b_{i+1} * init_noise[i+1]     (the next stage, next tick)

A frame enters at stage 0: img2img ``x = a_0 * encode(frame) + b_0 * init_noise[0]``; generation
from conditions: ``x`` = fresh seeded noise. ``encode`` / ``decode`` are the VAE stage
(:func:`vae_codec` for diffusers' AutoencoderTiny / AutoencoderKL); ``cuda_graphs=True`` replays
the whole tick (encode, model, solver arithmetic, decode) as one CUDA graph
(:mod:`diffrt.runtime.graphs`); only the similarity filter and the bookkeeping stay on the host. ``init_noise`` [n] is drawn once (seeded) and reused
for every frame, so a stream equals offline sampling of each frame with the same noise. A frame's
condition travels with it through the stages. The frame entered at tick k comes out (decoded) at
tick k + n - 1; the first n - 1 ticks return nothing (flagged ``ready=False``, never a garbage frame).

Classifier-free guidance (``cfg_type``; epsilon-prediction models for the residual modes):

* "full": the unconditional branch for every row (2n rows per call);
* "self" (RCFG): no unconditional call; ``eps_u = delta * stock_noise``, a virtual residual noise
  carried from row to row: after each tick ``stock_noise = roll(init_noise, -1) + delta_x`` with
  ``delta_x = (a_next / b_next) * step(m, b * stock_noise)`` (StreamDiffusion's update);
* "initialize": like "self", but the stage-0 row's unconditional prediction is computed (n + 1 rows)
  and seeds ``stock_noise[0]``.

The stochastic similarity filter (``similarity_threshold``): an input frame whose cosine
similarity c to the previous input gives skip probability max(0, 1 - (1 - c) / (1 - threshold));
a skipped frame returns the previous output without a model call, at most ``max_skip_frames`` in a
row. The similarity reaches the host through a non-blocking read (:class:`~diffrt.runtime.residency.LaggedRead`):
on CPU at once, on a GPU the newest one that has arrived (a frame or more late), so the filter never
waits for the device. Queues (:mod:`diffrt.runtime.stream_queues`): :meth:`start` runs ticks on a worker thread fed by
:meth:`submit` (a bounded queue: it blocks, or raises queue.Full after ``timeout``); :meth:`get`
returns results in order; :meth:`close` drains the frames in flight (n - 1 bubble ticks) so none is
lost; every ``timeout`` holds, and a closed pipeline starts again as a fresh stream.

Faults stay with their frame. A frame is checked before it enters (:meth:`check_frame`: shape, dtype,
finite values; ValueError / TypeError, the pipeline untouched). A frame whose tick raises is retried
as an empty slot: if that tick works, the frame was at fault and the others go on; if not, the model
is and the error is raised (the pipeline as before the tick, so it can still be drained). A frame
whose latents or image go non-finite has its rows reset. Either way it comes out in its slot as a
result with ``error`` (why) and no image. ``deadline``
(:class:`~diffrt.runtime.deadline.DeadlinePolicy`) degrades guidance, layers, caching and skipping
to keep a per-frame time budget instead of dropping frames. ``early_exit`` (an uncertainty threshold)
runs a model with exit heads through layer early exit (not with ``cuda_graphs``); ``exit_stats``.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .denoiser import Denoiser
from .early_exit import ExitState, exiting, has_exit_heads
from .residency import LaggedRead
from .solvers.lcm import boundary_scalings, lcm_timesteps, lcm_x0
from .stream_faults import StreamFaults
from .stream_queues import StreamQueues, StreamWorkerError

__all__ = ["StreamPipeline", "StreamResult", "StreamStats", "StreamWorkerError", "offline_frame", "vae_codec"]

log = logging.getLogger(__name__)

CFG_TYPES = ("none", "full", "self", "initialize")
_EMPTY = object()  # the condition of an empty stage


@dataclass
class StreamResult:
    """One tick's output: the frame id that completed and its image, or ``ready=False`` while filling.
    A frame that failed comes out in its slot with ``frame_id``, ``error`` (why) and no image
    (``ready=False``, so a consumer that only looks at ``ready`` never gets a broken image)."""

    frame_id: int | None
    image: torch.Tensor | None
    ready: bool
    skipped: bool = False  # the similarity filter skipped this frame: ``image`` is the previous output
    degradation: str | None = None  # the deadline policy's rung in force for this tick
    error: str | None = None  # why this frame failed (None: it did not)

    @property
    def failed(self) -> bool:
        """Whether this is a frame's error result."""
        return self.error is not None


@dataclass
class StreamStats:
    ticks: int = 0
    frames: int = 0
    skipped: int = 0
    longest_skip_run: int = 0
    model_calls: int = 0
    rows: list[int] = field(default_factory=list)  # model batch rows per call


class StreamPipeline(StreamFaults, StreamQueues):
    """Stream Batch over ``den`` (module docstring). ``cond`` is the default condition of each frame
    (a frame's own ``cond`` in :meth:`tick` / :meth:`submit` overrides it); ``uncond`` the
    unconditional one for CFG; ``encode`` / ``decode`` map frames to latents and back (identity by
    default: a pixel-space model). ``frame_shape``: what a frame must be (without a leading batch dim
    of 1); by default the latent shape without ``encode``, else the shape of the first frame that ticks."""

    def __init__(self, den: Denoiser, t_index_list: tuple[int, ...] = (32, 45), num_inference_steps: int = 50,
                 cond: Any = None, uncond: Any = None, guidance_scale: float = 1.0, cfg_type: str = "none",
                 delta: float = 1.0, img2img: bool = True, encode: Callable | None = None,
                 decode: Callable | None = None, similarity_threshold: float | None = None, max_skip_frames: int = 10,
                 queue_size: int = 8, seed: int = 0, original_inference_steps: int = 50,
                 timestep_scaling: float = 10.0, latent_shape: tuple[int, ...] | None = None,
                 device: torch.device | str | None = None, cuda_graphs: bool = False, deadline: Any = None,
                 early_exit: float | None = None, frame_shape: tuple[int, ...] | None = None):
        if cfg_type not in CFG_TYPES:
            raise ValueError(f"cfg_type must be one of {', '.join(CFG_TYPES)}, got {cfg_type!r}")
        _check_number("guidance_scale", guidance_scale)
        _check_number("delta", delta)
        for name, value, low in (("num_inference_steps", num_inference_steps, 1),
                                 ("original_inference_steps", original_inference_steps, 1),
                                 ("max_skip_frames", max_skip_frames, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if similarity_threshold is not None and (isinstance(similarity_threshold, bool) or
                                                 not isinstance(similarity_threshold, (int, float)) or
                                                 not -1.0 <= similarity_threshold < 1.0):
            raise ValueError(f"similarity_threshold must be None or a cosine similarity in [-1, 1), got "
                             f"{similarity_threshold!r}")
        if cfg_type != "none" and uncond is None and cfg_type != "self":
            raise ValueError(f"cfg_type={cfg_type!r} needs uncond (the unconditional condition)")
        if cfg_type in ("self", "initialize") and den.prediction_type != "epsilon":
            raise NotImplementedError(f"residual CFG ({cfg_type}) works on noise predictions; this model predicts "
                                      f"{den.prediction_type}: use cfg_type='full' or 'none'")
        if den.schedule.kind != "vp":
            raise ValueError("StreamPipeline needs a discrete (VP) noise schedule")
        all_steps = lcm_timesteps(den.schedule.num_train_timesteps, original_inference_steps, num_inference_steps)
        if not t_index_list or any(not 0 <= i < len(all_steps) for i in t_index_list) or \
                list(t_index_list) != sorted(set(t_index_list)):
            raise ValueError(f"t_index_list must be increasing indices into {len(all_steps)} LCM steps, got "
                             f"{t_index_list}")
        self.device = torch.device(device or den.device or "cpu")
        # Python conditions become device tensors once, here: the tick copies nothing from the host
        self.den, self.cond, self.uncond = den, _on_device(cond, self.device), _on_device(uncond, self.device)
        self.guidance_scale, self.cfg_type, self.delta = float(guidance_scale), cfg_type, float(delta)
        self.img2img, self.encode, self.decode = img2img, encode or (lambda f: f), decode or (lambda z: z)
        self.timesteps = torch.tensor([float(all_steps[i]) for i in t_index_list], device=self.device)
        self.stages = len(t_index_list)
        abar = den.schedule.alphas_cumprod
        rows = [(abar[int(t)].sqrt(), (1 - abar[int(t)]).sqrt(), *boundary_scalings(int(t), timestep_scaling),
                 *lcm_x0(den.prediction_type, abar[int(t)])) for t in self.timesteps.tolist()]

        def column(i: int) -> torch.Tensor:
            return torch.tensor([float(r[i]) for r in rows], dtype=torch.float32, device=self.device)

        self.a, self.b, self.c_skip, self.c_out, self.x_coef, self.m_coef = (column(i) for i in range(6))
        self.latent_shape = tuple(latent_shape or den.sample_shape)
        self.frame_shape = tuple(frame_shape) if frame_shape is not None else \
            (self.latent_shape if encode is None else None)
        self.generator = torch.Generator().manual_seed(seed)
        self.init_noise = torch.randn(self.stages, *self.latent_shape, generator=self.generator).to(self.device)
        # generated frames' noise is drawn where it is used (no host-to-device copy per tick)
        self.entry_generator = self.generator if self.device.type == "cpu" else \
            torch.Generator(self.device).manual_seed(seed + 2)
        self.similarity_threshold, self.max_skip_frames = similarity_threshold, max_skip_frames
        self.skip_generator = torch.Generator().manual_seed(seed + 1)
        self.stats = StreamStats()
        self.deadline = deadline  # a diffrt.runtime.deadline.DeadlinePolicy, or None
        self.cuda_graphs = cuda_graphs
        if early_exit is not None and not self.supports_early_exit:
            raise ValueError("early_exit needs a model with exit heads and a tick that is not graph-captured "
                             "(an exit decision is a host read)")
        self.early_exit = early_exit  # layer early exit's uncertainty threshold (None: off); see exit_stats
        self._exit_state = None
        self._run_tick = self._tick_tensors
        if cuda_graphs:  # the whole tick (VAE encode, model, solver arithmetic, decode) as one graph
            from .graphs import GraphRunner  # noqa: PLC0415

            self._run_tick = GraphRunner(self._tick_tensors)  # eager, logged, off CUDA
        self.reset()
        self._init_queues(queue_size)

    # ------------------------------------------------------------------------------- the tick
    def reset(self) -> None:
        """Empty the stages (the next n - 1 ticks fill them again)."""
        self.buffer = torch.zeros(self.stages - 1, *self.latent_shape, device=self.device)
        self.buffer_ids: list[int | None] = [None] * (self.stages - 1)
        self.buffer_conds: list[Any] = [_EMPTY] * (self.stages - 1)
        self.stock_noise = self.init_noise.clone()
        self.previous_frame, self.previous_output, self.skip_run = None, None, 0
        self._similarity: LaggedRead | None = None  # the filter's cosine similarities, read without waiting
        self._last_entry = None
        self.next_id = 0
        self.failures: dict[int, str] = {}  # frames in flight that failed: id -> why (they leave as error results)
        self._finite_checks: collections.deque = collections.deque()  # (frame ids, LaggedRead) of ticks not read yet

    def _bcast(self, v: torch.Tensor, rows: int) -> torch.Tensor:
        return v[:rows].reshape(rows, *([1] * len(self.latent_shape)))

    def _entry(self, frame: torch.Tensor | None) -> torch.Tensor:
        """What enters stage 0: the frame (img2img; encoded in the tick) or fresh seeded noise."""
        if self.img2img and frame is not None:
            return frame.to(self.device).reshape(1, *self._unbatched_shape(frame)).float()
        return torch.randn(1, *self.latent_shape, generator=self.entry_generator, device=self.device)

    def _conds(self, conds: list[Any]) -> Any:
        """The model's cond for the rows (each frame's, resolved when it entered). Empty stages (warm-up,
        drain bubbles, failed frames) borrow a real row's, or the pipeline's default ``cond`` when every stage
        is empty (a conditional model is never called without one); None when no frame has one."""
        real = [c for c in conds if c is not _EMPTY] or [_as_row(self.cond, self.device)]
        if all(c is None for c in real):
            return None
        if any(c is None for c in real):
            raise ValueError("some frames have a condition and others none: give the pipeline a default cond")
        return torch.cat([real[0] if c is _EMPTY else c for c in conds])

    @property
    def rows_per_call(self) -> int:
        """Model batch rows per tick: n, 2n with full CFG, n + 1 with "initialize"."""
        if self.guidance_scale != 1.0 and self.cfg_type == "full":
            return 2 * self.stages
        if self.guidance_scale != 1.0 and self.cfg_type == "initialize":
            return self.stages + 1
        return self.stages

    def _tick_tensors(self, entry: torch.Tensor, buffer: torch.Tensor, stock: torch.Tensor, *cond: torch.Tensor):
        """One tick as tensors only (what a CUDA graph captures): (image [1, ...], buffer, stock_noise)."""
        cond = cond[0] if cond else None
        n, t = self.stages, self.timesteps
        first = self.a[0] * self.encode(entry) + self.b[0] * self.init_noise[:1] if self.img2img else entry
        x = torch.cat([first, buffer]).float()
        if n > 1:
            stock = torch.cat([self.init_noise[:1], stock[:-1]])
        guided = self.guidance_scale != 1.0
        if self.cfg_type == "full" and guided:
            out_u, out_c = self.den(torch.cat([x, x]), torch.cat([t, t]),
                                    _cat(_repeat(self.uncond, n, self.device), cond)).chunk(2)
            m = out_u + self.guidance_scale * (out_c - out_u)
        elif self.cfg_type in ("self", "initialize") and guided:
            if self.cfg_type == "initialize":
                out = self.den(torch.cat([x[:1], x]), torch.cat([t[:1], t]),
                               _cat(_repeat(self.uncond, 1, self.device), cond))
                stock = torch.cat([out[:1].float(), stock[1:]])
                out_c = out[1:]
            else:
                out_c = self.den(x, t, cond)
            out_u = self.delta * stock
            m = out_u + self.guidance_scale * (out_c.float() - out_u)
        else:
            m = self.den(x, t, cond)
        m = m.float()
        denoised = self._denoise(m, x)
        if self.cfg_type in ("self", "initialize") and guided:
            stock = self._next_stock_noise(m, stock)
        buffer = self._bcast(self.a[1:], n - 1) * denoised[:-1] + self._bcast(self.b[1:], n - 1) * self.init_noise[1:]
        return self.decode(denoised[-1:]), buffer, stock

    def _denoise(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        data = self._bcast(self.x_coef, n) * x + self._bcast(self.m_coef, n) * m
        return self._bcast(self.c_out, n) * data + self._bcast(self.c_skip, n) * x

    def _next_stock_noise(self, m: torch.Tensor, stock: torch.Tensor) -> torch.Tensor:
        """StreamDiffusion's residual-noise update after a tick."""
        n = m.shape[0]
        delta_x = self._denoise(m, self._bcast(self.b, n) * stock)
        ones = torch.ones(1, device=self.device)
        a_next, b_next = torch.cat([self.a[1:], ones]), torch.cat([self.b[1:], ones])
        delta_x = delta_x * self._bcast(a_next, n) / self._bcast(b_next, n)
        return torch.cat([self.init_noise[1:], self.init_noise[:1]]) + delta_x

    def tick(self, frame: torch.Tensor | None = None, cond: Any = None, bubble: bool = False) -> StreamResult:
        """Push one frame (or, with ``bubble``, nothing: drain) through one batched model call. A frame the
        pipeline cannot take raises before anything changes (:meth:`check_frame`); one that fails in its
        tick comes out in its slot as an error result; an error the model raises even without the frame
        is raised, the pipeline left as it was before the tick."""
        if bubble:
            with self._rollback():
                return self._bubble()
        return self._tick_frame(self.check_frame(frame), cond)

    def _tick_queued(self, frame: torch.Tensor | None, cond: Any, frame_id: int) -> StreamResult:
        """A submitted frame's tick in the worker: a frame that cannot enter takes its slot as an error."""
        try:
            frame = self.check_frame(frame)
        except (TypeError, ValueError) as error:
            return self._tick_without_frame(error)
        return self._tick_frame(frame, cond)

    def _tick_frame(self, frame: torch.Tensor | None, cond: Any) -> StreamResult:
        try:
            with self._rollback():
                return self._enter(frame, cond)
        except Exception as error:  # noqa: BLE001 - the frame or the model: the retry without it tells
            return self._tick_without_frame(error)

    def _tick_without_frame(self, error: Exception) -> StreamResult:
        """The tick with the failed frame's slot empty: the others go on, the frame leaves as an error
        result. If this tick fails too, the model fails on its own: ``error`` is raised."""
        reason = f"{type(error).__name__}: {error}"
        log.warning("stream: frame %d failed (%s); it leaves as an error result", self.next_id, reason)
        try:
            with self._rollback():
                return self._enter_failed(reason)
        except Exception as retry_error:  # noqa: BLE001 - reported, then the first error is raised
            log.error("stream: the tick fails without frame %d too (%s: %s): the model fails on its own",
                      self.next_id, type(retry_error).__name__, retry_error)
        raise error

    def _enter(self, frame: torch.Tensor | None, cond: Any) -> StreamResult:
        self.stats.ticks += 1
        self.stats.frames += 1
        frame_id, self.next_id = self.next_id, self.next_id + 1
        if self._skip(frame):
            return StreamResult(frame_id, self.previous_output, True, skipped=True)
        result = self._advance(self._entry(frame), _as_row(self.cond if cond is None else cond, self.device), frame_id)
        if self.frame_shape is None and self.img2img and frame is not None:
            self.frame_shape = self._unbatched_shape(frame)  # the first frame that ticked fixes the shape
        return result

    def _enter_failed(self, reason: str) -> StreamResult:
        self.stats.ticks += 1
        self.stats.frames += 1
        frame_id, self.next_id = self.next_id, self.next_id + 1
        self.failures[frame_id] = reason
        return self._advance(self._blank_entry(), _EMPTY, frame_id)

    def _bubble(self) -> StreamResult:
        self.stats.ticks += 1
        if self.next_id == 0:  # nothing has entered: nothing to drain
            return StreamResult(None, None, False)
        entry = self._entry(None)
        if self.img2img and self._last_entry is not None:
            entry = torch.zeros_like(self._last_entry)
        return self._advance(entry, _EMPTY, None)

    def _advance(self, entry: torch.Tensor, entry_cond: Any, frame_id: int | None) -> StreamResult:
        """One batched model call: ``entry`` enters stage 0, every frame moves one stage, the last leaves."""
        ids, conds = [frame_id, *self.buffer_ids], [entry_cond, *self.buffer_conds]
        cond_rows = self._conds(conds)
        started = self.deadline.start(self.device) if self.deadline is not None else None
        rung = None if self.deadline is None else self.deadline.rung
        with torch.no_grad(), self._exits():
            image, buffer, stock = self._run_tick(entry, self.buffer, self.stock_noise,
                                                  *([] if cond_rows is None else [cond_rows]))
        self.buffer, self.stock_noise = self._contain_nonfinite(ids, image, buffer, stock)
        self._last_entry = entry
        self.stats.model_calls += 1
        self.stats.rows.append(self.rows_per_call)
        if self.deadline is not None:
            self.deadline.observe(self, started)
        self.buffer_ids, self.buffer_conds = ids[:-1], conds[:-1]
        return self._leave(ids[-1], image, rung)

    def _leave(self, frame_id: int | None, image: torch.Tensor, rung: str | None) -> StreamResult:
        if frame_id is None:
            return StreamResult(None, None, False)
        error = self.failures.pop(frame_id, None)
        if error is not None:
            return StreamResult(frame_id, None, False, degradation=rung, error=error)
        self.previous_output = image
        return StreamResult(frame_id, image, True, degradation=rung)

    @property
    def supports_early_exit(self) -> bool:
        """Whether layer early exit can run here: a model with exit heads, no step cache, a tick not graph-captured."""
        return (has_exit_heads(getattr(self.den, "model", None)) and not self.cuda_graphs
                and getattr(self.den, "step_cache", None) is None)  # a step cache skips the same blocks

    @property
    def exit_stats(self) -> dict[str, Any] | None:
        """Blocks run and saved by early exit over the ticks that used it (None: never used)."""
        return None if self._exit_state is None else self._exit_state.stats

    @contextlib.contextmanager
    def _exits(self):
        if self.early_exit is None:
            yield
            return
        if self._exit_state is None:
            self._exit_state = ExitState(self.early_exit)
        self._exit_state.threshold = self.early_exit
        with exiting(self._exit_state):
            yield

    def _skip(self, frame: torch.Tensor | None) -> bool:
        if self.similarity_threshold is None or frame is None or self.previous_output is None:
            self.previous_frame = frame
            return False
        previous, self.previous_frame = self.previous_frame, frame
        if previous is None or self.skip_run >= self.max_skip_frames:
            self.skip_run = 0
            return False
        cosine = torch.nn.functional.cosine_similarity(frame.flatten().float(), previous.flatten().float(), dim=0)
        if self._similarity is None or self._similarity.on_cuda != cosine.is_cuda:
            self._similarity = LaggedRead(cosine)
        self._similarity.request(cosine)
        seen = self._similarity.latest()  # this frame's similarity, or an earlier one's still in flight on a GPU
        probability = 0.0 if seen is None else max(0.0, 1.0 - (1.0 - float(seen)) / (1.0 - self.similarity_threshold))
        if float(torch.rand((), generator=self.skip_generator)) < probability:
            self.skip_run += 1
            self.stats.skipped += 1
            self.stats.longest_skip_run = max(self.stats.longest_skip_run, self.skip_run)
            self.previous_frame = previous  # compare the next frame with the last one processed
            return True
        self.skip_run = 0
        return False


def vae_codec(vae) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(encode, decode) of a diffusers ``AutoencoderTiny`` or ``AutoencoderKL`` for the stream: images in
    [-1, 1] [B, 3, H, W] <-> latents, scaled by the VAE's ``scaling_factor`` (AutoencoderKL encodes to
    its posterior's mode, deterministic). Pure tensor code: it runs inside a captured tick."""
    name = type(vae).__name__
    if name not in ("AutoencoderTiny", "AutoencoderKL"):
        raise TypeError(f"vae_codec takes a diffusers AutoencoderTiny or AutoencoderKL, got {name}")
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    dtype = next(vae.parameters()).dtype
    if name == "AutoencoderTiny":
        def encode(image):
            return vae.encode(image.to(dtype)).latents.float() * scale

        def decode(latent):
            return vae.decode((latent / scale).to(dtype)).sample.float()
    else:
        def encode(image):
            return vae.encode(image.to(dtype)).latent_dist.mode().float() * scale

        def decode(latent):
            return vae.decode((latent / scale).to(dtype)).sample.float()
    return encode, decode


def _repeat(value: Any, n: int, device) -> Any:
    if value is None:
        return None
    tensor = torch.as_tensor(value, device=device)
    if tensor.dim() == 0:
        return tensor.reshape(1).expand(n)
    return tensor.expand(n, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor[:n]


def _cat(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    return torch.cat([a, b])


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _on_device(value: Any, device: torch.device) -> torch.Tensor | None:
    """A condition given as a Python value (a label, a list) or a tensor, as a tensor on ``device``."""
    return None if value is None else torch.as_tensor(value, device=device)


def _as_row(cond: Any, device) -> torch.Tensor | None:
    """A frame's condition with a leading batch dim of 1: a label -> [1], embeddings [L, D] -> [1, L, D]."""
    if cond is None:
        return None
    tensor = torch.as_tensor(cond, device=device)
    if tensor.dim() == 0:
        return tensor.reshape(1)
    return tensor if tensor.shape[0] == 1 else tensor.unsqueeze(0)


def offline_frame(pipe: StreamPipeline, frame: torch.Tensor | None, cond: Any = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """One frame sampled stage by stage on its own with the pipeline's ``init_noise`` (no guidance):
    what the stream must return for it (the tests' reference). ``noise``: the entry latent of a
    generated (not img2img) frame."""
    with torch.no_grad():
        if frame is None:
            x = noise
        else:
            x = pipe.a[0] * pipe.encode(frame.reshape(1, *frame.shape[-3:])) + pipe.b[0] * pipe.init_noise[:1]
        row = _as_row(pipe.cond if cond is None else cond, pipe.device)
        for i in range(pipe.stages):
            m = pipe.den(x, pipe.timesteps[i:i + 1], row).float()
            denoised = pipe.c_out[i] * (pipe.x_coef[i] * x + pipe.m_coef[i] * m) + pipe.c_skip[i] * x
            if i + 1 < pipe.stages:
                x = pipe.a[i + 1] * denoised + pipe.b[i + 1] * pipe.init_noise[i + 1:i + 2]
        return pipe.decode(denoised)
