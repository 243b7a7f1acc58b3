"""The static kernel profile (sm_90, sm_80) and its roofline estimate, regenerated in one command, no GPU.

    python -m diffrt.bench.static_profile [--date YYYYMMDD] [--suffix=-before] [--arch 90,80] [--render-only]

1. compiles every variant of :mod:`diffrt.kernels.compile_check` (realistic calls of every model family,
   as Triton's JIT compiles them) for each arch and writes
   ``bench/results/static-sm<arch>-<date>-kernels<suffix>.json`` ({topic, arch, stamp, rows, failures});
2. writes the roofline ESTIMATE (:mod:`diffrt.bench.roofline`) from the sm_90 profile:
   ``bench/results/static-sm90-<date>-roofline-estimate<suffix>.{json,md}``;
3. rewrites the section of bench/README.md between the ``static-kernels`` markers: one table per
   arch and the estimate.

``--render-only`` skips the compile and renders the existing JSONs. Run it with TRITON_INTERPRET
unset; the full set takes about 10 minutes per arch on 2 busy cores (compiles are cached in memory
per specialization, and Triton's disk cache goes to a temporary folder).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from diffrt.kernels import compile_check

from . import harness, roofline

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- static-kernels:begin -->", "<!-- static-kernels:end -->"
METRICS = ("registers", "stack_bytes", "shared_bytes", "wgmma", "mma", "cp_async", "tma_loads", "global_loads",
           "loop_sync_loads", "stages", "loop_instructions")


def profile_path(arch: int, date: str, suffix: str = "") -> Path:
    return RESULTS / f"static-sm{arch}-{date}-kernels{suffix}.json"


def kernel_sources() -> dict[str, str]:
    """sha256 (16 hex digits) of each kernel source compiled: which kernel the numbers belong to."""
    from diffrt.kernels import attention_triton, int8_triton  # noqa: PLC0415

    return {Path(module.__file__).name: hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]
            for module in (attention_triton, int8_triton)}


def write_profile(arch: int, date: str, suffix: str = "") -> Path:
    """Compile the full variant set for sm_<arch> and write its JSON; returns the path."""
    rows, failures = compile_check.run((arch,))
    document = {"topic": "static-kernels", "arch": arch, "stamp": harness.environment_stamp("cpu"),
                "kernel_sources": kernel_sources(), "rows": rows, "failures": failures}
    path = profile_path(arch, date, suffix)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return path


def _widths(counts: dict) -> str:
    return " ".join(f"{count}x{width}B" for width, count in counts.items()) or "-"


def _label(row: dict) -> str:
    call = row["call"]
    if row["kernel"] == "int8":
        extras = ["smooth" if call.get("smooth") else "", call.get("act") or "", "int32 out" if call.get("out") else ""]
        return " ".join(["int8", row["case"], *filter(None, extras)])
    mode = "sparse" if call.get("sparse") else f"todo-{call['todo']}" if call.get("todo") else "dense"
    return f"{row['case']} hd{call['head_dim']} {mode}"


def _key(row: dict) -> tuple:
    return _label(row), tuple(json.dumps(row[metric]) for metric in METRICS)


def table(document: dict) -> str:
    """One Markdown row per variant (a bf16 row folded into its fp16 twin where every metric is the same)."""
    rows = document["rows"]
    fp16 = {_key(row) for row in rows if row["dtype"] == "float16"}
    bf16 = {_key(row) for row in rows if row["dtype"] == "bfloat16"}
    lines = ["| variant | dtype | regs | stack B | smem KB / limit | wgmma / mma | cp.async | TMA | sync loads | "
             "sync loads in loop | stages | loop ins |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for row in rows:
        if row["dtype"] == "bfloat16" and _key(row) in fp16:
            continue
        dtype = "float16 / bfloat16" if row["dtype"] == "float16" and _key(row) in bf16 else row["dtype"]
        over = "" if row["shared_fits"] else " **over**"
        lines.append(f"| {_label(row)} | {dtype} | {row['registers']} | {row['stack_bytes']} | "
                     f"{row['shared_bytes'] / 1024:.1f} / {row['shared_limit'] / 1024:.0f}{over} | "
                     f"{row['wgmma']} / {row['mma']} | {_widths(row['cp_async_bytes'])} | {row['tma_loads']} | "
                     f"{_widths(row['global_loads'])} | {_widths(row['loop_sync_loads'])} | {row['stages']} | "
                     f"{row['loop_instructions']} |")
    for failure in document["failures"]:
        lines.append(f"| {_label(failure)} | {failure['dtype']} | compile failed: {failure['error'][:120]} |"
                     + " |" * 9)
    return "\n".join(lines)


def section(documents: dict[int, dict], estimate_md: str, date: str, suffix: str) -> str:
    """The README section: how to regenerate, one table per arch, the estimate."""
    triton = next(iter(documents.values()))["stamp"].get("triton")
    parts = [BEGIN, "", f"## Static kernel profile ({date}{suffix}, Triton {triton}, compiled as the JIT does; no GPU)",
             "", "Regenerate the JSONs, the estimate and this section in one command (TRITON_INTERPRET unset):", "",
             "```bash", f"python -m diffrt.bench.static_profile --date {date}", "```", "",
             "Each kernel variant is a real call of a model family's layer, compiled through Triton's own argument "
             "binding (`python -m diffrt.kernels.compile_check`): registers and stack per thread, dynamic shared "
             "memory against the arch's per-block limit, tensor-core instructions in the PTX, cp.async copies and "
             "synchronous global loads by width (count x bytes; in the whole kernel and in its main loop), pipeline "
             "stages (1: the loads are not pipelined), "
             "SASS instructions per iteration of the main loop. The CI gate over these numbers is "
             "`tests/test_kernel_gate.py`."]
    for arch, document in sorted(documents.items(), reverse=True):
        parts += ["", f"<details><summary>sm_{arch}: {len(document['rows'])} variants, "
                      f"{len(document['failures'])} compile failures "
                      f"(bench/results/{profile_path(arch, date, suffix).name})</summary>", "", table(document), "",
                  "</details>"]
    parts += ["", "### Roofline estimate per model family (ESTIMATE, from the sm_90 profile)", "", estimate_md, END]
    return "\n".join(parts)


def latest_date() -> str | None:
    """The date of the newest recorded sm_90 profile (no suffix), None when there is none."""
    dates = sorted(re.findall(r"static-sm90-(\d{8})-kernels\.json", " ".join(p.name for p in RESULTS.iterdir())))
    return dates[-1] if dates else None


def build(date: str, suffix: str, archs: tuple[int, ...]) -> tuple[dict, str, str]:
    """(the estimate, its Markdown, the README section) from the recorded JSONs of ``archs``."""
    documents = {arch: json.loads(profile_path(arch, date, suffix).read_text()) for arch in archs}
    if 90 not in documents:
        raise SystemExit("the roofline estimate needs the sm_90 profile: include 90 in --arch")
    estimates = roofline.estimate(documents[90]["rows"])
    estimate_md = roofline.markdown(estimates)
    return estimates, estimate_md, section(documents, estimate_md, date, suffix)


def render(date: str, suffix: str, archs: tuple[int, ...]) -> None:
    """Write the estimate from the sm_90 JSON and the README section from every arch's JSON."""
    estimates, estimate_md, new = build(date, suffix, archs)
    stem = RESULTS / f"static-sm90-{date}-roofline-estimate{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(estimates, indent=1) + "\n")
    stem.with_suffix(".md").write_text(estimate_md)
    text = README.read_text()
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: new, text, flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    README.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrt.bench.static_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--date", default=_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d"))
    parser.add_argument("--suffix", default="", help="appended to the file names, e.g. -before")
    parser.add_argument("--arch", default="90,80", help="comma-separated compute capabilities x 10 (90 is needed)")
    parser.add_argument("--render-only", action="store_true", help="render the existing JSONs, compile nothing")
    args = parser.parse_args(argv)
    archs = tuple(int(arch) for arch in args.arch.split(","))
    if not args.render_only:
        os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="diffrt-static-profile-"))
        for arch in archs:
            print(f"wrote {write_profile(arch, args.date, args.suffix)}", flush=True)
    render(args.date, args.suffix, archs)
    print(f"wrote the roofline estimate and the README section ({README})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
