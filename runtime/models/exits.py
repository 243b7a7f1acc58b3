"""Layer early exit for the reference DiT (DeeDiff): exit heads, uncertainty heads, training, inference.

After every ``every`` blocks (not after the last: that is the full model) an exit has

* an output head: the DiT's final layer with its adaLN modulation shared (the trained one, frozen)
  and its own LayerNorm affine and output Linear (initialised from the final layer's), giving
  g_i [B, C, H, W]: about 1.5k parameters per exit, so the heads add little to the shipped weights;
* an uncertainty head u_i = sigmoid(w_i . [mean over tokens of h_i, c] + b_i) in (0, 1), trained to
  predict tanh(mean |g_i - f|), the exit's error against the full model f.

:func:`train_exit_heads` trains both with the backbone frozen (seeded; the DiT's own training
distribution: digits of the train split noised at uniform timesteps, labels dropped to the null class
with p = 0.1): loss = sum_i mean (g_i - f)^2 + sum_i mean (u_i - tanh(mean |g_i - f|))^2.

Inference (:class:`~diffrt.runtime.early_exit.EarlyExitModel`: ``Sampler(..., early_exit=threshold)`` puts
an :class:`~diffrt.runtime.early_exit.ExitState` in the call context, and the DiT's forward hands the call
to :meth:`ExitHeads.exiting_forward`): the batch runs block by block;
at each exit the rows whose uncertainty is below ``threshold`` take that exit's prediction and leave,
the others run on as a compacted batch (``early_exit_scope="batch"``: the whole batch stops at the
first exit where every row is below it). The decisions stay on the device and the host plans the
compacted batches from earlier calls (:mod:`diffrt.runtime.early_exit`); ``threshold`` 0 never exits
(u > 0), so it is the full model. The ExitState counts the blocks run per row.

Train and ship the heads with ``python -m diffrt.runtime.models.train --model digits-dit-exits``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..early_exit import ExitState
from ..graphs import GraphRunner, pad_rows
from .dit import DigitsDiT

log = logging.getLogger(__name__)

class ExitHeads(nn.Module):
    """Output and uncertainty heads after blocks ``every``, ``2 every``, ... of a :class:`DigitsDiT`."""

    def __init__(self, dit: DigitsDiT, every: int = 1):
        super().__init__()
        dim = dit.config["hidden_size"]
        self.depths = list(range(every, dit.num_blocks, every))
        if not self.depths:
            raise ValueError(f"every={every} leaves no exit before the last of {dit.num_blocks} blocks")
        self.every = every
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in self.depths)
        self.outputs = nn.ModuleList(copy.deepcopy(dit.final_layer.linear) for _ in self.depths)
        self.uncertainty = nn.ModuleList(nn.Linear(2 * dim, 1) for _ in self.depths)

    def predict(self, dit: DigitsDiT, index: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Exit ``index``'s prediction [B, C, H, W] from tokens h [B, L, D] (the final layer's modulation)."""
        shift, scale = dit.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        normed = self.norms[index](h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return dit.unpatchify(self.outputs[index](normed))

    def uncertainty_of(self, index: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.uncertainty[index](torch.cat([h.mean(dim=1), c], dim=1))).squeeze(1)

    def exiting_forward(self, dit: DigitsDiT, state: ExitState, x, t, y) -> torch.Tensor:
        """The DiT's forward while early exit is on (``dit.forward`` calls it): :func:`exiting_forward`."""
        return exiting_forward(dit, state, x, t, y)


def forward_exits(dit: DigitsDiT, heads: ExitHeads, x, t, y) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(exit predictions, exit uncertainties, the full prediction) of one batch (training, evaluation)."""
    h, c = dit.embed(x, t, y)
    outputs, uncertainties = [], []
    for depth, block in enumerate(dit.blocks, start=1):
        h = block(h, c)
        if depth in heads.depths:
            index = heads.depths.index(depth)
            outputs.append(heads.predict(dit, index, h, c))
            uncertainties.append(heads.uncertainty_of(index, h, c))
    return outputs, uncertainties, dit.readout(h, c)


class ExitSegments:
    """The DiT cut at its exits: segment k runs blocks (d_{k-1}, d_k] and returns the tokens and exit k's
    uncertainty (with ``graphs``, also exit k's prediction for every row, so that the decision between
    segments is the only host step); the last segment runs the remaining blocks and the final layer.

    With ``graphs`` each segment is a :class:`~diffrt.runtime.graphs.GraphRunner` (CUDA graphs on CUDA
    tensors, eager elsewhere) and compacted batches are padded to the next power of two, so a batch of
    B rows captures at most log2(B) + 1 buckets per segment.
    """

    def __init__(self, dit: DigitsDiT, heads: "ExitHeads", graphs: bool = False):
        self.dit, self.heads, self.graphs = dit, heads, graphs
        self.bounds = [0, *heads.depths, dit.num_blocks]
        functions = [self._exit_segment(k) for k in range(len(heads.depths))] + [self._last_segment]
        if graphs:
            functions = [GraphRunner(f) for f in functions]
        self.functions = functions

    def _blocks(self, k: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.dit.blocks[self.bounds[k]:self.bounds[k + 1]]:
            h = block(h, c)
        return h

    def _exit_segment(self, k: int):
        def segment(h, c):
            h = self._blocks(k, h, c)
            u = self.heads.uncertainty_of(k, h, c)
            return (h, u, self.heads.predict(self.dit, k, h, c)) if self.graphs else (h, u)
        segment.__name__ = f"exit_segment_{k}"
        return segment

    def _last_segment(self, h, c):
        return self.dit.readout(self._blocks(len(self.heads.depths), h, c), c)

    def run(self, k: int, h: torch.Tensor, c: torch.Tensor):
        """Segment ``k`` on rows h [n, L, D], c [n, D] (padded to the graph bucket and cut back)."""
        if not self.graphs:
            return self.functions[k](h, c)
        (h, c), n = pad_rows((h, c))
        outputs = self.functions[k](h, c)
        if torch.is_tensor(outputs):
            return outputs[:n]
        return tuple(o[:n] for o in outputs)


def exit_segments(dit: DigitsDiT, graphs: bool) -> ExitSegments:
    """The DiT's :class:`ExitSegments` (kept with its heads, so graphs are captured once)."""
    heads = dit.exit_heads
    cache = heads.__dict__.setdefault("_segments", {})
    if graphs not in cache:
        cache[graphs] = ExitSegments(dit, heads, graphs)
    return cache[graphs]


def exiting_forward(dit: DigitsDiT, state: ExitState, x, t, y) -> torch.Tensor:
    """The DiT's forward stopping at the first confident exit (module docstring): per sample (the rows
    that are confident leave, the rest run on compacted) or for the whole batch at once. Segments
    between exits run as CUDA graphs when ``state.graphs``; no host read decides between them."""
    from diffrt.export import quant  # noqa: PLC0415 - INT8 groups follow the compacted rows

    heads = dit.exit_heads
    segments = exit_segments(dit, state.graphs)
    with contextlib.ExitStack() as narrowed:  # INT8 per-sample groups narrowed with the rows; restored on the way out
        return _exit_loop(dit, heads, segments, state, *dit.embed(x, t, y), quant, narrowed)


def _exit_loop(dit, heads, segments, state, h, c, quant, narrowed: contextlib.ExitStack) -> torch.Tensor:
    """The exit loop without host syncs (:mod:`diffrt.runtime.early_exit`): at exit k the device marks the
    rows that are confident (``finished``: their output is that exit's prediction), the host keeps
    ``plan[k]`` rows running, the unfinished ones first and the most uncertain of them first; rows
    leaving unfinished take exit k's prediction too."""
    batch, exits = h.shape[0], len(heads.depths)
    rows = torch.arange(batch, device=h.device)  # the rows still running, into the output
    done = torch.zeros(batch, dtype=torch.bool, device=h.device)  # of the running rows: output already fixed
    unfinished = torch.zeros(exits, dtype=torch.int64, device=h.device)  # per exit, for the next calls' plans
    let_go = torch.zeros((), device=h.device)  # rows sent away unfinished earlier, expected still unfinished here
    plan = None if state.synchronous else state.plan(batch, exits)
    out: torch.Tensor | None = None
    state.begin(batch, dit.num_blocks)
    for index, depth in enumerate(heads.depths):
        running = rows.shape[0]
        h, u, *predicted = segments.run(index, h, c)
        confident = u < state.threshold
        if not state.per_sample:
            confident = confident.all().expand(running)
        finished = done | confident
        left = (~finished).sum()
        # rows let go unfinished are expected to stay unfinished as often as the running ones did at this exit
        let_go = let_go * left / (~done).sum().clamp_min(1)
        unfinished[index] = left + let_go.round().long()  # (not counting them would ratchet the plans down)
        keep = int(left) if plan is None else min(plan[index], running)  # int(left): the synchronous mode's read
        prediction = predicted[0] if predicted else heads.predict(dit, index, h, c)
        if out is None:
            out = prediction.new_zeros((batch, *prediction.shape[1:]))
        # the unfinished rows first, the most uncertain first: the plan keeps those
        order = torch.argsort(torch.where(finished, -1.0, u.float()), descending=True, stable=True)
        staying, leaving = order[:keep], order[keep:]
        take = (finished & ~done).index_fill(0, leaving, True) & ~done  # newly finished, or sent away unfinished
        if keep < running:
            forced = (~finished).index_select(0, leaving).sum()
            let_go = let_go + forced
            state.let_go(forced)
        out.index_copy_(0, rows, torch.where(take.view(-1, *([1] * (out.dim() - 1))), prediction, out.index_select(0, rows)))
        state.count(depth, running - keep)
        if keep == 0:
            state.observe(unfinished, batch)
            return out
        if keep < running:
            h, c, rows = h.index_select(0, staying), c.index_select(0, staying), rows.index_select(0, staying)
            finished = finished.index_select(0, staying)
            narrowed.enter_context(quant.keep_samples(staying))
        done = finished
    final = segments.run(exits, h, c)
    state.count(dit.num_blocks, rows.shape[0])
    state.observe(unfinished, batch)
    return out.index_copy_(0, rows, torch.where(done.view(-1, *([1] * (out.dim() - 1))), out.index_select(0, rows), final))


def train_exit_heads(dit: DigitsDiT, schedule, every: int = 1, steps: int = 1500, batch_size: int = 64,
                     lr: float = 1e-3, seed: int = 0, progress: bool = True) -> tuple[ExitHeads, dict[str, Any]]:
    """Train exit heads on a frozen ``dit`` (module docstring); returns the heads and a training record."""
    from .digits import load_digits  # noqa: PLC0415

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    dit = dit.eval().requires_grad_(False)
    heads = ExitHeads(dit, every).float().train()
    images, labels = load_digits("train")
    abar = schedule.alphas_cumprod.float()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    start, loss_ema = time.perf_counter(), None
    for step in tqdm(range(steps), desc="exit heads", unit="step", disable=not progress, mininterval=5.0):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0, y = images[index], labels[index]
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        y = torch.where(torch.rand(batch_size, generator=generator) < 0.1, torch.full_like(y, dit.null_class), y)
        with torch.no_grad():
            h, c = dit.embed(x_t, t.float(), y)
            hidden = []
            for depth, block in enumerate(dit.blocks, start=1):
                h = block(h, c)
                if depth in heads.depths:
                    hidden.append(h)
            full = dit.readout(h, c)
        loss = torch.zeros(())
        for i, h_i in enumerate(hidden):
            g = heads.predict(dit, i, h_i, c)
            error = (g - full).abs().mean(dim=(1, 2, 3))
            loss = loss + F.mse_loss(g, full) + F.mse_loss(heads.uncertainty_of(i, h_i, c), torch.tanh(error.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
    heads.eval().requires_grad_(False)
    record = {"every": every, "depths": heads.depths, "steps": steps, "batch_size": batch_size, "lr": lr,
              "seed": seed, "final_loss": round(loss_ema or 0.0, 6), "wall_time_s": round(time.perf_counter() - start, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "objective": "sum_i MSE(g_i, f) + MSE(u_i, tanh(mean|g_i - f|)), backbone frozen"}
    log.info("exit heads: depths %s, final loss %.5f", heads.depths, record["final_loss"])
    return heads, record


EXITS_FILE = "digits-dit-exits.safetensors"


def save_exit_heads(heads: ExitHeads, record: dict[str, Any], weights_dir) -> None:
    """``<weights_dir>/digits-dit-exits.safetensors`` and the record under "exit_heads" in digits-dit.json."""
    import json  # noqa: PLC0415

    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(weights_dir)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(folder / EXITS_FILE),
              metadata={"every": str(heads.every)})
    card_path = folder / "digits-dit.json"
    card = json.loads(card_path.read_text())
    card["exit_heads"] = {**record, "file": EXITS_FILE, "parameters": sum(p.numel() for p in heads.parameters())}
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def load_exit_heads(dit: DigitsDiT, weights_dir) -> ExitHeads | None:
    """The shipped heads for ``dit`` (None when the file is absent), on the DiT's device and dtype."""
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(weights_dir) / EXITS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        every = int(handle.metadata()["every"])
    heads = ExitHeads(dit, every)
    heads.load_state_dict(load_file(str(path)))
    first = next(dit.parameters())
    return heads.to(first.device, first.dtype).eval().requires_grad_(False)
