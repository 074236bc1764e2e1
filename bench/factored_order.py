"""One factored SVF product ``(x Vhᵀ ⊙ σz) Uᵀ`` four ways, by number of rows.

    python -m bench.factored_order [--repeats 5] [--layers 60] [--threads 2]

* x-first: MKL's sgemm on the plain factors, which packs each factor on every call;
* weight-first: the same sums as ``(U (σz ⊙ Vh xᵀ))ᵀ``, the big factor as left operand;
* MKL prepacked: x-first on factors MKL packed beforehand for exactly this row count
  (``torch.ops.mkl._mkl_linear``, where this torch has it);
* oneDNN packed: x-first on factors packed once for oneDNN (`gesal_core.prepacked`, what
  `SVFLinear` serves with on a CPU), one packing used at every row count.

On the bundled model's MLP shapes (gate/up: 576 -> 1536, down: 1536 -> 576, rank 576)
with random factors, looping over ``--layers`` distinct factor pairs so that they stream
from memory as in the model (one pair fits in cache, 60 do not). Rows: 1 is one answer's
decode step, 8 to 48 batches, 64 and 144 prefills.

Results go to ``factored_order.json`` on one thread, otherwise to
``factored_order_<N>threads.json``.
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import apply_threads, base_args, median, report
from gesal_core import prepacked

SHAPES = {"gate/up 576->1536": (576, 1536), "down 1536->576": (1536, 576)}
RANK = 576


def _prepacked(weights: list[torch.Tensor], rows: int) -> list[torch.Tensor] | None:
    mkl = getattr(torch.ops, "mkl", None)
    if mkl is None or not torch.backends.mkl.is_available():
        return None
    try:
        return [mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
    except (RuntimeError, AttributeError):
        return None


def x_first(Vh: list, U: list, x: torch.Tensor, scale: torch.Tensor) -> None:
    n = x.shape[0]
    for vh, u in zip(Vh, U, strict=True):
        F.linear(F.linear(x, vh) * scale.view(n, 1, -1), u)


def weight_first(Vh: list, U: list, x: torch.Tensor, scale: torch.Tensor) -> None:
    rows = x.reshape(x.shape[0], -1).t()
    for vh, u in zip(Vh, U, strict=True):
        (u @ ((vh @ rows) * scale.t())).t().contiguous()


def x_first_prepacked(
    Vh: list, U: list, x: torch.Tensor, scale: torch.Tensor, pv: list, pu: list
) -> None:
    n, mkl = x.shape[0], torch.ops.mkl
    for vh, u, a, b in zip(Vh, U, pv, pu, strict=True):
        h = mkl._mkl_linear(x.reshape(n, -1), a, vh, None, n) * scale
        mkl._mkl_linear(h, b, u, None, n)


def x_first_onednn(x: torch.Tensor, scale: torch.Tensor, pv: list, pu: list) -> None:
    for a, b in zip(pv, pu, strict=True):
        prepacked.linear(prepacked.linear(x, a) * scale.view(x.shape[0], 1, -1), b)


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__, repeats=5)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--sizes", default="1,2,4,8,16,32,48,64,144")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    layers = 4 if args.quick else args.layers
    sizes = [1, 8] if args.quick else [int(s) for s in args.sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    rows, raw = [], {}
    for shape, (d_in, d_out) in SHAPES.items():
        Vh = [torch.randn(RANK, d_in, generator=g) for _ in range(layers)]
        U = [torch.randn(d_out, RANK, generator=g) for _ in range(layers)]
        S = torch.rand(RANK, generator=g) + 0.5
        onednn = None
        if prepacked.supported(U[0]):
            onednn = ([prepacked.pack(w) for w in Vh], [prepacked.pack(w) for w in U])
        for n in sizes:
            x = torch.randn(n, 1, d_in, generator=g)
            scale = S * (1 + 0.1 * torch.randn(n, RANK, generator=g))  # a z per row
            packed = (_prepacked(Vh, n), _prepacked(U, n))

            args_ = (Vh, U, x, scale)
            variants = {
                "x-first": partial(x_first, *args_),
                "weight-first": partial(weight_first, *args_),
            }
            if packed[0] is not None and packed[1] is not None:
                variants["MKL prepacked"] = partial(x_first_prepacked, *args_, *packed)
            if onednn is not None:
                variants["oneDNN packed"] = partial(x_first_onednn, x, scale, *onednn)
            times = {name: [] for name in variants}
            for fn in variants.values():
                fn()  # warm-up
            for _ in range(args.repeats):  # interleaved: each round sees the same noise
                for name, fn in variants.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) / layers * 1e3)
            m = {name: median(v) for name, v in times.items()}
            raw[f"{shape}, {n} rows"] = times
            rows.append(
                {
                    "shape": shape,
                    "rows": n,
                    **{f"{name} ms/layer": v for name, v in m.items()},
                    "weight-first speed-up": m["x-first"] / m["weight-first"],
                    **{
                        f"{name} speed-up": m["x-first"] / m[name]
                        for name in ("MKL prepacked", "oneDNN packed")
                        if name in m
                    },
                }
            )
    name = "factored_order"
    threads = torch.get_num_threads()
    if threads != 1 and not args.quick:  # 2: the bot's own setting on a 2-core host
        name += f"_{threads}threads"
    report(
        name,
        rows,
        {
            "dtype": "torch.float32",
            "rank": RANK,
            "layers": layers,
            "repeats": args.repeats,
            "times_ms_per_layer": raw,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
